"""Tests of the label table's SNOMED CT coding (config/labels.toml)."""

from __future__ import annotations

from pipeline.labels import DEFAULT_LABELS_PATH, load_label_table

EXPECTED_KEYS = (
    "sartorius", "rectus_femoris", "vastus_lateralis", "vastus_intermedius", "vastus_medialis",
    "adductor_longus", "adductor_brevis", "adductor_magnus", "gracilis", "pectineus", "gluteus_maximus",
    "gluteus_medius", "gluteus_minimus", "tensor_fasciae_latae", "piriformis", "quadratus_femoris",
    "obturator_internus", "obturator_externus", "semitendinosus", "semimembranosus", "biceps_femoris",
    "iliacus", "iliopsoas", "psoas", "abdominal_oblique", "rectus_abdominis", "multifidus", "femur", "ilium",
)
# Codes checked against public copies (TotalSegmentator mapping, DICOM PS3.16 via pydicom, FHIR body-site).
VERIFIED = {
    "vastus_lateralis": "1403006",
    "vastus_medialis": "3478008",
    "gracilis": "2577006",
    "gluteus_maximus": "181674001",
    "gluteus_medius": "78333006",
    "gluteus_minimus": "75297007",
    "iliopsoas": "68455001",
    "abdominal_oblique": "1142228004",
    "femur": "71341001",
    "ilium": "22356005",
}


def test_table_has_the_29_structures_in_order() -> None:
    table = load_label_table()
    assert table.keys() == EXPECTED_KEYS
    assert table.num_classes == 30


def test_filled_codes_are_numeric_unique_and_have_meanings() -> None:
    table = load_label_table()
    codes = [label.snomed_code for label in table.labels if label.snomed_code]
    for label in table.labels:
        assert label.snomed_meaning.strip(), label.key
        if label.snomed_code:
            assert label.snomed_code.isdigit() and 6 <= len(label.snomed_code) <= 18, (label.key, label.snomed_code)
    assert len(set(codes)) == len(codes)


def test_verified_codes() -> None:
    table = load_label_table()
    for key, code in VERIFIED.items():
        assert table.by_key(key).snomed_code == code


def test_todo_line_present_exactly_while_codes_are_missing() -> None:
    table = load_label_table()
    missing = [label.key for label in table.labels if not label.snomed_code]
    has_todo = "TODO(verify)" in DEFAULT_LABELS_PATH.read_text(encoding="utf-8")
    assert has_todo == bool(missing), missing


def test_every_entry_has_a_code() -> None:
    table = load_label_table()
    missing = [label.key for label in table.labels if not label.snomed_code]
    assert missing == []
