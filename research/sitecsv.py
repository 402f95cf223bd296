"""The site CSV of clinical data (format: :mod:`research.cohort`) and its join with the measured studies."""

from __future__ import annotations

import csv
import datetime as dt
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from research.errors import SiteCsvError
from scp.validate import is_valid_uid
from research.rows import TIDY_COLUMNS
from thighnode.results import StudyResult

AWGS2014_DXA_SMI_KG_M2 = {"F": 5.4, "M": 7.0}
"""AWGS 2014 DXA appendicular SMI cut-offs (sarcopenia below): women 5.4, men 7.0 kg/m²."""
_SELECTOR_COLUMNS = ("patient_id", "issuer", "study_uid", "study_date")
_NUMERIC_RANGES = {
    "dxa_lean_mass_kg": (0.0, 200.0, "kg (lean mass in grams? divide by 1000)"),
    "dxa_smi_kg_m2": (0.0, 30.0, "kg/m²"),
}
_SEX = {"f": "F", "female": "F", "w": "F", "woman": "F", "m": "M", "male": "M", "man": "M", "o": "O", "other": "O"}
_BOOL = {"1": "1", "0": "0", "true": "1", "false": "0", "yes": "1", "no": "0", "y": "1", "n": "0"}


@dataclass(frozen=True)
class ClinicalRow:
    """One row of the site CSV, validated (``values`` = clinical columns, normalised text)."""

    line: int
    patient_id: str
    issuer: str | None  # None: matches any issuer
    study_uid: str
    study_date: str  # YYYYMMDD or ""
    values: dict[str, str]


@dataclass(frozen=True)
class SiteCsv:
    path: Path
    clinical_columns: tuple[str, ...]
    rows: tuple[ClinicalRow, ...]


def _csv_error(path: Path, line: int, column: str, value: str, allowed: str) -> SiteCsvError:
    return SiteCsvError(f"site CSV {path} line {line}, column {column!r}: value {value!r}; allowed: {allowed}")


def _parse_date(path: Path, line: int, value: str) -> str:
    for fmt in ("%Y%m%d", "%Y-%m-%d"):
        try:
            return dt.datetime.strptime(value, fmt).strftime("%Y%m%d")
        except ValueError:
            continue
    raise _csv_error(path, line, "study_date", value, "a date YYYYMMDD or YYYY-MM-DD")


def read_site_csv(path: Path) -> SiteCsv:
    """Read and validate the site CSV (see the module docstring for the columns)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise SiteCsvError(f"site CSV {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise SiteCsvError(f"site CSV {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8 CSV") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise SiteCsvError(f"site CSV {path} line 1: no header row; the first line must name the columns")
    delimiter = ";" if ";" in lines[0] and "," not in lines[0] else ","
    reader = csv.reader(text.splitlines(keepends=True), delimiter=delimiter, strict=True)
    try:
        header_raw = next(reader)
    except csv.Error as exc:
        raise SiteCsvError(f"site CSV {path} line 1: not valid CSV ({exc})") from None
    header = [h.strip().lower() for h in header_raw]
    for i, h in enumerate(header):
        if not h:
            raise SiteCsvError(f"site CSV {path} line 1, column {i + 1}: empty column name; every column needs a name")
        if header.index(h) != i:
            raise SiteCsvError(f"site CSV {path} line 1, column {h!r}: named twice; column names must be unique")
    if "patient_id" not in header:
        raise SiteCsvError(
            f"site CSV {path} line 1: no 'patient_id' column; columns seen: {', '.join(header)}; "
            "required: patient_id (optional issuer, study_uid, study_date, then clinical columns)"
        )
    clashing = [h for h in header if h in TIDY_COLUMNS and h != "sex" and h not in _SELECTOR_COLUMNS]
    if clashing:
        raise SiteCsvError(
            f"site CSV {path} line 1, column {clashing[0]!r}: this name is a measured column of the tidy table; "
            "rename the clinical column (e.g. prefix it with site_)"
        )
    clinical = tuple(h for h in header if h not in _SELECTOR_COLUMNS)
    rows: list[ClinicalRow] = []
    line = 1
    try:
        for fields in reader:
            line = reader.line_num
            if not fields or all(not f.strip() for f in fields):
                continue
            if len(fields) != len(header):
                raise SiteCsvError(
                    f"site CSV {path} line {line}: {len(fields)} fields, the header has {len(header)} "
                    f"({', '.join(header)}); a value containing {delimiter!r} must be quoted"
                )
            raw = {h: f.strip() for h, f in zip(header, fields)}
            rows.append(_clinical_row(path, line, raw, clinical, "issuer" in header))
    except csv.Error as exc:
        raise SiteCsvError(f"site CSV {path} line {reader.line_num}: not valid CSV ({exc})") from None
    return SiteCsv(path=path, clinical_columns=clinical, rows=tuple(rows))


def _clinical_row(path: Path, line: int, raw: dict[str, str], clinical: Sequence[str], has_issuer: bool) -> ClinicalRow:
    if not raw["patient_id"]:
        raise _csv_error(path, line, "patient_id", "", "a non-empty PatientID as in the studies")
    uid = raw.get("study_uid", "")
    if uid and not is_valid_uid(uid):
        raise _csv_error(path, line, "study_uid", uid, "a StudyInstanceUID (digits and dots, at most 64 characters)")
    date = _parse_date(path, line, raw["study_date"]) if raw.get("study_date") else ""
    values: dict[str, str] = {}
    for col in clinical:
        v = raw[col]
        if v == "":
            values[col] = ""
        elif col == "sex":
            if v.lower() not in _SEX:
                raise _csv_error(path, line, col, v, "F, M, O (or female, male, other)")
            values[col] = _SEX[v.lower()]
        elif col == "dxa_sarcopenia":
            if v.lower() not in _BOOL:
                raise _csv_error(path, line, col, v, "0 or 1 (also true/false, yes/no), or blank to derive it")
            values[col] = _BOOL[v.lower()]
        elif col in _NUMERIC_RANGES:
            lo, hi, unit = _NUMERIC_RANGES[col]
            try:
                number = float(v.replace(",", ".") if v.count(",") == 1 and "." not in v else v)
            except ValueError:
                raise _csv_error(path, line, col, v, f"a number in {unit}") from None
            if not (lo < number < hi) or math.isnan(number):
                raise _csv_error(path, line, col, v, f"{lo} < value < {hi} {unit}")
            values[col] = repr(number)
        else:
            values[col] = v
    issuer = raw.get("issuer", "") if has_issuer else ""
    return ClinicalRow(
        line=line, patient_id=raw["patient_id"], issuer=issuer or None, study_uid=uid, study_date=date, values=values
    )


@dataclass(frozen=True)
class JoinReport:
    """What the join of the site CSV with the studies found (line numbers, never patient IDs)."""

    csv_rows: int
    matched_rows: int
    unknown_patient_lines: tuple[int, ...]  # no study of that patient in the results database
    unmatched_study_lines: tuple[int, ...]  # the patient is known but no study has that UID / date
    studies_with_clinical: int
    sex_conflicts: int  # CSV sex differs from the study's PatientSex (the CSV wins)
    sarcopenia_derived: int  # dxa_sarcopenia derived from dxa_smi_kg_m2 and sex (AWGS 2014)


def join_clinical(studies: Sequence[StudyResult], site: SiteCsv) -> tuple[dict[str, dict[str, str]], JoinReport]:
    """Clinical values per study UID (own row first, then the patient's agreeing rows), and a report."""
    by_patient: dict[str, list[StudyResult]] = {}
    for s in studies:
        by_patient.setdefault(s.patient_id, []).append(s)
    own: dict[str, dict[str, str]] = {}
    own_line: dict[str, int] = {}
    patient_rows: dict[tuple[str, str], list[dict[str, str]]] = {}
    unknown, unmatched = [], []
    for row in site.rows:
        candidates = [s for s in by_patient.get(row.patient_id, []) if row.issuer is None or s.issuer == row.issuer]
        if not candidates:
            unknown.append(row.line)
            continue
        chosen = [
            s for s in candidates
            if (not row.study_uid or s.study_uid == row.study_uid) and (not row.study_date or s.study_date == row.study_date)
        ]
        if not chosen:
            unmatched.append(row.line)
            continue
        for s in chosen:
            if s.study_uid in own:
                raise SiteCsvError(
                    f"site CSV {site.path} lines {own_line[s.study_uid]} and {row.line} both describe study "
                    f"{s.study_uid}; allowed: one row per study (give study_uid or study_date to tell them apart)"
                )
            own[s.study_uid] = dict(row.values)
            own_line[s.study_uid] = row.line
        for issuer in {s.issuer for s in chosen}:
            patient_rows.setdefault((row.patient_id, issuer), []).append(row.values)
    patient_level = [c for c in site.clinical_columns if not c.startswith("dxa_")]
    out: dict[str, dict[str, str]] = {}
    conflicts = derived = 0
    for s in studies:
        values = dict(own.get(s.study_uid, {}))
        for col in patient_level:
            if values.get(col):
                continue
            seen = {r[col] for r in patient_rows.get((s.patient_id, s.issuer), []) if r.get(col)}
            if len(seen) == 1:
                values[col] = seen.pop()
        if not values:
            continue
        if values.get("sex") and s.sex in ("F", "M", "O") and values["sex"] != s.sex:
            conflicts += 1
        sex = values.get("sex") or s.sex
        values["dxa_sarcopenia_source"] = "csv" if values.get("dxa_sarcopenia") else ""
        if not values.get("dxa_sarcopenia") and values.get("dxa_smi_kg_m2") and sex in AWGS2014_DXA_SMI_KG_M2:
            values["dxa_sarcopenia"] = "1" if float(values["dxa_smi_kg_m2"]) < AWGS2014_DXA_SMI_KG_M2[sex] else "0"
            values["dxa_sarcopenia_source"] = "derived_awgs2014"
            derived += 1
        out[s.study_uid] = values
    report = JoinReport(
        csv_rows=len(site.rows), matched_rows=len(site.rows) - len(unknown) - len(unmatched),
        unknown_patient_lines=tuple(unknown), unmatched_study_lines=tuple(unmatched),
        studies_with_clinical=len(out), sex_conflicts=conflicts, sarcopenia_derived=derived,
    )
    return out, report
