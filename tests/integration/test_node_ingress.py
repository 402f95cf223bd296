"""The running node driven by real dcmtk programs: push, assemble, select; echo; allow-lists; kill -9."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from scp.index import InstanceIndex
from tests.conftest import require_tool
from tests.support.node import NodeProcess
from tests.support.synthetic_ct import write_ct_series, write_localizer

pytestmark = pytest.mark.integration

STUDY = "1.2.826.0.1.3680043.8.498.1001"


def _multi_series_study(root: Path) -> dict[str, list[Path]]:
    """A localizer, a bone-kernel and a soft-tissue axial series of one study."""
    common = dict(study_uid=STUDY, frame_uid="1.2.826.0.1.3680043.8.498.1002", n_slices=24, rows=48, cols=48)
    return {
        "localizer": [write_localizer(root / "loc", study_uid=STUDY, series_uid="1.2.826.0.1.3680043.8.498.1100")],
        "bone": write_ct_series(
            root / "bone", series_uid="1.2.826.0.1.3680043.8.498.1200", series_number=3, kernel="BONE",
            description="Thigh 2.0 bone", seed=2, **common,
        ),
        "soft": write_ct_series(
            root / "soft", series_uid="1.2.826.0.1.3680043.8.498.1300", series_number=2, kernel="STANDARD",
            description="Thigh 2.0 soft tissue", seed=3, **common,
        ),
    }


def _storescu(port: int, files: list[Path], calling: str = "CTSCANNER", called: str = "THIGHNODE") -> subprocess.CompletedProcess:
    storescu = require_tool("storescu")
    return subprocess.run(
        [storescu, "-aet", calling, "-aec", called, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, timeout=120,
    )


def test_pushed_study_is_assembled_and_the_soft_tissue_series_selected(tmp_path: Path) -> None:
    series = _multi_series_study(tmp_path / "in")
    files = [p for paths in series.values() for p in paths]
    with NodeProcess(tmp_path) as node:
        done = _storescu(node.port, files)
        assert done.returncode == 0, done.stderr
        status = node.wait_for(
            lambda s: any(j["state"] in ("done", "declined", "failed") for j in s["jobs"]),
            what="the study's job to finish",
        )
    (job,) = status["jobs"]
    assert job["state"] == "done", job
    assert job["study_uid"] == STUDY
    assert job["series_uid"] == "1.2.826.0.1.3680043.8.498.1300"
    (study,) = status["studies"]
    assert study["instances"] == len(files)
    assert set(job["timings_s"]) >= {"select", "load", "total"}


def test_echo_answers_and_allow_lists_refuse_strangers(tmp_path: Path) -> None:
    echoscu = require_tool("echoscu")
    extra = '[security]\nallowed_calling_aets = ["CTSCANNER"]\nallowed_peers = ["127.0.0.0/8"]\n'
    with NodeProcess(tmp_path, extra_config=extra) as node:
        ok = subprocess.run([echoscu, "-aet", "CTSCANNER", "-aec", "THIGHNODE", "127.0.0.1", str(node.port)],
                            capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stderr
        stranger = subprocess.run([echoscu, "-aet", "INTRUDER", "-aec", "THIGHNODE", "127.0.0.1", str(node.port)],
                                  capture_output=True, text=True, timeout=60)
        assert stranger.returncode != 0
        assert "reject" in (stranger.stdout + stranger.stderr).lower()
        wrong_called = subprocess.run([echoscu, "-aet", "CTSCANNER", "-aec", "OTHER", "127.0.0.1", str(node.port)],
                                      capture_output=True, text=True, timeout=60)
        assert wrong_called.returncode != 0
        log = node.log()
    assert "INTRUDER" in log  # the rejection is logged with the AE title


def _send_one_by_one(port: int, files: list[Path], acknowledged: list[str], stop: threading.Event) -> None:
    """A scanner that sends instance by instance, remembering each Success it got."""
    ae = AE(ae_title="CTSCANNER")
    ae.add_requested_context(CTImageStorage, [pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="THIGHNODE")
    if not assoc.is_established:
        return
    try:
        for path in files:
            if stop.is_set():
                break
            ds = pydicom.dcmread(path)
            try:
                status = assoc.send_c_store(ds)
            except Exception:  # noqa: BLE001 - the node was killed under us
                break
            if status and status.Status == 0x0000:
                acknowledged.append(ds.SOPInstanceUID)
            else:
                break
            time.sleep(0.02)
    finally:
        if assoc.is_established:
            assoc.release()


def test_kill_9_while_receiving_loses_no_acknowledged_instance_and_the_job_finishes_once(tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "in", n_slices=120, rows=64, cols=64, study_uid=STUDY, seed=7)
    # A quiet period long enough that the partial study is not processed between restart and re-send.
    node = NodeProcess(tmp_path, quiet_period_s=8.0).start()
    acknowledged: list[str] = []
    stop = threading.Event()
    sender = threading.Thread(target=_send_one_by_one, args=(node.port, files, acknowledged, stop))
    sender.start()
    try:
        deadline = time.monotonic() + 60
        while len(acknowledged) < 30 and time.monotonic() < deadline and sender.is_alive():
            time.sleep(0.01)
        node.kill9()
        sender.join(timeout=60)
        assert 30 <= len(acknowledged) < len(files)

        # Every instance the scanner saw acknowledged is on disk, intact and indexed.
        index = InstanceIndex(node.data_dir / "thighnode.db")
        try:
            indexed = {i.sop_instance_uid: i for i in index.instances(STUDY)}
        finally:
            index.close()
        for uid in acknowledged:
            assert uid in indexed, f"acknowledged {uid} is not indexed"
            assert pydicom.dcmread(indexed[uid].path).SOPInstanceUID == uid

        # Restart; the scanner re-sends the whole series (duplicates are acknowledged, stored once).
        node.start()
        done = _storescu(node.port, files)
        assert done.returncode == 0, done.stderr
        status = node.wait_for(
            lambda s: any(j["state"] == "done" for j in s["jobs"]), what="the job to finish after restart"
        )
        node.stop()
    finally:
        stop.set()
        node.kill9()
    (study,) = status["studies"]
    assert study["instances"] == len(files)
    done_jobs = [j for j in status["jobs"] if j["state"] == "done"]
    assert len(done_jobs) == 1, status["jobs"]
    assert all(j["state"] in ("done",) for j in status["jobs"]), status["jobs"]
