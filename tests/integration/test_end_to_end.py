"""Scanner → node → PACS with the shipped demonstration bundle: dcmtk storescu pushes a phantom thigh CT to a
real `thighnode serve`, which sends SEG + SR + PDF into the same study in a real Orthanc; a CT without femur
(the real TCIA series) is declined and nothing is sent; a PACS that refuses the Segmentation SOP class
yields a clear outbox error while the SR and PDF still arrive."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest

from modelkit.phantom import PhantomParams, generate_phantom, write_dicom_series
from tests.conftest import require_tool
from tests.support.dciodvfy import dciodvfy_errors
from tests.support.node import NodeProcess
from tests.support.orthanc import OrthancServer

pytestmark = pytest.mark.integration

STUDY = "1.2.826.0.1.3680043.8.498.66001"
BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "thighnode_demo"


def _push(port: int, files: list[Path]) -> None:
    storescu = require_tool("storescu")
    done = subprocess.run(
        [storescu, "-aet", "CTSCANNER", "-aec", "THIGHNODE", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr


def _finished(study_uid: str):  # noqa: ANN202
    def check(s: dict) -> bool:
        jobs = [j for j in s["jobs"] if j["study_uid"] == study_uid]
        return bool(jobs) and jobs[0]["state"] in ("done", "declined", "failed") and s["outbox_counts"].get("pending", 0) == 0

    return check


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    phantom = generate_phantom(PhantomParams(seed=12, sex="M", height_m=1.8, spacing_mm=(3.0, 2.0, 2.0)))
    return write_dicom_series(
        phantom, tmp_path_factory.mktemp("e2e") / "ct", patient_id="TN-E2E-1", patient_name="End^ToEnd",
        patient_sex="M", birth_date="19550505", height_m=1.8, study_uid=STUDY, series_uid=STUDY + ".1",
        frame_of_reference_uid=STUDY + ".2", study_date="20240612", accession="E2E1",
    )


def test_study_results_arrive_in_the_pacs_and_a_non_thigh_ct_is_declined(
    tmp_path: Path, phantom_files: list[Path], shared_data: Path
) -> None:
    assert (BUNDLE / "models" / "model.pt").is_file(), "the shipped bundle is missing"
    with OrthancServer(tmp_path / "pacs", aet="PACS") as pacs:
        extra = f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs.dicom_port}\n'
        with NodeProcess(tmp_path / "node_a", quiet_period_s=1.0, extra_config=extra, load_model=True) as node:
            _push(node.port, phantom_files)
            status = node.wait_for(_finished(STUDY), timeout_s=900, what="the phantom study's outputs")
            job = next(j for j in status["jobs"] if j["study_uid"] == STUDY)
            assert job["state"] == "done", job
            assert {"select", "load", "check", "segment", "measure", "seg", "sr", "pdf", "queue"} <= set(job["timings_s"])

            tcia = sorted((shared_data / "tcia-pancreas-ct" / "dcm").glob("*.dcm"))
            tcia_study = str(pydicom.dcmread(tcia[0], stop_before_pixels=True).StudyInstanceUID)
            _push(node.port, tcia)
            status = node.wait_for(_finished(tcia_study), timeout_s=600, what="the TCIA study's job")
            tcia_job = next(j for j in status["jobs"] if j["study_uid"] == tcia_study)
            assert tcia_job["state"] == "declined", tcia_job
            assert tcia_job["reason"].startswith("no hip or thigh in the field of view"), tcia_job

        # In the PACS: SEG, SR and PDF in the phantom's study, valid; nothing for the declined study.
        found = {}
        for iid in pacs.instances():
            tags = pacs.instance_tags(iid)
            if tags.get("Modality") in ("SEG", "SR", "DOC"):
                assert tags["StudyInstanceUID"] == STUDY
                found[tags["Modality"]] = iid
        assert set(found) == {"SEG", "SR", "DOC"}
        for modality, iid in found.items():
            path = tmp_path / f"{modality}.dcm"
            path.write_bytes(pacs.get_bytes(f"/instances/{iid}/file"))
            assert dciodvfy_errors(path) == [], modality
        seg = pydicom.dcmread(tmp_path / "SEG.dcm", stop_before_pixels=True)
        assert "thighnode_demo" in str(seg.SegmentSequence[0].SegmentAlgorithmName)


def test_a_pacs_refusing_segmentation_gets_a_clear_error_and_still_receives_sr_and_pdf(
    tmp_path: Path, phantom_files: list[Path]
) -> None:
    """The PACS here is a pynetdicom SCP that supports SR and Encapsulated PDF storage but not SEG."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Comprehensive3DSRStorage, EncapsulatedPDFStorage, Verification

    from tests.support.ports import free_port

    received: list[str] = []

    def handle_store(event) -> int:  # noqa: ANN001
        received.append(str(event.request.AffectedSOPClassUID))
        return 0x0000

    ae = AE(ae_title="NOSEG")
    for cls in (Comprehensive3DSRStorage, EncapsulatedPDFStorage, Verification):
        ae.add_supported_context(cls)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    try:
        extra = f'[[destinations]]\nname = "noseg"\nae_title = "NOSEG"\nhost = "127.0.0.1"\nport = {port}\n'
        with NodeProcess(tmp_path / "node_b", quiet_period_s=1.0, extra_config=extra, load_model=True) as node:
            _push(node.port, phantom_files)
            status = node.wait_for(_finished(STUDY), timeout_s=900, what="the outputs to be sent or failed")
    finally:
        server.shutdown()
    assert sorted(received) == sorted([str(Comprehensive3DSRStorage), str(EncapsulatedPDFStorage)])
    failed = [i for i in status["outbox"] if i["state"] == "failed"]
    assert len(failed) == 1
    assert "refused SOP class Segmentation Storage" in failed[0]["last_error"]


def test_kill_9_while_a_job_runs_resumes_it_and_it_finishes_once(tmp_path: Path, phantom_files: list[Path]) -> None:
    import sqlite3
    import time

    node = NodeProcess(tmp_path / "node_c", quiet_period_s=1.0, load_model=True).start(timeout_s=300)
    db = node.data_dir / "thighnode.db"
    try:
        _push(node.port, phantom_files)
        deadline = time.monotonic() + 300
        state = ""
        while time.monotonic() < deadline:
            con = sqlite3.connect(db)
            row = con.execute("SELECT state FROM jobs WHERE study_uid = ? ORDER BY id DESC LIMIT 1", (STUDY,)).fetchone()
            con.close()
            state = row[0] if row else ""
            if state == "running":
                break
            time.sleep(0.05)
        assert state == "running", f"the job never ran (state {state!r}); log:\n{node.log()[-3000:]}"
        node.kill9()
        node.start(timeout_s=300)
        status = node.wait_for(_finished(STUDY), timeout_s=900, what="the resumed job")
    finally:
        node.stop()
    jobs = [j for j in status["jobs"] if j["study_uid"] == STUDY]
    assert [j["state"] for j in jobs] == ["done"], jobs
    con = sqlite3.connect(db)
    events = [r[0] for r in con.execute(
        "SELECT to_state FROM job_events WHERE job_id = ? ORDER BY id", (jobs[0]["job"],)).fetchall()]
    con.close()
    assert events == ["received", "ready", "running", "ready", "running", "done"], events
    assert "resumed" in node.log()
