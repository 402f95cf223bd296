"""Cohort statistics of the two reference studies, on plain rows (no database, no I/O).

Two analyses are reproduced over every study the node has measured:

* thigh muscle volume loss after hip fracture (prior vs follow-up CT) by fracture type and sex:
  Table 1 = each muscle's share of the visualised total muscle volume (baseline CT),
  Table 2 = total muscle volume loss per group (n, mean, std, min, Q1, median, Q3, max, as
  ``pandas.describe`` gives them: sample std, linearly interpolated quartiles), raw (cm³) and divided
  by height² (cm³/m²), Table 3 = per muscle and side the mean loss (cm³, cm³/m²) and mean loss ratio;
* CT skeletal muscle mass / SMI of the gluteal, above-knee and all-muscle groups against DXA:
  Spearman correlation, ROC for DXA sarcopenia with its AUC and the Youden-optimal cut-off.

Loss is reported positive when muscle was lost: ``loss = prior - current = -change``; the loss ratio
is ``loss / prior volume`` (``-change_ratio``), in percent in the tables.

The tables read *tidy rows*: mappings with one row per study x structure x side, with at least
``study_uid``, ``structure_key``, ``structure_name``, ``structure_group``, ``side`` ("left", "right",
"both"), ``volume_ml``, ``flags`` (comma-separated codes) and, for the loss tables, ``compared``,
``change_ml``, ``change_ratio``, ``change_per_height2``, ``prior_volume_ml``, ``height_m``; plus any
grouping columns (``fracture_type``, ``sex`` ...). A missing grouping value forms the group
``(missing)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy import stats

from node_errors import NodeError

MUSCLE_GROUPS = ("anterior", "medial", "gluteal", "posterior")
"""Label-table groups counted as thigh/hip muscles in Tables 1-3 (the 21 muscles of the paper's tables)."""

SIDES = ("left", "right", "both")
MISSING = "(missing)"
_PARTIAL_FLAGS = ("partial_fov_top", "partial_fov_bottom")


class CohortStatsError(NodeError):
    """Invalid input to a cohort statistic (lengths differ, labels not 0/1 ...)."""


# ---------------------------------------------------------------------------
# Correlation and ROC.


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Spearman's rank correlation and its two-sided p value; (nan, nan) with < 3 pairs or a constant."""
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xa.shape != ya.shape or xa.ndim != 1:
        raise CohortStatsError(f"spearman: x has shape {xa.shape}, y {ya.shape}; both must be 1-D of equal length")
    if xa.size < 3 or np.ptp(xa) == 0 or np.ptp(ya) == 0:
        return math.nan, math.nan
    res = stats.spearmanr(xa, ya)
    return float(res.statistic), float(res.pvalue)


def _check_roc_input(scores: Sequence[float], labels: Sequence[int | bool]) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=float)
    lab = np.asarray(labels)
    if s.shape != lab.shape or s.ndim != 1:
        raise CohortStatsError(f"ROC: scores have shape {s.shape}, labels {lab.shape}; both must be 1-D of equal length")
    if not np.all(np.isfinite(s)):
        raise CohortStatsError("ROC: scores contain NaN or infinity; drop those subjects first")
    if not np.all(np.isin(lab, (0, 1))):
        raise CohortStatsError(f"ROC: labels must be 0/1 (or booleans); saw {sorted(set(lab.tolist()))}")
    lab = lab.astype(bool)
    if lab.all() or not lab.any():
        raise CohortStatsError(
            f"ROC: needs positives and negatives; saw {int(lab.sum())} positive(s) of {lab.size}"
        )
    return s, lab


def roc_curve(
    scores: Sequence[float], labels: Sequence[int | bool], *, higher_is_positive: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The empirical ROC curve: ``(fpr, tpr, thresholds)``, one point per distinct score plus (0, 0).

    With ``higher_is_positive`` a subject is called positive when ``score >= threshold``; without it
    (low SMI predicts sarcopenia) when ``score <= threshold``. ``thresholds[0]`` is +inf (-inf) and
    calls nobody positive; the thresholds run from the strictest to the most lenient, so fpr and tpr
    are non-decreasing and end at (1, 1).
    """
    s, lab = _check_roc_input(scores, labels)
    oriented = s if higher_is_positive else -s
    distinct = np.unique(oriented)[::-1]  # strictest first
    n_pos, n_neg = int(lab.sum()), int((~lab).sum())
    tpr = [0.0] + [float(np.sum(lab & (oriented >= t))) / n_pos for t in distinct]
    fpr = [0.0] + [float(np.sum(~lab & (oriented >= t))) / n_neg for t in distinct]
    thresholds = np.concatenate([[np.inf], distinct if higher_is_positive else -distinct])
    if not higher_is_positive:
        thresholds[0] = -np.inf
    return np.asarray(fpr), np.asarray(tpr), thresholds


def auc(fpr: Sequence[float], tpr: Sequence[float]) -> float:
    """Area under a ROC curve by the trapezoidal rule (ties count half, as in the Mann-Whitney U)."""
    f, t = np.asarray(fpr, dtype=float), np.asarray(tpr, dtype=float)
    if f.shape != t.shape or f.ndim != 1 or f.size < 2:
        raise CohortStatsError(f"auc: fpr has shape {f.shape}, tpr {t.shape}; need equal 1-D arrays of >= 2 points")
    if np.any(np.diff(f) < 0):
        raise CohortStatsError("auc: fpr must be non-decreasing (use the output of roc_curve)")
    return float(np.sum(np.diff(f) * (t[1:] + t[:-1]) / 2.0))


def youden_threshold(
    scores: Sequence[float], labels: Sequence[int | bool], *, higher_is_positive: bool
) -> tuple[float, float, float, float]:
    """The Youden-optimal cut-off: ``(threshold, sensitivity, specificity, J)``.

    The threshold is the midpoint between the optimal score and the next distinct score on the
    negative side, so that it separates the data the same whether used with ``<`` or ``<=``: a subject
    is positive when ``score < threshold`` (``higher_is_positive=False``, e.g. SMI < cut-off means
    sarcopenia) or ``score > threshold``. Among equal J the cut with the higher specificity wins.
    """
    s, lab = _check_roc_input(scores, labels)
    fpr, tpr, thr = roc_curve(s, lab, higher_is_positive=higher_is_positive)
    j = tpr - fpr
    best = max(range(1, len(j)), key=lambda i: (round(float(j[i]), 12), -fpr[i]))
    t = float(thr[best])
    if higher_is_positive:
        below = s[s < t]
        cut = (t + float(below.max())) / 2.0 if below.size else float(np.nextafter(t, -np.inf))
    else:
        above = s[s > t]
        cut = (t + float(above.min())) / 2.0 if above.size else float(np.nextafter(t, np.inf))
    return cut, float(tpr[best]), float(1.0 - fpr[best]), float(j[best])


@dataclass(frozen=True)
class RocResult:
    """ROC analysis of one score against a binary reference (e.g. CT SMI vs DXA sarcopenia)."""

    name: str
    n: int
    n_positive: int
    auc: float
    threshold: float  # Youden-optimal cut-off (see youden_threshold)
    sensitivity: float
    specificity: float
    youden_j: float
    higher_is_positive: bool
    fpr: tuple[float, ...]
    tpr: tuple[float, ...]


def roc_analysis(
    name: str, scores: Sequence[float], labels: Sequence[int | bool], *, higher_is_positive: bool
) -> RocResult:
    """Curve, AUC and Youden cut-off of ``scores`` for ``labels`` in one object."""
    fpr, tpr, _ = roc_curve(scores, labels, higher_is_positive=higher_is_positive)
    cut, sens, spec, j = youden_threshold(scores, labels, higher_is_positive=higher_is_positive)
    lab = np.asarray(labels).astype(bool)
    return RocResult(
        name=name, n=int(lab.size), n_positive=int(lab.sum()), auc=auc(fpr, tpr), threshold=cut,
        sensitivity=sens, specificity=spec, youden_j=j, higher_is_positive=higher_is_positive,
        fpr=tuple(float(v) for v in fpr), tpr=tuple(float(v) for v in tpr),
    )


# ---------------------------------------------------------------------------
# Descriptive statistics and grouping.


def describe(values: Iterable[float]) -> dict[str, float | int]:
    """n, mean, std (sample, ddof=1), min, q1, median, q3, max (linear quartiles); NaN where undefined."""
    v = np.asarray([float(x) for x in values], dtype=float)
    if v.size == 0:
        return {"n": 0, **{k: math.nan for k in ("mean", "std", "min", "q1", "median", "q3", "max")}}
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return {
        "n": int(v.size), "mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else math.nan,
        "min": float(v.min()), "q1": float(q1), "median": float(med), "q3": float(q3), "max": float(v.max()),
    }


def _value(row: Mapping[str, Any], column: str) -> str:
    v = row.get(column)
    return MISSING if v is None or str(v).strip() == "" else str(v)


def group_of(row: Mapping[str, Any], group_by: Sequence[str]) -> tuple[str, ...]:
    """The grouping values of a row (``(missing)`` for absent ones)."""
    return tuple(_value(row, c) for c in group_by)


def _group_columns(group_by: Sequence[str], group: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {c: v for c, v in zip(group_by, group)}
    out["cohort_group"] = " / ".join(group) if group else "all"
    return out


def _num(v: Any) -> float | None:
    if v is None or v == "":
        return None
    f = float(v)
    return None if math.isnan(f) else f


def _truthy(v: Any) -> bool:
    return v is True or str(v).strip().lower() in ("1", "true", "yes")


def _is_muscle(row: Mapping[str, Any], muscle_groups: Sequence[str]) -> bool:
    return row.get("structure_group") in muscle_groups


def _by_study(rows: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        out.setdefault(str(r["study_uid"]), []).append(r)
    return out


def _structure_order(rows: Iterable[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(key, name) in order of first appearance (the label table order when rows come from the DB)."""
    seen: dict[str, str] = {}
    for r in rows:
        seen.setdefault(str(r["structure_key"]), str(r.get("structure_name") or r["structure_key"]))
    return list(seen.items())


# ---------------------------------------------------------------------------
# Table 1: composition.


def _side_volumes(study_rows: Sequence[Mapping[str, Any]], side: str) -> dict[str, tuple[float, bool]]:
    """key -> (volume ml, partial) on one side; "both" falls back to left + right when not stored."""
    stored = {str(r["structure_key"]): (float(r["volume_ml"]), _partial(r)) for r in study_rows if r["side"] == side}
    if stored or side != "both":
        return stored
    left = _side_volumes(study_rows, "left")
    right = _side_volumes(study_rows, "right")
    return {k: (left[k][0] + right[k][0], left[k][1] or right[k][1]) for k in left if k in right}


def _partial(row: Mapping[str, Any]) -> bool:
    flags = row.get("flags") or ""
    codes = flags if isinstance(flags, (tuple, list)) else str(flags).split(",")
    return any(c in _PARTIAL_FLAGS for c in codes)


def composition_table(
    rows: Sequence[Mapping[str, Any]],
    *,
    group_by: Sequence[str] = (),
    sides: Sequence[str] = SIDES,
    muscle_groups: Sequence[str] = MUSCLE_GROUPS,
) -> list[dict[str, Any]]:
    """Table 1: each muscle's share (%) of the total muscle volume visualised, mean and sd over studies.

    Give the rows of the studies to describe (the paper uses the pre-operative CT: the caller passes
    baseline studies). Per study and side, total = sum of the muscles' volumes on that side; a row per
    group, side and muscle: ``n`` studies, ``mean_pct``, ``sd_pct`` (ddof=1), ``n_partial`` (studies
    of the group with a muscle cut by the field of view on that side: the share is of what is visible).
    """
    muscles = [r for r in rows if _is_muscle(r, muscle_groups)]
    order = _structure_order(muscles)
    acc: dict[tuple[tuple[str, ...], str], dict[str, list[float]]] = {}
    partial: dict[tuple[tuple[str, ...], str], int] = {}
    for study_rows in _by_study(muscles).values():
        group = group_of(study_rows[0], group_by)
        for side in sides:
            vols = _side_volumes(study_rows, side)
            total = sum(v for v, _ in vols.values())
            if not vols or total <= 0:
                continue
            cell = acc.setdefault((group, side), {})
            for key, (v, _) in vols.items():
                cell.setdefault(key, []).append(100.0 * v / total)
            partial[(group, side)] = partial.get((group, side), 0) + int(any(p for _, p in vols.values()))
    side_rank = {s: i for i, s in enumerate(sides)}
    out = []
    for (group, side), cell in sorted(acc.items(), key=lambda kv: (kv[0][0], side_rank[kv[0][1]])):
        for key, name in order:
            if key not in cell:
                continue
            d = describe(cell[key])
            out.append(
                {
                    **_group_columns(group_by, group), "side": side, "structure_key": key, "structure_name": name,
                    "n": d["n"], "mean_pct": d["mean"], "sd_pct": d["std"], "n_partial": partial[(group, side)],
                }
            )
    return out


# ---------------------------------------------------------------------------
# Tables 2 and 3: loss between prior and follow-up.


@dataclass(frozen=True)
class _Loss:
    loss_ml: float
    loss_per_height2: float | None
    prior_ml: float | None


def _side_losses(
    study_rows: Sequence[Mapping[str, Any]], side: str
) -> tuple[dict[str, _Loss], int]:
    """key -> loss of the compared muscles on one side, and the number of muscles not compared.

    "both" uses stored "both" changes, else left + right of muscles compared on both sides.
    """
    changes = [r for r in study_rows if r["side"] == side and r.get("prior_study_uid")]
    if changes or side != "both":
        out: dict[str, _Loss] = {}
        missing = 0
        for r in changes:
            change = _num(r.get("change_ml"))
            if not _truthy(r.get("compared")) or change is None:
                missing += 1
                continue
            per_h2 = _num(r.get("change_per_height2"))
            height = _num(r.get("height_m"))
            if per_h2 is None and height:
                per_h2 = change / height**2
            out[str(r["structure_key"])] = _Loss(
                loss_ml=-change, loss_per_height2=None if per_h2 is None else -per_h2,
                prior_ml=_num(r.get("prior_volume_ml")),
            )
        return out, missing
    left, _ = _side_losses(study_rows, "left")
    right, _ = _side_losses(study_rows, "right")
    keys = {str(r["structure_key"]) for r in study_rows if r["side"] in ("left", "right") and r.get("prior_study_uid")}
    out = {}
    for k in keys:
        if k not in left or k not in right:
            continue
        a, b = left[k], right[k]
        per_h2 = None if a.loss_per_height2 is None or b.loss_per_height2 is None else a.loss_per_height2 + b.loss_per_height2
        prior = None if a.prior_ml is None or b.prior_ml is None else a.prior_ml + b.prior_ml
        out[k] = _Loss(a.loss_ml + b.loss_ml, per_h2, prior)
    return out, len(keys) - len(out)


def study_total_losses(
    rows: Sequence[Mapping[str, Any]],
    *,
    group_by: Sequence[str] = (),
    sides: Sequence[str] = SIDES,
    muscle_groups: Sequence[str] = MUSCLE_GROUPS,
) -> list[dict[str, Any]]:
    """Per study with a comparison and side: the total muscle volume loss behind Table 2 and Figure 6.

    ``complete`` is False when a muscle change on that side was not compared (``n_not_compared``);
    its totals are then None (a sum over different muscles would not be comparable between studies).
    ``total_loss_ml`` = sum of ``-change_ml``; ``total_loss_per_height2`` the same in cm³/m² (None
    without a height); ``total_loss_ratio_pct`` = 100 x total loss / total prior volume.
    """
    muscles = [r for r in rows if _is_muscle(r, muscle_groups) and r.get("prior_study_uid")]
    out = []
    for uid, study_rows in _by_study(muscles).items():
        group = group_of(study_rows[0], group_by)
        for side in sides:
            losses, not_compared = _side_losses(study_rows, side)
            if not losses and not not_compared:
                continue
            total = per_h2 = ratio = None
            if not not_compared:
                total = sum(x.loss_ml for x in losses.values())
                if all(x.loss_per_height2 is not None for x in losses.values()):
                    per_h2 = sum(x.loss_per_height2 for x in losses.values())  # type: ignore[misc]
                priors = [x.prior_ml for x in losses.values()]
                if all(p is not None for p in priors) and sum(priors) > 0:  # type: ignore[arg-type]
                    ratio = 100.0 * total / sum(priors)  # type: ignore[arg-type]
            out.append(
                {
                    **_group_columns(group_by, group), "side": side, "study_uid": uid,
                    "complete": not not_compared, "n_muscles": len(losses), "n_not_compared": not_compared,
                    "total_loss_ml": total, "total_loss_per_height2": per_h2, "total_loss_ratio_pct": ratio,
                }
            )
    return out


def loss_table(
    rows: Sequence[Mapping[str, Any]],
    *,
    group_by: Sequence[str] = (),
    sides: Sequence[str] = SIDES,
    muscle_groups: Sequence[str] = MUSCLE_GROUPS,
) -> list[dict[str, Any]]:
    """Table 2: total muscle volume loss per group and side (studies with a comparison).

    Total loss = sum over the muscles of ``-change_ml`` on that side (see :func:`study_total_losses`).
    A study counts only when every muscle change on that side was compared; ``n_excluded`` counts
    the others. Columns: ``n``, ``n_excluded``, ``loss_ml_{mean,std,min,q1,median,q3,max}``, the same
    for ``loss_per_height2`` (cm³/m², over ``n_per_height2`` studies with a height) and
    ``mean_loss_ratio_pct`` (total loss / total prior volume, mean over studies).
    """
    acc: dict[tuple[tuple[str, ...], str], list[Mapping[str, Any]]] = {}
    for t in study_total_losses(rows, group_by=group_by, sides=sides, muscle_groups=muscle_groups):
        acc.setdefault((group_of(t, group_by), t["side"]), []).append(t)
    side_rank = {s: i for i, s in enumerate(sides)}
    out = []
    for (group, side), items in sorted(acc.items(), key=lambda kv: (kv[0][0], side_rank[kv[0][1]])):
        done = [t for t in items if t["complete"]]
        raw = describe(t["total_loss_ml"] for t in done)
        adj = describe(t["total_loss_per_height2"] for t in done if t["total_loss_per_height2"] is not None)
        ratios = [t["total_loss_ratio_pct"] for t in done if t["total_loss_ratio_pct"] is not None]
        row: dict[str, Any] = {**_group_columns(group_by, group), "side": side, "n": raw["n"],
                               "n_excluded": len(items) - len(done)}
        for k in ("mean", "std", "min", "q1", "median", "q3", "max"):
            row[f"loss_ml_{k}"] = raw[k]
        row["n_per_height2"] = adj["n"]
        for k in ("mean", "std", "min", "q1", "median", "q3", "max"):
            row[f"loss_per_height2_{k}"] = adj[k]
        row["mean_loss_ratio_pct"] = float(np.mean(ratios)) if ratios else math.nan
        out.append(row)
    return out


def per_muscle_loss_table(
    rows: Sequence[Mapping[str, Any]],
    *,
    group_by: Sequence[str] = (),
    sides: Sequence[str] = SIDES,
    muscle_groups: Sequence[str] = MUSCLE_GROUPS,
) -> list[dict[str, Any]]:
    """Table 3: per group, side and muscle: ``n`` compared, ``mean_loss_ml``, ``sd_loss_ml``,
    ``mean_loss_per_height2`` (cm³/m²) and ``mean_loss_ratio_pct`` (mean of loss / prior volume, %).

    Only compared changes count (a muscle not compared in a study is left out of that muscle's mean).
    """
    muscles = [r for r in rows if _is_muscle(r, muscle_groups) and r.get("prior_study_uid")]
    order = _structure_order(muscles)
    acc: dict[tuple[tuple[str, ...], str, str], dict[str, list[float]]] = {}
    for study_rows in _by_study(muscles).values():
        group = group_of(study_rows[0], group_by)
        for side in sides:
            losses, _ = _side_losses(study_rows, side)
            for key, x in losses.items():
                cell = acc.setdefault((group, side, key), {"ml": [], "h2": [], "ratio": []})
                cell["ml"].append(x.loss_ml)
                if x.loss_per_height2 is not None:
                    cell["h2"].append(x.loss_per_height2)
                if x.prior_ml:
                    cell["ratio"].append(100.0 * x.loss_ml / x.prior_ml)
    names = dict(order)
    rank = {k: i for i, (k, _) in enumerate(order)}
    side_rank = {s: i for i, s in enumerate(sides)}
    out = []
    for (group, side, key), cell in sorted(acc.items(), key=lambda kv: (kv[0][0], side_rank[kv[0][1]], rank[kv[0][2]])):
        d = describe(cell["ml"])
        out.append(
            {
                **_group_columns(group_by, group), "side": side, "structure_key": key, "structure_name": names[key],
                "n": d["n"], "mean_loss_ml": d["mean"], "sd_loss_ml": d["std"],
                "mean_loss_per_height2": float(np.mean(cell["h2"])) if cell["h2"] else math.nan,
                "mean_loss_ratio_pct": float(np.mean(cell["ratio"])) if cell["ratio"] else math.nan,
            }
        )
    return out


# ---------------------------------------------------------------------------
# Terminal output.


def _fmt(v: Any, floatfmt: str) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, float):
        return "-" if math.isnan(v) else format(v, floatfmt)
    return str(v)


def format_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, *, floatfmt: str = ".2f"
) -> str:
    """A plain aligned text table (numbers right-aligned, NaN as ``-``)."""
    if not rows:
        return "(no rows)"
    cols = list(columns) if columns is not None else list(rows[0].keys())
    cells = [[_fmt(r.get(c), floatfmt) for c in cols] for r in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(cols)]
    numeric = [all(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool) for r in rows) for c in cols]
    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()
    return "\n".join([line(cols), line(["-" * w for w in widths]), *(line(c) for c in cells)])
