"""Query SCU: find a patient's prior studies and their series on a PACS (C-FIND).

Implements the SCU side of the Query/Retrieve Service Class (PS3.4 Annex C) with the
Study Root information model (PS3.4 C.6.2):

* :func:`find_studies` - C-FIND at STUDY level (PS3.4 C.4.1, keys C.6.2.1.2): the
  patient's studies strictly before a date, containing a modality, newest first.
* :func:`find_series` - C-FIND at SERIES level (PS3.4 C.4.1, keys C.6.2.1.3).

A C-FIND that fails raises :class:`~scp.errors.QueryFailedError` naming the PACS,
because an empty list would read as "this patient has no prior study". Invalid
arguments raise :class:`~scp.errors.QueryArgumentError` /
:class:`~scp.errors.InvalidUIDError`.

Logs carry identifiers only (UIDs, counts, the PACS name and address), never a
PatientID or a name. pynetdicom itself logs request identifiers at INFO; the CLI keeps
its logger at WARNING. Each call builds its own AE and association
(:mod:`scp.association`), so the functions may run on several threads at once.
"""

from __future__ import annotations

import datetime
import fnmatch
import logging
import time
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from scp.association import create_ae
from scp.errors import QueryArgumentError, QueryFailedError
from scp.pacs import QuerySource, associate, error_comment, read_int, read_multi, read_text, release
from scp.status import PENDING_STATUSES, STATUS_SUCCESS, describe_retrieve_status
from scp.validate import is_valid_uid, validate_uid

LOGGER = logging.getLogger(__name__)

#: Longest LO value (PS3.5 Table 6.2-1): PatientID, IssuerOfPatientID.
_LO_MAX_CHARS = 64
#: Longest CS value (PS3.5 Table 6.2-1): Modality.
_CS_MAX_CHARS = 16
#: Characters with a matching meaning in C-FIND keys (PS3.4 C.2.2.2.4, C.2.2.2.2).
_WILDCARDS = ("*", "?", "\\")


@dataclass(frozen=True)
class StudyMatch:
    """One STUDY-level C-FIND match (PS3.4 C.6.2.1.2); empty strings when not returned.

    ``study_date`` is DA (YYYYMMDD), ``study_time`` TM as returned.
    """

    study_instance_uid: str
    study_date: str
    study_time: str
    study_description: str
    modalities_in_study: tuple[str, ...]
    accession_number: str
    number_of_series: int | None


@dataclass(frozen=True)
class SeriesMatch:
    """One SERIES-level C-FIND match (PS3.4 C.6.2.1.3); empty strings when not returned."""

    series_instance_uid: str
    modality: str
    series_number: int | None
    series_description: str
    number_of_instances: int | None
    body_part_examined: str


@dataclass(frozen=True)
class _StudyKeys:
    """The checked matching keys of a STUDY-level C-FIND (PS3.4 C.6.2.1.2)."""

    patient_id: str
    issuer: str
    before_date: str | None
    modality: str

    def identifier(self) -> Dataset:
        """The C-FIND identifier: these keys, and empty return keys for what a match needs."""
        query = Dataset()
        if not (self.patient_id + self.issuer).isascii():
            query.SpecificCharacterSet = "ISO_IR 192"
        query.QueryRetrieveLevel = "STUDY"
        query.PatientID = self.patient_id
        if self.issuer:
            query.IssuerOfPatientID = self.issuer
        query.StudyInstanceUID = ""
        query.StudyDate = f"-{self.before_date}" if self.before_date else ""
        query.StudyTime = ""
        query.StudyDescription = ""
        query.AccessionNumber = ""
        query.ModalitiesInStudy = self.modality
        query.NumberOfStudyRelatedSeries = None
        return query

    def match(self, ident: Dataset) -> StudyMatch | None:
        """The PACS's answer as a :class:`StudyMatch`, or None when the client-side check drops it."""
        study_uid = read_text(ident, "StudyInstanceUID")
        if not is_valid_uid(study_uid):
            return None
        returned_id = read_text(ident, "PatientID")
        returned_issuer = read_text(ident, "IssuerOfPatientID")
        study_date = read_text(ident, "StudyDate")
        modalities = read_multi(ident, "ModalitiesInStudy")
        before = self.before_date
        if (
            (returned_id and returned_id != self.patient_id)
            or (self.issuer and returned_issuer and returned_issuer != self.issuer)
            or (before and not (len(study_date) == 8 and study_date.isdigit() and study_date < before))
            or (self.modality and modalities and self.modality not in modalities)
        ):
            return None
        return StudyMatch(
            study_instance_uid=study_uid,
            study_date=study_date,
            study_time=read_text(ident, "StudyTime"),
            study_description=read_text(ident, "StudyDescription"),
            modalities_in_study=modalities,
            accession_number=read_text(ident, "AccessionNumber"),
            number_of_series=read_int(ident, "NumberOfStudyRelatedSeries"),
        )


def _check_key_text(value: object, keyword: str, max_chars: int, *, allow_empty: bool) -> str:
    """A single-valued matching key without wildcards (single value matching, PS3.4 C.2.2.2.1)."""
    allowed = (
        f"{'0' if allow_empty else '1'} to {max_chars} characters, no control characters, "
        f"no wildcard or backslash ({' '.join(_WILDCARDS)})"
    )
    if not isinstance(value, str):
        raise QueryArgumentError(f"{keyword} must be a string ({allowed}); got {type(value).__name__}")
    text = value.strip(" ")
    if not text and not allow_empty:
        raise QueryArgumentError(f"{keyword} is empty; allowed: {allowed}")
    if len(text) > max_chars:
        raise QueryArgumentError(f"{keyword} is {len(text)} characters long; allowed: {allowed}")
    # The value itself is not echoed: PatientID must not reach logs or job records.
    bad = [c for c in text if c in _WILDCARDS or ord(c) < 0x20 or ord(c) == 0x7F]
    if bad:
        raise QueryArgumentError(f"{keyword} contains {bad[0]!r}; allowed: {allowed}")
    return text


def _check_date(value: object, keyword: str) -> str:
    allowed = "a date YYYYMMDD (DA, PS3.5 Table 6.2-1)"
    if not isinstance(value, str) or len(value) != 8 or not value.isdigit():
        raise QueryArgumentError(f"{keyword} is {value!r}; allowed: {allowed}")
    try:
        datetime.datetime.strptime(value, "%Y%m%d")
    except ValueError:
        raise QueryArgumentError(f"{keyword} is {value!r}, not a calendar date; allowed: {allowed}") from None
    return value


def _check_modality(value: object) -> str:
    allowed = "'' (any) or a Modality code of up to 16 upper-case letters, digits or '_' (CS)"
    if not isinstance(value, str):
        raise QueryArgumentError(f"modality is {value!r}; allowed: {allowed}")
    text = value.strip(" ")
    if len(text) > _CS_MAX_CHARS or any(not (c.isascii() and (c.isupper() or c.isdigit() or c == "_")) for c in text):
        raise QueryArgumentError(f"modality is {value!r}; allowed: {allowed}")
    return text


def _run_find(source: QuerySource, identifier: Dataset, level: str) -> list[Dataset]:
    """Send one Study Root C-FIND (PS3.4 C.4.1) and collect the pending identifiers.

    Raises :class:`~scp.errors.QueryFailedError` naming the PACS when the association
    fails, the final status is not Success, or no final response arrives.
    """
    ae = create_ae(source.association)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc, reason = associate(source, ae)
    if assoc is None:
        raise QueryFailedError(f"C-FIND {level} failed: {reason}")
    matches: list[Dataset] = []
    try:
        try:
            responses = assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind)
        except ValueError as exc:
            raise QueryFailedError(f"{source.label} did not accept Study Root Query/Retrieve - FIND ({exc})") from None
        final: int | None = None
        for status_ds, ident in responses:
            if "Status" not in status_ds:
                raise QueryFailedError(
                    f"C-FIND {level} on {source.label} got no final response "
                    f"(timed out after {source.timeout_s:g} s, aborted, or an invalid response); "
                    f"{len(matches)} matches so far"
                )
            status = int(status_ds.Status)
            if status in PENDING_STATUSES:
                if ident is not None:
                    matches.append(ident)
                continue
            final = status
            if status != STATUS_SUCCESS:
                described = f"{describe_retrieve_status(status)}{error_comment(status_ds)}"
                raise QueryFailedError(f"{source.label} refused C-FIND {level}: {described}")
        if final is None:
            raise QueryFailedError(f"C-FIND {level} on {source.label} ended without a final status")
    finally:
        release(assoc)
    return matches


def _time_key(study_time: str) -> str:
    """TM as a sortable HHMMSS.ffffff (PS3.5 Table 6.2-1: components may be omitted)."""
    whole, _, fraction = study_time.replace(":", "").partition(".")
    return f"{whole.ljust(6, '0')}.{fraction.ljust(6, '0')}"


def find_studies(
    source: QuerySource,
    *,
    patient_id: str,
    issuer_of_patient_id: str = "",
    before_date: str | None = None,
    modality: str = "CT",
) -> list[StudyMatch]:
    """The patient's studies on ``source``, newest first (Study Root C-FIND at STUDY level).

    PS3.4 C.4.1 / C.6.2.1.2. Keys: PatientID (single value matching; wildcards are
    refused so that no other patient can match), IssuerOfPatientID when given,
    StudyDate ``-YYYYMMDD`` (range matching, PS3.4 C.2.2.2.5) when ``before_date`` is
    given, ModalitiesInStudy when ``modality`` is not ``""``. The PACS's answer is
    checked again here, because not every PACS matches every key: a study is dropped
    when its returned PatientID or IssuerOfPatientID differs, when ``before_date`` is
    given and its StudyDate is missing or not strictly earlier, or when it returns
    ModalitiesInStudy without ``modality``. A study whose ModalitiesInStudy comes back
    empty is kept (the series selection checks the modality anyway).

    Raises :class:`~scp.errors.QueryArgumentError` for invalid arguments and
    :class:`~scp.errors.QueryFailedError` when the C-FIND fails (the message names the PACS).
    """
    keys = _StudyKeys(
        patient_id=_check_key_text(patient_id, "patient_id", _LO_MAX_CHARS, allow_empty=False),
        issuer=_check_key_text(issuer_of_patient_id, "issuer_of_patient_id", _LO_MAX_CHARS, allow_empty=True),
        before_date=None if before_date is None else _check_date(before_date, "before_date"),
        modality=_check_modality(modality),
    )
    started = time.monotonic()
    LOGGER.info(
        "C-FIND STUDY on %s: before %s, modality %s",
        source.label,
        keys.before_date or "any date",
        keys.modality or "any",
    )
    identifiers = _run_find(source, keys.identifier(), "STUDY")
    kept: dict[str, StudyMatch] = {}
    dropped = 0
    for ident in identifiers:
        match = keys.match(ident)
        if match is None:
            dropped += 1
        else:
            kept[match.study_instance_uid] = match
    studies = sorted(
        kept.values(),
        key=lambda m: (m.study_date, _time_key(m.study_time), m.study_instance_uid),
        reverse=True,
    )
    LOGGER.info(
        "C-FIND STUDY on %s: %d matches, %d kept (%s), %d dropped by the client-side check, %.2f s",
        source.label,
        len(identifiers),
        len(studies),
        ", ".join(m.study_instance_uid for m in studies) or "none",
        dropped,
        time.monotonic() - started,
    )
    return studies


def find_series(source: QuerySource, study_uid: str) -> list[SeriesMatch]:
    """The series of one study on ``source``, by SeriesNumber (C-FIND at SERIES level).

    PS3.4 C.4.1 / C.6.2.1.3 (Study Root: StudyInstanceUID is the unique key of the
    level above). Raises :class:`~scp.errors.InvalidUIDError` for an invalid
    ``study_uid`` and :class:`~scp.errors.QueryFailedError` when the C-FIND fails.
    """
    validate_uid(study_uid, "StudyInstanceUID")
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = ""
    query.Modality = ""
    query.SeriesNumber = None
    query.SeriesDescription = ""
    query.NumberOfSeriesRelatedInstances = None
    query.BodyPartExamined = ""

    started = time.monotonic()
    identifiers = _run_find(source, query, "SERIES")
    series: dict[str, SeriesMatch] = {}
    for ident in identifiers:
        returned_study = read_text(ident, "StudyInstanceUID")
        series_uid = read_text(ident, "SeriesInstanceUID")
        if (returned_study and returned_study != study_uid) or not is_valid_uid(series_uid):
            continue
        series[series_uid] = SeriesMatch(
            series_instance_uid=series_uid,
            modality=read_text(ident, "Modality"),
            series_number=read_int(ident, "SeriesNumber"),
            series_description=read_text(ident, "SeriesDescription"),
            number_of_instances=read_int(ident, "NumberOfSeriesRelatedInstances"),
            body_part_examined=read_text(ident, "BodyPartExamined"),
        )
    ordered = sorted(
        series.values(),
        key=lambda s: (s.series_number is None, s.series_number or 0, s.series_instance_uid),
    )
    LOGGER.info(
        "C-FIND SERIES on %s for study %s: %d series, %.2f s",
        source.label,
        study_uid,
        len(ordered),
        time.monotonic() - started,
    )
    return ordered



@dataclass(frozen=True)
class _CohortKeys:
    """The checked matching keys of an archive (cohort) STUDY-level C-FIND, by date range."""

    date_from: str
    date_to: str
    modality: str
    description: str

    def identifier(self) -> Dataset:
        query = Dataset()
        if not self.description.isascii():
            query.SpecificCharacterSet = "ISO_IR 192"
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        query.StudyDate = f"{self.date_from}-{self.date_to}"
        query.StudyTime = ""
        query.StudyDescription = self.description
        query.AccessionNumber = ""
        query.ModalitiesInStudy = self.modality
        query.NumberOfStudyRelatedSeries = None
        return query

    def match(self, ident: Dataset) -> StudyMatch | None:
        """The answer as a :class:`StudyMatch`, or None when the client-side check drops it (not
        every PACS applies every key: range matching, ModalitiesInStudy and wildcards are checked again)."""
        study_uid = read_text(ident, "StudyInstanceUID")
        study_date = read_text(ident, "StudyDate")
        modalities = read_multi(ident, "ModalitiesInStudy")
        description = read_text(ident, "StudyDescription")
        if (
            not is_valid_uid(study_uid)
            or not (len(study_date) == 8 and study_date.isdigit() and self.date_from <= study_date <= self.date_to)
            or (self.modality and modalities and self.modality not in modalities)
            or (self.description and not fnmatch.fnmatchcase(description.upper(), self.description.upper()))
        ):
            return None
        return StudyMatch(
            study_instance_uid=study_uid,
            study_date=study_date,
            study_time=read_text(ident, "StudyTime"),
            study_description=description,
            modalities_in_study=modalities,
            accession_number=read_text(ident, "AccessionNumber"),
            number_of_series=read_int(ident, "NumberOfStudyRelatedSeries"),
        )


def find_studies_in_range(
    source: QuerySource,
    *,
    date_from: str,
    date_to: str,
    modality: str = "CT",
    study_description: str = "",
) -> list[StudyMatch]:
    """Every study on ``source`` dated ``date_from``..``date_to`` (inclusive), oldest first.

    For archive backfills (cohort research): a Study Root C-FIND at STUDY level (PS3.4 C.4.1,
    C.6.2.1.2) with StudyDate range matching (C.2.2.2.5), ModalitiesInStudy when ``modality`` is not
    ``""``, and StudyDescription with wildcard matching (``*``, ``?``; C.2.2.2.4) when
    ``study_description`` is given. No patient key: every patient's studies match. The answer is
    checked again client-side (date in range, modality, description, case-insensitive).

    Raises :class:`~scp.errors.QueryArgumentError` for invalid arguments and
    :class:`~scp.errors.QueryFailedError` when the C-FIND fails (the message names the PACS).
    """
    keys = _CohortKeys(
        date_from=_check_date(date_from, "date_from"),
        date_to=_check_date(date_to, "date_to"),
        modality=_check_modality(modality),
        description=_check_description(study_description),
    )
    if keys.date_from > keys.date_to:
        raise QueryArgumentError(f"date_from {keys.date_from} is after date_to {keys.date_to}; allowed: from <= to")
    started = time.monotonic()
    identifiers = _run_find(source, keys.identifier(), "STUDY")
    kept = {m.study_instance_uid: m for m in (keys.match(i) for i in identifiers) if m is not None}
    studies = sorted(kept.values(), key=lambda m: (m.study_date, _time_key(m.study_time), m.study_instance_uid))
    LOGGER.info(
        "C-FIND STUDY on %s: %s..%s, modality %s: %d matches, %d kept, %.2f s",
        source.label, keys.date_from, keys.date_to, keys.modality or "any", len(identifiers), len(studies),
        time.monotonic() - started,
    )
    return studies


def _check_description(value: object) -> str:
    """A StudyDescription matching key: text of at most 64 characters; wildcards * and ? allowed."""
    if not isinstance(value, str):
        raise QueryArgumentError(f"study_description must be a str; got {type(value).__name__}")
    if len(value) > _LO_MAX_CHARS or "\\" in value or any(ord(c) < 32 for c in value):
        raise QueryArgumentError(
            f"study_description {value!r} is not a valid LO matching key; allowed: at most {_LO_MAX_CHARS} "
            "characters, no backslash or control characters (wildcards * and ? are allowed)"
        )
    return value
