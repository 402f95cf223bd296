"""The output registry: entries to builders, build order, what is sent."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import Dataset

from dicomout.context import StudyContext
from dicomout.errors import OutputPluginError
from dicomout.outputs import BUILTIN_OUTPUTS, entry_problem, load_output, plan_outputs

NOTE = "tests.dicomout.note_output:NoteOutput"


def _plan(enabled: list[str]) -> list[tuple[str, bool]]:
    return [(p.builder.name, p.send) for p in plan_outputs(enabled)]


def test_the_default_outputs_are_built_and_sent_in_order() -> None:
    assert _plan(list(BUILTIN_OUTPUTS)) == [("seg", True), ("sr", True), ("pdf", True)]


def test_a_needed_output_is_built_first_and_not_sent() -> None:
    assert _plan(["sr", "pdf"]) == [("seg", False), ("sr", True), ("pdf", True)]
    assert _plan(["pdf", NOTE]) == [("pdf", True), ("seg", False), ("note", True)]
    assert _plan([NOTE, "seg"]) == [("seg", True), ("note", True)]


def test_nothing_enabled_builds_nothing() -> None:
    assert plan_outputs([]) == ()


def test_an_import_path_names_a_builder_class() -> None:
    builder = load_output(NOTE)
    assert (builder.name, builder.needs) == ("note", ("seg",))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("xml", r"'xml': allowed: seg, sr, pdf or an import path 'package.module:Name'"),
        ("tests.dicomout.no_such_module:X", r"module tests.dicomout.no_such_module cannot be imported"),
        ("tests.dicomout.note_output:Missing", r"module tests.dicomout.note_output has no 'Missing'"),
        ("tests.dicomout.note_output:NOT_A_BUILDER", r"NOT_A_BUILDER is not an output builder"),
    ],
)
def test_a_wrong_entry_is_refused_with_its_name(entry: str, message: str) -> None:
    with pytest.raises(OutputPluginError, match=message):
        plan_outputs(["seg", entry])


def test_two_outputs_of_one_name_are_refused() -> None:
    with pytest.raises(OutputPluginError, match="a second output named 'seg'"):
        plan_outputs(["seg", "dicomout.outputs.seg:SegOutput"])


def test_a_need_that_is_neither_enabled_nor_built_in_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.dicomout import note_output

    monkeypatch.setattr(note_output.NoteOutput, "needs", ("xml",))
    with pytest.raises(OutputPluginError, match="output 'note' needs 'xml', which is neither enabled nor built in"):
        plan_outputs([NOTE])


def test_needs_in_a_cycle_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from dicomout.outputs.seg import SegOutput

    monkeypatch.setattr(SegOutput, "needs", ("note",))
    with pytest.raises(OutputPluginError, match="cycle: note -> seg -> note"):
        plan_outputs([NOTE])


def test_entry_forms() -> None:
    assert entry_problem("seg") == "" and entry_problem("site.outputs.note:NoteOutput") == ""
    assert entry_problem("site.outputs.note") != "" and entry_problem(7).startswith("must be a string")


def test_a_plug_in_output_derives_its_own_uids() -> None:
    from dicomout.uids import output_uid

    series = "1.2.826.0.1.3680043.8.498.1"
    assert output_uid(series, "1", "note.instance") not in {output_uid(series, "1", k) for k in ("seg.instance", "note.series")}
    assert output_uid(series, "1", "seg.instance") == output_uid(series, "1", "seg.instance")
    with pytest.raises(ValueError, match="output UID kind 'Note.file' is not allowed"):
        output_uid(series, "1", "Note.file")


def hand_made_context(directory: Path) -> StudyContext:
    """The StudyContext of one small synthetic CT (tests.dicomout.test_seg's case, hand-made measurements),
    default [outputs] settings but the institution "Test Hospital", a fixed content time."""
    from datetime import datetime, timezone

    import pydicom

    from dicomout.context import ModelInfo, OutputSettings
    from pipeline.selection import patient_info
    from pipeline.types import SelectedSeries
    from tests.dicomout.test_seg import MODEL_NAME, MODEL_VERSION, make_case
    from tests.dicomout.test_sr import hand_made_measurements

    paths, volume, seg = make_case(directory, "HFS")
    headers = tuple(pydicom.dcmread(p, stop_before_pixels=True) for p in paths)
    selected = SelectedSeries(
        volume.study_instance_uid, volume.series_instance_uid, tuple(paths), "test", headers=headers,
        patient=patient_info(headers[0]), study_date=str(headers[0].get("StudyDate", "")),
    )
    return StudyContext(
        job_id=1, study_uid=volume.study_instance_uid, selected=selected, volume=volume, segmentation=seg,
        measurements=hand_made_measurements(volume, seg), model=ModelInfo(MODEL_NAME, MODEL_VERSION, demonstration=True),
        settings=OutputSettings(institution_name="Test Hospital"), software_version="9.9.9",
        content_time=datetime(2031, 2, 3, 4, 5, 6, tzinfo=timezone.utc),
    )


def build_all_outputs(context: StudyContext) -> dict[str, Dataset]:
    """Every built-in output built from ``context`` in plan order, each given what it needs."""
    built: dict[str, Dataset] = {}
    for planned in plan_outputs(list(BUILTIN_OUTPUTS)):
        built[planned.builder.name] = planned.builder.build(context, {n: built[n] for n in planned.builder.needs})
    return built


def test_the_built_in_builders_read_only_the_context(tmp_path) -> None:  # noqa: ANN001
    """Given one context, SEG -> SR -> PDF come out the same twice; the content time is the context's."""
    context = hand_made_context(tmp_path)
    first, second = build_all_outputs(context), build_all_outputs(context)
    assert [first[k].SOPInstanceUID for k in first] == [second[k].SOPInstanceUID for k in second]
    assert first["pdf"].EncapsulatedDocument == second["pdf"].EncapsulatedDocument
    assert (first["pdf"].ContentDate, first["pdf"].ContentTime) == ("20310203", "040506")
    assert first["pdf"].InstitutionName == "Test Hospital" and first["sr"].InstitutionName == "Test Hospital"
    evidence = first["sr"].CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert first["seg"].SOPInstanceUID in {
        str(i.ReferencedSOPInstanceUID) for s in evidence for i in s.ReferencedSOPSequence
    }


def test_the_seg_transfer_syntax_follows_the_outputs_settings() -> None:
    """Issue 24: BINARY deflated by default; "none" is uncompressed for either type."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

    from dicomout.context import OutputSettings
    from dicomout.outputs.seg import seg_transfer_syntax

    assert seg_transfer_syntax(OutputSettings()) == DeflatedExplicitVRLittleEndian
    assert seg_transfer_syntax(OutputSettings(binary_compression="JPEG2000")) == JPEG2000Lossless
    assert seg_transfer_syntax(OutputSettings(binary_compression="none")) == ExplicitVRLittleEndian
    assert seg_transfer_syntax(OutputSettings(seg_type="LABELMAP")) == DeflatedExplicitVRLittleEndian
    assert seg_transfer_syntax(OutputSettings(seg_type="LABELMAP", labelmap_compression="RLE")) == RLELossless
    assert seg_transfer_syntax(OutputSettings(seg_type="LABELMAP", labelmap_compression="none")) == ExplicitVRLittleEndian
    with pytest.raises(ValueError, match="binary_compression is 'zip'; allowed: deflate, JPEG2000, none"):
        OutputSettings(binary_compression="zip")
