"""The figures of ``thighnode cohort`` (PNG, matplotlib's object API; no global pyplot state).

Each function returns the written path, or the reason (text) it wrote nothing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from research.rows import CT_GROUPS, StudyRecord
from research.stats import RocResult


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


def fig_loss_bars(path: Path, table3: Sequence[Mapping[str, Any]], value: str, ylabel: str, title: str) -> Path | str:
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
