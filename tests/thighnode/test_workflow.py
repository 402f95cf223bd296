"""The workflow from received files to queued SEG/SR/PDF, with a segmenter that returns the
phantom's ground truth (this tests the wiring and the outputs, not the model)."""

from __future__ import annotations

import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicomout.outbox import Outbox
from pipeline.labels import load_label_table
from modelkit.phantom import PhantomParams, generate_phantom, write_dicom_series
from pipeline.types import Segmentation, Volume
from scp.index import InstanceIndex
from scp.types import ReceivedInstance
from tests.support.dciodvfy import dciodvfy_errors
from tests.support.truth import TruthSegmenter
from thighnode.jobs import DECLINED, DONE, JobStore, StudyProgress
from thighnode.results import ResultsStore
from thighnode.settings import load_settings
from thighnode.workflow import Workflow

STUDY = "1.2.826.0.1.3680043.8.498.77001"


def _index_series(index: InstanceIndex, paths: list[Path], study: str) -> None:
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        index.record(
            ReceivedInstance(
                sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID, study_instance_uid=study,
                series_instance_uid=ds.SeriesInstanceUID, modality="CT", transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                path=p, size_bytes=p.stat().st_size, calling_ae="TEST", peer_address="127.0.0.1", received_at=time.time(),
            )
        )


@pytest.fixture(scope="module")
def phantom_study(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    labels = load_label_table()
    phantom = generate_phantom(PhantomParams(seed=5, spacing_mm=(4.0, 3.0, 3.0), implant="left", height_m=1.6, sex="F"))
    out = tmp_path_factory.mktemp("ph")
    paths = write_dicom_series(
        phantom, out / "dicom", patient_id="TN-WF-1", patient_name="Test^Workflow", patient_sex="F",
        birth_date="19500101", height_m=1.6, study_uid=STUDY, series_uid=STUDY + ".2",
        frame_of_reference_uid=STUDY + ".3", study_date="20240301", accession="A1",
    )
    return phantom, labels, paths


def _run(tmp_path: Path, phantom_study, extra_env: dict[str, str] | None = None, bundle: object = None,  # noqa: ANN001, ANN202
         segmenter: object = None, on_queued: object = None):
    phantom, labels, paths = phantom_study
    env = {"THIGHNODE_HOME": str(tmp_path),
           "THIGHNODE_DESTINATIONS": '[{name = "pacs", ae_title = "PACS", host = "127.0.0.1", port = 4242}]',
           **(extra_env or {})}
    settings = load_settings(environ=env)
    index = InstanceIndex(settings.db_path)
    _index_series(index, paths, STUDY)
    jobs = JobStore(settings.db_path)
    jobs.sync([StudyProgress(STUDY, 0.0)], now=100.0, quiet_period_s=1)
    job = jobs.claim_next()
    results = ResultsStore(settings.db_path)
    outbox = Outbox(settings.db_path)
    seg = TruthSegmenter({STUDY: phantom}, labels)
    if bundle is not None:
        seg.bundle = bundle  # type: ignore[attr-defined]  # what a pipeline.inference.Segmenter carries
    wf = Workflow(settings, index, lambda: segmenter or seg, results=results, outbox=outbox,
                  on_queued=on_queued)  # type: ignore[arg-type]
    outcome = wf.run(job)
    return settings, outcome, results, outbox


def test_a_phantom_study_yields_valid_seg_sr_pdf_queued_for_the_pacs(tmp_path: Path, phantom_study) -> None:  # noqa: ANN001
    phantom, labels, paths = phantom_study
    settings, outcome, results, outbox = _run(tmp_path, phantom_study)
    assert outcome.state == DONE, outcome.reason
    assert set(outcome.timings_s) >= {"select", "load", "check", "segment", "measure", "seg", "sr", "pdf", "queue"}
    kinds = {o["kind"]: Path(o["path"]) for o in outcome.result["outputs"]}
    assert set(kinds) == {"seg", "sr", "pdf"}
    for kind, path in kinds.items():
        assert dciodvfy_errors(path) == [], f"{kind}: dciodvfy errors"
    items = outbox.items(study_uid=STUDY)
    assert sorted(i.destination for i in items) == ["pacs"] * 3

    # The field of view is recorded: the regions the image shows, those the segmentation supports, the policy.
    coverage = outcome.result["coverage"]
    assert {"pelvis", "hip", "thigh"} <= set(coverage["regions"])
    assert all(z0 <= z1 for z0, z1 in coverage["regions"].values())
    # the phantom's gluteal muscles reach its top slice (the iliac crest): "hip (cut)"
    assert [r.split(" ")[0] for r in coverage["from_segmentation"]] == ["hip", "thigh"]
    assert coverage["policy"] == {"accept_regions": ["hip", "thigh"], "min_region_mm": 20.0}
    assert "axial slices" in coverage["evidence"]

    # The SR's volumes equal the voxel volumes of the SEG's segments, read back.
    seg = hd.seg.segread(kinds["seg"])
    sr = hd.sr.srread(kinds["sr"])
    spacing = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    voxel_ml = float(spacing.PixelSpacing[0]) * float(spacing.PixelSpacing[1]) * float(spacing.SliceThickness) / 1000
    by_uid = {}
    for number in seg.segment_numbers:
        desc = seg.get_segment_description(number)
        mask = seg.get_volume(segment_numbers=[number], combine_segments=False).array
        by_uid[str(desc.tracking_uid)] = float(mask.sum()) * voxel_ml
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = report.get_volumetric_roi_measurement_groups()
    assert len(groups) >= 40
    checked = 0
    for group in groups:
        volume = [m for m in group.get_measurements() if m.name.value == "118565006"]
        if not volume:
            continue
        assert str(group.tracking_uid) in by_uid
        assert volume[0].value == pytest.approx(by_uid[str(group.tracking_uid)], rel=1e-3)
        checked += 1
    assert checked >= 40

    # Measurements are in the results database; the implant side is flagged; SMI follows from the height.
    stored = results.get(STUDY)
    assert stored is not None and stored.patient_id == "TN-WF-1" and stored.study_date == "20240301"
    m = stored.measurements
    all_both = m.group("all", "both")
    assert all_both.smi_kg_m2 == pytest.approx(all_both.mass_g / 1000 / 1.6**2, rel=1e-6)
    metal_sides = {s.side for s in m.structures if "metal" in s.flags}
    assert "left" in metal_sides and "right" not in metal_sides


def test_one_job_parses_each_source_file_once_for_its_header_and_once_for_its_pixels(
    tmp_path: Path, phantom_study, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    """Selection reads the headers; loading, measuring and the SEG/SR/PDF builders use them (no re-read)."""
    _, _, paths = phantom_study
    sources = {str(Path(p)) for p in paths}
    reads: dict[tuple[str, bool], int] = {}
    real = pydicom.dcmread
    real_run = Workflow.run
    active: list[bool] = []  # count only what the job reads (not the test's own indexing)

    def run(self, job):  # noqa: ANN001, ANN202
        active.append(True)
        try:
            return real_run(self, job)
        finally:
            active.clear()

    def counting(fp, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        key = str(Path(fp)) if isinstance(fp, (str, Path)) else ""
        if active and key in sources:
            header_only = bool(kwargs.get("stop_before_pixels"))
            reads[(key, header_only)] = reads.get((key, header_only), 0) + 1
        return real(fp, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    monkeypatch.setattr(Workflow, "run", run)
    _, outcome, _, _ = _run(tmp_path, phantom_study)
    assert outcome.state == DONE, outcome.reason
    assert {(p, True): 1 for p in sources} | {(p, False): 1 for p in sources} == reads


def test_each_output_is_queued_and_the_sender_woken_as_soon_as_it_is_written(
    tmp_path: Path, phantom_study  # noqa: ANN001
) -> None:
    """The SEG travels to the PACS while the SR and the PDF are built (issue 24's end-to-end time)."""
    seen: list[list[str]] = []
    holder: dict[str, Outbox] = {}

    def woken() -> None:
        outbox = holder.get("outbox") or Outbox(load_settings(environ={"THIGHNODE_HOME": str(tmp_path)}).db_path)
        holder["outbox"] = outbox
        seen.append(sorted(Path(i.path).name.split("_")[0] for i in outbox.items(study_uid=STUDY)))

    _, outcome, _, _ = _run(tmp_path, phantom_study, on_queued=woken)
    assert outcome.state == DONE, outcome.reason
    assert seen == [["seg"], ["seg", "sr"], ["pdf", "seg", "sr"]]
    assert outcome.result["queued"] == ["seg", "sr", "pdf"]
    assert outcome.reason.startswith("SEG+SR+PDF queued to pacs")


def test_an_output_failing_after_the_seg_was_queued_fails_the_job_naming_what_went(
    tmp_path: Path, phantom_study, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    from dicomout.errors import OutputError
    from dicomout.outputs.pdf import PdfOutput

    def broken(self, context, built):  # noqa: ANN001, ANN202
        raise OutputError("the report could not be rendered (test)")

    monkeypatch.setattr(PdfOutput, "build", broken)
    _, outcome, _, outbox = _run(tmp_path, phantom_study, on_queued=lambda: None)
    assert outcome.state == "failed"
    assert outcome.reason.startswith("the report could not be rendered (test)")
    assert outcome.reason.endswith("(already queued before the failure: SEG, SR)")
    assert sorted(Path(i.path).name.split("_")[0] for i in outbox.items(study_uid=STUDY)) == ["seg", "sr"]


def test_without_a_sender_to_wake_outputs_are_queued_only_when_the_last_one_is_written(
    tmp_path: Path, phantom_study, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    """A Celery worker has no sender to wake: it queues at the end, so a task killed after the SEG was
    written and redelivered to another worker sends every output once (tests/integration/test_celery_workers)."""
    from dicomout.errors import OutputError
    from dicomout.outputs.pdf import PdfOutput

    def broken(self, context, built):  # noqa: ANN001, ANN202
        raise OutputError("the report could not be rendered (test)")

    monkeypatch.setattr(PdfOutput, "build", broken)
    _, outcome, _, outbox = _run(tmp_path, phantom_study)
    assert outcome.state == "failed" and outcome.reason == "the report could not be rendered (test)"
    assert outbox.items(study_uid=STUDY) == [] and "queued" not in outcome.result


def test_reprocessing_replaces_outputs_with_the_same_uids(tmp_path: Path, phantom_study) -> None:  # noqa: ANN001
    _, first, _, _ = _run(tmp_path / "a", phantom_study)
    _, second, _, _ = _run(tmp_path / "b", phantom_study)
    assert [o["sop_instance_uid"] for o in first.result["outputs"]] == [
        o["sop_instance_uid"] for o in second.result["outputs"]
    ]


def test_labelmap_option_is_honoured(tmp_path: Path, phantom_study) -> None:  # noqa: ANN001
    _, outcome, _, _ = _run(tmp_path, phantom_study, {"THIGHNODE_OUTPUTS__SEG_TYPE": "LABELMAP"})
    assert outcome.state == DONE, outcome.reason
    seg_path = next(Path(o["path"]) for o in outcome.result["outputs"] if o["kind"] == "seg")
    ds = pydicom.dcmread(seg_path, stop_before_pixels=True)
    assert ds.SegmentationType == "LABELMAP"


def test_a_fourth_output_by_import_path_is_written_and_queued_for_each_destination(
    tmp_path: Path, phantom_study  # noqa: ANN001
) -> None:
    two = ('[{name = "pacs", ae_title = "PACS", host = "127.0.0.1", port = 4242}, '
           '{name = "archive", ae_title = "ARCHIVE", host = "127.0.0.1", port = 4243}]')
    enabled = '["sr", "tests.dicomout.note_output:NoteOutput"]'
    settings, outcome, _, outbox = _run(
        tmp_path, phantom_study, {"THIGHNODE_DESTINATIONS": two, "THIGHNODE_OUTPUTS__ENABLED": enabled}
    )
    assert outcome.state == DONE, outcome.reason
    assert outcome.reason.startswith("SR+NOTE queued to pacs, archive")
    assert {"seg", "sr", "note"} <= set(outcome.timings_s) and "pdf" not in outcome.timings_s
    sent = {o["kind"]: o for o in outcome.result["outputs"]}
    assert list(sent) == ["sr", "note"]
    note = pydicom.dcmread(sent["note"]["path"])
    written = sorted(p.name.split("_")[0] for p in (settings.outputs_dir / STUDY).iterdir())
    assert written == ["note", "seg", "sr"]  # the SEG is built for the SR and the note, not sent
    seg = pydicom.dcmread(next((settings.outputs_dir / STUDY).glob("seg_*.dcm")), stop_before_pixels=True)
    assert note.DocumentTitle == f"Test note: {len(seg.SegmentSequence)} segments"
    queued = {(i.destination, i.sop_instance_uid) for i in outbox.items(study_uid=STUDY)}
    assert queued == {
        (dest, sent[kind]["sop_instance_uid"]) for dest in ("pacs", "archive") for kind in ("sr", "note")
    }


def test_the_report_banner_follows_the_bundle_demonstration_flag(tmp_path: Path, phantom_study) -> None:  # noqa: ANN001
    from types import SimpleNamespace

    from tests.dicomout.test_report import _pdf_text

    texts = {}
    for flag in (True, False):
        # the intended-use text no longer decides: only the metadata flag does
        bundle = SimpleNamespace(demonstration=flag, metadata={"intended_use": "DEMONSTRATION MODEL - NOT FOR CLINICAL USE"})
        _, outcome, _, _ = _run(tmp_path / str(flag), phantom_study, {"THIGHNODE_OUTPUTS__ENABLED": '["pdf"]'}, bundle)
        (pdf,) = [o for o in outcome.result["outputs"] if o["kind"] == "pdf"]
        texts[flag] = _pdf_text(pydicom.dcmread(pdf["path"]).EncapsulatedDocument.rstrip(b"\0"), tmp_path)
    assert "NOT FOR CLINICAL USE" in texts[True]
    assert "NOT FOR CLINICAL USE" not in texts[False]


def test_a_segmentation_without_femur_is_declined_after_the_model(tmp_path: Path, phantom_study) -> None:  # noqa: ANN001
    """The image shows hip and thigh, so the model runs; a segmentation with no femur still declines."""
    phantom, labels, _ = phantom_study

    class NoFemur:
        def segment(self, volume: Volume) -> Segmentation:
            truth = TruthSegmenter({STUDY: phantom}, labels).segment(volume)
            femur = labels.by_key("femur").id
            keep = truth.label_map != femur
            return Segmentation(truth.label_map * keep, truth.side_map * keep, labels, "unit", "0",
                                affine_lps=truth.affine_lps)

    _, outcome, _, outbox = _run(tmp_path, phantom_study, segmenter=NoFemur())
    assert outcome.state == DECLINED
    assert outcome.reason.startswith("no femur in the segmentation: it found femur right 0.0 cm³, left 0.0 cm³")
    assert {"hip", "thigh"} <= set(outcome.result["coverage"]["regions"])
    assert [r.split(" ")[0] for r in outcome.result["coverage"]["from_segmentation"]] == ["hip", "thigh"]
    assert outbox.items(study_uid=STUDY) == []


def test_a_study_without_femur_is_declined_and_nothing_is_queued(tmp_path: Path, shared_data: Path) -> None:
    paths = sorted((shared_data / "tcia-pancreas-ct" / "dcm").glob("*.dcm"))
    study = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    env = {"THIGHNODE_HOME": str(tmp_path),
           "THIGHNODE_DESTINATIONS": '[{name = "pacs", ae_title = "PACS", host = "127.0.0.1", port = 4242}]'}
    settings = load_settings(environ=env)
    index = InstanceIndex(settings.db_path)
    _index_series(index, paths, study)
    jobs = JobStore(settings.db_path)
    jobs.sync([StudyProgress(study, 0.0)], now=100.0, quiet_period_s=1)
    job = jobs.claim_next()
    outbox = Outbox(settings.db_path)

    class MustNotRun:
        def segment(self, volume: Volume) -> Segmentation:
            raise AssertionError("the image check must decline before the model runs")

    outcome = Workflow(settings, index, lambda: MustNotRun(), outbox=outbox).run(job)
    assert outcome.state == DECLINED
    assert outcome.reason.startswith("no hip or thigh in the field of view"), outcome.reason
    assert outcome.result["coverage"]["policy"] == {"accept_regions": ["hip", "thigh"], "min_region_mm": 20.0}
    assert outbox.items(study_uid=study) == []


def test_a_study_whose_field_of_view_cuts_the_thigh_muscles_withholds_those_groups_in_the_job_record(
    tmp_path: Path,
) -> None:
    """A scan ending above the knee: the job is done, the gluteal group is reported, and the groups whose
    muscles the field of view cuts are recorded as withheld with their reason (no number)."""
    phantom = generate_phantom(PhantomParams(seed=5, spacing_mm=(4.0, 3.0, 3.0), height_m=1.6, sex="F",
                                             fov_bottom_mm=-250.0))
    paths = write_dicom_series(
        phantom, tmp_path / "dicom", patient_id="TN-WF-2", patient_name="Test^Hip", patient_sex="F",
        birth_date="19500101", height_m=1.6, study_uid=STUDY, series_uid=STUDY + ".2",
        frame_of_reference_uid=STUDY + ".3", study_date="20240301", accession="A2",
    )
    _, outcome, _, _ = _run(tmp_path, (phantom, load_label_table(), paths))
    assert outcome.state == DONE, outcome.reason
    groups = outcome.result["measurements"]["groups"]
    assert groups["gluteal/both"]["volume_ml"] > 0 and "withheld" not in groups["gluteal/both"]
    for key in ("above_knee/both", "all/both"):
        assert groups[key]["volume_ml"] is None and groups[key]["smi_kg_m2"] is None
        assert "cut at the inferior edge" in groups[key]["withheld"]


def test_every_output_and_the_job_record_name_the_model_weights_sha256(tmp_path: Path, phantom_study) -> None:  # noqa: ANN001
    """The exact model that produced a study: the SEG's AlgorithmParameters, the SR's algorithm parameters, the
    PDF's Model row and the job's result carry the sha256 the segmenter's Segmentation gives (from the bundle)."""
    import dataclasses

    from tests.dicomout.test_report import _pdf_text
    from tests.dicomout.test_sr import _text_items

    phantom, labels, _ = phantom_study
    sha = "5fd24b9656d4" + "0" * 52

    class Hashed:
        def segment(self, volume: Volume) -> Segmentation:
            return dataclasses.replace(TruthSegmenter({STUDY: phantom}, labels).segment(volume), model_sha256=sha)

    _, outcome, _, _ = _run(tmp_path, phantom_study, segmenter=Hashed())
    assert outcome.state == DONE, outcome.reason
    assert outcome.result["model"] == {"name": "truth", "version": "0.0.1", "sha256": sha}
    paths = {o["kind"]: o["path"] for o in outcome.result["outputs"]}
    seg = pydicom.dcmread(paths["seg"], stop_before_pixels=True)
    assert seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters == (
        f"weights_sha256={sha}")
    assert set(_text_items(pydicom.dcmread(paths["sr"]), "111002")) == {f"weights_sha256={sha}"}
    text = _pdf_text(pydicom.dcmread(paths["pdf"]).EncapsulatedDocument.rstrip(b"\0"), tmp_path)
    assert text.count("truth 0.0.1 sha256 5fd24b9656d4") == text.count("Page ") >= 3


def test_an_mr_only_study_is_declined_naming_what_it_holds(tmp_path: Path) -> None:
    """Issue 25: an MR-only study was declined as "the study holds no series"."""
    settings = load_settings(environ={"THIGHNODE_HOME": str(tmp_path)})
    index = InstanceIndex(settings.db_path)
    study = "1.2.826.0.1.3680043.8.498.77009"
    for i, modality in enumerate(["MR"] * 3 + ["SR"]):
        index.record(ReceivedInstance(
            sop_instance_uid=f"{study}.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.4", study_instance_uid=study,
            series_instance_uid=f"{study}.100", modality=modality, transfer_syntax_uid="1.2.840.10008.1.2.1",
            path=tmp_path / f"{i}.dcm", size_bytes=1, calling_ae="MR1", peer_address="127.0.0.1", received_at=1.0,
        ))
    jobs = JobStore(settings.db_path)
    jobs.sync([StudyProgress(study, 0.0)], now=100.0, quiet_period_s=1)
    job = jobs.claim_next()
    assert job is not None
    outcome = Workflow(settings, index, lambda: None).run(job)
    assert outcome.state == DECLINED
    assert outcome.reason == (
        "the study holds no CT instance (Modality CT): its 4 received instance(s) are 3 MR, 1 SR; "
        "only CT series are processed"
    )
