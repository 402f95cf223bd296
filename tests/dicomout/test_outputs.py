"""The output registry: entries to builders, build order, what is sent."""

from __future__ import annotations

import pytest

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
