"""The report's pages of one study: summary (group totals, sarcopenia, pictures), the
per-structure table and the volume chart with its "Comparison with prior study" section.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dicomout.report_layout import (
    Cell,
    DASH,
    FLAG_TINT,
    NOT_REPORTED_TINT,
    FLAG_WORDS,
    GROUP_TITLES,
    LEFT_COLOR,
    RIGHT_COLOR,
    SEX_WORDS,
    SIDE_ORDER,
    content_axes,
    draw_table,
    flag_words,
    format_date,
    format_number,
    structure_order,
    flag_tint,
    wrapped_text,
)
from dicomout.report_overlay import OverlayImage
from pipeline.labels import LabelTable
from pipeline.types import (
    FLAG_PARTIAL_TOP,
    GROUP_ABOVE_KNEE,
    GROUP_ALL,
    GROUP_GLUTEAL,
    SIDE_BOTH,
    Comparison,
    GroupMeasurement,
    Measurements,
    PriorSearch,
    StructureMeasurement,
)


def _group_rows(measurements: Measurements) -> list[list[Cell]]:
    rows: list[list[Cell]] = []
    for group in (GROUP_GLUTEAL, GROUP_ABOVE_KNEE, GROUP_ALL):
        for side in SIDE_ORDER:
            g: GroupMeasurement | None = measurements.group(group, side)
            if g is None:
                continue
            if not g.reported:
                rows.append([
                    Cell(GROUP_TITLES.get(group, group), align="left", bold=side == SIDE_BOTH),
                    Cell(side, align="left"),
                    Cell("not reported", tint=NOT_REPORTED_TINT),
                    *([Cell(DASH)] * 3),
                    Cell("see note below", align="left", tint=NOT_REPORTED_TINT),
                ])
                continue
            tint = FLAG_TINT[FLAG_PARTIAL_TOP] if g.includes_partial else None
            rows.append([
                Cell(GROUP_TITLES.get(group, group), align="left", bold=side == SIDE_BOTH),
                Cell(side, align="left"),
                Cell(("≥" if g.includes_partial else "") + format_number(g.volume_ml, 1), tint=tint),
                Cell(("≥" if g.includes_partial else "") + format_number(g.mass_g, 0), tint=tint),
                Cell(format_number(g.volume_per_height2_cm3_m2, 0)),
                Cell(format_number(g.smi_kg_m2, 2), bold=side == SIDE_BOTH),
                Cell("includes partial structure" if g.includes_partial else "", align="left", tint=tint),
            ])
    return rows


def _withheld_lines(measurements: Measurements) -> list[str]:
    """One line per group withheld on any side, with the reason of its both-sides row (which
    names the muscles of either side)."""
    lines = []
    for group in (GROUP_GLUTEAL, GROUP_ABOVE_KNEE, GROUP_ALL):
        withheld = [g for g in measurements.groups if g.group == group and not g.reported]
        if withheld:
            g = next((w for w in withheld if w.side == SIDE_BOTH), withheld[0])
            lines.append(f"{GROUP_TITLES.get(group, group)} ({g.side}): {g.withheld_reason}.")
    return lines


def _not_assessed_lines(measurements: Measurements) -> list[tuple[str, dict[str, Any]]]:
    """The screen's configured group is withheld: say so, and what was measured instead."""
    note = measurements.sarcopenia_not_assessed
    assert note is not None
    lines: list[tuple[str, dict[str, Any]]] = [(f"Sarcopenia screen: {note.reason}.", {"fontweight": "bold"})]
    if not note.measured_group:
        return lines
    title = GROUP_TITLES.get(note.measured_group, note.measured_group)
    smi = "no SMI (no height)" if note.measured_smi_kg_m2 is None else f"SMI {note.measured_smi_kg_m2:.2f} kg/m²"
    if note.measured_threshold_applied:
        how = f"screened below with the site's threshold for the {title} group."
    else:
        how = (
            f"no threshold is applied to it: none is configured for the {title} group (a site that has "
            f"calibrated one sets it in [sarcopenia.group_thresholds.{note.measured_group}])."
        )
    lines.append((f"Measured: {title}, both sides, {smi}; {how}", {}))
    return lines


def _sarcopenia_lines(measurements: Measurements) -> list[tuple[str, dict[str, Any]]]:
    s = measurements.sarcopenia
    notes = _not_assessed_lines(measurements) if measurements.sarcopenia_not_assessed is not None else []
    if s is None and notes:
        return notes
    if s is None:
        reason = "no height" if measurements.height_m is None else "no threshold configured or group missing"
        return [(f"Sarcopenia screen: not assessed ({reason}).", {})]
    verdict = "BELOW threshold (suggests low muscle mass)" if s.below_threshold else "not below threshold"
    sex = SEX_WORDS.get(measurements.sex, measurements.sex or "unknown sex")
    lines: list[tuple[str, dict[str, Any]]] = [
        *notes,
        (f"Sarcopenia screen — {GROUP_TITLES.get(s.group, s.group)}, both sides, {sex}:", {"fontweight": "bold"}),
        (
            f"SMI {s.smi_kg_m2:.2f} kg/m² vs threshold {s.threshold_kg_m2:.2f} kg/m² → {verdict}.",
            {"fontweight": "bold"},
        ),
        (f"Threshold source: {s.source or 'not stated'}.", {}),
    ]
    if not s.calibrated_for_ct:
        lines.append((
            "Caveat: this threshold is NOT calibrated for CT (it was derived with another method, e.g. DXA); "
            "indicative only.",
            {"color": "#c62828", "fontweight": "bold"},
        ))
    return lines


def _flag_lines(measurements: Measurements, labels: LabelTable) -> list[str]:
    if not measurements.flags:
        return ["No quality flags."]
    names = {label.key: label.name for label in labels.labels}
    lines = []
    for flag in measurements.flags:
        where = []
        if flag.structure:
            where.append(names.get(flag.structure, flag.structure))
        if flag.side:
            where.append(flag.side)
        prefix = f"[{FLAG_WORDS.get(flag.code, flag.code)}] "
        suffix = f" ({', '.join(where)})" if where else ""
        lines.append(f"• {prefix}{flag.message}{suffix}")
    return lines


def _draw_picture(ax: Any, image: OverlayImage, title: str) -> None:
    ax.imshow(image.rgb, extent=(0.0, image.width_mm, image.height_mm, 0.0), interpolation="nearest", aspect="equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=7.5)
    style = {"color": "yellow", "fontsize": 11, "fontweight": "bold", "va": "center"}
    ax.text(0.03, 0.5, "R", transform=ax.transAxes, ha="left", **style)
    ax.text(0.97, 0.5, "L", transform=ax.transAxes, ha="right", **style)
    top, bottom = ("A", "P") if image.plane == "axial" else ("S", "I")
    ax.text(0.5, 0.97, top, transform=ax.transAxes, ha="center", **{**style, "va": "top", "fontsize": 9})
    ax.text(0.5, 0.03, bottom, transform=ax.transAxes, ha="center", **{**style, "va": "bottom", "fontsize": 9})


def draw_summary_page(
    fig: Any, top: float, measurements: Measurements, labels: LabelTable,
    axial: OverlayImage, coronal: OverlayImage, entropy: OverlayImage | None = None,
) -> None:
    fig.text(0.06, top, "Muscle group totals", fontsize=10, fontweight="bold", va="top")
    rows = _group_rows(measurements)
    row_h_fig = 0.0155
    n_lines = len(rows) + 1
    table_top = top - 0.018
    ax = content_axes(fig, table_top - row_h_fig * n_lines, table_top)
    if rows:
        draw_table(
            ax,
            ["Group", "Side", "Volume (cm³)", "Mass (g)", "Vol/height² (cm³/m²)", "SMI (kg/m²)", "Note"],
            rows,
            [0.17, 0.07, 0.11, 0.09, 0.15, 0.10, 0.19],
            row_height=1.0 / n_lines,
        )
    else:
        ax.text(0, 0.9, "No group totals were computed.", fontsize=8, va="top")
    y = table_top - row_h_fig * n_lines - 0.012
    for line in _withheld_lines(measurements):
        y = wrapped_text(fig, 0.06, y, line, width=140, line_step=0.0125, fontsize=7.5)
    for text, style in _sarcopenia_lines(measurements):
        y = wrapped_text(fig, 0.06, y, text, width=112, line_step=0.0135, fontsize=8, **style)
    y -= 0.006
    fig.text(0.06, y, "Quality flags", fontsize=10, fontweight="bold", va="top")
    y -= 0.02
    flag_lines = _flag_lines(measurements, labels)
    max_lines = 8
    for line in flag_lines[:max_lines]:
        y = wrapped_text(fig, 0.07, y, line, width=140, line_step=0.0125, fontsize=7.5)
    if len(flag_lines) > max_lines:
        fig.text(0.07, y, f"… and {len(flag_lines) - max_lines} more (see the structure table).", fontsize=7.5, va="top")
        y -= 0.0135
    pic_top = y - 0.01
    pic_bottom = 0.045
    height = max(0.15, pic_top - pic_bottom - 0.02)
    pictures = [
        (0.06, axial, f"Axial, z = {axial.position_mm:.0f} mm (largest thigh muscle area)"),
        (0.52, coronal, f"Coronal reformat, y = {coronal.position_mm:.0f} mm"),
    ]
    width = 0.42
    if entropy is not None:
        width = 0.285
        pictures = [
            (0.06, axial, f"Axial, z = {axial.position_mm:.0f} mm\n(largest thigh muscle area)"),
            (0.365, coronal, f"Coronal reformat,\ny = {coronal.position_mm:.0f} mm"),
            (0.67, entropy, f"Uncertainty (voxel entropy, red-yellow),\nz = {entropy.position_mm:.0f} mm (most uncertain)"),
        ]
    for x0, image, title in pictures:
        pax = fig.add_axes((x0, pic_bottom, width, height))
        pax.set_anchor("N")
        _draw_picture(pax, image, title)


def structure_rows(measurements: Measurements, labels: LabelTable, keys: Sequence[str]) -> list[list[Cell]]:
    colours = {label.key: label.color for label in labels.labels}
    rows = []
    for key in keys:
        right: StructureMeasurement | None = measurements.structure(key, "right")
        left: StructureMeasurement | None = measurements.structure(key, "left")
        both: StructureMeasurement | None = measurements.structure(key, SIDE_BOTH)
        any_m = right or left or both
        name = any_m.name if any_m is not None else key
        row = [Cell(name, align="left", swatch=colours.get(key))]
        for m in (right, left):
            if m is None:
                row += [Cell(DASH)] * 4
                continue
            tint = flag_tint(m.flags)
            partial = "≥" if m.is_partial else ""
            row += [
                Cell(partial + format_number(m.volume_ml, 1), tint=tint),
                Cell(format_number(m.mean_hu, 0), tint=tint),
                Cell(partial + format_number(m.mass_g, 0), tint=tint),
                Cell(format_number(m.fat_fraction * 100.0 if m.fat_fraction is not None else None, 1), tint=tint),
            ]
        if both is not None:
            total = both.volume_ml
            total_partial = both.is_partial
        else:
            values = [m.volume_ml for m in (right, left) if m is not None]
            total = sum(values) if values else None
            total_partial = any(m is not None and m.is_partial for m in (right, left))
        row.append(Cell(("≥" if total_partial else "") + format_number(total, 1), bold=True))
        if has_uncertainty(measurements):
            row.append(_uncertainty_cell(right, left))
        flag_parts = []
        if right is not None and left is not None and right.flags and right.flags == left.flags:
            flag_parts.append(f"R+L: {flag_words(right.flags)}")
        else:
            for side_letter, m in (("R", right), ("L", left)):
                if m is not None and m.flags:
                    flag_parts.append(f"{side_letter}: {flag_words(m.flags)}")
        if both is not None and both.flags:
            flag_parts.append(f"total: {flag_words(both.flags)}")
        row.append(Cell("; ".join(flag_parts), align="left", tint=flag_tint([f for m in (right, left, both) if m for f in m.flags])))
        rows.append(row)
    return rows


#: Tint of the uncertainty cell of a structure flagged low confidence on either side.
LOW_CONFIDENCE_TINT = "#c9def5"


def has_uncertainty(measurements: Measurements) -> bool:
    """Whether the structure table carries the uncertainty column (pipeline.uncertainty on)."""
    return any(s.uncertainty is not None for s in measurements.structures)


def _uncertainty_cell(right: StructureMeasurement | None, left: StructureMeasurement | None) -> Cell:
    """Mean normalised entropy right / left; "*" marks a side flagged low confidence."""
    parts, low = [], False
    for m in (right, left):
        u = m.uncertainty if m is not None else None
        if u is None:
            parts.append(DASH)
            continue
        low = low or u.low_confidence
        parts.append(f"{u.mean_entropy:.2f}" + ("*" if u.low_confidence else ""))
    return Cell(" / ".join(parts), tint=LOW_CONFIDENCE_TINT if low else None)


def draw_structure_page(fig: Any, top: float, rows: list[list[Cell]], continued: bool, last: bool, measurements: Measurements) -> None:
    title = "Structures (right and left)" + (" — continued" if continued else "")
    fig.text(0.06, top, title, fontsize=10, fontweight="bold", va="top")
    row_h_fig = 0.0152
    n_lines = len(rows) + 2
    table_top = top - 0.018
    ax = content_axes(fig, table_top - row_h_fig * n_lines, table_top)
    headers = ["Structure", "cm³", "HU", "g", "fat %", "cm³", "HU", "g", "fat %", "R+L cm³", "Flags"]
    widths = [0.165, 0.065, 0.045, 0.055, 0.05, 0.065, 0.045, 0.055, 0.05, 0.07, 0.255]
    spans: tuple[tuple[int, int, str], ...] = ((1, 4, "Right"), (5, 8, "Left"), (9, 9, "Total"))
    uncertainty = has_uncertainty(measurements)
    if uncertainty:
        headers.insert(10, "entropy R / L")
        widths[-1:] = [0.09, 0.165]
        spans += ((10, 10, "Uncertainty"),)
    draw_table(ax, headers, rows, widths, row_height=1.0 / n_lines, font_size=6.8, top_spans=spans)
    y = table_top - row_h_fig * n_lines - 0.012
    if not last:
        return
    legend = [
        ("#ffdfb0", "partial: cut by the field of view; values (≥) are lower bounds"),
        ("#f8c4c4", "metal nearby: HU, mass and fat % unreliable"),
        ("#e2cdf2", "implausible volume for the patient's size: check the segmentation"),
    ]
    from matplotlib.patches import Rectangle

    if uncertainty:
        thr = next((s.uncertainty for s in measurements.structures if s.uncertainty is not None), None)
        n = thr.n_samples if thr is not None else 0
        legend.append((LOW_CONFIDENCE_TINT, f"low confidence (*): uncertainty across {n} test-time augmentations "
                       "above the model's calibrated threshold: check the outline"))
    for colour, text in legend:
        fig.add_artist(Rectangle((0.06, y - 0.009), 0.018, 0.009, transform=fig.transFigure, facecolor=colour, edgecolor="#777777", lw=0.3))
        fig.text(0.084, y - 0.0045, text, fontsize=7, va="center")
        y -= 0.014
    y -= 0.01
    fig.text(0.06, y, "Methods", fontsize=10, fontweight="bold", va="top")
    y -= 0.02
    methods = [
        "Volume = voxel count × voxel volume"
        + (f" ({measurements.voxel_volume_ml * 1000.0:.3f} mm³ per voxel)." if measurements.voxel_volume_ml else "."),
        f"Mass: {measurements.density_formula or 'not stated'}.",
        "Mean HU over the structure; fat % = share of its voxels within −190..−30 HU.",
        "Vol/height² = group volume / height²; SMI = group mass (kg) / height² (m²).",
    ]
    if uncertainty:
        methods += ["Uncertainty: mean voxel entropy of the test-time augmentations' averaged probabilities in the",
                    "structure (0 = certain, 1 = uniform over the classes) and its volume spread across them."]
    for line in methods:
        fig.text(0.07, y, line, fontsize=7.5, va="top")
        y -= 0.0135


def draw_chart_page(
    fig: Any,
    top: float,
    measurements: Measurements,
    labels: LabelTable,
    comparison: Comparison | None,
    prior_search: PriorSearch | None,
    comparison_pages: str,
) -> None:
    fig.text(0.06, top, "Muscle volumes by side", fontsize=10, fontweight="bold", va="top")
    muscle_keys = [k for k in structure_order(measurements, labels) if k not in {l.key for l in labels.labels if l.is_bone}]
    names, right_v, left_v, right_p, left_p = [], [], [], [], []
    for key in muscle_keys:
        r = measurements.structure(key, "right")
        l = measurements.structure(key, "left")
        if r is None and l is None:
            continue
        names.append((r or l).name)  # type: ignore[union-attr]
        right_v.append(r.volume_ml if r is not None else 0.0)
        left_v.append(l.volume_ml if l is not None else 0.0)
        right_p.append(r is not None and r.is_partial)
        left_p.append(l is not None and l.is_partial)
    chart_bottom = 0.25
    ax = fig.add_axes((0.24, chart_bottom, 0.70, top - 0.03 - chart_bottom))
    if names:
        y = np.arange(len(names), dtype=float)
        h = 0.38
        bars_r = ax.barh(y - h / 2, right_v, height=h, color=RIGHT_COLOR, label="Right")
        bars_l = ax.barh(y + h / 2, left_v, height=h, color=LEFT_COLOR, label="Left")
        for bars, partial in ((bars_r, right_p), (bars_l, left_p)):
            for bar, p in zip(bars, partial):
                if p:
                    bar.set_hatch("////")
                    bar.set_edgecolor("black")
        ax.set_yticks(y, names)
        ax.margins(y=0.01)
        ax.invert_yaxis()
        ax.set_xlabel("Volume (cm³)")
        ax.grid(axis="x", color="#dddddd", lw=0.5)
        ax.set_axisbelow(True)
        handles, texts = ax.get_legend_handles_labels()
        if any(right_p) or any(left_p):
            from matplotlib.patches import Patch

            handles.append(Patch(facecolor="white", edgecolor="black", hatch="////"))
            texts.append("partial (lower bound)")
        ax.legend(handles, texts, loc="lower right", frameon=False)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, "No muscle volumes to chart.", ha="center", va="center")
    y_text = chart_bottom - 0.05
    fig.text(0.06, y_text, "Comparison with prior study", fontsize=10, fontweight="bold", va="top")
    y_text -= 0.022
    if comparison is not None:
        lines = [
            f"Compared with the prior study of {format_date(comparison.prior_study_date)}"
            + (f" ({comparison.interval_days} days earlier)" if comparison.interval_days is not None else "")
            + f": see {comparison_pages}.",
        ]
    elif prior_search is not None:
        lines = _prior_search_lines(prior_search)
    else:
        lines = ["No prior study was compared in this report."]
    for i, line in enumerate(lines):
        style = {"fontweight": "bold"} if i == 0 else {}
        y_text = wrapped_text(fig, 0.07, y_text, line, width=140, line_step=0.0135, fontsize=8, **style)


def _prior_search_lines(search: PriorSearch) -> list[str]:
    """The "No prior study found" section (no comparison in this report)."""
    where = "; ".join(search.looked_in) or "nowhere (no source configured)"
    head = (
        f"Prior study {search.prior_study_uid or ''} was found but not compared.".replace("  ", " ")
        if search.found
        else "No prior study found."
    )
    lines = [head, f"Looked in: {where}."]
    if search.message:
        lines.append(search.message)
    return lines
