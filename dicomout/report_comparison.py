"""The report's comparison pages (pipeline.types.Comparison): the per-structure change table
with its notes, the group totals and the change charts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from dicomout.report_layout import (
    Cell,
    DASH,
    FLAG_SHORT,
    FLAG_TINT,
    LABEL_GROUP_TITLES,
    LEFT_COLOR,
    MINUS,
    RIGHT_COLOR,
    content_axes,
    draw_table,
    format_date,
    format_number,
    wrapped_text,
)
from pipeline.labels import LabelTable
from pipeline.types import (
    FLAG_PARTIAL_COMMON_RANGE,
    FLAG_EMPTY,
    FLAG_METAL,
    FLAG_PARTIAL_TOP,
    SIDE_BOTH,
    Comparison,
    StructureChange,
)


@dataclass(frozen=True)
class _ComparisonTable:
    """The rows of the per-structure change table and the notes printed under it."""

    rows: list[list[Cell]]
    notes: list[str]


def _signed(value: float | None, digits: int) -> str:
    """``+1.2`` / ``−3.4`` (typographic minus) or a dash."""
    if value is None or not math.isfinite(value):
        return DASH
    return f"{value:+.{digits}f}".replace("-", MINUS)


def _range_text(rng: tuple[float, float] | None) -> str:
    if rng is None:
        return "?"
    return f"{rng[0]:.0f}..{rng[1]:.0f}".replace("-", MINUS)


def _side_titles(operated: str) -> dict[str, str]:
    """Column titles of the right and left sides, the operated one marked."""
    titles = {"right": "Right", "left": "Left"}
    if operated in ("right", "left"):
        other = "left" if operated == "right" else "right"
        titles[operated] += " (operated side)"
        titles[other] += " (contralateral)"
    elif operated == SIDE_BOTH:
        titles = {side: title + " (operated side)" for side, title in titles.items()}
    return titles


def _change_order(comparison: Comparison, labels: LabelTable) -> list[str]:
    """Structure keys of the comparison in label table order (unknown keys last, sorted)."""
    present = {c.key for c in comparison.changes}
    order = [k for k in labels.keys() if k in present]
    return order + sorted(present - set(order))


def _change_tint(c: StructureChange | None) -> str | None:
    if c is None:
        return None
    if not c.compared:
        return FLAG_TINT[FLAG_EMPTY]
    if FLAG_METAL in c.flags:
        return FLAG_TINT[FLAG_METAL]
    if FLAG_PARTIAL_COMMON_RANGE in c.flags:
        return FLAG_TINT[FLAG_PARTIAL_TOP]
    return None


def comparison_table(comparison: Comparison, labels: LabelTable) -> _ComparisonTable:
    """One row per structure, right and left side by side; reasons for "not compared" become
    numbered notes, the partial ranges and the metal caveat notes under the table."""
    colours = {label.key: label.color for label in labels.labels}
    reasons: dict[str, int] = {}
    partial_ranges: dict[str, set[tuple[float, float] | None]] = {"right": set(), "left": set()}
    metal = False
    rows: list[list[Cell]] = []
    for key in _change_order(comparison, labels):
        by_side = {side: comparison.change(key, side) for side in ("right", "left")}
        any_c = by_side["right"] or by_side["left"]
        row = [Cell(any_c.name if any_c is not None else key, align="left", swatch=colours.get(key))]
        notes: dict[str, str] = {}
        for side in ("right", "left"):
            c = by_side[side]
            tint = _change_tint(c)
            if c is None or not c.compared:
                row += [Cell(DASH, tint=tint)] * 5
                if c is not None:
                    number = reasons.setdefault(c.reason or "no reason given", len(reasons) + 1)
                    notes[side] = f"not compared [{number}]"
                continue
            row += [
                Cell(format_number(c.prior_volume_ml, 1), tint=tint),
                Cell(format_number(c.current_volume_ml, 1), tint=tint),
                Cell(_signed(c.change_ml, 1), tint=tint, bold=True),
                Cell(_signed(None if c.change_ratio is None else 100.0 * c.change_ratio, 1), tint=tint),
                Cell(_signed(c.change_per_height2_cm3_m2, 1), tint=tint),
            ]
            words = []
            if FLAG_PARTIAL_COMMON_RANGE in c.flags:
                words.append("partial")
                partial_ranges[side].add(c.common_range_mm)
            if FLAG_METAL in c.flags:
                words.append("metal")
                metal = True
            words += [FLAG_SHORT.get(f, f) for f in c.flags if f not in (FLAG_PARTIAL_COMMON_RANGE, FLAG_METAL)]
            if words:
                notes[side] = ", ".join(words)
        if set(notes) == {"right", "left"} and notes["right"] == notes["left"]:
            text = f"R+L: {notes['right']}"
        else:
            text = "; ".join(f"{side[0].upper()}: {note}" for side, note in notes.items())
        row.append(Cell(text, align="left"))
        rows.append(row)
    lines = [f"[{n}] not compared: {reason}" for reason, n in reasons.items()]
    for side in ("right", "left"):
        for rng in sorted(partial_ranges[side], key=lambda r: r or (0.0, 0.0)):
            lines.append(
                f"partial ({side}): compared over z {_range_text(rng)} mm only "
                f"({comparison.axis_text.get(side, 'from the landmark')}); the structure "
                "extends beyond the range both scans cover, and what lies outside is not compared."
            )
    if metal:
        lines.append(
            "metal: HU values withheld (mean HU, fat fraction and mass changes are not given); "
            "the volume change may be affected by the metal artefact."
        )
    return _ComparisonTable(rows=rows, notes=lines)


def _group_change_rows(comparison: Comparison, labels: LabelTable) -> list[list[Cell]]:
    """Sums over the compared structures of each label group and side (and all muscles)."""
    bone_groups = {label.group for label in labels.labels if label.is_bone}
    label_groups = [g for g in dict.fromkeys(label.group for label in labels.labels) if g not in bone_groups]
    label_groups += sorted({c.group for c in comparison.changes} - set(label_groups) - bone_groups)
    h2 = comparison.height_m**2 if comparison.height_m else None
    selections = [(g, LABEL_GROUP_TITLES.get(g, g.replace("_", " ").capitalize()), {g}) for g in label_groups]
    selections.append(("all", "All muscles", set(label_groups)))
    selections += [(g, LABEL_GROUP_TITLES.get(g, g.capitalize()), {g}) for g in sorted(bone_groups)]
    rows: list[list[Cell]] = []
    for _, title, members in selections:
        entries = [c for c in comparison.changes if c.group in members]
        if not entries:
            continue
        row = [Cell(title, align="left", bold=title == "All muscles")]
        counts = []
        for side in ("right", "left"):
            on_side = [c for c in entries if c.side == side]
            used = [c for c in on_side if c.compared and c.prior_volume_ml is not None and c.current_volume_ml is not None]
            counts.append(f"{side[0].upper()} {len(used)}/{len(on_side)}")
            if not used:
                row += [Cell(DASH)] * 5
                continue
            prior = sum(c.prior_volume_ml for c in used)  # type: ignore[misc]
            current = sum(c.current_volume_ml for c in used)  # type: ignore[misc]
            change = current - prior
            flagged = any(c.flags for c in used)
            tint = FLAG_TINT[FLAG_PARTIAL_TOP] if flagged else None
            row += [
                Cell(format_number(prior, 1), tint=tint),
                Cell(format_number(current, 1), tint=tint),
                Cell(_signed(change, 1), tint=tint, bold=True),
                Cell(_signed(100.0 * change / prior if prior > 0 else None, 1), tint=tint),
                Cell(_signed(change / h2 if h2 else None, 1), tint=tint),
            ]
        row.append(Cell(", ".join(counts) + " compared", align="left"))
        rows.append(row)
    return rows


_CHANGE_HEADER = ["prior", "current", "Δ cm³", "Δ %", "Δ/h²"]


def _change_table(ax: Any, first: str, rows: list[list[Cell]], titles: dict[str, str], n_lines: int, notes: str) -> None:
    draw_table(
        ax,
        [first, *_CHANGE_HEADER, *_CHANGE_HEADER, notes],
        rows,
        [0.15, *([0.058, 0.062, 0.06, 0.05, 0.05] * 2), 0.29],
        row_height=1.0 / n_lines,
        font_size=6.6,
        top_spans=((1, 5, titles["right"]), (6, 10, titles["left"])),
    )


def _comparison_intro(fig: Any, y: float, comparison: Comparison) -> float:
    days = comparison.interval_days
    interval = DASH if days is None else f"{days} days" + (f" ({days / 30.44:.1f} months)" if abs(days) >= 60 else "")
    operated = {
        "right": "right (metal in either scan); the contralateral left is shown beside it",
        "left": "left (metal in either scan); the contralateral right is shown beside it",
        SIDE_BOTH: "both sides (metal on both sides in either scan)",
    }.get(comparison.operated_side, "none (no metal found in either scan)")
    height = f"{comparison.height_m:.2f} m" if comparison.height_m else "unknown (no change per height²)"
    items = [
        ("Prior study", f"{format_date(comparison.prior_study_date)}   (StudyInstanceUID {comparison.prior_study_uid})"),
        ("Current study", format_date(comparison.current_study_date)),
        ("Interval", interval),
        ("Landmark", comparison.landmark or DASH),
        ("Operated side", operated),
        ("Height", height),
    ]
    for key, value in items:
        fig.text(0.06, y, f"{key}:", fontsize=7.5, color="#444444", va="top")
        fig.text(0.17, y, value, fontsize=7.5, va="top", fontweight="bold" if key == "Interval" else "normal")
        y -= 0.0128
    fig.text(0.06, y, "Method:", fontsize=7.5, color="#444444", va="top")
    y = wrapped_text(fig, 0.17, y, comparison.method or DASH, width=112, line_step=0.0125, fontsize=7.5)
    y = wrapped_text(
        fig, 0.06, y - 0.003,
        "Volumes (cm³) over the common range of the leg both scans cover, not over each whole scan; "
        "Δ = current − prior, Δ % of the prior volume, Δ/h² = Δ cm³ / height² (cm³/m²). Changes of mean HU, "
        "mass and fat fraction are in the structured report (SR).",
        width=150, line_step=0.0122, fontsize=7, color="#444444",
    )
    return y - 0.004


def draw_comparison_table_page(
    fig: Any, top: float, comparison: Comparison, rows: list[list[Cell]], notes: list[str], *, continued: bool, last: bool
) -> None:
    from matplotlib.patches import Rectangle

    fig.text(0.06, top, "Comparison with prior study" + (" — continued" if continued else ""),
             fontsize=10, fontweight="bold", va="top")
    y = top - 0.022
    if not continued:
        y = _comparison_intro(fig, y, comparison)
    row_h_fig = 0.0152
    n_lines = len(rows) + 2
    ax = content_axes(fig, y - row_h_fig * n_lines, y)
    if rows:
        _change_table(ax, "Structure", rows, _side_titles(comparison.operated_side), n_lines, "Notes")
    else:
        ax.text(0, 0.9, "The comparison holds no structure.", fontsize=8, va="top")
    y -= row_h_fig * n_lines + 0.012
    if not last:
        return
    for colour, text in (
        (FLAG_TINT[FLAG_PARTIAL_TOP], "partial: compared over the common range only"),
        (FLAG_TINT[FLAG_METAL], "metal nearby: HU values withheld"),
        (FLAG_TINT[FLAG_EMPTY], "not compared"),
    ):
        fig.add_artist(Rectangle((0.06, y - 0.009), 0.018, 0.009, transform=fig.transFigure, facecolor=colour,
                                 edgecolor="#777777", lw=0.3))
        fig.text(0.084, y - 0.0045, text, fontsize=7, va="center")
        y -= 0.013
    y -= 0.006
    for line in notes:
        y = wrapped_text(fig, 0.06, y, line, width=150, line_step=0.0122, fontsize=7)


def _change_bars(
    ax: Any, names: list[str], values: dict[str, list[float | None]], flagged: dict[str, list[bool]],
    titles: dict[str, str], xlabel: str, *, show_names: bool,
) -> None:
    """Horizontal change bars per muscle, right and left side by side (like the paper's
    Figures 7 and 8); a side that was not compared has no bar, a flagged one is hatched."""
    from matplotlib.ticker import MaxNLocator

    y = np.arange(len(names), dtype=float)
    h = 0.38
    for side, offset, colour in (("right", -h / 2, RIGHT_COLOR), ("left", h / 2, LEFT_COLOR)):
        shown = [i for i, v in enumerate(values[side]) if v is not None]
        bars = ax.barh(y[shown] + offset, [values[side][i] for i in shown], height=h, color=colour, label=titles[side])
        for bar, i in zip(bars, shown):
            if flagged[side][i]:
                bar.set_hatch("////")
                bar.set_edgecolor("black")
    ax.axvline(0.0, color="#444444", lw=0.6)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6))
    ax.set_yticks(y, names if show_names else [""] * len(names))
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", color="#dddddd", lw=0.5)
    ax.set_axisbelow(True)
    for spine in ("top", "right"):
        ax.spines[spine].set_visible(False)


def draw_comparison_chart_page(fig: Any, top: float, comparison: Comparison, labels: LabelTable) -> None:
    from matplotlib.patches import Patch

    fig.text(0.06, top, "Comparison with prior study — group totals and change per muscle", fontsize=10,
             fontweight="bold", va="top")
    titles = _side_titles(comparison.operated_side)
    group_rows = _group_change_rows(comparison, labels)
    row_h_fig = 0.0152
    n_lines = len(group_rows) + 2
    table_top = top - 0.022
    ax = content_axes(fig, table_top - row_h_fig * n_lines, table_top)
    if group_rows:
        _change_table(ax, "Group", group_rows, titles, n_lines, "Structures compared")
    y = table_top - row_h_fig * n_lines - 0.01
    y = wrapped_text(
        fig, 0.06, y,
        "Group totals add up the structures compared on that side (flagged ones included, tinted); a structure "
        "not compared on a side is left out of that side's total.",
        width=150, line_step=0.0122, fontsize=7, color="#444444",
    )
    bone = {label.key for label in labels.labels if label.is_bone}
    names: list[str] = []
    change: dict[str, list[float | None]] = {"right": [], "left": []}
    ratio: dict[str, list[float | None]] = {"right": [], "left": []}
    flagged: dict[str, list[bool]] = {"right": [], "left": []}
    for key in _change_order(comparison, labels):
        if key in bone:
            continue
        by_side = {side: comparison.change(key, side) for side in ("right", "left")}
        usable = {side: c if c is not None and c.compared and c.change_ml is not None else None for side, c in by_side.items()}
        if not any(usable.values()):
            continue
        names.append(next(c for c in usable.values() if c is not None).name)
        for side, c in usable.items():
            change[side].append(c.change_ml if c is not None else None)
            ratio[side].append(100.0 * c.change_ratio if c is not None and c.change_ratio is not None else None)
            flagged[side].append(bool(c is not None and c.flags))
    chart_top, chart_bottom = y - 0.035, 0.105
    if not names:
        fig.text(0.06, chart_top, "No muscle was compared on either side: no change chart.", fontsize=8, va="top")
        return
    fig.text(0.06, y - 0.008, "Change per muscle and side (not compared: omitted; flagged: hatched)",
             fontsize=9, fontweight="bold", va="top")
    left_ax = fig.add_axes((0.25, chart_bottom, 0.33, chart_top - chart_bottom))
    right_ax = fig.add_axes((0.62, chart_bottom, 0.32, chart_top - chart_bottom))
    _change_bars(left_ax, names, change, flagged, titles, "Volume change (cm³)", show_names=True)
    _change_bars(right_ax, names, ratio, flagged, titles, "Volume change (% of prior volume)", show_names=False)
    left_ax.set_title("Change in cm³", fontsize=8)
    right_ax.set_title("Change in % of the prior volume", fontsize=8)
    handles, texts = left_ax.get_legend_handles_labels()
    if any(any(f) for f in flagged.values()):
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="////"))
        texts.append("flagged (partial or metal)")
    fig.legend(handles, texts, loc="lower center", ncol=len(handles), frameon=False, bbox_to_anchor=(0.5, 0.03))
