"""scp.assembly: which studies are quiet long enough."""

from __future__ import annotations

import pytest

from scp.assembly import ready_studies
from scp.types import StudyActivity


def _activity(uid: str, last: float) -> StudyActivity:
    return StudyActivity(uid, first_received_at=last - 10, last_received_at=last, instance_count=3, non_ct_count=0)


def test_only_studies_quiet_for_the_period_are_ready() -> None:
    activity = [_activity("1.1", 100.0), _activity("1.2", 170.0), _activity("1.3", 140.0)]
    assert ready_studies(activity, now=200.0, quiet_period_s=60.0) == ["1.1", "1.3"]


def test_boundary_counts_as_quiet() -> None:
    assert ready_studies([_activity("1.1", 140.0)], now=200.0, quiet_period_s=60.0) == ["1.1"]


def test_longest_quiet_first_then_uid() -> None:
    activity = [_activity("1.9", 50.0), _activity("1.2", 50.0), _activity("1.5", 10.0)]
    assert ready_studies(activity, now=100.0, quiet_period_s=0.0) == ["1.5", "1.2", "1.9"]


def test_accepts_any_iterable_and_empty() -> None:
    assert ready_studies(iter(()), now=0.0, quiet_period_s=1.0) == []
    assert ready_studies((a for a in [_activity("1.1", 0.0)]), now=5.0, quiet_period_s=1.0) == ["1.1"]


def test_negative_quiet_period_is_refused() -> None:
    with pytest.raises(ValueError, match="quiet_period_s"):
        ready_studies([], now=0.0, quiet_period_s=-1.0)
