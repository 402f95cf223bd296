"""thighnode.compute without a broker: the [compute] settings, a worker's JobRunner on a real job store (a
delivery for a job already ended is a no-op; a task for another data directory is refused), and the node
putting a job back to ready when the broker cannot be reached. The broker itself: tests/integration/
test_celery_workers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from scp.index import InstanceIndex
from tests.support.dicom_cases import SHAPE, SPACING_MM, thigh_arrays
from tests.support.ports import free_port
from tests.support.synthetic_ct import write_ct_series
from tests.thighnode.test_workflow import _index_series
from thighnode.compute import CeleryDispatcher, ComputeError, JobRunner
from thighnode.jobs import DONE, READY, RUNNING, JobStore, StudyProgress
from thighnode.node import Node
from thighnode.settings import ConfigError, load_settings

STUDY = "1.2.826.0.1.3680043.8.498.26901"


def _env(tmp_path: Path, **compute: str) -> dict[str, str]:
    env = {"THIGHNODE_HOME": str(tmp_path)}
    env.update({f"THIGHNODE_COMPUTE__{k.upper()}": v for k, v in compute.items()})
    return env


def test_compute_defaults_to_the_local_backend_and_refuses_unknown_values(tmp_path: Path) -> None:
    compute = load_settings(environ=_env(tmp_path)).compute
    assert (compute.backend, compute.queue, compute.debug_task_delay_s) == ("local", "thighnode.jobs", 0.0)
    with pytest.raises(ConfigError, match=r"compute.backend = 'gpu'.*allowed.*local.*celery"):
        load_settings(environ=_env(tmp_path, backend='"gpu"'))
    with pytest.raises(ConfigError, match=r"compute.broker_url = 'redis://h:6379/0'.*amqp://"):
        load_settings(environ=_env(tmp_path, broker_url='"redis://h:6379/0"'))


@pytest.fixture
def claimed(tmp_path: Path):  # noqa: ANN201
    """A real CT study in the index and its job claimed (running), as the node leaves it for a worker."""
    settings = load_settings(environ=_env(tmp_path, backend='"celery"'))
    hu, _ = thigh_arrays(3)
    files = write_ct_series(
        tmp_path / "ct", n_slices=SHAPE[0], rows=SHAPE[1], cols=SHAPE[2], pixel_spacing=(SPACING_MM, SPACING_MM),
        slice_spacing=SPACING_MM, origin=(-80.0, -56.0, 0.0), study_uid=STUDY, hu=hu, seed=3,
    )
    index = InstanceIndex(settings.db_path)
    _index_series(index, files, STUDY)
    jobs = JobStore(settings.db_path)
    jobs.sync([StudyProgress(STUDY, 0.0)], now=100.0, quiet_period_s=1)
    job = jobs.claim_next()
    assert job is not None and job.state == RUNNING
    yield settings, jobs, job
    jobs.close()
    index.close()


def test_a_worker_runs_a_running_job_once_and_a_redelivery_after_it_ended_does_nothing(claimed) -> None:  # noqa: ANN001
    settings, jobs, job = claimed
    runner = JobRunner(settings, lambda _s: None)  # no model: the job ends after select and load
    runner.open()
    try:
        first = runner.run(job.id, STUDY, str(settings.node.data_dir), worker="w0@test")
        events = jobs.events(job.id)
        again = runner.run(job.id, STUDY, str(settings.node.data_dir), worker="w1@test", redelivered=True)
    finally:
        runner.close()
    assert first == {"job_id": job.id, "state": DONE, "ran": True}
    ended = jobs.get(job.id)
    assert ended.state == DONE and "segmentation is off" in ended.reason
    assert ended.timings_s["load"] >= 0 and ended.result["volume"]["shape"] == list(SHAPE)
    assert again == {"job_id": job.id, "state": DONE, "ran": False}
    assert jobs.events(job.id) == events  # nothing recorded twice
    assert [e.to_state for e in events] == ["received", "ready", "running", "done"]


def test_a_task_for_another_data_directory_is_refused(claimed, tmp_path: Path) -> None:  # noqa: ANN001
    settings, jobs, job = claimed
    runner = JobRunner(settings, lambda _s: None)
    runner.open()
    try:
        with pytest.raises(ComputeError, match=r"data directory is /elsewhere, this worker's is .*same \[node\] data_dir"):
            runner.run(job.id, STUDY, "/elsewhere")
    finally:
        runner.close()
    assert jobs.get(job.id).state == RUNNING


def test_the_node_puts_a_job_back_to_ready_when_the_broker_is_unreachable(tmp_path: Path) -> None:
    closed = free_port()  # nothing listens there
    settings = load_settings(environ=_env(
        tmp_path, backend='"celery"', broker_url=f'"amqp://guest:guest@127.0.0.1:{closed}//"'))
    node = Node(settings, load_model=False)
    node.jobs = JobStore(settings.db_path)
    dispatcher = CeleryDispatcher(settings)
    try:
        node.jobs.sync([StudyProgress(STUDY, 0.0)], now=100.0, quiet_period_s=1)
        node._dispatch(dispatcher)
        job = node.jobs.jobs(study_uid=STUDY)[0]
        events = node.jobs.events(job.id)
    finally:
        dispatcher.close()
        node.jobs.close()
    assert job.state == READY
    assert [e.to_state for e in events] == ["received", "ready", "running", "ready"]
    assert events[-1].reason.startswith("not sent to the broker (")
