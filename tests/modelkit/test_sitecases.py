"""The node's corrected cases: reading case.json and the split into training and held-out cases by patient."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest

from modelkit.sitecases import (
    SiteCaseError,
    held_out_cases,
    read_corrected_cases,
    split_by_patient,
    split_corrected_cases,
)
from tests.support.dicom_cases import write_case_json_only


def _node(tmp_path: Path, studies: dict[str, int]) -> Path:
    """A node data directory with ``studies[patient]`` corrected studies per patient (case.json only)."""
    node = tmp_path / "node"
    for patient, n in studies.items():
        for _ in range(n):
            write_case_json_only(node, patient_id=patient)
    return node


def _sides(split) -> dict[str, set[str]]:
    sides: dict[str, set[str]] = {}
    for side, cases in (("train", split.train), ("held_out", split.held_out)):
        for c in cases:
            sides.setdefault(c.patient_key, set()).add(side)
    return sides


def test_a_patients_studies_stay_on_one_side_and_the_split_is_deterministic(tmp_path: Path) -> None:
    studies = {f"P{i:02d}": 1 + i % 3 for i in range(20)}  # 1-3 studies per patient, 40 studies
    node = _node(tmp_path, studies)
    cases = read_corrected_cases(node)
    assert len(cases) == sum(studies.values())
    split = split_corrected_cases(node, seed=5, fraction=0.3)
    assert all(len(s) == 1 for s in _sides(split).values())  # no patient on both sides
    assert len(split.train) + len(split.held_out) == len(cases) and split.patients == 20
    held_patients = {c.patient_key for c in split.held_out}
    assert 1 <= len(held_patients) < 20
    # the same seed gives the same split, whatever order the cases come in
    shuffled = list(cases)
    random.Random(3).shuffle(shuffled)
    assert {c.study_uid for c in split_by_patient(shuffled, 5, 0.3).held_out} == {c.study_uid for c in split.held_out}
    # another seed holds out other patients
    others = [{c.patient_key for c in split_by_patient(cases, seed, 0.3).held_out} for seed in range(6, 10)]
    assert any(o != held_patients for o in others)
    # held_out_cases (for `thighnode model compare`) gives exactly the held-out case folders
    assert held_out_cases(node, 5, 0.3) == [c.folder for c in split.held_out]


def test_a_patients_side_stays_put_as_corrected_cases_accumulate(tmp_path: Path) -> None:
    first = {f"P{i:02d}": 1 for i in range(20)}
    node = _node(tmp_path, first)
    before = _sides(split_corrected_cases(node, seed=1, fraction=0.3))
    for i in range(20, 30):
        write_case_json_only(node, patient_id=f"P{i:02d}")
    write_case_json_only(node, patient_id="P00")  # a second study of an earlier patient
    after = _sides(split_corrected_cases(node, seed=1, fraction=0.3))
    assert {p: after[p] for p in before} == before
    assert all(len(s) == 1 for s in after.values())


def test_fewer_than_two_patients_train_on_everything_and_the_log_says_so(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    from modelkit.train_settings import TrainSettings
    from modelkit.training import _site_split

    node = _node(tmp_path, {"ONLY": 3})
    split = split_corrected_cases(node, seed=0, fraction=0.5)
    assert len(split.train) == 3 and split.held_out == ()
    settings = TrainSettings(data_dirs=(), output_bundle=tmp_path / "b", checkpoint_dir=tmp_path / "c",
                             node_data_dir=node, held_out_fraction=0.5)
    with caplog.at_level(logging.INFO, logger="modelkit.training"):
        assert _site_split(settings).held_out == ()
    assert "3 corrected case(s) of 1 patient(s): all train, none held out (fewer than 2 patients)" in caplog.text
    # two patients: one is held out, one trains, whatever the fraction
    write_case_json_only(node, patient_id="OTHER")
    for fraction in (0.01, 0.5, 0.99):
        two = split_corrected_cases(node, seed=0, fraction=fraction)
        assert len({c.patient_key for c in two.held_out}) == 1 and len({c.patient_key for c in two.train}) == 1
    assert split_corrected_cases(node, seed=0, fraction=0.0).held_out == ()


def test_no_corrected_folder_yet_is_no_cases_but_a_missing_node_data_dir_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "node").mkdir()
    assert read_corrected_cases(tmp_path / "node") == []
    with pytest.raises(SiteCaseError, match=r"node_data_dir: folder .*nowhere does not exist"):
        read_corrected_cases(tmp_path / "nowhere")


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.pop("patient_key"), r"case.json: patient_key must be a non-empty string; saw None"),
    (lambda r: r.update(study_uid="1.2.3"), r"study_uid '1.2.3' differs from its folder's name"),
    (lambda r: r.update(patient_key="Doe^Jane"), r"patient_key must be 64 lower-case hex digits"),
])
def test_a_malformed_case_json_is_refused_naming_the_key(tmp_path: Path, edit, message: str) -> None:  # noqa: ANN001
    folder = write_case_json_only(tmp_path / "node", patient_id="P1")
    record = json.loads((folder / "case.json").read_text())
    edit(record)
    (folder / "case.json").write_text(json.dumps(record))
    with pytest.raises(SiteCaseError, match=message):
        read_corrected_cases(tmp_path / "node")


def test_the_held_out_fraction_is_checked(tmp_path: Path) -> None:
    with pytest.raises(SiteCaseError, match="held_out_fraction is 1.0"):
        split_by_patient([], 0, 1.0)
    from modelkit.train_settings import TrainSettings

    with pytest.raises(ValueError, match="held_out_fraction must be a number"):
        TrainSettings(data_dirs=(), output_bundle=tmp_path, checkpoint_dir=tmp_path, held_out_fraction=-0.1)
