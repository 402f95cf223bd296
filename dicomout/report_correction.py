"""The report's page(s) of a reader's correction: the model's volume against the corrected one.

One row per structure and side (right, left) that the model or the reader segmented:
model volume, corrected volume, corrected - model in cm³ and in % of the model's volume
(:class:`pipeline.correction.StructureDifference`). Rows that changed are tinted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dicomout.report_layout import DASH, MINUS, Cell, content_axes, draw_table
from pipeline.correction import StructureDifference

CORRECTION_ROWS_PER_PAGE = 44
CHANGED_TINT = "#d7ecd9"


def _signed(value: float, digits: int) -> str:
    text = f"{abs(value):.{digits}f}"
    if round(value, digits) == 0:
        return text
    return ("+" if value > 0 else MINUS) + text


def correction_rows(differences: Sequence[StructureDifference]) -> list[list[Cell]]:
    """Table rows (right and left sides; a structure neither segmented is left out)."""
    rows = []
    for d in differences:
        if d.side not in ("right", "left") or (d.model_voxel_count == 0 and d.corrected_voxel_count == 0):
            continue
        tint = CHANGED_TINT if d.difference_voxels else None
        pct = d.difference_pct
        rows.append([
            Cell(d.name, align="left"), Cell(d.side, align="left"),
            Cell(f"{d.model_volume_ml:.1f}"), Cell(f"{d.corrected_volume_ml:.1f}", bold=bool(d.difference_voxels)),
            Cell(_signed(d.difference_ml, 1), tint=tint), Cell(DASH if pct is None else _signed(pct, 1), tint=tint),
        ])
    return rows


def correction_chunks(differences: Sequence[StructureDifference]) -> list[list[list[Cell]]]:
    rows = correction_rows(differences)
    return [rows[i:i + CORRECTION_ROWS_PER_PAGE] for i in range(0, len(rows), CORRECTION_ROWS_PER_PAGE)] or [[]]


def draw_correction_page(fig: Any, top: float, rows: list[list[Cell]], *, reader: str, continued: bool) -> None:
    """Title, one sentence and the table of model vs corrected values."""
    title = f"Corrected by {reader}: model value vs corrected value" + (" — continued" if continued else "")
    fig.text(0.06, top, title, fontsize=10, fontweight="bold", va="top")
    fig.text(0.06, top - 0.018, "The report's values are measured on the corrected segmentation; the model's "
             "values are kept for comparison (difference = corrected − model).", fontsize=7.5, va="top")
    row_h_fig = 0.0152
    n_lines = len(rows) + 1
    table_top = top - 0.036
    ax = content_axes(fig, table_top - row_h_fig * n_lines, table_top)
    draw_table(
        ax, ["Structure", "Side", "Model cm³", "Corrected cm³", "Difference cm³", "Difference %"], rows,
        [0.34, 0.1, 0.14, 0.14, 0.14, 0.14], row_height=1.0 / n_lines, font_size=7.0,
    )
