"""Finding the patient's prior study: first in the results database, then (optionally) in the PACS.

A prior found in the results database is compared at once. A prior that exists only in the PACS is
requested (C-FIND study then series level, C-MOVE to this node or C-GET); it then arrives like any
study, is processed (its outputs are sent only when ``prior.send_prior_results`` is set), and the
study that asked for it is reprocessed with the comparison when ``prior.update_when_prior_arrives``
is set. Failed retrievals are retried with a doubling delay and are visible in ``prior_requests``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.compare import compare_studies
from pipeline.types import AnatomicalProfiles, Comparison, Measurements, PatientInfo, PriorSearch
from scp.db import SqliteStore
from thighnode.jobs import DONE, JobStore
from thighnode.results import ResultsStore
from thighnode.settings import Settings

if TYPE_CHECKING:
    from scp.index import InstanceIndex
    from scp.instance_sink import InstanceSink

log = logging.getLogger(__name__)

REQUESTED = "requested"
ARRIVED = "arrived"
FAILED = "failed"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS prior_requests (
    prior_study_uid TEXT NOT NULL,
    for_study_uid TEXT NOT NULL,
    prior_study_date TEXT NOT NULL DEFAULT '',
    series_uids TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,
    last_error TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (prior_study_uid, for_study_uid)
);
"""


@dataclass(frozen=True)
class PriorRequest:
    prior_study_uid: str
    for_study_uid: str
    prior_study_date: str
    series_uids: tuple[str, ...]
    state: str
    attempts: int
    next_attempt_at: float | None
    last_error: str


class PriorRequests(SqliteStore):
    """Priors requested from the PACS, in SQLite (thread-safe)."""

    SCHEMA = _SCHEMA

    def record(
        self,
        prior_study_uid: str,
        for_study_uid: str,
        *,
        prior_study_date: str,
        series_uids: tuple[str, ...],
        state: str,
        attempts: int,
        error: str = "",
        next_attempt_at: float | None = None,
        now: float | None = None,
    ) -> None:
        now = time.time() if now is None else now
        with self._lock:
            self._db.execute(
                "INSERT INTO prior_requests(prior_study_uid, for_study_uid, prior_study_date, series_uids, state, "
                "attempts, next_attempt_at, last_error, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(prior_study_uid, for_study_uid) DO UPDATE SET state = excluded.state, "
                "attempts = excluded.attempts, next_attempt_at = excluded.next_attempt_at, "
                "last_error = excluded.last_error, series_uids = excluded.series_uids, updated_at = excluded.updated_at",
                (prior_study_uid, for_study_uid, prior_study_date, "\\".join(series_uids), state, attempts,
                 next_attempt_at, error, now, now),
            )

    def _rows(self, where: str, args: tuple) -> list[PriorRequest]:
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM prior_requests WHERE {where} ORDER BY created_at", args).fetchall()
        return [
            PriorRequest(
                r["prior_study_uid"], r["for_study_uid"], r["prior_study_date"],
                tuple(u for u in r["series_uids"].split("\\") if u), r["state"], r["attempts"],
                r["next_attempt_at"], r["last_error"],
            )
            for r in rows
        ]

    def for_prior(self, prior_study_uid: str) -> list[PriorRequest]:
        return self._rows("prior_study_uid = ?", (prior_study_uid,))

    def for_study(self, for_study_uid: str) -> list[PriorRequest]:
        return self._rows("for_study_uid = ?", (for_study_uid,))

    def due_retries(self, now: float) -> list[PriorRequest]:
        return self._rows("state = ? AND next_attempt_at IS NOT NULL AND next_attempt_at <= ?", (FAILED, now))

    def is_requested_prior(self, study_uid: str) -> bool:
        return bool(self.for_prior(study_uid))

    def mark(self, prior_study_uid: str, state: str, error: str = "", now: float | None = None) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE prior_requests SET state = ?, last_error = ?, next_attempt_at = NULL, updated_at = ? "
                "WHERE prior_study_uid = ?",
                (state, error, time.time() if now is None else now, prior_study_uid),
            )


class PriorFinder:
    """Finds (or requests) the prior study of a patient and compares with it."""

    def __init__(self, settings: Settings, results: ResultsStore, requests: PriorRequests, index: object | None = None) -> None:
        self._settings = settings
        self._results = results
        self._requests = requests
        self._index = index

    def is_requested_prior(self, study_uid: str) -> bool:
        """True when the study was retrieved from the PACS as another study's prior."""
        return self._requests.is_requested_prior(study_uid)

    # -- the source --------------------------------------------------------------------------

    def query_source(self):  # noqa: ANN201 - scp.pacs.QuerySource, imported lazily
        from scp.pacs import QuerySource

        p = self._settings.prior
        return QuerySource(
            name="prior source",
            ae_title=p.ae_title,
            host=p.host,
            port=p.port,
            calling_ae_title=self._settings.node.ae_title,
            method=p.method,  # type: ignore[arg-type]
            move_destination_ae=self._settings.node.ae_title,
            timeout_s=self._settings.node.dimse_timeout_s,
            tls=self._settings.security.tls if p.tls else None,
        )

    def describe_source(self) -> str:
        p = self._settings.prior
        return f"PACS query/retrieve ({p.ae_title}@{p.host}:{p.port})"

    # -- finding -----------------------------------------------------------------------------

    def find(
        self,
        *,
        study_uid: str,
        study_date: str,
        patient: PatientInfo,
        measurements: Measurements,
        profiles: AnatomicalProfiles,
    ) -> tuple[Comparison | None, PriorSearch]:
        """The comparison with the latest earlier study of the patient, or where the node looked."""
        looked = ["results database"]
        if not patient.patient_id:
            return None, PriorSearch(False, looked_in=tuple(looked), message="the study has no PatientID")
        prior = self._latest_prior(study_uid, study_date, patient)
        if prior is not None:
            prior_result, prior_profiles = prior
            comparison = compare_studies(
                measurements, profiles, prior_result.measurements, prior_profiles,
                current_study_date=study_date, prior_study_date=prior_result.study_date,
                prior_study_uid=prior_result.study_uid, height_m=measurements.height_m,
                metal_withhold_near_pct=self._settings.prior.metal_withhold_near_pct,
                metal_withhold_slices_pct=self._settings.prior.metal_withhold_slices_pct,
                withhold_partial=self._settings.prior.withhold_partial,
            )
            self._results.save_comparison(study_uid, comparison)
            for request in self._requests.for_prior(prior_result.study_uid):
                if request.for_study_uid == study_uid:
                    self._requests.mark(prior_result.study_uid, ARRIVED)
            log.info("study %s: compared with prior %s (%s days)", study_uid, prior_result.study_uid,
                     comparison.interval_days)
            return comparison, PriorSearch(
                True, prior_study_uid=prior_result.study_uid, looked_in=tuple(looked),
                message=f"prior study of {prior_result.study_date} found in the results database",
            )
        if not self._settings.prior.query:
            return None, PriorSearch(
                False, looked_in=tuple(looked),
                message="no earlier processed study of this patient; no PACS query/retrieve source is configured",
            )
        if self._requests.is_requested_prior(study_uid):
            return None, PriorSearch(
                False, looked_in=tuple(looked),
                message="this study was itself retrieved as a prior; no further prior is requested",
            )
        looked.append(self.describe_source())
        pending = [r for r in self._requests.for_study(study_uid) if r.state == REQUESTED]
        if pending:
            r = pending[0]
            return None, PriorSearch(
                False, looked_in=tuple(looked),
                message=f"prior study of {r.prior_study_date} was requested from the PACS; "
                "the comparison follows when it has been processed",
            )
        return None, self._request_from_pacs(study_uid, study_date, patient, tuple(looked))

    def _latest_prior(
        self, study_uid: str, study_date: str, patient: PatientInfo
    ):  # noqa: ANN202 - (StudyResult, AnatomicalProfiles) | None
        candidates = [
            r for r in self._results.studies_of_patient(patient.patient_id, patient.issuer_of_patient_id)
            if r.study_uid != study_uid and r.study_date and study_date and r.study_date < study_date
        ]
        for candidate in sorted(candidates, key=lambda r: r.study_date, reverse=True):
            profiles = self._results.profiles(candidate.study_uid)
            if profiles is not None:
                return candidate, profiles
        return None

    def _request_from_pacs(
        self, study_uid: str, study_date: str, patient: PatientInfo, looked: tuple[str, ...]
    ) -> PriorSearch:
        from scp.errors import QueryFailedError
        from scp.query import find_series, find_studies

        source = self.query_source()
        try:
            studies = find_studies(
                source, patient_id=patient.patient_id, issuer_of_patient_id=patient.issuer_of_patient_id,
                before_date=study_date or None, modality="CT",
            )
        except QueryFailedError as exc:
            log.warning("study %s: prior query failed: %s", study_uid, exc.message)
            return PriorSearch(False, looked_in=looked, message=f"the PACS query failed: {exc.message}")
        for match in studies:
            if match.study_instance_uid == study_uid:
                continue
            try:
                series = find_series(source, match.study_instance_uid)
            except QueryFailedError as exc:
                return PriorSearch(False, looked_in=looked, message=f"the PACS series query failed: {exc.message}")
            usable = [
                s for s in series
                if s.modality == "CT"
                and (s.number_of_instances is None or s.number_of_instances >= self._settings.processing.min_slices)
                and not any(w in s.series_description.lower() for w in ("localizer", "scout", "topogram", "dose"))
            ]
            if not usable:
                continue
            usable.sort(key=lambda s: -(s.number_of_instances or 0))
            chosen = tuple(s.series_instance_uid for s in usable[:3])
            error = self.retrieve(match.study_instance_uid, chosen)
            attempts = 1
            if error:
                delay = self._settings.prior.retry_delay_s
                self._requests.record(
                    match.study_instance_uid, study_uid, prior_study_date=match.study_date, series_uids=chosen,
                    state=FAILED, attempts=attempts, error=error, next_attempt_at=time.time() + delay,
                )
                return PriorSearch(
                    False, looked_in=looked,
                    message=f"prior study of {match.study_date} found in the PACS but its retrieval failed "
                    f"({error}); retrying",
                )
            self._requests.record(
                match.study_instance_uid, study_uid, prior_study_date=match.study_date, series_uids=chosen,
                state=REQUESTED, attempts=attempts,
            )
            log.info("study %s: prior %s requested from the PACS (%d series)", study_uid, match.study_instance_uid,
                     len(chosen))
            return PriorSearch(
                False, looked_in=looked,
                message=f"prior study of {match.study_date} was retrieved from the PACS; "
                "the comparison follows when it has been processed",
            )
        return PriorSearch(False, looked_in=looked, message="no earlier CT study of this patient in the PACS")

    def retrieve(self, prior_study_uid: str, series_uids: tuple[str, ...]) -> str:
        """Retrieve the series; '' on success, else the reason."""
        from scp.retrieve import retrieve_study

        source = self.query_source()
        store = None
        if source.method == "get" and self._index is not None:
            store = retrieval_sink(self._settings, self._index, source.ae_title)
        return retrieve_study(source, prior_study_uid, series_uids, store=store)

    def retry_due(self, now: float | None = None) -> int:
        """Retry failed retrievals whose time has come (scheduler job). Returns the number retried."""
        now = time.time() if now is None else now
        retried = 0
        for r in self._requests.due_retries(now):
            error = self.retrieve(r.prior_study_uid, r.series_uids)
            attempts = r.attempts + 1
            if error and attempts < self._settings.prior.retrieve_attempts:
                delay = self._settings.prior.retry_delay_s * 2 ** (attempts - 1)
                state, next_at = FAILED, now + delay
            else:
                state, next_at = (FAILED, None) if error else (REQUESTED, None)
            self._requests.record(
                r.prior_study_uid, r.for_study_uid, prior_study_date=r.prior_study_date, series_uids=r.series_uids,
                state=state, attempts=attempts, error=error, next_attempt_at=next_at, now=now,
            )
            log.info("prior %s: retrieval retry %d %s", r.prior_study_uid, attempts, "failed" if error else "done")
            retried += 1
        return retried


def follow_up_prior(
    requests: PriorRequests, jobs: JobStore, study_uid: str, state: str, reason: str, *, update_when_prior_arrives: bool
) -> None:
    """After a job of ``study_uid`` ended: when that study was another study's requested prior, reprocess that
    study (or record the prior as arrived, or as failed when its job did not end done)."""
    for request in requests.for_prior(study_uid):
        if request.state != REQUESTED:
            continue
        if state != DONE:
            requests.mark(study_uid, FAILED, f"the prior study was {state}: {reason}")
            continue
        if update_when_prior_arrives:
            jobs.requeue(
                request.for_study_uid,
                f"prior study {study_uid} arrived and was processed: reprocessing with the comparison",
            )
        else:
            requests.mark(study_uid, ARRIVED)


def retrieval_sink(settings: Settings, index: InstanceIndex, source_ae_title: str) -> InstanceSink:
    """Where a C-GET's instances go: spooled and indexed as the listener stores them, with the same
    [security] integrity limits (element and instance sizes)."""
    from scp.instance_sink import store_into
    from scp.integrity import IntegrityLimits

    sec = settings.security
    return store_into(index, settings.spool_dir, source_ae_title,
                      limits=IntegrityLimits(sec.max_element_bytes, sec.max_instance_bytes))
