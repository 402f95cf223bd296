"""Study assembly: which studies have been quiet long enough to be processed.

Pure functions over :class:`scp.types.StudyActivity`; the job store calls them and
reopens a study whose ``last_received_at`` moved past the value it processed.
"""

from __future__ import annotations

from collections.abc import Iterable

from scp.types import StudyActivity


def ready_studies(activity: Iterable[StudyActivity], now: float, quiet_period_s: float) -> list[str]:
    """Study Instance UIDs whose last instance arrived at least ``quiet_period_s`` before ``now``.

    ``now`` and the activity times are epoch seconds. The result is ordered by
    ``last_received_at`` (longest quiet first), then by UID, so it is deterministic.
    """
    if quiet_period_s < 0:
        raise ValueError(f"quiet_period_s must be >= 0 seconds; got {quiet_period_s}")
    ready = [a for a in activity if now - a.last_received_at >= quiet_period_s]
    ready.sort(key=lambda a: (a.last_received_at, a.study_instance_uid))
    return [a.study_instance_uid for a in ready]
