"""TID 1500 SR with the longitudinal comparison: written, validated with dciodvfy, read back
with highdicom, and the change values per structure and side checked against the input
Comparison; and the "No prior study found" statement when the search found none."""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicomout import codes
from dicomout.seg import BuildError, build_seg, parse_tracking_id
from dicomout.context import Equipment
from dicomout.sr import PATIENT_TOTALS_ID, PRIOR_COMPARISON_ID, build_sr
from pipeline.types import FLAG_METAL, Comparison, PriorSearch, Segmentation, StructureChange
from tests.dicomout.test_seg import EQUIPMENT, MODEL_NAME, MODEL_VERSION, make_case
from tests.dicomout.test_sr import HEIGHT_M, MISSING_KEY_SIDE, hand_made_measurements
from tests.support.dciodvfy import run_dciodvfy

PRIOR_UID = "1.2.826.0.1.3680043.8.498.4711"
PARTIAL = "partial_common_range"
LOOKED_IN = ("results database", "PACS (PACS@127.0.0.1:4242)")


def _change(key: str, name: str, group: str, side: str, prior_ml: float, current_ml: float, *,
            flags: tuple[str, ...] = (), reason: str = "compared over the common range z -40..120 mm",
            rng: tuple[float, float] = (-40.0, 120.0)) -> StructureChange:
    metal = FLAG_METAL in flags
    change = current_ml - prior_ml
    return StructureChange(
        key=key, name=name, group=group, side=side, compared=True, reason=reason, common_range_mm=rng,
        prior_volume_ml=prior_ml, current_volume_ml=current_ml, change_ml=change, change_ratio=change / prior_ml,
        change_per_height2_cm3_m2=change / HEIGHT_M**2,
        prior_mass_g=None if metal else prior_ml * 1.05, current_mass_g=None if metal else current_ml * 1.04,
        change_mass_g=None if metal else current_ml * 1.04 - prior_ml * 1.05,
        prior_mean_hu=None if metal else 48.0, current_mean_hu=None if metal else 41.5,
        change_mean_hu=None if metal else -6.5,
        prior_fat_fraction=None if metal else 0.052, current_fat_fraction=None if metal else 0.071,
        change_fat_fraction=None if metal else 0.019, flags=flags,
    )


def _not_compared(key: str, name: str, group: str, side: str, reason: str) -> StructureChange:
    return StructureChange(
        key=key, name=name, group=group, side=side, compared=False, reason=reason, common_range_mm=None,
        prior_volume_ml=None, current_volume_ml=None, change_ml=None, change_ratio=None,
        change_per_height2_cm3_m2=None, prior_mass_g=None, current_mass_g=None, change_mass_g=None,
        prior_mean_hu=None, current_mean_hu=None, change_mean_hu=None, prior_fat_fraction=None,
        current_fat_fraction=None, change_fat_fraction=None,
    )


def hand_made_comparison(measurements, labels) -> Comparison:
    """Three measured structures on both sides (one clean, one partial, one with metal, one not
    compared), the measured-but-not-found structure, and one structure with no measurement."""
    keys = []
    for s in measurements.structures:
        if s.key not in keys and s.key != MISSING_KEY_SIDE[0] and s.voxel_count and measurements.structure(s.key, "left"):
            keys.append(s.key)
    a, b, c = (measurements.structure(k, "right") for k in keys[:3])
    measured = {s.key for s in measurements.structures}
    unmeasured = next(label for label in labels.labels if label.key not in measured)
    missing = labels.by_key(MISSING_KEY_SIDE[0])
    changes = (
        _change(a.key, a.name, a.group, "right", 210.0, 188.5),
        _change(a.key, a.name, a.group, "left", 205.0, 201.25, flags=(PARTIAL,),
                reason="compared over the common range z -40..120 mm only (extends beyond it in the prior scan)"),
        _change(b.key, b.name, b.group, "right", 640.0, 552.0, flags=(FLAG_METAL,),
                reason="metal within 30 mm in the current scan: mean HU, fat fraction and mass changes are not given"),
        _not_compared(b.key, b.name, b.group, "left", "no landmark: femoral head not in the prior scan's field of view"),
        _change(c.key, c.name, c.group, "right", 99.0, 90.0, flags=(PARTIAL, FLAG_METAL), reason="partial and metal"),
        _change(c.key, c.name, c.group, "left", 101.0, 103.0),
        _not_compared(missing.key, missing.name, missing.group, MISSING_KEY_SIDE[1], "not present in the current scan"),
        _change(unmeasured.key, unmeasured.name, unmeasured.group, "left", 12.0, 0.5, rng=(-10.0, 80.0)),
    )
    return Comparison(
        prior_study_uid=PRIOR_UID, prior_study_date="20230110", current_study_date="20240315", interval_days=430,
        landmark="top of the femoral head",
        method="Aligned on the top of the femoral head per side; compared over the common range z -40..120 mm.",
        changes=changes, operated_side="right", height_m=HEIGHT_M,
    )


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("sr_comparison")
    paths, volume, seg = make_case(tmp, "HFS")
    missing = seg.labels.by_key(MISSING_KEY_SIDE[0]).id
    label_map = np.where((seg.label_map == missing) & (seg.side_map == 2), 0, seg.label_map)
    seg = Segmentation(label_map, np.where(label_map == 0, 0, seg.side_map), seg.labels, MODEL_NAME, MODEL_VERSION,
                       volume.affine_lps)
    seg_ds = build_seg(volume, seg, paths, **EQUIPMENT)
    measurements = hand_made_measurements(volume, seg)
    # one structure not measured in this study at all (e.g. found only in the prior study)
    dropped = measurements.structures[-1].key
    measurements = dataclasses.replace(
        measurements, structures=tuple(s for s in measurements.structures if s.key != dropped)
    )
    comparison = hand_made_comparison(measurements, seg.labels)
    args = (measurements, seg_ds, paths)
    kwargs = dict(volume=volume, labels=seg.labels, equipment=Equipment(**EQUIPMENT))
    with_prior = tmp / "sr_prior.dcm"
    build_sr(*args, prior=comparison, prior_search=PriorSearch(True, PRIOR_UID, LOOKED_IN), **kwargs).save_as(with_prior)
    none_found = tmp / "sr_none.dcm"
    search = PriorSearch(found=False, looked_in=LOOKED_IN, message="no earlier CT of the thighs for this patient")
    build_sr(*args, prior_search=search, **kwargs).save_as(none_found)
    return {"args": args, "kwargs": kwargs, "comparison": comparison, "with_prior": with_prior,
            "none_found": none_found, "volume": volume}


def _report(path: Path) -> hd.sr.MeasurementReport:
    report = hd.sr.srread(path).content
    assert isinstance(report, hd.sr.MeasurementReport)
    return report


def _groups_by_key_side(report: hd.sr.MeasurementReport) -> dict[tuple[str, str], hd.sr.templates.Template]:
    out = {}
    for g in [*report.get_volumetric_roi_measurement_groups(), *report.get_image_measurement_groups()]:
        if g.tracking_identifier in (PATIENT_TOTALS_ID, PRIOR_COMPARISON_ID):
            continue
        out[parse_tracking_id(g.tracking_identifier)] = g
    return out


def _values(group: hd.sr.templates.Template) -> dict[str, tuple[float, str]]:
    return {m.name.value: (float(m.value), m.unit.value) for m in group.get_measurements()}


def _texts(group: hd.sr.templates.Template, name) -> list[str]:
    return [item.value for item in group[0].ContentSequence if item.name == name]


@pytest.mark.parametrize("which", ["with_prior", "none_found"])
def test_sr_with_comparison_passes_dciodvfy(case: dict, which: str) -> None:
    report = run_dciodvfy(case[which])
    assert report.errors == (), report.output


def test_change_values_read_back_per_structure_and_side(case: dict) -> None:
    groups = _groups_by_key_side(_report(case["with_prior"]))
    comparison: Comparison = case["comparison"]
    for c in comparison.changes:
        g = groups[(c.key, c.side)]
        values = _values(g)
        expected = {
            codes.PRIOR_VOLUME_COMMON_RANGE: (c.prior_volume_ml, "cm3"),
            codes.CURRENT_VOLUME_COMMON_RANGE: (c.current_volume_ml, "cm3"),
            codes.VOLUME_CHANGE: (c.change_ml, "cm3"),
            codes.VOLUME_CHANGE_RATIO: (None if c.change_ratio is None else 100 * c.change_ratio, "%"),
            codes.VOLUME_CHANGE_PER_HEIGHT2: (c.change_per_height2_cm3_m2, "cm3/m2"),
            codes.MASS_CHANGE: (c.change_mass_g, "g"),
            codes.MEAN_ATTENUATION_CHANGE: (c.change_mean_hu, "[hnsf'U]"),
            codes.FAT_FRACTION_CHANGE: (None if c.change_fat_fraction is None else 100 * c.change_fat_fraction, "%"),
            codes.COMMON_RANGE_INFERIOR: (c.common_range_mm[0] if c.common_range_mm else None, "mm"),
            codes.COMMON_RANGE_SUPERIOR: (c.common_range_mm[1] if c.common_range_mm else None, "mm"),
        }
        for code, (value, unit) in expected.items():
            where = f"{c.key} {c.side} {code.meaning}"
            if value is None:
                assert code.value not in values, where
            else:
                assert values[code.value][0] == pytest.approx(value, rel=1e-9, abs=1e-12), where
                assert values[code.value][1] == unit, where
        (done,) = g.get_qualitative_evaluations(name=codes.COMPARISON_WITH_PRIOR_DONE)
        assert done.value == (codes.YES if c.compared else codes.NO)
        flags = [e.value for e in g.get_qualitative_evaluations(name=codes.COMPARISON_FLAG)]
        assert flags == [codes.comparison_flag_code(f) for f in c.flags]
        assert _texts(g, codes.COMPARISON_NOTE) == [c.reason]


def test_metal_withholds_hu_values_and_keeps_volume_change(case: dict) -> None:
    groups = _groups_by_key_side(_report(case["with_prior"]))
    metal = next(c for c in case["comparison"].changes if c.flags == (FLAG_METAL,))
    values = _values(groups[(metal.key, metal.side)])
    assert values[codes.VOLUME_CHANGE.value][0] == pytest.approx(metal.change_ml)
    for code in (codes.MASS_CHANGE, codes.MEAN_ATTENUATION_CHANGE, codes.FAT_FRACTION_CHANGE):
        assert code.value not in values
    # the structure's own current-study measurements are still there, unchanged in number
    assert len(groups[(metal.key, metal.side)].get_measurements(name=codes.VOLUME)) == 1


def test_prior_study_is_referenced(case: dict) -> None:
    report = _report(case["with_prior"])
    by_id = {g.tracking_identifier: g for g in report.get_image_measurement_groups()}
    prior = by_id[PRIOR_COMPARISON_ID]
    items = {item.name: item for item in prior[0].ContentSequence}
    assert items[codes.STUDY_INSTANCE_UID].value == PRIOR_UID
    assert items[codes.STUDY_INSTANCE_UID].value_type == hd.sr.ValueTypeValues.UIDREF
    assert items[codes.STUDY_DATE].value == datetime.date(2023, 1, 10)
    (interval,) = prior.get_measurements(name=codes.COMPARISON_INTERVAL)
    assert (float(interval.value), interval.unit) == (430.0, codes.UNIT_DAY)
    assert _texts(prior, codes.COMPARISON_METHOD) == [case["comparison"].method]
    assert _texts(prior, codes.COMPARISON_LANDMARK) == ["top of the femoral head"]
    (operated,) = prior.get_qualitative_evaluations(name=codes.OPERATED_SIDE)
    assert operated.value == codes.RIGHT
    (done,) = by_id[PATIENT_TOTALS_ID].get_qualitative_evaluations(name=codes.COMPARISON_WITH_PRIOR_DONE)
    assert done.value == codes.YES
    ds = pydicom.dcmread(case["with_prior"])
    assert ds.StudyInstanceUID == case["volume"].study_instance_uid != PRIOR_UID


def test_no_prior_found_is_stated(case: dict) -> None:
    report = _report(case["none_found"])
    by_id = {g.tracking_identifier: g for g in report.get_image_measurement_groups()}
    assert PRIOR_COMPARISON_ID not in by_id
    totals = by_id[PATIENT_TOTALS_ID]
    (text,) = _texts(totals, codes.PRIOR_STUDY_SEARCH)
    assert text.startswith("No prior study found")
    assert "results database; PACS (PACS@127.0.0.1:4242)" in text
    assert "no earlier CT of the thighs for this patient" in text
    (done,) = totals.get_qualitative_evaluations(name=codes.COMPARISON_WITH_PRIOR_DONE)
    assert done.value == codes.NO
    for g in _groups_by_key_side(report).values():
        assert g.get_measurements(name=codes.VOLUME_CHANGE) == []


@pytest.mark.parametrize(
    ("prior", "search", "match"),
    [
        (object(), None, "prior comparison is a object"),
        ("COMPARISON", None, "allowed: pipeline.types.Comparison"),
        (None, {"found": False}, "prior_search is a dict"),
    ],
)
def test_wrong_types_are_refused(case: dict, prior: object, search: object, match: str) -> None:
    with pytest.raises(BuildError, match=match):
        build_sr(*case["args"], prior=prior, prior_search=search, **case["kwargs"])


def test_inconsistent_comparisons_are_refused(case: dict) -> None:
    comparison: Comparison = case["comparison"]
    own = Comparison(**{**comparison.__dict__, "prior_study_uid": case["volume"].study_instance_uid})
    with pytest.raises(BuildError, match="is the current study's StudyInstanceUID"):
        build_sr(*case["args"], prior=own, **case["kwargs"])
    bad_uid = Comparison(**{**comparison.__dict__, "prior_study_uid": "1.2.abc"})
    with pytest.raises(BuildError, match="not a valid UID"):
        build_sr(*case["args"], prior=bad_uid, **case["kwargs"])
    with pytest.raises(BuildError, match="prior_search says no prior was found"):
        build_sr(*case["args"], prior=comparison, prior_search=PriorSearch(found=False), **case["kwargs"])
    twice = Comparison(**{**comparison.__dict__, "changes": comparison.changes + comparison.changes[:1]})
    with pytest.raises(BuildError, match="appears twice"):
        build_sr(*case["args"], prior=twice, **case["kwargs"])


WITHHELD_REASON = ("metal within 15 mm of 23 % of its voxels in the current scan (withheld from 10 %): "
                   "its volume cannot be trusted and the change is not shown")


def test_volume_change_withheld_near_metal_has_its_reason_and_no_number(case: dict, tmp_path: Path) -> None:
    """pipeline.compare withholds a structure near metal: not compared, flag metal kept, no change value."""
    comparison: Comparison = case["comparison"]
    metal = next(c for c in comparison.changes if c.flags == (FLAG_METAL,))
    withheld = dataclasses.replace(
        _not_compared(metal.key, metal.name, metal.group, metal.side, WITHHELD_REASON),
        common_range_mm=(-40.0, 120.0), flags=(FLAG_METAL,),
    )
    changes = tuple(withheld if c is metal else c for c in comparison.changes)
    path = tmp_path / "sr_withheld.dcm"
    build_sr(*case["args"], prior=dataclasses.replace(comparison, changes=changes),
             prior_search=PriorSearch(True, PRIOR_UID, LOOKED_IN), **case["kwargs"]).save_as(path)
    g = _groups_by_key_side(_report(path))[(metal.key, metal.side)]
    values = _values(g)
    for code in (codes.PRIOR_VOLUME_COMMON_RANGE, codes.CURRENT_VOLUME_COMMON_RANGE, codes.VOLUME_CHANGE,
                 codes.VOLUME_CHANGE_RATIO, codes.VOLUME_CHANGE_PER_HEIGHT2, codes.MASS_CHANGE):
        assert code.value not in values, code.meaning
    (done,) = g.get_qualitative_evaluations(name=codes.COMPARISON_WITH_PRIOR_DONE)
    assert done.value == codes.NO
    flags = [e.value for e in g.get_qualitative_evaluations(name=codes.COMPARISON_FLAG)]
    assert flags == [codes.comparison_flag_code(FLAG_METAL)]
    assert _texts(g, codes.COMPARISON_NOTE) == [WITHHELD_REASON]
    assert run_dciodvfy(path).errors == ()
