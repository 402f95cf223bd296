"""``thighnode cohort``: the research analyses of the reference papers over everything measured.

Reads the results database (every processed study and its comparison with the prior), joins an
optional site CSV of clinical data, and writes into ``--out``:

``cohort_tidy.csv``           one row per study x structure x side (no raw PatientID: ``patient_key``)
``table1_composition.csv``    each muscle's % of the visualised muscle volume, baseline CT, by group
``table2_total_loss.csv``     total muscle volume loss (cm³, cm³/m²) by group: n, mean, std, quartiles
``table3_muscle_loss.csv``    per muscle and side: mean loss (cm³, cm³/m²) and loss ratio by group
``total_loss_by_study.csv``   the per-study totals behind Table 2 and Figure 6
``smi_dxa_correlation.csv``   Spearman: CT group mass vs DXA lean mass, CT SMI vs DXA SMI
``roc_smi.csv``               per CT group and sex: AUC, Youden cut-off, sensitivity, specificity, n
``fig6_total_loss_box.png``, ``fig7_muscle_loss_bar.png``, ``fig8_loss_ratio_bar.png``,
``fig_roc_smi.png``, ``fig_mass_vs_dxa.png`` (each skipped, with the reason printed, without data)

Site CSV (UTF-8, comma- or semicolon-separated, header row; column names are case-insensitive):

* ``patient_id`` (required): PatientID (0010,0020) as in the studies; ``issuer`` (optional):
  IssuerOfPatientID; blank or absent matches any issuer;
* ``study_uid`` or ``study_date`` (YYYYMMDD or YYYY-MM-DD), both optional: which of the patient's
  studies the row describes; with neither, the row describes every study of the patient;
* clinical columns: ``fracture_type`` (e.g. femoral_neck, intertrochanteric), ``sex`` (F/M/O,
  female/male), ``dxa_lean_mass_kg`` (DXA lean mass, lower-extremity or whole-body), ``dxa_smi_kg_m2``,
  ``dxa_sarcopenia`` (0/1; blank: derived from dxa_smi_kg_m2 and sex with AWGS 2014: < 5.4 kg/m²
  women, < 7.0 men); any other column is carried into the tidy CSV as text.

``dxa_*`` values belong to the studies the row selects; the other clinical columns (fracture type,
sex ...) describe the patient and are also given to the patient's other studies when the patient's
rows agree (a follow-up CT then inherits the fracture type of the row naming the pre-operative CT).
CSV rows whose patient has no study are counted and reported (by line), never silently dropped.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, TextIO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from node_errors import NodeError
from research.stats import (
    RocResult,
    composition_table,
    format_table,
    loss_table,
    per_muscle_loss_table,
    roc_analysis,
    spearman,
    study_total_losses,
)
from pipeline.types import GROUP_ABOVE_KNEE, GROUP_ALL, GROUP_GLUTEAL, SIDE_BOTH
from thighnode.results import ResultsStore, StudyResult

log = logging.getLogger(__name__)

DEFAULT_GROUP_BY = ("fracture_type", "sex")
CT_GROUPS = (GROUP_GLUTEAL, GROUP_ABOVE_KNEE, GROUP_ALL)
AWGS2014_DXA_SMI_KG_M2 = {"F": 5.4, "M": 7.0}
"""AWGS 2014 DXA appendicular SMI cut-offs (sarcopenia below): women 5.4, men 7.0 kg/m²."""

TIDY_COLUMNS = (
    "patient_key", "study_uid", "study_date", "baseline", "sex", "height_m", "model",
    "structure_key", "structure_name", "structure_group", "side",
    "volume_ml", "volume_per_height2", "mean_hu", "std_hu", "mass_g", "fat_fraction", "flags",
    "prior_study_uid", "interval_days", "operated_side", "prior_volume_ml", "current_volume_ml",
    "change_ml", "change_ratio", "change_per_height2", "compared", "reason",
)
_SELECTOR_COLUMNS = ("patient_id", "issuer", "study_uid", "study_date")
_NUMERIC_RANGES = {
    "dxa_lean_mass_kg": (0.0, 200.0, "kg (lean mass in grams? divide by 1000)"),
    "dxa_smi_kg_m2": (0.0, 30.0, "kg/m²"),
}
_SEX = {"f": "F", "female": "F", "w": "F", "woman": "F", "m": "M", "male": "M", "man": "M", "o": "O", "other": "O"}
_BOOL = {"1": "1", "0": "0", "true": "1", "false": "0", "yes": "1", "no": "0", "y": "1", "n": "0"}
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class CohortError(NodeError):
    """The cohort analysis cannot run as asked (no database, unknown grouping column ...)."""


class SiteCsvError(CohortError):
    """The site CSV is malformed; the message names the file, line, column, value and what is allowed."""


def patient_key(patient_id: str, issuer: str = "") -> str:
    """A pseudonymous patient key: the first 16 hex digits of SHA-256 of ``PatientID\\Issuer``.

    The backslash cannot occur in a LO value (PS3.5 6.2), so different (ID, issuer) pairs never join
    into the same text. Unsalted: it hides the ID from readers of the outputs, it is not anonymisation.
    """
    return hashlib.sha256(f"{patient_id}\\{issuer}".encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------
# Site CSV.


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
    if uid and (len(uid) > 64 or not _UID.match(uid)):
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


# ---------------------------------------------------------------------------
# Tidy rows and per-study records.


def _baseline_uids(studies: Sequence[StudyResult]) -> set[str]:
    """The earliest study of each patient (by StudyDate; the pre-operative CT in the paper's design)."""
    first: dict[tuple[str, str], StudyResult] = {}
    for s in studies:
        k = (s.patient_id, s.issuer)
        if k not in first or (s.study_date or "99999999") < (first[k].study_date or "99999999"):
            first[k] = s
    return {s.study_uid for s in first.values()}


def _study_sex(study: StudyResult, clinical: Mapping[str, str]) -> str:
    return clinical.get("sex") or study.sex or ""


def tidy_rows(
    store: ResultsStore, clinical: Mapping[str, Mapping[str, str]] | None = None, *, clinical_columns: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """One row per study x structure x side (columns ``TIDY_COLUMNS`` + the clinical columns).

    A study with a comparison carries, on each structure row, its change against the prior; a change
    without a stored structure row gets a row of its own (measured columns empty). ``sex`` is the CSV's
    when given, else the study's PatientSex. No PatientID, only ``patient_key``.
    """
    studies = store.all_studies()
    comparisons = store.comparisons()
    clinical = clinical or {}
    baseline = _baseline_uids(studies)
    extra_cols = [c for c in clinical_columns if c != "sex"]
    if clinical and "dxa_sarcopenia_source" not in extra_cols:
        extra_cols.append("dxa_sarcopenia_source")
    out: list[dict[str, Any]] = []
    for s in studies:
        cv = clinical.get(s.study_uid, {})
        h2 = s.height_m**2 if s.height_m else None
        comp = comparisons.get(s.study_uid)
        base: dict[str, Any] = {
            "patient_key": patient_key(s.patient_id, s.issuer), "study_uid": s.study_uid, "study_date": s.study_date,
            "baseline": s.study_uid in baseline, "sex": _study_sex(s, cv), "height_m": s.height_m,
            "model": f"{s.model_name} {s.model_version}".strip(),
            **{c: cv.get(c, "") for c in extra_cols},
        }
        changes = {(c.key, c.side): c for c in comp.changes} if comp else {}
        seen: set[tuple[str, str]] = set()
        for m in s.measurements.structures:
            row = {
                **base, "structure_key": m.key, "structure_name": m.name, "structure_group": m.group, "side": m.side,
                "volume_ml": m.volume_ml, "volume_per_height2": m.volume_ml / h2 if h2 else None,
                "mean_hu": m.mean_hu, "std_hu": m.std_hu, "mass_g": m.mass_g, "fat_fraction": m.fat_fraction,
                "flags": ",".join(m.flags),
            }
            seen.add((m.key, m.side))
            out.append(_with_change(row, comp, changes.get((m.key, m.side))))
        for (key, side), c in changes.items():
            if (key, side) not in seen:
                row = {**base, "structure_key": key, "structure_name": c.name, "structure_group": c.group, "side": side,
                       "flags": ",".join(c.flags)}
                out.append(_with_change(row, comp, c))
    return [{col: r.get(col) for col in (*TIDY_COLUMNS, *extra_cols)} for r in out]


def _with_change(row: dict[str, Any], comp: Any, change: Any) -> dict[str, Any]:
    if comp is None or change is None:
        return row
    return {
        **row, "prior_study_uid": comp.prior_study_uid, "interval_days": comp.interval_days,
        "operated_side": comp.operated_side, "prior_volume_ml": change.prior_volume_ml,
        "current_volume_ml": change.current_volume_ml, "change_ml": change.change_ml,
        "change_ratio": change.change_ratio, "change_per_height2": change.change_per_height2_cm3_m2,
        "compared": change.compared, "reason": change.reason,
    }


@dataclass(frozen=True)
class StudyRecord:
    """Study-level values for the SMI / DXA analyses (muscle groups on both sides)."""

    study_uid: str
    sex: str
    smi_kg_m2: dict[str, float | None]  # CT group -> SMI
    mass_kg: dict[str, float | None]  # CT group -> mass
    partial: dict[str, bool]  # CT group -> a member structure cut by the field of view
    dxa_lean_mass_kg: float | None
    dxa_smi_kg_m2: float | None
    dxa_sarcopenia: int | None


def study_records(studies: Sequence[StudyResult], clinical: Mapping[str, Mapping[str, str]]) -> list[StudyRecord]:
    out = []
    for s in studies:
        cv = clinical.get(s.study_uid, {})
        groups = {g: s.measurements.group(g, SIDE_BOTH) for g in CT_GROUPS}
        out.append(
            StudyRecord(
                study_uid=s.study_uid, sex=_study_sex(s, cv),
                smi_kg_m2={g: (m.smi_kg_m2 if m else None) for g, m in groups.items()},
                mass_kg={g: (m.mass_g / 1000.0 if m else None) for g, m in groups.items()},
                partial={g: bool(m and m.includes_partial) for g, m in groups.items()},
                dxa_lean_mass_kg=float(cv["dxa_lean_mass_kg"]) if cv.get("dxa_lean_mass_kg") else None,
                dxa_smi_kg_m2=float(cv["dxa_smi_kg_m2"]) if cv.get("dxa_smi_kg_m2") else None,
                dxa_sarcopenia=int(cv["dxa_sarcopenia"]) if cv.get("dxa_sarcopenia") else None,
            )
        )
    return out


def correlation_rows(records: Sequence[StudyRecord]) -> list[dict[str, Any]]:
    """Spearman of CT group mass vs DXA lean mass, and CT group SMI vs DXA SMI (pairs with both values)."""
    out = []
    for g in CT_GROUPS:
        for ct_name, dxa_name, ct, dxa in (
            ("mass_kg", "dxa_lean_mass_kg", lambda r: r.mass_kg[g], lambda r: r.dxa_lean_mass_kg),
            ("smi_kg_m2", "dxa_smi_kg_m2", lambda r: r.smi_kg_m2[g], lambda r: r.dxa_smi_kg_m2),
        ):
            pairs = [(ct(r), dxa(r)) for r in records if ct(r) is not None and dxa(r) is not None]
            if not pairs:
                continue
            rho, p = spearman([a for a, _ in pairs], [b for _, b in pairs])
            out.append({"ct_group": g, "ct_measure": ct_name, "dxa_measure": dxa_name, "n": len(pairs), "rho": rho, "p": p})
    return out


def roc_rows(records: Sequence[StudyRecord]) -> tuple[list[dict[str, Any]], dict[tuple[str, str], RocResult]]:
    """ROC of CT SMI (low = positive) for DXA sarcopenia, per CT group and sex (thresholds are sex-specific)."""
    rows, results = [], {}
    for g in CT_GROUPS:
        for sex in ("F", "M"):
            sel = [r for r in records if r.sex == sex and r.dxa_sarcopenia is not None and r.smi_kg_m2[g] is not None]
            if not sel:
                continue
            labels = [r.dxa_sarcopenia for r in sel]
            base = {"ct_group": g, "sex": sex, "n": len(sel), "n_sarcopenia": int(sum(labels)),
                    "n_partial": sum(r.partial[g] for r in sel)}
            if 0 < sum(labels) < len(labels):
                res = roc_analysis(f"SMI {g} ({sex})", [r.smi_kg_m2[g] for r in sel], labels, higher_is_positive=False)
                results[(g, sex)] = res
                rows.append({**base, "auc": res.auc, "threshold_kg_m2": res.threshold, "sensitivity": res.sensitivity,
                             "specificity": res.specificity, "youden_j": res.youden_j, "note": ""})
            else:
                rows.append({**base, "auc": math.nan, "threshold_kg_m2": math.nan, "sensitivity": math.nan,
                             "specificity": math.nan, "youden_j": math.nan,
                             "note": "needs sarcopenic and non-sarcopenic studies"})
    return rows, results


# ---------------------------------------------------------------------------
# Output files.


def _csv_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    return str(v)


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Path:
    cols = list(columns) if columns is not None else (list(rows[0].keys()) if rows else [])
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for r in rows:
            w.writerow([_csv_value(r.get(c)) for c in cols])
    return path


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _group_labels(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        seen.setdefault(str(r["cohort_group"]), None)
    return list(seen)


def fig_total_loss_box(path: Path, totals: Sequence[Mapping[str, Any]]) -> Path | str:
    """Figure 6: box plots of the total muscle volume loss (cm³) per group, one panel per side."""
    done = [t for t in totals if t["complete"]]
    if not done:
        return "no study with a complete comparison"
    sides = [s for s in ("left", "right", "both") if any(t["side"] == s for t in done)]
    groups = _group_labels(done)
    fig = _figure(max(4.0, 1.3 * len(groups)) * len(sides), 4.5)
    axes = fig.subplots(1, len(sides), squeeze=False)[0]
    for ax, side in zip(axes, sides):
        data = [[t["total_loss_ml"] for t in done if t["side"] == side and t["cohort_group"] == g] for g in groups]
        keep = [(g, d) for g, d in zip(groups, data) if d]
        ax.boxplot([d for _, d in keep])
        ax.set_xticks(range(1, len(keep) + 1), [g for g, _ in keep])
        ax.set_title(f"total muscle volume loss, {side}")
        ax.set_ylabel("loss (cm³)")
        ax.tick_params(axis="x", labelrotation=30)
    fig.savefig(path, format="png")
    return path


def _bar_panels(path: Path, table3: Sequence[Mapping[str, Any]], value: str, ylabel: str, title: str) -> Path | str:
    rows = [r for r in table3 if not (isinstance(r[value], float) and math.isnan(r[value]))]
    if not rows:
        return "no compared muscle changes"
    sides = [s for s in ("left", "right", "both") if any(r["side"] == s for r in rows)]
    groups = _group_labels(rows)
    names: dict[str, str] = {}
    for r in rows:
        names.setdefault(r["structure_key"], r["structure_name"])
    keys = list(names)
    fig = _figure(max(8.0, 0.5 * len(keys) * max(1, len(groups)) / 2), 3.8 * len(sides))
    axes = fig.subplots(len(sides), 1, squeeze=False)[:, 0]
    width = 0.8 / max(1, len(groups))
    for ax, side in zip(axes, sides):
        lookup = {(r["cohort_group"], r["structure_key"]): r[value] for r in rows if r["side"] == side}
        for i, g in enumerate(groups):
            ys = [lookup.get((g, k), math.nan) for k in keys]
            ax.bar([x + (i - (len(groups) - 1) / 2) * width for x in range(len(keys))], ys, width, label=g)
        ax.set_xticks(range(len(keys)), [names[k] for k in keys], rotation=60, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}, {side}")
        ax.legend(fontsize=8)
    fig.savefig(path, format="png")
    return path


def fig_roc(path: Path, results: Mapping[tuple[str, str], RocResult]) -> Path | str:
    """ROC curves of the three CT SMIs for DXA sarcopenia, one panel per sex, with AUC and Youden point."""
    if not results:
        return "no DXA sarcopenia labels with both classes (needs dxa_sarcopenia or dxa_smi_kg_m2 and sex)"
    sexes = [s for s in ("F", "M") if any(k[1] == s for k in results)]
    fig = _figure(4.8 * len(sexes), 4.5)
    axes = fig.subplots(1, len(sexes), squeeze=False)[0]
    for ax, sex in zip(axes, sexes):
        for g in CT_GROUPS:
            res = results.get((g, sex))
            if res is None:
                continue
            line = ax.plot(res.fpr, res.tpr, drawstyle="steps-post", label=f"SMI {g}: AUC {res.auc:.2f}")[0]
            ax.plot([1 - res.specificity], [res.sensitivity], "o", color=line.get_color(),
                    label=f"  cut-off {res.threshold:.2f} kg/m²")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.set_title(f"CT SMI for DXA sarcopenia ({'women' if sex == 'F' else 'men'})")
        ax.legend(fontsize=7, loc="lower right")
    fig.savefig(path, format="png")
    return path


def fig_mass_vs_dxa(path: Path, records: Sequence[StudyRecord], corr: Sequence[Mapping[str, Any]]) -> Path | str:
    """Scatter of CT muscle mass per group against DXA lean mass, with Spearman's rho."""
    if not any(r.dxa_lean_mass_kg is not None for r in records):
        return "no dxa_lean_mass_kg values in the site CSV"
    fig = _figure(13.0, 4.3)
    axes = fig.subplots(1, len(CT_GROUPS), squeeze=False)[0]
    rho = {c["ct_group"]: c for c in corr if c["ct_measure"] == "mass_kg"}
    for ax, g in zip(axes, CT_GROUPS):
        pairs = [(r.dxa_lean_mass_kg, r.mass_kg[g]) for r in records
                 if r.dxa_lean_mass_kg is not None and r.mass_kg[g] is not None]
        ax.scatter([a for a, _ in pairs], [b for _, b in pairs], s=14)
        c = rho.get(g)
        ax.set_title(f"{g}: rho {c['rho']:.2f} (p {c['p']:.3g}, n {c['n']})" if c else g, fontsize=9)
        ax.set_xlabel("DXA lean mass (kg)")
        ax.set_ylabel(f"CT muscle mass, {g} (kg)")
    fig.savefig(path, format="png")
    return path


# ---------------------------------------------------------------------------
# Thresholds into the node configuration.

_HEADER = re.compile(r"^\s*\[\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\s*(#.*)?$")
_ANY_HEADER = re.compile(r"^\s*\[")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(float(v))
    return json.dumps(str(v), ensure_ascii=False)


def update_toml_section(text: str, section: str, values: Mapping[str, Any]) -> str:
    """``text`` with the keys of ``[section]`` set to ``values`` (other lines and sections untouched).

    Existing key lines of the section are replaced in place, missing keys are added at the end of
    the section, a missing section is appended. The result is parsed back and checked.
    """
    try:
        before = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CohortError(f"the threshold file is not valid TOML ({exc}); fix it before writing thresholds") from None
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    start = next((i for i, ln in enumerate(lines) if (m := _HEADER.match(ln)) and m.group(1) == section), None)
    new_lines = [f"{k} = {_toml_value(v)}\n" for k, v in values.items()]
    if start is None:
        sep = ["\n"] if lines and lines[-1].strip() else []
        lines += [*sep, f"[{section}]\n", *new_lines]
    else:
        end = next((i for i in range(start + 1, len(lines)) if _ANY_HEADER.match(lines[i])), len(lines))
        body = lines[start + 1 : end]
        done = set()
        for i, ln in enumerate(body):
            m = re.match(r"^\s*([A-Za-z0-9_\-]+)\s*=", ln)
            if m and m.group(1) in values:
                body[i] = f"{m.group(1)} = {_toml_value(values[m.group(1)])}\n"
                done.add(m.group(1))
        last = len(body)
        while last > 0 and not body[last - 1].strip():
            last -= 1
        missing = [f"{k} = {_toml_value(v)}\n" for k, v in values.items() if k not in done]
        body = body[:last] + missing + body[last:]
        lines = lines[: start + 1] + body + lines[end:]
    result = "".join(lines)
    after = tomllib.loads(result)
    expected = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v) for k, v in values.items()}
    got = {k: after.get(section, {}).get(k) for k in values}
    others_same = {k: v for k, v in before.items() if k != section} == {k: v for k, v in after.items() if k != section}
    if got != expected or not others_same:
        raise CohortError(
            f"could not update [{section}] safely (a multi-line value or an unusual layout?); "
            f"edit the file by hand: {', '.join(f'{k} = {_toml_value(v)}' for k, v in values.items())}"
        )
    return result


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class ThresholdUpdate:
    path: Path
    group: str
    threshold_female_kg_m2: float
    threshold_male_kg_m2: float
    source: str


def write_sarcopenia_thresholds(path: Path, results: Mapping[tuple[str, str], RocResult], *, today: dt.date | None = None) -> ThresholdUpdate:
    """Write the Youden cut-offs of CT SMI (configured group, per sex) into ``[sarcopenia]`` of ``path``."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    try:
        current = tomllib.loads(text).get("sarcopenia", {})
    except tomllib.TOMLDecodeError as exc:
        raise CohortError(f"threshold file {path} is not valid TOML ({exc})") from None
    group = current.get("group", GROUP_ALL)
    if group not in CT_GROUPS:
        raise CohortError(f"{path}: sarcopenia.group = {group!r}; allowed: {', '.join(CT_GROUPS)}")
    missing = [sex for sex in ("F", "M") if (group, sex) not in results]
    if missing:
        raise CohortError(
            f"cannot calibrate the CT SMI threshold of group {group!r} for "
            f"{' and '.join('women' if s == 'F' else 'men' for s in missing)}: the cohort needs studies of that sex "
            "with DXA sarcopenia labels of both classes; both thresholds are required (nothing was written)"
        )
    f, m = results[(group, "F")], results[(group, "M")]
    day = (today or dt.date.today()).isoformat()
    source = (
        f"thighnode cohort {day}: Youden cut-off of CT SMI ({group}) for DXA sarcopenia; "
        f"women n={f.n} ({f.n_positive} sarcopenic) AUC {f.auc:.3f}; men n={m.n} ({m.n_positive} sarcopenic) AUC {m.auc:.3f}"
    )
    values = {
        "group": group, "threshold_female_kg_m2": round(f.threshold, 3), "threshold_male_kg_m2": round(m.threshold, 3),
        "calibrated_for_ct": True, "source": source,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, update_toml_section(text, "sarcopenia", values))
    return ThresholdUpdate(path, group, values["threshold_female_kg_m2"], values["threshold_male_kg_m2"], source)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# The command.


@dataclass(frozen=True)
class CohortSummary:
    out_dir: Path
    files: dict[str, Path]
    skipped: dict[str, str]  # file name -> why it was not written
    n_studies: int
    n_comparisons: int
    n_tidy_rows: int
    group_by: tuple[str, ...]
    join: JoinReport | None
    rocs: dict[tuple[str, str], RocResult] = field(default_factory=dict)  # (CT group, sex) -> result
    thresholds: ThresholdUpdate | None = None


def _resolve_group_by(group_by: Sequence[str] | None, available: set[str], emit: Any) -> tuple[str, ...]:
    if group_by is None:
        kept = tuple(c for c in DEFAULT_GROUP_BY if c in available)
        dropped = [c for c in DEFAULT_GROUP_BY if c not in available]
        if dropped:
            emit(f"note: grouping by {', '.join(kept) or 'nothing'} ({', '.join(dropped)} needs the site CSV column)")
        return kept
    unknown = [c for c in group_by if c not in available]
    if unknown:
        raise CohortError(
            f"--group-by column {unknown[0]!r} is not a column of the cohort; available: {', '.join(sorted(available))}"
        )
    return tuple(group_by)


def run_cohort(
    settings: Any,
    *,
    out_dir: Path,
    site_csv: Path | None = None,
    group_by: Sequence[str] | None = None,
    write_thresholds: Path | None = None,
    stream: TextIO | None = None,
) -> CohortSummary:
    """Run the cohort analyses over ``settings.db_path`` and write the outputs into ``out_dir``.

    ``group_by`` None: ``fracture_type, sex`` where available. ``write_thresholds``: a TOML file whose
    ``[sarcopenia]`` section receives the calibrated CT SMI cut-offs.
    """
    out = stream or sys.stdout

    def emit(text: str = "") -> None:
        print(text, file=out)

    t0 = time.monotonic()
    db = Path(settings.db_path)
    if not db.exists():
        raise CohortError(f"no results database at {db}: the node has not measured any study yet (check --config)")
    site = read_site_csv(Path(site_csv)) if site_csv is not None else None
    store = ResultsStore(db)
    try:
        studies = store.all_studies()
        if not studies:
            raise CohortError(f"the results database {db} holds no measured study; nothing to analyse")
        clinical, join = join_clinical(studies, site) if site else ({}, None)
        rows = tidy_rows(store, clinical, clinical_columns=site.clinical_columns if site else ())
        n_comparisons = len(store.comparisons())
    finally:
        store.close()
    log.info("cohort: %d studies, %d comparisons, %d tidy rows", len(studies), n_comparisons, len(rows))
    gb = _resolve_group_by(group_by, set(rows[0].keys()) if rows else set(TIDY_COLUMNS), emit)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    skipped: dict[str, str] = {}

    def put(name: str, result: Path | str) -> None:
        if isinstance(result, Path):
            files[name] = result
        else:
            skipped[name] = result
            emit(f"skipped {name}: {result}")

    put("cohort_tidy.csv", write_csv(out_dir / "cohort_tidy.csv", rows))
    table1 = composition_table([r for r in rows if r["baseline"]], group_by=gb)
    put("table1_composition.csv", write_csv(out_dir / "table1_composition.csv", table1, _cols(table1, gb, "t1")))
    totals = study_total_losses(rows, group_by=gb)
    put("total_loss_by_study.csv", write_csv(out_dir / "total_loss_by_study.csv", totals, _cols(totals, gb, "tot")))
    table2 = loss_table(rows, group_by=gb)
    put("table2_total_loss.csv", write_csv(out_dir / "table2_total_loss.csv", table2, _cols(table2, gb, "t2")))
    table3 = per_muscle_loss_table(rows, group_by=gb)
    put("table3_muscle_loss.csv", write_csv(out_dir / "table3_muscle_loss.csv", table3, _cols(table3, gb, "t3")))
    records = study_records(studies, clinical)
    corr = correlation_rows(records)
    put("smi_dxa_correlation.csv", write_csv(out_dir / "smi_dxa_correlation.csv", corr, _CORR_COLS))
    roc_table, rocs = roc_rows(records)
    put("roc_smi.csv", write_csv(out_dir / "roc_smi.csv", roc_table, _ROC_COLS))

    put("fig6_total_loss_box.png", fig_total_loss_box(out_dir / "fig6_total_loss_box.png", totals))
    put("fig7_muscle_loss_bar.png", _bar_panels(out_dir / "fig7_muscle_loss_bar.png", table3, "mean_loss_ml",
                                                "mean loss (cm³)", "mean muscle volume loss"))
    put("fig8_loss_ratio_bar.png", _bar_panels(out_dir / "fig8_loss_ratio_bar.png", table3, "mean_loss_ratio_pct",
                                               "mean loss ratio (%)", "mean muscle volume loss ratio"))
    put("fig_roc_smi.png", fig_roc(out_dir / "fig_roc_smi.png", rocs))
    put("fig_mass_vs_dxa.png", fig_mass_vs_dxa(out_dir / "fig_mass_vs_dxa.png", records, corr))

    thresholds = write_sarcopenia_thresholds(Path(write_thresholds), rocs) if write_thresholds is not None else None
    summary = CohortSummary(
        out_dir=out_dir, files=files, skipped=skipped, n_studies=len(studies), n_comparisons=n_comparisons,
        n_tidy_rows=len(rows), group_by=gb, join=join, rocs=rocs, thresholds=thresholds,
    )
    _print_summary(emit, summary, table1, table2, table3, corr, roc_table)
    log.info("cohort: done in %.2f s, %d files", time.monotonic() - t0, len(files))
    return summary


_CORR_COLS = ("ct_group", "ct_measure", "dxa_measure", "n", "rho", "p")
_ROC_COLS = ("ct_group", "sex", "n", "n_sarcopenia", "n_partial", "auc", "threshold_kg_m2", "sensitivity",
             "specificity", "youden_j", "note")


def _cols(rows: Sequence[Mapping[str, Any]], gb: Sequence[str], kind: str) -> list[str]:
    head = [*gb, "cohort_group", "side"]
    rest = {
        "t1": ["structure_key", "structure_name", "n", "mean_pct", "sd_pct", "n_partial"],
        "t2": ["n", "n_excluded", *(f"loss_ml_{k}" for k in ("mean", "std", "min", "q1", "median", "q3", "max")),
               "n_per_height2", *(f"loss_per_height2_{k}" for k in ("mean", "std", "min", "q1", "median", "q3", "max")),
               "mean_loss_ratio_pct"],
        "t3": ["structure_key", "structure_name", "n", "mean_loss_ml", "sd_loss_ml", "mean_loss_per_height2",
               "mean_loss_ratio_pct"],
        "tot": ["study_uid", "complete", "n_muscles", "n_not_compared", "total_loss_ml", "total_loss_per_height2",
                "total_loss_ratio_pct"],
    }[kind]
    return [*head, *rest]


def _print_summary(emit: Any, s: CohortSummary, t1: list, t2: list, t3: list, corr: list, roc: list) -> None:
    emit(f"cohort: {s.n_studies} studies, {s.n_comparisons} with a prior, {s.n_tidy_rows} tidy rows; "
         f"groups by {', '.join(s.group_by) or 'nothing'}")
    if s.join is not None:
        j = s.join
        emit(f"site CSV: {j.csv_rows} rows, {j.matched_rows} matched, {len(j.unknown_patient_lines)} unknown patient(s)"
             + (f" (lines {', '.join(map(str, j.unknown_patient_lines))})" if j.unknown_patient_lines else "")
             + f", {len(j.unmatched_study_lines)} with no matching study"
             + (f" (lines {', '.join(map(str, j.unmatched_study_lines))})" if j.unmatched_study_lines else "")
             + f"; {j.studies_with_clinical} studies with clinical data, {j.sarcopenia_derived} DXA sarcopenia "
             f"derived (AWGS 2014), {j.sex_conflicts} sex conflict(s) (CSV used)")
    both1 = [r for r in t1 if r["side"] == SIDE_BOTH]
    emit("\nTable 1. Muscle volume composition (% of visualised muscle volume, baseline CT, both sides)")
    emit(format_table(both1, ["cohort_group", "structure_name", "n", "mean_pct", "sd_pct"], floatfmt=".1f"))
    emit("\nTable 2. Total muscle volume loss (cm³; cm³/m²)")
    emit(format_table(t2, ["cohort_group", "side", "n", "n_excluded", "loss_ml_mean", "loss_ml_std", "loss_ml_min",
                           "loss_ml_q1", "loss_ml_median", "loss_ml_q3", "loss_ml_max", "loss_per_height2_mean",
                           "mean_loss_ratio_pct"], floatfmt=".1f"))
    both3 = [r for r in t3 if r["side"] == SIDE_BOTH]
    emit("\nTable 3. Per-muscle loss (both sides; all sides in table3_muscle_loss.csv)")
    emit(format_table(both3, ["cohort_group", "structure_name", "n", "mean_loss_ml", "mean_loss_per_height2",
                              "mean_loss_ratio_pct"], floatfmt=".1f"))
    emit("\nCT muscle mass / SMI vs DXA (Spearman)")
    emit(format_table(corr, list(_CORR_COLS), floatfmt=".3f"))
    emit("\nROC of CT SMI for DXA sarcopenia")
    emit(format_table(roc, list(_ROC_COLS), floatfmt=".3f"))
    if s.thresholds is not None:
        t = s.thresholds
        emit(f"\nwrote [sarcopenia] to {t.path}: group {t.group}, women < {t.threshold_female_kg_m2} kg/m², "
             f"men < {t.threshold_male_kg_m2} kg/m² (calibrated_for_ct = true)")
    emit(f"\n{len(s.files)} files in {s.out_dir}" + (f"; skipped: {', '.join(s.skipped)}" if s.skipped else ""))


def cmd_cohort(args: argparse.Namespace) -> int:
    from thighnode.settings import load_settings

    settings = load_settings(args.config)
    group_by = None if args.group_by is None else tuple(c.strip() for c in args.group_by.split(",") if c.strip())
    run_cohort(
        settings, out_dir=Path(args.out), site_csv=args.site_csv, group_by=group_by,
        write_thresholds=args.write_thresholds,
    )
    return 0


def add_cohort_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``cohort`` to the CLI's subparsers (sets ``func`` = :func:`cmd_cohort`)."""
    help_ = "research tables and figures over every measured study, joined with a site CSV"
    p = subparsers.add_parser("cohort", help=help_, description=help_)
    p.add_argument("--config", type=Path, default=None, help="node configuration file (TOML)")
    p.add_argument("--out", type=Path, required=True, help="output directory (CSV tables, PNG figures)")
    p.add_argument("--site-csv", type=Path, default=None,
                   help="clinical data: patient_id [, issuer] [, study_uid | study_date], fracture_type, sex, dxa_* ...")
    p.add_argument("--group-by", default=None,
                   help="comma-separated grouping columns (default: fracture_type,sex where available)")
    p.add_argument("--write-thresholds", type=Path, default=None,
                   help="TOML file whose [sarcopenia] section receives the calibrated CT SMI cut-offs")
    p.set_defaults(func=cmd_cohort)
    return p
