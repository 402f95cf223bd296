"""Issue 25, items 3 and 4, on real processes: a running node (and Orthanc as the PACS).

- Truncated-then-complete: the truncated first copy is refused (and listed by `thighnode status`),
  the complete copy is stored and the study is processed; a truncated copy already stored (by an older
  node) is replaced by the complete one and the declined study is processed again.
- PACS down past the retries, then up, then `thighnode resend`: delivered, and once (a second resend
  stores the same SOP Instance, not a second one).
- A study that kills the node each time it is processed is failed after max_job_attempts, and the
  node then stays up.
"""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from dicomout.outbox import Outbox
from scp.status import STATUS_PIXEL_DATA_LENGTH, STATUS_SUCCESS
from tests.support.node import NodeProcess
from tests.support.orthanc import OrthancServer
from tests.support.ports import free_port
from tests.support.synthetic_ct import write_ct_series

pytestmark = pytest.mark.integration

STUDY = "1.2.826.0.1.3680043.8.498.2501"
SERIES = STUDY + ".1"


def _series(root: Path, study: str = STUDY, n_slices: int = 22) -> list[Path]:
    return write_ct_series(root, study_uid=study, series_uid=study + ".1", frame_uid=study + ".2",
                           n_slices=n_slices, rows=32, cols=32, seed=4)


def _send(port: int, datasets: list[Dataset]) -> list[int]:
    ae = AE(ae_title="CTSCANNER")
    ae.add_requested_context(CTImageStorage, [str(datasets[0].file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title="THIGHNODE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def _final(status: dict) -> bool:
    return any(j["state"] in ("done", "declined", "failed") for j in status["jobs"])


def test_truncated_first_copy_is_refused_and_the_complete_copy_wins(tmp_path: Path) -> None:
    files = _series(tmp_path / "in")
    datasets = [pydicom.dcmread(p) for p in files]
    victim = pydicom.dcmread(files[5])
    victim.PixelData = victim.PixelData[: len(victim.PixelData) // 2]  # cut in half, lengths consistent
    with NodeProcess(tmp_path / "node", quiet_period_s=2.0) as node:
        statuses = _send(node.port, [victim] + datasets[:5])
        assert statuses == [STATUS_PIXEL_DATA_LENGTH] + [STATUS_SUCCESS] * 5
        statuses = _send(node.port, datasets[5:])  # the complete copy of the victim comes first here
        assert statuses == [STATUS_SUCCESS] * len(datasets[5:])
        status = node.wait_for(_final, what="the study's job to finish")
    [job] = status["jobs"]
    assert job["state"] == "done", job
    assert job["study_uid"] == STUDY
    [study] = status["studies"]
    assert study["instances"] == len(files)
    [refusal] = status["refusals"]["recent"]
    assert (refusal["status"], refusal["sop_instance_uid"], refusal["calling_ae"]) == (
        "0xC003", victim.SOPInstanceUID, "CTSCANNER")
    assert status["refusals"]["counts"] == {"0xC003": 1}


def test_a_truncated_copy_stored_by_an_older_node_is_repaired_by_sending_the_complete_copy(tmp_path: Path) -> None:
    """The issue's dead end: the study was declined ("cannot decode the pixel data") and no resend could
    repair it. A truncated copy already in the spool (stored before these checks) is replaced by the
    complete copy, and the study is processed again."""
    files = _series(tmp_path / "in")
    victim = pydicom.dcmread(files[5])
    truncated = pydicom.dcmread(files[5])
    truncated.PixelData = truncated.PixelData[: len(truncated.PixelData) // 2]
    node = NodeProcess(tmp_path / "node", quiet_period_s=1.0)
    spool = node.data_dir / "spool" / STUDY / SERIES
    spool.mkdir(parents=True)
    for path in files:  # what an older node stored: the start-up reconciliation indexes it
        ds = truncated if path == files[5] else pydicom.dcmread(path)
        ds.save_as(spool / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    with node:
        first = node.wait_for(_final, what="the job of the damaged study")
        [job] = first["jobs"]
        assert job["state"] == "declined" and "cannot decode the pixel data" in job["reason"], job
        assert _send(node.port, [victim]) == [STATUS_SUCCESS]
        status = node.wait_for(
            lambda s: len(s["jobs"]) == 2 and all(j["state"] in ("done", "declined", "failed") for j in s["jobs"]),
            what="the study to be processed again",
        )
    newest = max(status["jobs"], key=lambda j: j["job"])
    assert newest["state"] == "done", newest
    assert status["refusals"]["counts"] == {} and status["conflicts"] == []


def _wait(predicate, timeout_s: float, what: str):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_pacs_down_past_the_retries_then_up_then_resend_delivers_once(tmp_path: Path) -> None:
    pacs_port = free_port()
    extra = (f'[outbox]\nsend_interval_s = 0.5\nbase_delay_s = 0.5\nmax_delay_s = 1\nmax_age_days = 0.00003\n\n'
             f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs_port}\n')
    # write_config puts its own [outbox] first: give the keys once, in our table
    node = NodeProcess(tmp_path / "node", extra_config="")
    node.config.write_text(node.config.read_text().replace(
        "[outbox]\nsend_interval_s = 0.5\nbase_delay_s = 0.5\nmax_delay_s = 2\n", extra), encoding="utf-8")
    [result_file] = _series(tmp_path / "out", study="1.2.826.0.1.3680043.8.498.2502", n_slices=1)
    sop_uid = str(pydicom.dcmread(result_file, stop_before_pixels=True).SOPInstanceUID)
    with node:
        outbox = Outbox(node.data_dir / "thighnode.db")
        item_id = outbox.enqueue(result_file, "pacs", job_id=None, study_uid="1.2.826.0.1.3680043.8.498.2502",
                                 sop_class_uid=str(CTImageStorage), sop_instance_uid=sop_uid)
        failed = _wait(lambda: (i := outbox.get(item_id)) is not None and i.state == "failed" and i,
                       60, "the item to fail while the PACS is down")
        assert "max_age_s" in failed.last_error and failed.attempts >= 2
        with OrthancServer(tmp_path / "pacs", aet="PACS", dicom_port=pacs_port) as pacs:
            assert pacs.count_instances() == 0
            done = node.cli("resend", "--destination", "pacs", "--failed")
            assert done.returncode == 0, done.stderr
            assert f"item {item_id} -> pacs" in done.stdout
            again = node.cli("resend", "--destination", "pacs", "--failed")  # before the node sent it: a no-op
            assert "nothing to send again" in again.stdout
            _wait(lambda: outbox.get(item_id).state == "sent", 60, "the resent item to be delivered")  # type: ignore[union-attr]
            assert pacs.sop_instance_uids() == {sop_uid}
            first = outbox.get(item_id)
            assert first is not None and first.attempts == 1
            # an explicit resend of a delivered item stores the same SOP Instance again: still one in the PACS
            assert node.cli("resend", "--item", str(item_id)).returncode == 0
            _wait(lambda: (i := outbox.get(item_id)) is not None and i.state == "sent" and i.generation > first.generation,
                  60, "the second delivery")
            assert pacs.count_instances() == 1 and pacs.sop_instance_uids() == {sop_uid}


def test_a_study_that_kills_the_node_is_failed_after_max_job_attempts(tmp_path: Path) -> None:
    crash_study = "1.2.826.0.1.3680043.8.498.2503"
    files = [pydicom.dcmread(p) for p in _series(tmp_path / "in", study=crash_study)]
    node = NodeProcess(tmp_path / "node", quiet_period_s=0.5, module="tests.support.crashing_node",
                       extra_env={"TEST_CRASH_STUDY_UID": crash_study},
                       extra_config="[processing]\nmax_job_attempts = 2\n")
    try:
        node.start()
        assert _send(node.port, files) == [STATUS_SUCCESS] * len(files)
        for crash in range(2):
            assert node.proc is not None
            rc = node.proc.wait(timeout=120)  # the job kills the process
            assert rc == -9, node.log()[-3000:]
            node.proc = None
            node.start()
        # third start: the job was started twice and never finished -> failed, not run again
        status = node.wait_for(_final, what="the crashing job to be failed")
        [job] = status["jobs"]
        assert job["state"] == "failed" and job["attempts"] == 2
        assert job["reason"].startswith("crashed the node 2 times"), job["reason"]
        time.sleep(1.5)  # several scheduler ticks: the node stays up
        assert node.proc is not None and node.proc.poll() is None
    finally:
        node.stop()
