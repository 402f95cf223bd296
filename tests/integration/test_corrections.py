"""A reader's corrected SEG sent over DICOM to a running node (issue 23 item 2): dcmtk storescu pushes a
phantom CT, the node (demonstration bundle) sends its SEG/SR/PDF to a real Orthanc; the node's SEG, edited
(one muscle's frame erased, new SOP Instance UID, ContentCreatorName), is C-STOREd back together with the
unedited SEG (as a PACS would echo it): the node takes only the edited one as a correction, and the verified
SR and PDF arrive in Orthanc."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pydicom
import pytest

from dicomout.uids import correction_uid
from modelkit.phantom import PhantomParams, generate_phantom, write_dicom_series
from tests.conftest import require_tool
from tests.support.correction import READER, make_correction
from tests.support.node import NodeProcess
from tests.support.orthanc import OrthancServer

pytestmark = pytest.mark.integration

STUDY = "1.2.826.0.1.3680043.8.498.66231"


def _push(port: int, files: list[Path], calling: str) -> None:
    """storescu -R: propose the files' SOP classes (its fixed default list lacks Segmentation Storage)."""
    storescu = require_tool("storescu")
    done = subprocess.run(
        [storescu, "-R", "-aet", calling, "-aec", "THIGHNODE", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr


def _settled(study_uid: str, jobs: int):  # noqa: ANN202
    def check(s: dict) -> bool:
        mine = [j for j in s["jobs"] if j["study_uid"] == study_uid]
        return (len(mine) >= jobs and all(j["state"] in ("done", "declined", "failed") for j in mine)
                and s["outbox_counts"].get("pending", 0) == 0)

    return check


def test_a_corrected_seg_sent_to_the_node_comes_back_as_a_verified_sr_and_pdf(tmp_path: Path) -> None:
    phantom = generate_phantom(PhantomParams(seed=3, sex="F", height_m=1.65, spacing_mm=(5.0, 3.0, 3.0)))
    ct = write_dicom_series(
        phantom, tmp_path / "ct", patient_id="TN-COR-2", patient_name="Loop^Correction", patient_sex="F",
        birth_date="19520303", height_m=1.65, study_uid=STUDY, series_uid=STUDY + ".1",
        frame_of_reference_uid=STUDY + ".2", study_date="20240707", accession="COR2",
    )
    with OrthancServer(tmp_path / "pacs", aet="PACS") as pacs:
        extra = f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs.dicom_port}\n'
        with NodeProcess(tmp_path / "node", quiet_period_s=1.0, extra_config=extra, load_model=True) as node:
            _push(node.port, ct, "CTSCANNER")
            status = node.wait_for(_settled(STUDY, 1), timeout_s=600, what="the model's outputs")
            assert [j["state"] for j in status["jobs"]] == ["done"], status["jobs"]
            [own_seg] = (node.data_dir / "outputs" / STUDY).glob("seg_*.dcm")
            correction, erased = make_correction(own_seg, tmp_path)
            assert erased > 0
            _push(node.port, [correction, own_seg], "READER")
            status = node.wait_for(_settled(STUDY, 2), timeout_s=300, what="the correction's outputs")
            log = node.log()
        job = status["jobs"][0]  # newest first
        assert job["state"] == "done" and job.get("kind") == "correction", job
        states = {c["seg_sop_instance_uid"]: c["state"] for c in status["corrections"]}
        seg_uid = str(pydicom.dcmread(correction, stop_before_pixels=True).SOPInstanceUID)
        assert states == {seg_uid: "accepted", own_seg.stem.split("_", 1)[1]: "own"}
        assert READER not in log and "Reader" not in json.dumps(status["corrections"])

        verified = {}
        for iid in pacs.instances():
            tags = pacs.instance_tags(iid)
            if tags.get("SOPInstanceUID") in (correction_uid(seg_uid, "sr.instance"), correction_uid(seg_uid, "pdf.instance")):
                verified[tags["Modality"]] = iid
        assert set(verified) == {"SR", "DOC"}
        sr_path = tmp_path / "verified_sr.dcm"
        sr_path.write_bytes(pacs.get_bytes(f"/instances/{verified['SR']}/file"))
        sr = pydicom.dcmread(sr_path)
        assert sr.StudyInstanceUID == STUDY and sr.VerificationFlag == "VERIFIED"
        assert str(sr.VerifyingObserverSequence[0].VerifyingObserverName) == READER
        case = node.data_dir / "corrected" / STUDY
        assert json.loads((case / "case.json").read_text())["seg_sop_instance_uid"] == seg_uid
        assert len(list((case / "ct").iterdir())) == len(ct)
