"""A reader's corrected SEG received for a processed study (issue 23 item 2): recognised, measured,
reported as verified (SR + PDF), stored as ground truth; our own SEG echoed back and unusable SEGs
are recorded with a reason, never applied.

The model run uses the phantom's ground truth as its "model" (tests.support.truth); the correction
is the node's own SEG with one muscle's frame erased, a new SOP Instance UID and a content creator.
"""

from __future__ import annotations

import copy
import json
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.pixels import pack_bits
from pydicom.uid import generate_uid

from dicomout.outbox import Outbox
from dicomout.uids import correction_uid
from modelkit.phantom import PhantomParams, generate_phantom, write_dicom_series
from pipeline.labels import load_label_table
from scp.index import InstanceIndex
from scp.types import ReceivedInstance
from tests.conftest import require_tool
from tests.support.correction import READER, make_correction
from tests.support.dciodvfy import dciodvfy_errors
from tests.support.truth import TruthSegmenter
from thighnode.cli import status_report
from thighnode.corrections import ACCEPTED, OWN, REFUSED, CorrectionStore
from thighnode.jobs import DECLINED, DONE, JobStore, StudyProgress
from thighnode.results import ResultsStore
from thighnode.settings import load_settings
from thighnode.workflow import Workflow

STUDY = "1.2.826.0.1.3680043.8.498.77231"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture(scope="module")
def phantom_study(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    phantom = generate_phantom(PhantomParams(seed=7, spacing_mm=(5.0, 3.0, 3.0), height_m=1.7, sex="M"))
    out = tmp_path_factory.mktemp("corr")
    paths = write_dicom_series(
        phantom, out / "dicom", patient_id="TN-CORR-1", patient_name="Test^Correction", patient_sex="M",
        birth_date="19480101", height_m=1.7, study_uid=STUDY, series_uid=STUDY + ".2",
        frame_of_reference_uid=STUDY + ".3", study_date="20240501", accession="C1",
    )
    return phantom, paths


class _Node:
    """The workflow's collaborators over one data directory, as the running node wires them."""

    def __init__(self, tmp_path: Path, phantom_study) -> None:  # noqa: ANN001
        phantom, self.ct_paths = phantom_study
        env = {"THIGHNODE_HOME": str(tmp_path),
               "THIGHNODE_DESTINATIONS": '[{name = "pacs", ae_title = "PACS", host = "127.0.0.1", port = 4242}]'}
        self.settings = load_settings(environ=env)
        self.index = InstanceIndex(self.settings.db_path)
        self.jobs = JobStore(self.settings.db_path)
        self.results = ResultsStore(self.settings.db_path)
        self.outbox = Outbox(self.settings.db_path)
        self.corrections = CorrectionStore(self.settings.db_path)
        self.segmenter = TruthSegmenter({STUDY: phantom}, load_label_table())

        def segmenter():  # noqa: ANN202
            return self.segmenter

        self.workflow = Workflow(self.settings, self.index, segmenter, results=self.results, outbox=self.outbox,
                                 corrections=self.corrections)
        self.clock = 100.0

    def receive(self, paths: list[Path], modality: str) -> None:
        self.clock += 10.0
        for p in paths:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            self.index.record(ReceivedInstance(
                sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID, study_instance_uid=ds.StudyInstanceUID,
                series_instance_uid=ds.SeriesInstanceUID, modality=modality,
                transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, path=p, size_bytes=p.stat().st_size,
                calling_ae="READER", peer_address="127.0.0.1", received_at=time.time(),
            ))

    def run_next(self):  # noqa: ANN201
        progress = [StudyProgress(a.study_instance_uid, a.last_received_at) for a in self.index.activity()]
        self.jobs.sync(progress, now=time.time() + 100.0, quiet_period_s=1)
        job = self.jobs.claim_next()
        assert job is not None
        outcome = self.workflow.run(job)
        self.jobs.finish(job.id, outcome.state, outcome.reason, result=outcome.result)
        return outcome


@pytest.fixture()
def node(tmp_path: Path, phantom_study) -> _Node:  # noqa: ANN001
    n = _Node(tmp_path, phantom_study)
    n.receive(n.ct_paths, "CT")
    outcome = n.run_next()
    assert outcome.state == DONE, outcome.reason
    n.model_outputs = {o["kind"]: o for o in outcome.result["outputs"]}  # type: ignore[attr-defined]
    return n


def _correction_from_own_seg(node: _Node, out: Path, *, erase: str = "gluteus maximus right") -> tuple[Path, int]:
    """The node's SEG with one segment's largest frame erased; returns (path, voxels erased)."""
    return make_correction(Path(node.model_outputs["seg"]["path"]), out, erase=erase)  # type: ignore[attr-defined]


def _content_values(ds: pydicom.Dataset) -> list[str]:
    """Every TextValue and PersonName of an SR content tree."""
    out = []
    for item in ds.get("ContentSequence", []):
        for keyword in ("TextValue", "PersonName"):
            if keyword in item:
                out.append(str(item[keyword].value))
        out += _content_values(item)
    return out


def _pdf_text(path: Path, tmp_path: Path) -> str:
    tool = require_tool("pdftotext")
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(pydicom.dcmread(path).EncapsulatedDocument.rstrip(b"\0"))
    return subprocess.run([tool, "-layout", str(pdf), "-"], capture_output=True, check=True).stdout.decode("utf-8")


def test_a_reader_correction_becomes_verified_outputs_and_ground_truth(node: _Node, tmp_path: Path) -> None:
    seg_path, erased = _correction_from_own_seg(node, tmp_path)
    seg_uid = str(pydicom.dcmread(seg_path, stop_before_pixels=True).SOPInstanceUID)
    queued_before = len(node.outbox.items(study_uid=STUDY))
    node.receive([seg_path], "SEG")
    outcome = node.run_next()
    assert outcome.state == DONE, outcome.reason
    assert outcome.result["kind"] == "correction"
    assert "segment" not in outcome.timings_s  # the model did not run again
    [summary] = outcome.result["corrections"]
    assert summary["state"] == ACCEPTED, summary["reason"]
    assert READER not in json.dumps(outcome.result)  # a person's name stays out of the job record

    # The corrected measurement differs from the model's by exactly the erased voxels; nothing else changed.
    voxel_ml = node.results.get(STUDY).measurements.voxel_volume_ml  # type: ignore[union-attr]
    changed = {(d["key"], d["side"]): d for d in summary["differences"]}
    assert set(changed) == {("gluteus_maximus", "right"), ("gluteus_maximus", "both")}
    d = changed[("gluteus_maximus", "right")]
    assert d["corrected_voxels"] - d["model_voxels"] == -erased
    assert d["difference_ml"] == pytest.approx(-erased * voxel_ml, abs=1e-3)
    # the model's own values are kept
    model = node.results.get(STUDY).measurements.structure("gluteus_maximus", "right")  # type: ignore[union-attr]
    assert model.voxel_count == d["model_voxels"]

    # New SR and PDF (and the SEG they reference), UIDs from the correction's SOP Instance UID, queued.
    outputs = {o["kind"]: o for o in summary["outputs"]}
    assert set(outputs) == {"seg", "sr", "pdf"}
    for kind, o in outputs.items():
        assert o["sop_instance_uid"] == correction_uid(seg_uid, f"{kind}.instance")
        assert o["sop_instance_uid"] != node.model_outputs[kind]["sop_instance_uid"]  # type: ignore[attr-defined]
    items = node.outbox.items(study_uid=STUDY)
    assert len(items) == queued_before + 3
    assert {i.sop_instance_uid for i in items} >= {o["sop_instance_uid"] for o in outputs.values()}

    sr = pydicom.dcmread(outputs["sr"]["path"])
    assert sr.VerificationFlag == "VERIFIED" and sr.CompletionFlag == "COMPLETE" and sr.PreliminaryFlag == "FINAL"
    assert str(sr.VerifyingObserverSequence[0].VerifyingObserverName) == READER
    values = _content_values(sr)
    assert READER in values  # the person observer context (TID 1003)
    notes = [v for v in values if v.startswith("Corrected by the reader")]
    assert any(f"corrected - model {-erased * voxel_ml:+.1f} cm3" in v for v in notes), notes
    assert len(notes) >= 40  # every structure/side group carries the model's value
    assert dciodvfy_errors(Path(outputs["sr"]["path"])) == []
    text = _pdf_text(Path(outputs["pdf"]["path"]), tmp_path)
    assert "VERIFIED (corrected by Test Reader)" in text
    assert "Model cm³" in text and "Corrected cm³" in text
    assert pydicom.dcmread(outputs["pdf"]["path"]).DocumentTitle.endswith("(verified, corrected by the reader)")

    # Ground truth for training, in the agreed layout.
    case = node.settings.node.data_dir / "corrected" / STUDY
    meta = json.loads((case / "case.json").read_text())
    assert set(meta) == {"study_uid", "series_uid", "patient_key", "seg_sop_instance_uid", "observer", "received_at"}
    assert meta["study_uid"] == STUDY and meta["series_uid"] == STUDY + ".2"
    assert meta["seg_sop_instance_uid"] == seg_uid and meta["observer"] == READER
    assert len(meta["patient_key"]) == 64 and "TN-CORR-1" not in json.dumps(meta)
    assert sorted(p.name for p in (case / "ct").iterdir()) == sorted(p.name for p in node.ct_paths)
    assert (case / "seg.dcm").read_bytes() == seg_path.read_bytes()
    [record] = node.corrections.records(study_uid=STUDY)
    assert record.state == ACCEPTED and record.observer == READER
    verified = {(m["key"], m["side"]): m for m in record.detail["verified_measurements"]}
    assert verified[("gluteus_maximus", "right")]["corrected_voxels"] == d["corrected_voxels"]
    assert len(verified) >= 50  # every structure and side, not only those changed
    [row] = [c for c in status_report(node.settings)["corrections"] if c["seg_sop_instance_uid"] == seg_uid]
    assert row["state"] == ACCEPTED and "verified_measurements" not in row

    # A second correction replaces the first as ground truth; the first is kept under previous/.
    second, _ = _correction_from_own_seg(node, tmp_path, erase="vastus lateralis left")
    node.receive([second], "SEG")
    assert node.run_next().state == DONE
    meta2 = json.loads((case / "case.json").read_text())
    assert meta2["seg_sop_instance_uid"] != seg_uid
    [previous] = list((node.settings.node.data_dir / "corrected-history" / STUDY).iterdir())
    assert json.loads((previous / "case.json").read_text())["seg_sop_instance_uid"] == seg_uid
    assert (previous / "seg.dcm").exists() and len(list((previous / "ct").iterdir())) == len(node.ct_paths)
    # the case folder stays one training case (one CT series, one SEG: the second), as thighnode train reads it
    from modelkit.segimport import load_dicom_case
    from modelkit.sitecases import read_corrected_cases

    [stored] = read_corrected_cases(node.settings.node.data_dir)
    assert stored.folder == case and stored.seg_sop_instance_uid == meta2["seg_sop_instance_uid"]
    hu, labels, _ = load_dicom_case(case, load_label_table())
    assert hu.shape == labels.shape and labels.any()


def test_our_own_seg_echoed_back_is_not_a_correction(node: _Node, tmp_path: Path) -> None:
    own = Path(node.model_outputs["seg"]["path"])  # type: ignore[attr-defined]
    echoed = tmp_path / "echo.dcm"
    echoed.write_bytes(own.read_bytes())
    queued_before = len(node.outbox.items(study_uid=STUDY))
    node.receive([echoed], "SEG")
    outcome = node.run_next()
    assert outcome.state == DONE, outcome.reason
    assert "segment" not in outcome.timings_s  # nor is the study reprocessed
    [summary] = outcome.result["corrections"]
    assert summary["state"] == OWN and "not a correction" in summary["reason"]
    assert len(node.outbox.items(study_uid=STUDY)) == queued_before
    assert not (node.settings.node.data_dir / "corrected").exists()


def _edited(node: _Node, tmp_path: Path, edit) -> Path:  # noqa: ANN001
    path, _ = _correction_from_own_seg(node, tmp_path)
    ds = pydicom.dcmread(path)
    edit(ds)
    ds.save_as(path, enforce_file_format=True)
    return path


def _shift_first_frame(ds: pydicom.Dataset) -> None:
    item = ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0]
    x, y, z = (float(v) for v in item.ImagePositionPatient)
    item.ImagePositionPatient = [x, y, z + 1.7]


def _rename_segment(ds: pydicom.Dataset) -> None:
    item = ds.SegmentSequence[0]
    item.SegmentLabel = "Tumour"
    code = item.SegmentedPropertyTypeCodeSequence[0]
    code.CodeValue, code.CodeMeaning = "108369006", "Neoplasm"


def _frame_below_the_ct(ds: pydicom.Dataset) -> None:
    item = ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0]
    x, y, z = (float(v) for v in item.ImagePositionPatient)
    item.ImagePositionPatient = [x, y, z - 5000.0]


@pytest.mark.parametrize("edit, words", [
    (lambda ds: setattr(ds, "FrameOfReferenceUID", generate_uid()), "FrameOfReferenceUID"),
    (_shift_first_frame, "off the CT grid"),
    (_frame_below_the_ct, "outside the CT's"),
    (_rename_segment, "matches no structure"),
], ids=["frame-of-reference", "off-grid-frame", "frame-outside-ct", "unknown-segment"])
def test_an_unusable_correction_is_refused_with_its_reason_and_kept(node: _Node, tmp_path: Path, edit, words: str) -> None:  # noqa: ANN001
    path = _edited(node, tmp_path, edit)
    queued_before = len(node.outbox.items(study_uid=STUDY))
    node.receive([path], "SEG")
    outcome = node.run_next()
    assert outcome.state == DECLINED
    assert words in outcome.reason and "correction refused" in outcome.reason
    [record] = node.corrections.records(study_uid=STUDY)
    assert record.state == REFUSED and words in record.reason
    assert path.exists()
    assert len(node.outbox.items(study_uid=STUDY)) == queued_before
    assert not (node.settings.node.data_dir / "corrected").exists()


def test_a_partial_correction_is_refused(node: _Node, tmp_path: Path) -> None:
    def keep_two_segments(ds: pydicom.Dataset) -> None:
        keep = [i for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence)
                if int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber) <= 2]
        frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))[keep]
        ds.PerFrameFunctionalGroupsSequence = [ds.PerFrameFunctionalGroupsSequence[i] for i in keep]
        ds.SegmentSequence = ds.SegmentSequence[:2]
        ds.NumberOfFrames = len(keep)
        ds.PixelData = pack_bits(frames.ravel())

    node.receive([_edited(node, tmp_path, keep_two_segments)], "SEG")
    outcome = node.run_next()
    assert outcome.state == DECLINED and "partial SEG" in outcome.reason


def test_a_seg_for_a_study_the_node_never_measured_is_refused(tmp_path: Path, phantom_study) -> None:  # noqa: ANN001
    n = _Node(tmp_path, phantom_study)
    ds = pydicom.dcmread(n.ct_paths[0])
    seg = copy.deepcopy(ds)
    seg.SOPClassUID = SEG_CLASS
    seg.SOPInstanceUID = generate_uid()
    seg.file_meta.MediaStorageSOPClassUID = SEG_CLASS
    seg.file_meta.MediaStorageSOPInstanceUID = seg.SOPInstanceUID
    seg.StudyInstanceUID = generate_uid()
    path = tmp_path / "lonely_seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    n.receive([path], "SEG")
    outcome = n.run_next()
    assert outcome.state == DECLINED
    assert "has not measured" in outcome.reason and "file kept" in outcome.reason
    assert path.exists()
