"""scp.status: the named DIMSE statuses, their classification and description."""

from __future__ import annotations

from scp import status
from scp.status import (
    STATUS_MOVE_DESTINATION_UNKNOWN,
    describe_retrieve_status,
    describe_status,
    is_permanent_failure,
    is_stored,
)


def test_status_classification() -> None:
    assert is_stored(0x0000) and is_stored(0x0001) and is_stored(0xB000) and is_stored(0xBFFF)
    assert not is_stored(0xA700) and not is_stored(0xC000) and not is_stored(0x0122)
    assert describe_status(0xA700) == "0xA700 (Refused: Out of Resources)"


def test_permanent_failures() -> None:
    assert is_permanent_failure(0x0122) and is_permanent_failure(0xA900) and is_permanent_failure(0xC123)
    assert not is_permanent_failure(0xA700) and not is_permanent_failure(0xA7FF)


def test_describe_retrieve_status_names_the_status() -> None:
    assert describe_retrieve_status(STATUS_MOVE_DESTINATION_UNKNOWN) == "0xA801 Move destination unknown"
    assert describe_retrieve_status(0xC123) == "0xC123 Unable to process"
    assert describe_retrieve_status(0x1234) == "0x1234 unknown status"


def test_single_statuses_are_distinct() -> None:
    """Every named single status has its own value (ranges are *_FIRST / *_LAST)."""
    names = [n for n in dir(status) if n.startswith("STATUS_") and not n.endswith(("_FIRST", "_LAST"))]
    values = [getattr(status, n) for n in names]
    assert len(set(values)) == len(values), sorted(zip(values, names))
