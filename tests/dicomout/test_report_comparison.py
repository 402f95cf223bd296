"""The PDF report's "Comparison with prior study" pages and the "No prior study found" section:
text extracted with poppler's pdftotext, determinism, and type checks at the edge."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dicomout.report import COMPARISON_ROWS_PER_PAGE, ReportError, render_report
from pipeline.labels import LabelTable, load_label_table
from pipeline.types import FLAG_METAL, Comparison, Measurements, PriorSearch, Segmentation, StructureChange, Volume
from tests.dicomout.test_report import PATIENT, _affine, _header, _measurements, _pdf_text, _segmentation, _volume

HEIGHT_M = 1.65
PRIOR_UID = "1.2.826.0.1.3680043.8.498.4711"
PARTIAL = "partial_common_range"
LOOKED_IN = ("results database", "PACS (PACS@127.0.0.1:4242)")
METHOD = (
    "Aligned on the top of the femoral head per side; compared over the common range z −60..240 mm (right) "
    "and z −60..180 mm (left) covered by both scans."
)


def change(labels: LabelTable, key: str, side: str, prior_ml: float | None, current_ml: float | None, *,
           flags: tuple[str, ...] = (), reason: str = "", rng: tuple[float, float] | None = (-60.0, 240.0)) -> StructureChange:
    """A StructureChange made by hand; ``prior_ml`` None: not compared (``reason`` says why)."""
    label = labels.by_key(key)
    if prior_ml is None or current_ml is None:
        return StructureChange(
            key=key, name=label.name, group=label.group, side=side, compared=False, reason=reason,
            common_range_mm=None, prior_volume_ml=None, current_volume_ml=None, change_ml=None, change_ratio=None,
            change_per_height2_cm3_m2=None, prior_mass_g=None, current_mass_g=None, change_mass_g=None,
            prior_mean_hu=None, current_mean_hu=None, change_mean_hu=None, prior_fat_fraction=None,
            current_fat_fraction=None, change_fat_fraction=None,
        )
    metal = FLAG_METAL in flags
    delta = current_ml - prior_ml
    return StructureChange(
        key=key, name=label.name, group=label.group, side=side, compared=True,
        reason=reason or "compared over the common range", common_range_mm=rng,
        prior_volume_ml=prior_ml, current_volume_ml=current_ml, change_ml=delta, change_ratio=delta / prior_ml,
        change_per_height2_cm3_m2=delta / HEIGHT_M**2,
        prior_mass_g=None if metal else prior_ml * 1.05, current_mass_g=None if metal else current_ml * 1.05,
        change_mass_g=None if metal else delta * 1.05, prior_mean_hu=None if metal else 45.0,
        current_mean_hu=None if metal else 40.0, change_mean_hu=None if metal else -5.0,
        prior_fat_fraction=None if metal else 0.05, current_fat_fraction=None if metal else 0.07,
        change_fat_fraction=None if metal else 0.02, flags=flags,
    )


def hand_made_comparison(labels: LabelTable) -> Comparison:
    """Both sides of three muscles and the femur: the operated right side loses more; the left
    vastus lateralis is not compared, the right gluteus maximus has metal, the left rectus femoris
    is partial (compared over z −60..180 mm only)."""
    return Comparison(
        prior_study_uid=PRIOR_UID, prior_study_date="20230110", current_study_date="20240315", interval_days=430,
        landmark="top of the femoral head", method=METHOD,
        changes=(
            change(labels, "rectus_femoris", "right", 230.4, 205.1),
            change(labels, "rectus_femoris", "left", 221.0, 218.8, flags=(PARTIAL,), rng=(-60.0, 180.0),
                   reason="compared over the common range z −60..180 mm only (extends beyond it in the prior scan)"),
            change(labels, "vastus_lateralis", "right", 690.0, 612.4),
            change(labels, "vastus_lateralis", "left", None, None,
                   reason="not present in the common range (z −60..180 mm from the landmark) of the prior scan"),
            change(labels, "gluteus_maximus", "right", 802.5, 734.2, flags=(FLAG_METAL,),
                   reason="metal within 30 mm in the current scan: mean HU, fat fraction and mass changes are not given"),
            change(labels, "gluteus_maximus", "left", 748.0, 741.8),
            change(labels, "femur", "right", 410.0, 409.1),
            change(labels, "femur", "left", 405.0, 405.6),
        ),
        operated_side="right", height_m=HEIGHT_M,
    )


@pytest.fixture(scope="module")
def labels() -> LabelTable:
    return load_label_table()


@pytest.fixture(scope="module")
def inputs(labels: LabelTable) -> tuple[Volume, Segmentation, Measurements]:
    affine = _affine()
    return _volume(affine), _segmentation(affine, labels), _measurements(labels)


@pytest.fixture(scope="module")
def comparison(labels: LabelTable) -> Comparison:
    return hand_made_comparison(labels)


@pytest.fixture(scope="module")
def comparison_pdf(inputs: tuple[Volume, Segmentation, Measurements], comparison: Comparison) -> bytes:
    volume, seg, meas = inputs
    return render_report(volume, seg, meas, PATIENT, study=_header(False), comparison=comparison,
                         prior_search=PriorSearch(True, PRIOR_UID, LOOKED_IN))


def _signed(value: float) -> str:
    return f"{value:+.1f}".replace("-", "−")


def test_comparison_pages_show_prior_interval_and_changes(
    comparison_pdf: bytes, comparison: Comparison, tmp_path: Path
) -> None:
    text = _pdf_text(comparison_pdf, tmp_path)
    # 1 summary + 1 structures + 1 volume chart + 1 change table + 1 group totals/charts
    assert text.count("Page ") == 5 and "Page 5 of 5" in text
    assert "see pages 4–5" in text
    for expected in ("Comparison with prior study", "2023-01-10", PRIOR_UID, "430 days", "top of the femoral head",
                     "Right (operated side)", "Left (contralateral)", "Aligned on the top of the femoral head per side"):
        assert expected in text, expected
    for c in comparison.changes:
        if not c.compared:
            continue
        for value in (f"{c.prior_volume_ml:.1f}", f"{c.current_volume_ml:.1f}", _signed(c.change_ml),
                      _signed(100 * c.change_ratio), _signed(c.change_per_height2_cm3_m2)):
            assert value in text, f"{c.key} {c.side}: {value}"
    # the not-compared side has its reason, the flagged ones their notes
    assert "[1] not compared: not present in the common range (z −60..180 mm from the landmark) of the prior scan" in text
    assert "partial (left): compared over z −60..180 mm only" in text
    assert "metal: HU values withheld" in text
    # group totals: anterior right = rectus femoris + vastus lateralis (both compared)
    prior, current = 230.4 + 690.0, 205.1 + 612.4
    for value in (f"{prior:.1f}", f"{current:.1f}", _signed(current - prior), _signed(100 * (current - prior) / prior)):
        assert value in text, value
    assert "All muscles" in text and "R 2/2, L 1/2 compared" in text
    assert "Change in % of the prior volume" in text and "Volume change (cm³)" in text


def test_no_prior_found_is_stated(inputs: tuple[Volume, Segmentation, Measurements], tmp_path: Path) -> None:
    volume, seg, meas = inputs
    search = PriorSearch(found=False, looked_in=LOOKED_IN, message="No earlier CT of the thighs for this patient.")
    pdf = render_report(volume, seg, meas, PATIENT, study=_header(False), prior_search=search)
    text = _pdf_text(pdf, tmp_path)
    assert "No prior study found." in text
    assert "Looked in: results database; PACS (PACS@127.0.0.1:4242)." in text
    assert "No earlier CT of the thighs for this patient." in text
    assert text.count("Page ") == 3  # no comparison pages
    assert "2023-01-10" not in text


def test_identical_inputs_give_identical_bytes(
    inputs: tuple[Volume, Segmentation, Measurements], comparison: Comparison, comparison_pdf: bytes
) -> None:
    volume, seg, meas = inputs
    again = render_report(volume, seg, meas, PATIENT, study=_header(False), comparison=hand_made_comparison(seg.labels),
                          prior_search=PriorSearch(True, PRIOR_UID, LOOKED_IN))
    assert again == comparison_pdf
    assert b"/CreationDate" not in again


def test_long_change_table_continues_on_another_page(
    inputs: tuple[Volume, Segmentation, Measurements], labels: LabelTable, tmp_path: Path
) -> None:
    volume, seg, meas = inputs
    n = COMPARISON_ROWS_PER_PAGE + 1
    template = change(labels, "sartorius", "right", 100.0, 90.0)
    changes = []
    for i in range(n):  # label keys first, then made-up ones (a newer label table's structures)
        key = labels.labels[i].key if i < len(labels.labels) else f"zz_extra_{i:02d}"
        for side in ("right", "left"):
            changes.append(dataclasses.replace(
                template, key=key, name=f"Structure {i:02d}", side=side, prior_volume_ml=100.0 + i,
                current_volume_ml=90.0 + i, change_ml=-10.0, change_ratio=-10.0 / (100.0 + i),
            ))
    many = Comparison(
        prior_study_uid=PRIOR_UID, prior_study_date="20230110", current_study_date="20240315", interval_days=430,
        landmark="top of the femoral head", method=METHOD, changes=tuple(changes),
    )
    text = _pdf_text(render_report(volume, seg, meas, PATIENT, study=_header(False), comparison=many), tmp_path)
    assert text.count("Page ") == 6
    assert "Comparison with prior study — continued" in text
    first, continued = text.split("Comparison with prior study — continued")
    last = f"Structure {n - 1:02d}"
    assert last not in first and last in continued  # the last row is on the continuation page
    assert f"{100.0 + n - 1:.1f}" in continued


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"comparison": object()}, "comparison is a object"),
    ({"prior_search": ("results database",)}, "prior_search is a tuple"),
])
def test_wrong_types_are_refused(inputs: tuple[Volume, Segmentation, Measurements], kwargs: dict, match: str) -> None:
    volume, seg, meas = inputs
    with pytest.raises(ReportError, match=match):
        render_report(volume, seg, meas, PATIENT, study=_header(False), **kwargs)


WITHHELD_REASON = ("metal within 15 mm of 23 % of its voxels in the current scan (withheld from 10 %): "
                   "its volume cannot be trusted and the change is not shown")


def test_volume_change_withheld_near_metal_shows_its_reason_and_no_number(
    inputs: tuple[Volume, Segmentation, Measurements], comparison: Comparison, labels: LabelTable, tmp_path: Path
) -> None:
    """pipeline.compare withholds the right gluteus maximus near metal: its row has dashes and the numbered
    reason, none of its values, and the left side is still shown."""
    metal = comparison.change("gluteus_maximus", "right")
    assert metal is not None and metal.change_ml is not None
    withheld = dataclasses.replace(
        change(labels, "gluteus_maximus", "right", None, None, reason=WITHHELD_REASON),
        common_range_mm=(-60.0, 240.0), flags=(FLAG_METAL,),
    )
    changes = tuple(withheld if c is metal else c for c in comparison.changes)
    volume, seg, meas = inputs
    pdf = render_report(volume, seg, meas, PATIENT, study=_header(False),
                        comparison=dataclasses.replace(comparison, changes=changes),
                        prior_search=PriorSearch(True, PRIOR_UID, LOOKED_IN))
    text = " ".join(_pdf_text(pdf, tmp_path).split())
    assert "not compared: metal within 15 mm of 23 % of its voxels in the current scan" in text
    assert "cannot be trusted and the change is not shown" in text
    # (its current volume, 734.2 cm³, is this study's own measurement and stays on the other pages)
    for value in (f"{metal.prior_volume_ml:.1f}", _signed(metal.change_ml), _signed(100 * metal.change_ratio)):  # type: ignore[operator]
        assert value not in text, value
    left = comparison.change("gluteus_maximus", "left")
    assert left is not None and _signed(left.change_ml) in text  # type: ignore[arg-type]


def test_partial_note_names_the_bone_registration_axis_of_that_side(
    inputs: tuple[Volume, Segmentation, Measurements], comparison: Comparison, tmp_path: Path
) -> None:
    """A side aligned by bone profile registration (no femoral head in a hip-to-knee cut) has its
    common range in the current scan's patient z: the partial note must say so, not "from the landmark"."""
    volume, seg, meas = inputs
    axis = "in the current scan's patient z, aligned by bone profile registration (correlation 0.97, shift +4.0 mm)"
    bone_aligned = dataclasses.replace(comparison, axis_text={"left": axis, "right": "from the landmark"})
    pdf = render_report(volume, seg, meas, PATIENT, study=_header(False), comparison=bone_aligned,
                        prior_search=PriorSearch(True, PRIOR_UID, LOOKED_IN))
    text = " ".join(_pdf_text(pdf, tmp_path).split())
    assert "partial (left): compared over z −60..180 mm only (in the current scan's patient z, aligned by bone" in text
    assert "partial (left): compared over z −60..180 mm only (from the landmark)" not in text
