"""pipeline.segread: a segment's side (laterality) and its structure, from a SegmentSequence item."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from pipeline.labels import load_label_table
from pipeline.segread import SegReadError, match_segments, segment_side


def _code(value: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, "SCT", meaning
    return c


def _segment(number: int, label: str, code: Dataset | None = None) -> Dataset:
    item = Dataset()
    item.SegmentNumber = number
    item.SegmentLabel = label
    if code is not None:
        item.SegmentedPropertyTypeCodeSequence = [code]
    return item


def test_side_from_the_modifier_then_the_anatomic_region_then_the_label() -> None:
    gmax = load_label_table().by_key("gluteus_maximus")
    typed = _code(gmax.snomed_code, gmax.name)
    typed.SegmentedPropertyTypeModifierCodeSequence = [_code("7771000", "Left")]
    assert segment_side(_segment(1, "Gluteus maximus right", typed)) == ("left", "modifier")  # the code wins

    region = Dataset()
    region.AnatomicRegionModifierSequence = [_code("24028007", "Right")]
    item = _segment(2, "muscle", _code(gmax.snomed_code, gmax.name))
    item.AnatomicRegionSequence = [region]
    assert segment_side(item) == ("right", "anatomic region modifier")

    assert segment_side(_segment(3, "Gluteus_maximus_Left")) == ("left", "label")
    assert segment_side(_segment(4, "Gluteus maximus")) == ("none", "")


def test_segments_match_by_code_or_label_with_their_side_and_an_unknown_one_is_named() -> None:
    labels = load_label_table()
    gmax = labels.by_key("gluteus_maximus")
    typed = _code(gmax.snomed_code, gmax.name)
    typed.SegmentedPropertyTypeModifierCodeSequence = [_code("24028007", "Right")]
    ds = Dataset()
    ds.SegmentSequence = [_segment(1, "anything", typed), _segment(2, "vastus lateralis left")]
    a, b = match_segments(ds, labels)
    assert (a.label_id, a.matched_by, a.side) == (gmax.id, "code", "right")
    assert (b.label_id, b.matched_by, b.side) == (labels.by_key("vastus_lateralis").id, "label", "left")

    ds.SegmentSequence = [_segment(7, "Tumour", _code("108369006", "Neoplasm"))]
    with pytest.raises(SegReadError, match="segment 7 .*'Tumour'.* matches no structure"):
        match_segments(ds, labels)
