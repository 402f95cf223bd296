"""Layout primitives of the report: the page frame (identification block, banner, footer),
tables of cells, wrapped text, number and date formatting, flag words and colours.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom

from pipeline.labels import LabelTable
from pipeline.types import (
    FLAG_EMPTY,
    FLAG_IMPLAUSIBLE_VOLUME,
    FLAG_METAL,
    FLAG_NO_HEIGHT,
    FLAG_PARTIAL_BOTTOM,
    FLAG_PARTIAL_TOP,
    GROUP_ABOVE_KNEE,
    GROUP_ALL,
    GROUP_GLUTEAL,
    SIDE_BOTH,
    Measurements,
    PatientInfo,
)


DEMONSTRATION_BANNER = "DEMONSTRATION MODEL — NOT FOR CLINICAL USE"
GROUP_TITLES = {
    GROUP_GLUTEAL: "Gluteal",
    GROUP_ABOVE_KNEE: "Above knee (thigh)",
    GROUP_ALL: "All (gluteal + thigh)",
}
SIDE_ORDER = ("right", "left", SIDE_BOTH)
FLAG_WORDS = {
    FLAG_PARTIAL_TOP: "partial (cut at top of scan)",
    FLAG_PARTIAL_BOTTOM: "partial (cut at bottom of scan)",
    FLAG_METAL: "metal nearby",
    FLAG_IMPLAUSIBLE_VOLUME: "implausible volume",
    FLAG_NO_HEIGHT: "no height",
    FLAG_EMPTY: "not found",
}
FLAG_SHORT = {  # for the structure table's narrow flags column
    FLAG_PARTIAL_TOP: "partial (top)",
    FLAG_PARTIAL_BOTTOM: "partial (bottom)",
    FLAG_METAL: "metal",
    FLAG_IMPLAUSIBLE_VOLUME: "implausible",
    FLAG_NO_HEIGHT: "no height",
    FLAG_EMPTY: "not found",
}
FLAG_TINT = {  # cell tint per flag, most severe first
    FLAG_METAL: "#f8c4c4",
    FLAG_IMPLAUSIBLE_VOLUME: "#e2cdf2",
    FLAG_PARTIAL_TOP: "#ffdfb0",
    FLAG_PARTIAL_BOTTOM: "#ffdfb0",
    FLAG_EMPTY: "#dddddd",
}
NOT_REPORTED_TINT = "#dddddd"  # a group withheld: the field of view does not cover its muscles
RIGHT_COLOR = "#3b6fb6"
LEFT_COLOR = "#e08a2c"
SEX_WORDS = {"F": "female", "M": "male", "O": "other"}
DASH = "—"
MINUS = "−"
"""StructureChange flag (pipeline.compare.FLAG_PARTIAL_COMMON_RANGE): compared over the common range only."""
LABEL_GROUP_TITLES = {  # label table groups (config/labels.toml)
    "gluteal": "Gluteal",
    "anterior": "Anterior thigh",
    "medial": "Medial thigh",
    "posterior": "Posterior thigh",
    "other": "Other",
    "bone": "Bone",
}


@dataclass(frozen=True)
class ReportHeader:
    """Study and software identification printed on every page.

    ``study_date`` is a DICOM DA (YYYYMMDD) and ``referring_physician`` a DICOM PN
    (``Family^Given``); both are printed in a readable form. ``model_name`` and
    ``model_version`` default to the segmentation's when empty. ``demonstration_model``
    prints the red "NOT FOR CLINICAL USE" banner.
    """

    study_date: str = ""
    study_time: str = ""
    accession_number: str = ""
    study_description: str = ""
    institution_name: str = ""
    referring_physician: str = ""
    node_version: str = ""
    model_name: str = ""
    model_version: str = ""
    demonstration_model: bool = False
    verified_by: str = ""  # a reader's correction: "Verified (corrected by <name>)" on every page

    @classmethod
    def from_dataset(
        cls,
        ds: pydicom.Dataset,
        *,
        node_version: str = "",
        model_name: str = "",
        model_version: str = "",
        demonstration_model: bool = False,
    ) -> "ReportHeader":
        """Read the General Study (PS3.3 C.7.2.1) and General Equipment (C.7.5.1)
        attributes of a source image header; missing attributes become ""."""

        def text(keyword: str) -> str:
            value = ds.get(keyword, "")
            return "" if value is None else str(value).strip()

        return cls(
            study_date=text("StudyDate"),
            study_time=text("StudyTime"),
            accession_number=text("AccessionNumber"),
            study_description=text("StudyDescription"),
            institution_name=text("InstitutionName"),
            referring_physician=text("ReferringPhysicianName"),
            node_version=node_version,
            model_name=model_name,
            model_version=model_version,
            demonstration_model=bool(demonstration_model),
        )


def format_date(da: str) -> str:
    da = (da or "").strip()
    if len(da) == 8 and da.isdigit():
        return f"{da[:4]}-{da[4:6]}-{da[6:]}"
    return da or DASH


def _format_person(pn: str) -> str:
    """DICOM PN ``Family^Given^Middle^Prefix^Suffix`` as "Family, Given Middle"."""
    pn = (pn or "").split("=")[0]
    parts = [p.strip() for p in pn.split("^")]
    if not any(parts):
        return DASH
    family = parts[0]
    given = " ".join(p for p in parts[1:3] if p)
    name = f"{family}, {given}" if family and given else family or given
    prefix = parts[3] if len(parts) > 3 else ""
    suffix = parts[4] if len(parts) > 4 else ""
    return " ".join(p for p in (prefix, name, suffix) if p)


def format_number(value: float | None, digits: int) -> str:
    if value is None or not math.isfinite(value):
        return DASH
    return f"{value:.{digits}f}"


def _height_text(measurements: Measurements, patient: PatientInfo) -> str:
    height = measurements.height_m if measurements.height_m is not None else patient.height_m
    if height is None:
        return "unknown (no height-adjusted values)"
    source = {
        "PatientSize": "DICOM PatientSize",
        "recorded": "recorded at the node",
    }.get(measurements.height_source, measurements.height_source or "source unknown")
    return f"{height:.2f} m ({source})"


def structure_order(measurements: Measurements, labels: LabelTable) -> list[str]:
    """Structure keys present in the measurements, in label table order."""
    present = {s.key for s in measurements.structures}
    order = [k for k in labels.keys() if k in present]
    order += sorted(present - set(order))
    return order


def flag_tint(flags: Sequence[str]) -> str | None:
    for code, colour in FLAG_TINT.items():
        if code in flags:
            return colour
    return None


def flag_words(flags: Sequence[str]) -> str:
    return ", ".join(FLAG_SHORT.get(code, code) for code in flags)


def wrapped_text(fig: Any, x: float, y: float, text: str, *, width: int, line_step: float, **style: Any) -> float:
    """Draw ``text`` wrapped at ``width`` characters from ``y`` down; return the y below it."""
    for line in textwrap.wrap(text, width=width) or [""]:
        fig.text(x, y, line, va="top", **style)
        y -= line_step
    return y


@dataclass(frozen=True)
class Cell:
    text: str
    tint: str | None = None
    bold: bool = False
    align: str = "right"
    swatch: tuple[int, int, int] | None = None


def draw_table(
    ax: Any,
    header: Sequence[str],
    rows: Sequence[Sequence[Cell]],
    widths: Sequence[float],
    *,
    row_height: float,
    font_size: float = 7.0,
    top_spans: Sequence[tuple[int, int, str]] = (),
) -> float:
    """Draw a ruled table into an axes spanning the figure (coordinates 0..1, y up)
    starting at its top; return the y of its bottom edge. ``top_spans`` adds a
    header row above ``header`` with (first column, last column, text) groups."""
    from matplotlib.patches import Rectangle

    total = sum(widths)
    xs = [0.0]
    for w in widths:
        xs.append(xs[-1] + w / total)
    y = 1.0
    if top_spans:
        y -= row_height
        for first, last, text in top_spans:
            ax.add_patch(Rectangle((xs[first], y), xs[last + 1] - xs[first], row_height, facecolor="#e4e9f1", edgecolor="white", lw=1.0))
            ax.text((xs[first] + xs[last + 1]) / 2, y + row_height / 2, text, ha="center", va="center", fontsize=font_size, fontweight="bold")
    y -= row_height
    ax.add_patch(Rectangle((0, y), 1, row_height, facecolor="#e4e9f1", edgecolor="none"))
    aligns = [cell.align for cell in rows[0]] if rows else ["left"] * len(header)
    for i, text in enumerate(header):
        align = aligns[i]
        x = xs[i] + 0.004 if align == "left" else xs[i + 1] - 0.004
        ax.text(x, y + row_height / 2, text, ha=align, va="center", fontsize=font_size, fontweight="bold")
    for r, row in enumerate(rows):
        y -= row_height
        if r % 2 == 1:
            ax.add_patch(Rectangle((0, y), 1, row_height, facecolor="#f5f5f5", edgecolor="none"))
        for i, cell in enumerate(row):
            if cell.tint:
                ax.add_patch(Rectangle((xs[i], y), xs[i + 1] - xs[i], row_height, facecolor=cell.tint, edgecolor="none"))
            x_text = xs[i] + 0.004
            if cell.swatch is not None:
                sw = min(row_height * 0.6, 0.012)
                ax.add_patch(
                    Rectangle((xs[i] + 0.004, y + (row_height - sw * 0.9) / 2), 0.012, sw * 0.9,
                              facecolor=np.asarray(cell.swatch) / 255.0, edgecolor="#555555", lw=0.3)
                )
                x_text += 0.016
            if cell.align == "left":
                ax.text(x_text, y + row_height / 2, cell.text, ha="left", va="center", fontsize=font_size,
                        fontweight="bold" if cell.bold else "normal")
            else:
                ax.text(xs[i + 1] - 0.004, y + row_height / 2, cell.text, ha="right", va="center",
                        fontsize=font_size, fontweight="bold" if cell.bold else "normal")
    ax.plot([0, 1], [y, y], color="#888888", lw=0.6)
    ax.plot([0, 1], [1, 1], color="#888888", lw=0.6)
    return y


def content_axes(fig: Any, bottom: float, top: float) -> Any:
    ax = fig.add_axes((0.06, bottom, 0.88, top - bottom))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")
    return ax


def draw_page_frame(
    fig: Any,
    *,
    page: int,
    pages: int,
    patient: PatientInfo,
    measurements: Measurements,
    study: ReportHeader,
    model_name: str,
    model_version: str,
) -> float:
    """Title, identification block, banner and footer; returns the top of the content area."""
    fig.text(0.06, 0.965, "Thigh and hip muscle CT measurements", fontsize=13, fontweight="bold", va="baseline")
    fig.text(0.94, 0.965, f"Page {page} of {pages}", fontsize=8, ha="right", va="baseline")
    sex = SEX_WORDS.get(patient.sex or measurements.sex, (patient.sex or measurements.sex) or DASH)
    age = patient.age.lstrip("0") if patient.age else ""
    left = [
        ("Patient", _format_person(patient.patient_name)),
        ("Patient ID", patient.patient_id or DASH),
        ("Birth date", format_date(patient.birth_date)),
        ("Sex / age", f"{sex} / {age or DASH}"),
        ("Height", _height_text(measurements, patient)),
        ("Weight", f"{patient.weight_kg:.0f} kg" if patient.weight_kg else DASH),
    ]
    right = [
        ("Study date", format_date(study.study_date)),
        ("Accession", study.accession_number or DASH),
        ("Study", study.study_description or DASH),
        ("Institution", study.institution_name or DASH),
        ("Referrer", _format_person(study.referring_physician)),
        ("Model", f"{model_name or DASH} {model_version}".strip() + f"  (thighnode {study.node_version or DASH})"),
    ]
    y0, dy = 0.944, 0.0125
    for column_x, value_x, items in ((0.06, 0.15, left), (0.52, 0.61, right)):
        for i, (key, value) in enumerate(items):
            fig.text(column_x, y0 - i * dy, f"{key}:", fontsize=7.5, color="#444444", va="top")
            fig.text(value_x, y0 - i * dy, value, fontsize=7.5,
                     fontweight="bold" if key in ("Patient", "Patient ID") else "normal", va="top")
    y = y0 - len(left) * dy - 0.006
    fig.add_artist(_hline(fig, y))
    if study.demonstration_model:
        from matplotlib.patches import Rectangle

        fig.add_artist(Rectangle((0.06, y - 0.030), 0.88, 0.024, transform=fig.transFigure, facecolor="#c62828", edgecolor="none"))
        fig.text(0.5, y - 0.018, DEMONSTRATION_BANNER, ha="center", va="center", fontsize=12, fontweight="bold", color="white")
        y -= 0.036
    if study.verified_by:
        from matplotlib.patches import Rectangle

        fig.add_artist(Rectangle((0.06, y - 0.030), 0.88, 0.024, transform=fig.transFigure, facecolor="#2e7d32", edgecolor="none"))
        fig.text(0.5, y - 0.018, verified_banner(study.verified_by), ha="center", va="center", fontsize=11,
                 fontweight="bold", color="white")
        y -= 0.036
    footer = (
        f"Values come from the segmentation as corrected by {study.verified_by}; the model's values are listed for "
        "comparison. " if study.verified_by else
        "Values come from an automated segmentation; check the overlay before relying on them. "
    )
    fig.text(
        0.06, 0.022,
        footer + "Volumes in cm³ (= ml); mass from HU-derived density.",
        fontsize=6.5, color="#555555",
    )
    return y - 0.012


def verified_banner(reader: str) -> str:
    """The banner of a report whose segmentation a reader corrected."""
    return f"VERIFIED (corrected by {reader})"


def _hline(fig: Any, y: float) -> Any:
    from matplotlib.lines import Line2D

    return Line2D([0.06, 0.94], [y, y], transform=fig.transFigure, color="#888888", lw=0.6)
