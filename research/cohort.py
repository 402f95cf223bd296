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

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, TextIO

from pipeline.types import SIDE_BOTH
from research.errors import CohortError
from research.figures import fig_loss_bars, fig_mass_vs_dxa, fig_roc, fig_total_loss_box
from research.rows import TIDY_COLUMNS, correlation_rows, roc_rows, study_records, tidy_rows, write_csv
from research.sitecsv import JoinReport, join_clinical, read_site_csv
from research.stats import (
    RocResult,
    composition_table,
    format_table,
    loss_table,
    per_muscle_loss_table,
    study_total_losses,
)
from research.thresholds import ThresholdUpdate, write_sarcopenia_thresholds
from thighnode.results import ResultsStore

log = logging.getLogger(__name__)

DEFAULT_GROUP_BY = ("fracture_type", "sex")


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
    put("fig7_muscle_loss_bar.png", fig_loss_bars(out_dir / "fig7_muscle_loss_bar.png", table3, "mean_loss_ml",
                                                "mean loss (cm³)", "mean muscle volume loss"))
    put("fig8_loss_ratio_bar.png", fig_loss_bars(out_dir / "fig8_loss_ratio_bar.png", table3, "mean_loss_ratio_pct",
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
