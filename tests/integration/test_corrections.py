"""A reader's corrected SEG sent over DICOM to a running node (issue 23 item 2): dcmtk storescu pushes a
phantom CT, the node (demonstration bundle) sends its SEG/SR/PDF to a real Orthanc; the SEG as Orthanc gives it
back, edited (one muscle's largest frame erased, another's grown, new SOP Instance UID, ContentCreatorName), is
C-STOREd back together with the unedited SEG (as a PACS would echo it): the node takes only the edited one as a
correction, and the verified SR (volumes = the edited SEG's voxel volumes, every other value unchanged) and PDF
arrive in Orthanc."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pydicom
import pytest

from dicomout.uids import correction_uid
from modelkit.phantom import PhantomParams, generate_phantom, write_dicom_series
from tests.conftest import require_tool
import highdicom as hd

from tests.support.correction import READER, make_edited_correction
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
            model_objects = _by_modality(pacs)
            own_seg = tmp_path / "seg_from_pacs.dcm"  # what the reader's viewer loads: the SEG as the PACS holds it
            own_seg.write_bytes(pacs.get_bytes(f"/instances/{model_objects['SEG']}/file"))
            model_sr = tmp_path / "model_sr.dcm"
            model_sr.write_bytes(pacs.get_bytes(f"/instances/{model_objects['SR']}/file"))
            correction, erased, added = make_edited_correction(own_seg, tmp_path, erase="gluteus maximus right",
                                                               enlarge="vastus lateralis left")
            assert erased > 0 and added > 0
            _push(node.port, [correction, own_seg], "READER")
            status = node.wait_for(_settled(STUDY, 2), timeout_s=300, what="the correction's outputs")
            log = node.log()
        job = status["jobs"][0]  # newest first
        assert job["state"] == "done" and job.get("kind") == "correction", job
        states = {c["seg_sop_instance_uid"]: c["state"] for c in status["corrections"]}
        seg_uid = str(pydicom.dcmread(correction, stop_before_pixels=True).SOPInstanceUID)
        own_uid = str(pydicom.dcmread(own_seg, stop_before_pixels=True).SOPInstanceUID)
        assert states == {seg_uid: "accepted", own_uid: "own"}
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
        # the verified SR's volumes are the edited SEG's voxel volumes; every other structure is as the model's
        edited = hd.seg.segread(correction)
        spacing = edited.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        voxel_ml = float(spacing.PixelSpacing[0]) * float(spacing.PixelSpacing[1]) * float(spacing.SliceThickness) / 1000
        seg_ml = {}
        for number in edited.segment_numbers:
            desc = edited.get_segment_description(number)  # the SR's tracking identifier is the segment's
            seg_ml[str(desc.tracking_id).lower()] = float(edited.get_volume(segment_numbers=[number], combine_segments=False).array.sum()) * voxel_ml
        model, corrected = _sr_volumes(model_sr), _sr_volumes(sr_path)
        assert set(corrected) == set(model) and len(model) >= 40
        for label, ml in corrected.items():
            assert ml == pytest.approx(seg_ml[label], abs=1e-3), label
        gmax, vl = "gluteus_maximus right", "vastus_lateralis left"
        assert corrected[gmax] == pytest.approx(model[gmax] - erased * voxel_ml, abs=1e-3)
        assert corrected[vl] == pytest.approx(model[vl] + added * voxel_ml, abs=1e-3)
        unchanged = {k for k in model if k not in (gmax, vl)}
        assert all(corrected[k] == pytest.approx(model[k], abs=1e-6) for k in unchanged)
        # the PDF in the PACS shows the correction; thighnode status shows the study as corrected
        pdf = pydicom.dcmread(io.BytesIO(pacs.get_bytes(f"/instances/{verified['DOC']}/file")))
        assert pdf.DocumentTitle.endswith("(verified, corrected by the reader)")
        assert job["state"] == "done" and job.get("kind") == "correction"  # thighnode status: the study corrected


def _by_modality(pacs: OrthancServer) -> dict[str, str]:
    """Orthanc instance id of each modality's (one) object in the PACS (CT excepted)."""
    out = {}
    for iid in pacs.instances():
        modality = pacs.instance_tags(iid).get("Modality")
        if modality != "CT":
            assert modality not in out, modality
            out[modality] = iid
    return out


def _sr_volumes(path: Path) -> dict[str, float]:
    """Volume (SCT 118565006, mL) per measurement group of a TID 1500 SR, by its tracking identifier (lower case)."""
    report = hd.sr.srread(path).content
    out = {}
    for group in report.get_volumetric_roi_measurement_groups():
        volume = [m for m in group.get_measurements() if m.name.value == "118565006"]
        if volume:
            out[str(group.tracking_identifier).lower()] = float(volume[0].value)
    return out
