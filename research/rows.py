"""Tidy rows and per-study records of the cohort: what the tables and figures of ``thighnode cohort`` read.

Rows come from the results database (:class:`thighnode.results.ResultsStore`) joined with the clinical
values of the site CSV (:mod:`research.sitecsv`); patients appear only as ``patient_key``.
"""

from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.types import GROUP_ABOVE_KNEE, GROUP_ALL, GROUP_GLUTEAL, SIDE_BOTH
from research.stats import RocResult, roc_analysis, spearman
from thighnode.results import ResultsStore, StudyResult

CT_GROUPS = (GROUP_GLUTEAL, GROUP_ABOVE_KNEE, GROUP_ALL)

TIDY_COLUMNS = (
    "patient_key", "study_uid", "study_date", "baseline", "sex", "height_m", "model",
    "structure_key", "structure_name", "structure_group", "side",
    "volume_ml", "volume_per_height2", "mean_hu", "std_hu", "mass_g", "fat_fraction", "flags",
    "prior_study_uid", "interval_days", "operated_side", "prior_volume_ml", "current_volume_ml",
    "change_ml", "change_ratio", "change_per_height2", "compared", "reason",
)


def patient_key(patient_id: str, issuer: str = "") -> str:
    """A pseudonymous patient key: the first 16 hex digits of SHA-256 of ``PatientID\\Issuer``.

    The backslash cannot occur in a LO value (PS3.5 6.2), so different (ID, issuer) pairs never join
    into the same text. Unsalted: it hides the ID from readers of the outputs, it is not anonymisation.
    """
    return hashlib.sha256(f"{patient_id}\\{issuer}".encode("utf-8")).hexdigest()[:16]



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
