"""scp.validate: the AE title and UID checks every network edge uses."""

from __future__ import annotations

import pytest

from node_errors import NodeError
from scp.errors import IngressConfigError, InvalidUIDError
from scp.validate import is_valid_uid, validate_ae_title, validate_uid


@pytest.mark.parametrize("uid", ["0", "1.2", "1.2.0.3", "1.2.840.10008.5.1.4.1.1.2", "9" * 64, "1." + "2" * 62])
def test_valid_uids_pass(uid: str) -> None:
    assert validate_uid(uid, "SOPInstanceUID") == uid


@pytest.mark.parametrize(
    ("uid", "fragment"),
    [
        ("", "is empty"),
        ("1.2.03", "not a valid UID"),
        ("01.2", "not a valid UID"),
        ("1..2", "not a valid UID"),
        ("1.2.", "not a valid UID"),
        (".1.2", "not a valid UID"),
        ("1.2.a", "not a valid UID"),
        ("1.2 ", "not a valid UID"),
        ("../../etc", "not a valid UID"),
        ("1/2", "not a valid UID"),
        ("1" * 65, "65 characters long"),
        (None, "must be a UID string"),
    ],
)
def test_invalid_uids_raise_with_keyword_value_and_rule(uid: object, fragment: str) -> None:
    with pytest.raises(InvalidUIDError) as info:
        validate_uid(uid, "SeriesInstanceUID")
    message = str(info.value)
    assert "SeriesInstanceUID" in message
    assert fragment in message
    assert "digits and dots" in message


@pytest.mark.parametrize("uid", ["", "1.02", "1..2", "1.2.", "a", "1" * 65, None, 12])
def test_is_valid_uid_is_false_for_what_validate_uid_refuses(uid: object) -> None:
    assert not is_valid_uid(uid)
    with pytest.raises(InvalidUIDError):
        validate_uid(uid, "SOPInstanceUID")


def test_is_valid_uid_accepts_the_longest_uid() -> None:
    assert is_valid_uid("1." + "2" * 62)


class _CallersError(NodeError):
    """Stands for a stage's own error class."""


def test_validate_uid_raises_the_callers_error() -> None:
    with pytest.raises(_CallersError, match=r"sop_uid '1\.02' is not a valid UID"):
        validate_uid("1.02", "sop_uid", _CallersError)


def test_ae_title_loses_its_insignificant_spaces() -> None:
    assert validate_ae_title(" NODE  ", "ae_title") == "NODE"


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("A" * 17, "is 17 characters long"),
        ("", "is 0 characters long"),
        ("   ", "is only spaces"),
        ("A\\B", "contains '\\\\'"),
        ("NODE\n", "contains '\\n'"),
        (b"NODE", "must be a string"),
    ],
)
def test_invalid_ae_titles_name_field_value_and_rule(value: object, fragment: str) -> None:
    with pytest.raises(IngressConfigError) as info:
        validate_ae_title(value, "ae_title")
    assert "ae_title" in str(info.value)
    assert fragment in str(info.value)
    assert "1 to 16 printable ASCII characters" in str(info.value)
