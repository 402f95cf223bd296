"""The human-readable thigh muscle report: a multi-page A4 PDF drawn with matplotlib.

The PDF is what a radiologist opens from PACS (wrapped by :mod:`dicomout.pdf` as an
Encapsulated PDF, PS3.3 A.45.1), so it carries the patient and study identification
on every page (the document's ``BurnedInAnnotation`` is therefore ``YES``).

Layout (A4 portrait):

* **every page** -- title, page number, an identification block (patient name, ID,
  birth date, sex, height and where it came from, study date, accession, study
  description, institution, referring physician, model name/version, node version)
  and, when the model metadata says so, a red banner "DEMONSTRATION MODEL -- NOT
  FOR CLINICAL USE"; a footer with the caveat that the values come from an automated
  segmentation.
* **page 1 (summary)** -- group totals (gluteal / above knee / all; right, left, both:
  volume, mass, volume/height², SMI), the sarcopenia screen with its threshold, the
  threshold's source and a "not calibrated for CT" caveat when so, the quality flags in
  words, and two pictures: an axial slice at the level of the largest thigh muscle
  area and a coronal reformat, CT in a soft-tissue window (-160..240 HU) with the
  segmentation in the label colours (alpha 0.4) and R/L markers.
* **page 2 (structures)** -- one row per structure, right and left side by side
  (volume cm³, mean HU, mass g, fat %), the total of both sides, and the flags;
  flagged cells are tinted (partial field of view: orange, volume prefixed with "≥";
  metal: red; implausible volume: violet); then the methods (density formula, voxel
  size, height source). Long tables continue on further pages.
* **volume chart page** -- a bar chart of the volume of each muscle, right and left bars
  side by side (partial structures hatched), and the section "Comparison with prior
  study": the pages where the comparison is, or (no ``comparison``) "No prior study
  found" with where the node looked (``prior_search``), or that none was compared.
* **comparison pages** (only with a ``comparison``, pipeline.types.Comparison) -- prior
  study date and UID, interval (days), landmark, operated side, height and the method
  sentence; a table per structure with right and left side by side (the operated side
  and the contralateral one named in the column titles): prior and current volume over
  the common range (cm³), change (cm³), change in % of the prior volume and change per
  height² (cm³/m²); cells tinted and notes for "not compared" (numbered reasons under
  the table), "partial" (compared over z a..b mm only) and "metal" (HU values withheld).
  Long tables continue on further pages. Then a page with the group totals (sums over
  the structures compared on each side, per label group, all muscles, and bone) and two
  bar charts like the hip-fracture paper's Figures 7 and 8: change per muscle and side in
  cm³ and in % of the prior volume, not-compared sides omitted, flagged ones hatched.

Orientation: pictures are drawn in the radiological convention (patient right on the
image left, anterior up on the axial slice, superior up on the coronal reformat). The
volume is reordered from its affine (PS3.3 C.7.6.2.1.1: each array axis is assigned to
the LPS axis its direction is closest to, and flipped where it points the other way),
never from array order, so a column-flipped or feet-first series is drawn the same way.
The reorder does not resample: an oblique or tilted series is shown on its own grid.

Determinism: the PDF carries no creation date and fonts are embedded as TrueType
(``pdf.fonttype`` 42, so text can be extracted), hence identical inputs give identical
bytes.
"""

from __future__ import annotations

import io
import logging
import math
import textwrap
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom

from dicomout.errors import OutputError
from pipeline.labels import LabelTable
from pipeline.types import (
    FLAG_PARTIAL_COMMON_RANGE,
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
    Comparison,
    GroupMeasurement,
    Measurements,
    PatientInfo,
    PriorSearch,
    Segmentation,
    StructureChange,
    StructureMeasurement,
    Volume,
)

LOGGER = logging.getLogger(__name__)

__all__ = [
    "DEMONSTRATION_BANNER",
    "WINDOW_HU",
    "OverlayImage",
    "ReportError",
    "ReportHeader",
    "axial_overlay_rgb",
    "coronal_overlay_rgb",
    "render_report",
]

DEMONSTRATION_BANNER = "DEMONSTRATION MODEL — NOT FOR CLINICAL USE"
WINDOW_HU: tuple[float, float] = (-160.0, 240.0)
"""Soft-tissue display window (lower, upper) in HU."""
OVERLAY_ALPHA = 0.4
MAX_DISPLAY_PIXELS = 320
"""Pictures are decimated (integer stride) so that neither side exceeds this."""
STRUCTURE_ROWS_PER_PAGE = 38
COMPARISON_ROWS_PER_PAGE = 30
"""Rows of the change table per page (the first page also holds the comparison's header)."""

_A4_INCHES = (8.27, 11.69)
_THIGH_MUSCLE_GROUPS = ("anterior", "medial", "posterior")
_RC: dict[str, Any] = {
    "pdf.fonttype": 42,  # TrueType: text stays text (extractable, searchable)
    "pdf.compression": 6,
    "font.family": "DejaVu Sans",
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "hatch.linewidth": 0.6,
}
# matplotlib reads pdf.fonttype from the process-wide rcParams while saving; reports
# rendered on two worker threads at once must not interleave their rc_context enter/exit.
_RC_LOCK = threading.Lock()

_GROUP_TITLES = {
    GROUP_GLUTEAL: "Gluteal",
    GROUP_ABOVE_KNEE: "Above knee (thigh)",
    GROUP_ALL: "All (gluteal + thigh)",
}
_SIDE_ORDER = ("right", "left", SIDE_BOTH)
_FLAG_WORDS = {
    FLAG_PARTIAL_TOP: "partial (cut at top of scan)",
    FLAG_PARTIAL_BOTTOM: "partial (cut at bottom of scan)",
    FLAG_METAL: "metal nearby",
    FLAG_IMPLAUSIBLE_VOLUME: "implausible volume",
    FLAG_NO_HEIGHT: "no height",
    FLAG_EMPTY: "not found",
}
_FLAG_SHORT = {  # for the structure table's narrow flags column
    FLAG_PARTIAL_TOP: "partial (top)",
    FLAG_PARTIAL_BOTTOM: "partial (bottom)",
    FLAG_METAL: "metal",
    FLAG_IMPLAUSIBLE_VOLUME: "implausible",
    FLAG_NO_HEIGHT: "no height",
    FLAG_EMPTY: "not found",
}
_FLAG_TINT = {  # cell tint per flag, most severe first
    FLAG_METAL: "#f8c4c4",
    FLAG_IMPLAUSIBLE_VOLUME: "#e2cdf2",
    FLAG_PARTIAL_TOP: "#ffdfb0",
    FLAG_PARTIAL_BOTTOM: "#ffdfb0",
    FLAG_EMPTY: "#dddddd",
}
_RIGHT_COLOR = "#3b6fb6"
_LEFT_COLOR = "#e08a2c"
_SEX_WORDS = {"F": "female", "M": "male", "O": "other"}
_DASH = "—"
_MINUS = "−"
"""StructureChange flag (pipeline.compare.FLAG_PARTIAL_COMMON_RANGE): compared over the common range only."""
_LABEL_GROUP_TITLES = {  # label table groups (config/labels.toml)
    "gluteal": "Gluteal",
    "anterior": "Anterior thigh",
    "medial": "Medial thigh",
    "posterior": "Posterior thigh",
    "other": "Other",
    "bone": "Bone",
}


class ReportError(OutputError):
    """The report cannot be drawn from the given inputs (shapes, geometry, values)."""


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


@dataclass(frozen=True)
class OverlayImage:
    """A picture in display orientation, exactly as the report draws it.

    ``rgb`` is uint8 ``(rows, cols, 3)``: row 0 at the top of the picture, column 0 at
    its left, which is the patient's RIGHT (radiological convention); axial pictures
    have anterior at the top, coronal ones superior at the top. ``width_mm`` /
    ``height_mm`` give the physical extent (for the aspect ratio); ``plane`` is
    "axial" or "coronal", ``position_mm`` the plane's LPS coordinate (z for axial, y
    for coronal) and ``level`` its index along that axis in the reordered volume
    (0 = most inferior / most anterior).
    """

    rgb: np.ndarray
    width_mm: float
    height_mm: float
    plane: str
    position_mm: float
    level: int


# ---------------------------------------------------------------------------
# Orientation


@dataclass(frozen=True)
class _Canonical:
    """Views of the volume's arrays reordered to (z up, y back, x left) ascending."""

    hu: np.ndarray
    labels: np.ndarray
    spacing_mm: tuple[float, float, float]  # along (z, y, x)
    axis_of: tuple[int, int, int]  # source array axis for z, y, x
    flipped: tuple[bool, bool, bool]
    affine_lps: np.ndarray
    shape_kji: tuple[int, int, int]

    def coordinate_mm(self, lps_axis: int, index: int) -> float:
        """LPS coordinate (0=x, 1=y, 2=z) of the plane ``index`` along a canonical axis."""
        canon_axis = 2 - lps_axis
        src_axis = self.axis_of[canon_axis]
        n = self.shape_kji[src_axis]
        src_index = n - 1 - index if self.flipped[canon_axis] else index
        centre = [(s - 1) / 2.0 for s in self.shape_kji]
        centre[src_axis] = src_index
        point = self.affine_lps @ np.array([*centre, 1.0])
        return float(point[lps_axis])


def _canonical(volume: Volume, segmentation: Segmentation) -> _Canonical:
    """Reorder the arrays (views, no copy) so that axes are (z, y, x) and indices grow
    toward superior, posterior and the patient's left (LPS, PS3.3 C.7.6.2.1.1)."""
    if segmentation.label_map.shape != volume.hu.shape:
        raise ReportError(
            f"segmentation label_map shape {segmentation.label_map.shape} differs from the volume's "
            f"{volume.hu.shape}; the overlay needs the same grid"
        )
    directions = np.asarray(volume.affine_lps, dtype=np.float64)[:3, :3]
    lps_of_axis = [int(np.argmax(np.abs(directions[:, i]))) for i in range(3)]
    if sorted(lps_of_axis) != [0, 1, 2]:
        raise ReportError(
            "cannot orient the pictures: the array axes' directions "
            f"{[tuple(np.round(directions[:, i], 3)) for i in range(3)]} map to LPS axes {lps_of_axis}; "
            "allowed: each array axis closest to a different patient axis"
        )
    axis_of = tuple(lps_of_axis.index(lps) for lps in (2, 1, 0))
    flipped = tuple(bool(directions[lps, axis_of[2 - lps]] < 0) for lps in (2, 1, 0))
    hu = np.transpose(volume.hu, axis_of)
    labels = np.transpose(segmentation.label_map, axis_of)
    flip_slices = tuple(slice(None, None, -1) if f else slice(None) for f in flipped)
    spacing = volume.spacing_mm
    return _Canonical(
        hu=hu[flip_slices],
        labels=labels[flip_slices],
        spacing_mm=tuple(float(spacing[a]) for a in axis_of),  # type: ignore[arg-type]
        axis_of=axis_of,  # type: ignore[arg-type]
        flipped=flipped,  # type: ignore[arg-type]
        affine_lps=np.asarray(volume.affine_lps, dtype=np.float64),
        shape_kji=tuple(volume.hu.shape),  # type: ignore[arg-type]
    )


def _label_lut(labels: LabelTable, max_value: int) -> np.ndarray:
    """RGB (float, 0..255) per label value; values beyond the table are white."""
    lut = np.full((max(max_value, len(labels.labels)) + 1, 3), 255.0)
    lut[0] = 0.0
    for label in labels.labels:
        lut[label.id] = label.color
    return lut


def _muscle_counts(canon: _Canonical, labels: LabelTable) -> tuple[np.ndarray, np.ndarray, int]:
    """Thigh muscle voxel counts per z level and per y level (on an in-plane
    subsampled grid, for speed) and the subsampling stride."""
    stride = max(1, math.ceil(max(canon.labels.shape[1:]) / 128))
    sub = np.asarray(canon.labels[:, ::stride, ::stride])
    ids = [label.id for label in labels.labels if label.group in _THIGH_MUSCLE_GROUPS]
    if sub.size == 0:
        return np.zeros(canon.labels.shape[0]), np.zeros(sub.shape[1]), stride
    top = int(sub.max()) if sub.size else 0
    lut = np.zeros(max(top, len(labels.labels)) + 1, dtype=bool)
    lut[ids] = True
    mask = lut[np.clip(sub, 0, None)]
    if not mask.any():  # no thigh muscle: fall back to any label
        mask = sub > 0
    return mask.sum(axis=(1, 2)), mask.sum(axis=(0, 2)), stride


def _composite(hu: np.ndarray, lab: np.ndarray, labels: LabelTable) -> np.ndarray:
    """Soft-tissue windowed grey CT with the labels blended in at OVERLAY_ALPHA."""
    lo, hi = WINDOW_HU
    grey = np.clip((hu.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0) * 255.0
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    lab = np.clip(lab.astype(np.int64), 0, None)
    lut = _label_lut(labels, int(lab.max()) if lab.size else 0)
    on = lab > 0
    rgb[on] = (1.0 - OVERLAY_ALPHA) * rgb[on] + OVERLAY_ALPHA * lut[lab[on]]
    return np.round(rgb).astype(np.uint8)


def _stride_for(shape: Sequence[int], max_pixels: int) -> int:
    return max(1, math.ceil(max(shape) / max(1, max_pixels)))


def axial_overlay_rgb(
    volume: Volume,
    segmentation: Segmentation,
    *,
    level: int | None = None,
    max_pixels: int = MAX_DISPLAY_PIXELS,
) -> OverlayImage:
    """The axial picture of the report: rows anterior→posterior, columns patient
    right→left (radiological convention), derived from the affine.

    ``level`` is the index along the superior axis of the reordered volume (0 = most
    inferior); ``None`` picks the level with the largest thigh muscle area (any label
    when there is no thigh muscle, the middle level when nothing is labelled).
    """
    canon = _canonical(volume, segmentation)
    nz = canon.hu.shape[0]
    if level is None:
        per_z, _, _ = _muscle_counts(canon, segmentation.labels)
        level = int(np.argmax(per_z)) if per_z.any() else nz // 2
    if not 0 <= level < nz:
        raise ReportError(f"axial level {level} is outside the volume (0..{nz - 1} along superior)")
    stride = _stride_for(canon.hu.shape[1:], max_pixels)
    hu = np.asarray(canon.hu[level, ::stride, ::stride])  # (y ascending = anterior at top, x ascending)
    lab = np.asarray(canon.labels[level, ::stride, ::stride])
    _, sy, sx = canon.spacing_mm
    return OverlayImage(
        rgb=_composite(hu, lab, segmentation.labels),
        width_mm=canon.hu.shape[2] * sx,
        height_mm=canon.hu.shape[1] * sy,
        plane="axial",
        position_mm=canon.coordinate_mm(2, level),
        level=level,
    )


def coronal_overlay_rgb(
    volume: Volume,
    segmentation: Segmentation,
    *,
    level: int | None = None,
    max_pixels: int = MAX_DISPLAY_PIXELS,
) -> OverlayImage:
    """The coronal reformat of the report: rows superior→inferior, columns patient
    right→left, physical extent for the aspect ratio (slice spacing may differ from
    pixel spacing).

    ``level`` is the index along the posterior axis of the reordered volume (0 = most
    anterior); ``None`` picks the coronal plane with the largest thigh muscle area.
    """
    canon = _canonical(volume, segmentation)
    ny = canon.hu.shape[1]
    if level is None:
        _, per_y, sub_stride = _muscle_counts(canon, segmentation.labels)
        level = min(ny - 1, int(np.argmax(per_y)) * sub_stride) if per_y.any() else ny // 2
    if not 0 <= level < ny:
        raise ReportError(f"coronal level {level} is outside the volume (0..{ny - 1} along posterior)")
    stride = _stride_for((canon.hu.shape[0], canon.hu.shape[2]), max_pixels)
    hu = np.asarray(canon.hu[::-1, level, :][::stride, ::stride])  # superior at top
    lab = np.asarray(canon.labels[::-1, level, :][::stride, ::stride])
    sz, _, sx = canon.spacing_mm
    return OverlayImage(
        rgb=_composite(hu, lab, segmentation.labels),
        width_mm=canon.hu.shape[2] * sx,
        height_mm=canon.hu.shape[0] * sz,
        plane="coronal",
        position_mm=canon.coordinate_mm(1, level),
        level=level,
    )


# ---------------------------------------------------------------------------
# Formatting


def _format_date(da: str) -> str:
    da = (da or "").strip()
    if len(da) == 8 and da.isdigit():
        return f"{da[:4]}-{da[4:6]}-{da[6:]}"
    return da or _DASH


def _format_person(pn: str) -> str:
    """DICOM PN ``Family^Given^Middle^Prefix^Suffix`` as "Family, Given Middle"."""
    pn = (pn or "").split("=")[0]
    parts = [p.strip() for p in pn.split("^")]
    if not any(parts):
        return _DASH
    family = parts[0]
    given = " ".join(p for p in parts[1:3] if p)
    name = f"{family}, {given}" if family and given else family or given
    prefix = parts[3] if len(parts) > 3 else ""
    suffix = parts[4] if len(parts) > 4 else ""
    return " ".join(p for p in (prefix, name, suffix) if p)


def _num(value: float | None, digits: int) -> str:
    if value is None or not math.isfinite(value):
        return _DASH
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


def _structure_order(measurements: Measurements, labels: LabelTable) -> list[str]:
    """Structure keys present in the measurements, in label table order."""
    present = {s.key for s in measurements.structures}
    order = [k for k in labels.keys() if k in present]
    order += sorted(present - set(order))
    return order


def _tint(flags: Sequence[str]) -> str | None:
    for code, colour in _FLAG_TINT.items():
        if code in flags:
            return colour
    return None


def _flag_words(flags: Sequence[str]) -> str:
    return ", ".join(_FLAG_SHORT.get(code, code) for code in flags)


def _wrapped_text(fig: Any, x: float, y: float, text: str, *, width: int, line_step: float, **style: Any) -> float:
    """Draw ``text`` wrapped at ``width`` characters from ``y`` down; return the y below it."""
    for line in textwrap.wrap(text, width=width) or [""]:
        fig.text(x, y, line, va="top", **style)
        y -= line_step
    return y


# ---------------------------------------------------------------------------
# Drawing


@dataclass(frozen=True)
class _Cell:
    text: str
    tint: str | None = None
    bold: bool = False
    align: str = "right"
    swatch: tuple[int, int, int] | None = None


def _draw_table(
    ax: Any,
    header: Sequence[str],
    rows: Sequence[Sequence[_Cell]],
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


def _content_axes(fig: Any, bottom: float, top: float) -> Any:
    ax = fig.add_axes((0.06, bottom, 0.88, top - bottom))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")
    return ax


def _draw_page_frame(
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
    sex = _SEX_WORDS.get(patient.sex or measurements.sex, (patient.sex or measurements.sex) or _DASH)
    age = patient.age.lstrip("0") if patient.age else ""
    left = [
        ("Patient", _format_person(patient.patient_name)),
        ("Patient ID", patient.patient_id or _DASH),
        ("Birth date", _format_date(patient.birth_date)),
        ("Sex / age", f"{sex} / {age or _DASH}"),
        ("Height", _height_text(measurements, patient)),
        ("Weight", f"{patient.weight_kg:.0f} kg" if patient.weight_kg else _DASH),
    ]
    right = [
        ("Study date", _format_date(study.study_date)),
        ("Accession", study.accession_number or _DASH),
        ("Study", study.study_description or _DASH),
        ("Institution", study.institution_name or _DASH),
        ("Referrer", _format_person(study.referring_physician)),
        ("Model", f"{model_name or _DASH} {model_version}".strip() + f"  (thighnode {study.node_version or _DASH})"),
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
    fig.text(
        0.06, 0.022,
        "Values come from an automated segmentation; check the overlay before relying on them. "
        "Volumes in cm³ (= ml); mass from HU-derived density.",
        fontsize=6.5, color="#555555",
    )
    return y - 0.012


def _hline(fig: Any, y: float) -> Any:
    from matplotlib.lines import Line2D

    return Line2D([0.06, 0.94], [y, y], transform=fig.transFigure, color="#888888", lw=0.6)


def _group_rows(measurements: Measurements) -> list[list[_Cell]]:
    rows: list[list[_Cell]] = []
    for group in (GROUP_GLUTEAL, GROUP_ABOVE_KNEE, GROUP_ALL):
        for side in _SIDE_ORDER:
            g: GroupMeasurement | None = measurements.group(group, side)
            if g is None:
                continue
            tint = _FLAG_TINT[FLAG_PARTIAL_TOP] if g.includes_partial else None
            rows.append([
                _Cell(_GROUP_TITLES.get(group, group), align="left", bold=side == SIDE_BOTH),
                _Cell(side, align="left"),
                _Cell(("≥" if g.includes_partial else "") + _num(g.volume_ml, 1), tint=tint),
                _Cell(("≥" if g.includes_partial else "") + _num(g.mass_g, 0), tint=tint),
                _Cell(_num(g.volume_per_height2_cm3_m2, 0)),
                _Cell(_num(g.smi_kg_m2, 2), bold=side == SIDE_BOTH),
                _Cell("includes partial structure" if g.includes_partial else "", align="left", tint=tint),
            ])
    return rows


def _sarcopenia_lines(measurements: Measurements) -> list[tuple[str, dict[str, Any]]]:
    s = measurements.sarcopenia
    if s is None:
        reason = "no height" if measurements.height_m is None else "no threshold configured or group missing"
        return [(f"Sarcopenia screen: not assessed ({reason}).", {})]
    verdict = "BELOW threshold (suggests low muscle mass)" if s.below_threshold else "not below threshold"
    sex = _SEX_WORDS.get(measurements.sex, measurements.sex or "unknown sex")
    lines: list[tuple[str, dict[str, Any]]] = [
        (f"Sarcopenia screen — {_GROUP_TITLES.get(s.group, s.group)}, both sides, {sex}:", {"fontweight": "bold"}),
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
        prefix = f"[{_FLAG_WORDS.get(flag.code, flag.code)}] "
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


def _summary_page(
    fig: Any, top: float, measurements: Measurements, labels: LabelTable,
    axial: OverlayImage, coronal: OverlayImage,
) -> None:
    fig.text(0.06, top, "Muscle group totals", fontsize=10, fontweight="bold", va="top")
    rows = _group_rows(measurements)
    row_h_fig = 0.0155
    n_lines = len(rows) + 1
    table_top = top - 0.018
    ax = _content_axes(fig, table_top - row_h_fig * n_lines, table_top)
    if rows:
        _draw_table(
            ax,
            ["Group", "Side", "Volume (cm³)", "Mass (g)", "Vol/height² (cm³/m²)", "SMI (kg/m²)", "Note"],
            rows,
            [0.17, 0.07, 0.11, 0.09, 0.15, 0.10, 0.19],
            row_height=1.0 / n_lines,
        )
    else:
        ax.text(0, 0.9, "No group totals were computed.", fontsize=8, va="top")
    y = table_top - row_h_fig * n_lines - 0.012
    for text, style in _sarcopenia_lines(measurements):
        y = _wrapped_text(fig, 0.06, y, text, width=112, line_step=0.0135, fontsize=8, **style)
    y -= 0.006
    fig.text(0.06, y, "Quality flags", fontsize=10, fontweight="bold", va="top")
    y -= 0.02
    flag_lines = _flag_lines(measurements, labels)
    max_lines = 8
    for line in flag_lines[:max_lines]:
        y = _wrapped_text(fig, 0.07, y, line, width=140, line_step=0.0125, fontsize=7.5)
    if len(flag_lines) > max_lines:
        fig.text(0.07, y, f"… and {len(flag_lines) - max_lines} more (see the structure table).", fontsize=7.5, va="top")
        y -= 0.0135
    pic_top = y - 0.01
    pic_bottom = 0.045
    height = max(0.15, pic_top - pic_bottom - 0.02)
    for x0, image, title in (
        (0.06, axial, f"Axial, z = {axial.position_mm:.0f} mm (largest thigh muscle area)"),
        (0.52, coronal, f"Coronal reformat, y = {coronal.position_mm:.0f} mm"),
    ):
        pax = fig.add_axes((x0, pic_bottom, 0.42, height))
        pax.set_anchor("N")
        _draw_picture(pax, image, title)


def _structure_rows(measurements: Measurements, labels: LabelTable, keys: Sequence[str]) -> list[list[_Cell]]:
    colours = {label.key: label.color for label in labels.labels}
    rows = []
    for key in keys:
        right: StructureMeasurement | None = measurements.structure(key, "right")
        left: StructureMeasurement | None = measurements.structure(key, "left")
        both: StructureMeasurement | None = measurements.structure(key, SIDE_BOTH)
        any_m = right or left or both
        name = any_m.name if any_m is not None else key
        row = [_Cell(name, align="left", swatch=colours.get(key))]
        for m in (right, left):
            if m is None:
                row += [_Cell(_DASH)] * 4
                continue
            tint = _tint(m.flags)
            partial = "≥" if m.is_partial else ""
            row += [
                _Cell(partial + _num(m.volume_ml, 1), tint=tint),
                _Cell(_num(m.mean_hu, 0), tint=tint),
                _Cell(partial + _num(m.mass_g, 0), tint=tint),
                _Cell(_num(m.fat_fraction * 100.0 if m.fat_fraction is not None else None, 1), tint=tint),
            ]
        if both is not None:
            total = both.volume_ml
            total_partial = both.is_partial
        else:
            values = [m.volume_ml for m in (right, left) if m is not None]
            total = sum(values) if values else None
            total_partial = any(m is not None and m.is_partial for m in (right, left))
        row.append(_Cell(("≥" if total_partial else "") + _num(total, 1), bold=True))
        flag_parts = []
        if right is not None and left is not None and right.flags and right.flags == left.flags:
            flag_parts.append(f"R+L: {_flag_words(right.flags)}")
        else:
            for side_letter, m in (("R", right), ("L", left)):
                if m is not None and m.flags:
                    flag_parts.append(f"{side_letter}: {_flag_words(m.flags)}")
        if both is not None and both.flags:
            flag_parts.append(f"total: {_flag_words(both.flags)}")
        row.append(_Cell("; ".join(flag_parts), align="left", tint=_tint([f for m in (right, left, both) if m for f in m.flags])))
        rows.append(row)
    return rows


def _structure_page(fig: Any, top: float, rows: list[list[_Cell]], continued: bool, last: bool, measurements: Measurements) -> None:
    title = "Structures (right and left)" + (" — continued" if continued else "")
    fig.text(0.06, top, title, fontsize=10, fontweight="bold", va="top")
    row_h_fig = 0.0152
    n_lines = len(rows) + 2
    table_top = top - 0.018
    ax = _content_axes(fig, table_top - row_h_fig * n_lines, table_top)
    _draw_table(
        ax,
        ["Structure", "cm³", "HU", "g", "fat %", "cm³", "HU", "g", "fat %", "R+L cm³", "Flags"],
        rows,
        [0.165, 0.065, 0.045, 0.055, 0.05, 0.065, 0.045, 0.055, 0.05, 0.07, 0.255],
        row_height=1.0 / n_lines,
        font_size=6.8,
        top_spans=((1, 4, "Right"), (5, 8, "Left"), (9, 9, "Total")),
    )
    y = table_top - row_h_fig * n_lines - 0.012
    if not last:
        return
    legend = [
        ("#ffdfb0", "partial: cut by the field of view; values (≥) are lower bounds"),
        ("#f8c4c4", "metal nearby: HU, mass and fat % unreliable"),
        ("#e2cdf2", "implausible volume for the patient's size: check the segmentation"),
    ]
    from matplotlib.patches import Rectangle

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
    for line in methods:
        fig.text(0.07, y, line, fontsize=7.5, va="top")
        y -= 0.0135


def _chart_page(
    fig: Any,
    top: float,
    measurements: Measurements,
    labels: LabelTable,
    comparison: Comparison | None,
    prior_search: PriorSearch | None,
    comparison_pages: str,
) -> None:
    fig.text(0.06, top, "Muscle volumes by side", fontsize=10, fontweight="bold", va="top")
    muscle_keys = [k for k in _structure_order(measurements, labels) if k not in {l.key for l in labels.labels if l.is_bone}]
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
        bars_r = ax.barh(y - h / 2, right_v, height=h, color=_RIGHT_COLOR, label="Right")
        bars_l = ax.barh(y + h / 2, left_v, height=h, color=_LEFT_COLOR, label="Left")
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
            f"Compared with the prior study of {_format_date(comparison.prior_study_date)}"
            + (f" ({comparison.interval_days} days earlier)" if comparison.interval_days is not None else "")
            + f": see {comparison_pages}.",
        ]
    elif prior_search is not None:
        lines = _prior_search_lines(prior_search)
    else:
        lines = ["No prior study was compared in this report."]
    for i, line in enumerate(lines):
        style = {"fontweight": "bold"} if i == 0 else {}
        y_text = _wrapped_text(fig, 0.07, y_text, line, width=140, line_step=0.0135, fontsize=8, **style)

# ---------------------------------------------------------------------------
# Longitudinal comparison (Comparison, pipeline/compare.py)


@dataclass(frozen=True)
class _ComparisonTable:
    """The rows of the per-structure change table and the notes printed under it."""

    rows: list[list[_Cell]]
    notes: list[str]


def _signed(value: float | None, digits: int) -> str:
    """``+1.2`` / ``−3.4`` (typographic minus) or a dash."""
    if value is None or not math.isfinite(value):
        return _DASH
    return f"{value:+.{digits}f}".replace("-", _MINUS)


def _range_text(rng: tuple[float, float] | None) -> str:
    if rng is None:
        return "?"
    return f"{rng[0]:.0f}..{rng[1]:.0f}".replace("-", _MINUS)


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
        return _FLAG_TINT[FLAG_EMPTY]
    if FLAG_METAL in c.flags:
        return _FLAG_TINT[FLAG_METAL]
    if FLAG_PARTIAL_COMMON_RANGE in c.flags:
        return _FLAG_TINT[FLAG_PARTIAL_TOP]
    return None


def _comparison_table(comparison: Comparison, labels: LabelTable) -> _ComparisonTable:
    """One row per structure, right and left side by side; reasons for "not compared" become
    numbered notes, the partial ranges and the metal caveat notes under the table."""
    colours = {label.key: label.color for label in labels.labels}
    reasons: dict[str, int] = {}
    partial_ranges: dict[str, set[tuple[float, float] | None]] = {"right": set(), "left": set()}
    metal = False
    rows: list[list[_Cell]] = []
    for key in _change_order(comparison, labels):
        by_side = {side: comparison.change(key, side) for side in ("right", "left")}
        any_c = by_side["right"] or by_side["left"]
        row = [_Cell(any_c.name if any_c is not None else key, align="left", swatch=colours.get(key))]
        notes: dict[str, str] = {}
        for side in ("right", "left"):
            c = by_side[side]
            tint = _change_tint(c)
            if c is None or not c.compared:
                row += [_Cell(_DASH, tint=tint)] * 5
                if c is not None:
                    number = reasons.setdefault(c.reason or "no reason given", len(reasons) + 1)
                    notes[side] = f"not compared [{number}]"
                continue
            row += [
                _Cell(_num(c.prior_volume_ml, 1), tint=tint),
                _Cell(_num(c.current_volume_ml, 1), tint=tint),
                _Cell(_signed(c.change_ml, 1), tint=tint, bold=True),
                _Cell(_signed(None if c.change_ratio is None else 100.0 * c.change_ratio, 1), tint=tint),
                _Cell(_signed(c.change_per_height2_cm3_m2, 1), tint=tint),
            ]
            words = []
            if FLAG_PARTIAL_COMMON_RANGE in c.flags:
                words.append("partial")
                partial_ranges[side].add(c.common_range_mm)
            if FLAG_METAL in c.flags:
                words.append("metal")
                metal = True
            words += [_FLAG_SHORT.get(f, f) for f in c.flags if f not in (FLAG_PARTIAL_COMMON_RANGE, FLAG_METAL)]
            if words:
                notes[side] = ", ".join(words)
        if set(notes) == {"right", "left"} and notes["right"] == notes["left"]:
            text = f"R+L: {notes['right']}"
        else:
            text = "; ".join(f"{side[0].upper()}: {note}" for side, note in notes.items())
        row.append(_Cell(text, align="left"))
        rows.append(row)
    lines = [f"[{n}] not compared: {reason}" for reason, n in reasons.items()]
    for side in ("right", "left"):
        for rng in sorted(partial_ranges[side], key=lambda r: r or (0.0, 0.0)):
            lines.append(
                f"partial ({side}): compared over z {_range_text(rng)} mm only (from the landmark); the structure "
                "extends beyond the range both scans cover, and what lies outside is not compared."
            )
    if metal:
        lines.append(
            "metal: HU values withheld (mean HU, fat fraction and mass changes are not given); "
            "the volume change may be affected by the metal artefact."
        )
    return _ComparisonTable(rows=rows, notes=lines)


def _group_change_rows(comparison: Comparison, labels: LabelTable) -> list[list[_Cell]]:
    """Sums over the compared structures of each label group and side (and all muscles)."""
    bone_groups = {label.group for label in labels.labels if label.is_bone}
    label_groups = [g for g in dict.fromkeys(label.group for label in labels.labels) if g not in bone_groups]
    label_groups += sorted({c.group for c in comparison.changes} - set(label_groups) - bone_groups)
    h2 = comparison.height_m**2 if comparison.height_m else None
    selections = [(g, _LABEL_GROUP_TITLES.get(g, g.replace("_", " ").capitalize()), {g}) for g in label_groups]
    selections.append(("all", "All muscles", set(label_groups)))
    selections += [(g, _LABEL_GROUP_TITLES.get(g, g.capitalize()), {g}) for g in sorted(bone_groups)]
    rows: list[list[_Cell]] = []
    for _, title, members in selections:
        entries = [c for c in comparison.changes if c.group in members]
        if not entries:
            continue
        row = [_Cell(title, align="left", bold=title == "All muscles")]
        counts = []
        for side in ("right", "left"):
            on_side = [c for c in entries if c.side == side]
            used = [c for c in on_side if c.compared and c.prior_volume_ml is not None and c.current_volume_ml is not None]
            counts.append(f"{side[0].upper()} {len(used)}/{len(on_side)}")
            if not used:
                row += [_Cell(_DASH)] * 5
                continue
            prior = sum(c.prior_volume_ml for c in used)  # type: ignore[misc]
            current = sum(c.current_volume_ml for c in used)  # type: ignore[misc]
            change = current - prior
            flagged = any(c.flags for c in used)
            tint = _FLAG_TINT[FLAG_PARTIAL_TOP] if flagged else None
            row += [
                _Cell(_num(prior, 1), tint=tint),
                _Cell(_num(current, 1), tint=tint),
                _Cell(_signed(change, 1), tint=tint, bold=True),
                _Cell(_signed(100.0 * change / prior if prior > 0 else None, 1), tint=tint),
                _Cell(_signed(change / h2 if h2 else None, 1), tint=tint),
            ]
        row.append(_Cell(", ".join(counts) + " compared", align="left"))
        rows.append(row)
    return rows


_CHANGE_HEADER = ["prior", "current", "Δ cm³", "Δ %", "Δ/h²"]


def _change_table(ax: Any, first: str, rows: list[list[_Cell]], titles: dict[str, str], n_lines: int, notes: str) -> None:
    _draw_table(
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
    interval = _DASH if days is None else f"{days} days" + (f" ({days / 30.44:.1f} months)" if abs(days) >= 60 else "")
    operated = {
        "right": "right (metal in either scan); the contralateral left is shown beside it",
        "left": "left (metal in either scan); the contralateral right is shown beside it",
        SIDE_BOTH: "both sides (metal on both sides in either scan)",
    }.get(comparison.operated_side, "none (no metal found in either scan)")
    height = f"{comparison.height_m:.2f} m" if comparison.height_m else "unknown (no change per height²)"
    items = [
        ("Prior study", f"{_format_date(comparison.prior_study_date)}   (StudyInstanceUID {comparison.prior_study_uid})"),
        ("Current study", _format_date(comparison.current_study_date)),
        ("Interval", interval),
        ("Landmark", comparison.landmark or _DASH),
        ("Operated side", operated),
        ("Height", height),
    ]
    for key, value in items:
        fig.text(0.06, y, f"{key}:", fontsize=7.5, color="#444444", va="top")
        fig.text(0.17, y, value, fontsize=7.5, va="top", fontweight="bold" if key == "Interval" else "normal")
        y -= 0.0128
    fig.text(0.06, y, "Method:", fontsize=7.5, color="#444444", va="top")
    y = _wrapped_text(fig, 0.17, y, comparison.method or _DASH, width=112, line_step=0.0125, fontsize=7.5)
    y = _wrapped_text(
        fig, 0.06, y - 0.003,
        "Volumes (cm³) over the common range of the leg both scans cover, not over each whole scan; "
        "Δ = current − prior, Δ % of the prior volume, Δ/h² = Δ cm³ / height² (cm³/m²). Changes of mean HU, "
        "mass and fat fraction are in the structured report (SR).",
        width=150, line_step=0.0122, fontsize=7, color="#444444",
    )
    return y - 0.004


def _comparison_table_page(
    fig: Any, top: float, comparison: Comparison, rows: list[list[_Cell]], notes: list[str], *, continued: bool, last: bool
) -> None:
    from matplotlib.patches import Rectangle

    fig.text(0.06, top, "Comparison with prior study" + (" — continued" if continued else ""),
             fontsize=10, fontweight="bold", va="top")
    y = top - 0.022
    if not continued:
        y = _comparison_intro(fig, y, comparison)
    row_h_fig = 0.0152
    n_lines = len(rows) + 2
    ax = _content_axes(fig, y - row_h_fig * n_lines, y)
    if rows:
        _change_table(ax, "Structure", rows, _side_titles(comparison.operated_side), n_lines, "Notes")
    else:
        ax.text(0, 0.9, "The comparison holds no structure.", fontsize=8, va="top")
    y -= row_h_fig * n_lines + 0.012
    if not last:
        return
    for colour, text in (
        (_FLAG_TINT[FLAG_PARTIAL_TOP], "partial: compared over the common range only"),
        (_FLAG_TINT[FLAG_METAL], "metal nearby: HU values withheld"),
        (_FLAG_TINT[FLAG_EMPTY], "not compared"),
    ):
        fig.add_artist(Rectangle((0.06, y - 0.009), 0.018, 0.009, transform=fig.transFigure, facecolor=colour,
                                 edgecolor="#777777", lw=0.3))
        fig.text(0.084, y - 0.0045, text, fontsize=7, va="center")
        y -= 0.013
    y -= 0.006
    for line in notes:
        y = _wrapped_text(fig, 0.06, y, line, width=150, line_step=0.0122, fontsize=7)


def _change_bars(
    ax: Any, names: list[str], values: dict[str, list[float | None]], flagged: dict[str, list[bool]],
    titles: dict[str, str], xlabel: str, *, show_names: bool,
) -> None:
    """Horizontal change bars per muscle, right and left side by side (like the paper's
    Figures 7 and 8); a side that was not compared has no bar, a flagged one is hatched."""
    from matplotlib.ticker import MaxNLocator

    y = np.arange(len(names), dtype=float)
    h = 0.38
    for side, offset, colour in (("right", -h / 2, _RIGHT_COLOR), ("left", h / 2, _LEFT_COLOR)):
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


def _comparison_chart_page(fig: Any, top: float, comparison: Comparison, labels: LabelTable) -> None:
    from matplotlib.patches import Patch

    fig.text(0.06, top, "Comparison with prior study — group totals and change per muscle", fontsize=10,
             fontweight="bold", va="top")
    titles = _side_titles(comparison.operated_side)
    group_rows = _group_change_rows(comparison, labels)
    row_h_fig = 0.0152
    n_lines = len(group_rows) + 2
    table_top = top - 0.022
    ax = _content_axes(fig, table_top - row_h_fig * n_lines, table_top)
    if group_rows:
        _change_table(ax, "Group", group_rows, titles, n_lines, "Structures compared")
    y = table_top - row_h_fig * n_lines - 0.01
    y = _wrapped_text(
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


def render_report(
    volume: Volume,
    segmentation: Segmentation,
    measurements: Measurements,
    patient: PatientInfo,
    *,
    study: ReportHeader,
    comparison: Comparison | None = None,
    prior_search: PriorSearch | None = None,
) -> bytes:
    """Render the report (layout in the module docstring) and return the PDF bytes.

    ``comparison`` (the current study against the patient's prior study) adds the
    "Comparison with prior study" pages; without one, ``prior_search`` (where the node
    looked) is reported on the last page as "No prior study found".

    Raises:
        ReportError: the segmentation is not on the volume's grid, the geometry cannot
            be oriented, or ``comparison`` / ``prior_search`` is not of its type.
    """
    from matplotlib import rc_context
    from matplotlib.backends.backend_pdf import PdfPages
    from matplotlib.figure import Figure

    started = time.perf_counter()
    if comparison is not None and not isinstance(comparison, Comparison):
        raise ReportError(
            f"comparison is a {type(comparison).__name__}; allowed: pipeline.types.Comparison or None"
        )
    if prior_search is not None and not isinstance(prior_search, PriorSearch):
        raise ReportError(
            f"prior_search is a {type(prior_search).__name__}; allowed: pipeline.types.PriorSearch or None"
        )
    labels = segmentation.labels
    axial = axial_overlay_rgb(volume, segmentation)
    coronal = coronal_overlay_rgb(volume, segmentation)
    keys = _structure_order(measurements, labels)
    all_rows = _structure_rows(measurements, labels, keys)
    chunks = [all_rows[i:i + STRUCTURE_ROWS_PER_PAGE] for i in range(0, len(all_rows), STRUCTURE_ROWS_PER_PAGE)] or [[]]
    cmp_chunks: list[list[list[_Cell]]] = []
    cmp_notes: list[str] = []
    if comparison is not None:
        table = _comparison_table(comparison, labels)
        cmp_notes = table.notes
        n = COMPARISON_ROWS_PER_PAGE
        cmp_chunks = [table.rows[i:i + n] for i in range(0, len(table.rows), n)] or [[]]
    chart_page = 1 + len(chunks) + 1
    pages = chart_page + (len(cmp_chunks) + 1 if comparison is not None else 0)
    comparison_pages = f"pages {chart_page + 1}–{pages}"
    model_name = study.model_name or segmentation.model_name
    model_version = study.model_version or segmentation.model_version
    frame = {
        "pages": pages, "patient": patient, "measurements": measurements, "study": study,
        "model_name": model_name, "model_version": model_version,
    }
    buffer = io.BytesIO()
    metadata = {
        "Title": "Thigh muscle CT measurements",
        "Author": "thighnode",
        "Subject": "Thigh and hip muscle volumes, mass and SMI",
        "Creator": f"thighnode {study.node_version}".strip(),
        "CreationDate": None,
    }
    with _RC_LOCK, rc_context(_RC):
        with PdfPages(buffer, metadata=metadata) as pdf:
            fig = Figure(figsize=_A4_INCHES)
            top = _draw_page_frame(fig, page=1, **frame)
            _summary_page(fig, top, measurements, labels, axial, coronal)
            pdf.savefig(fig, dpi=150)
            for i, chunk in enumerate(chunks):
                fig = Figure(figsize=_A4_INCHES)
                top = _draw_page_frame(fig, page=2 + i, **frame)
                _structure_page(fig, top, chunk, continued=i > 0, last=i == len(chunks) - 1, measurements=measurements)
                pdf.savefig(fig, dpi=150)
            fig = Figure(figsize=_A4_INCHES)
            top = _draw_page_frame(fig, page=pages, **frame)
            _chart_page(fig, top, measurements, labels, comparison, prior_search, comparison_pages)
            pdf.savefig(fig, dpi=150)
            if comparison is not None:
                for i, chunk in enumerate(cmp_chunks):
                    fig = Figure(figsize=_A4_INCHES)
                    top = _draw_page_frame(fig, page=chart_page + 1 + i, **frame)
                    _comparison_table_page(
                        fig, top, comparison, chunk, cmp_notes, continued=i > 0, last=i == len(cmp_chunks) - 1
                    )
                    pdf.savefig(fig, dpi=150)
                fig = Figure(figsize=_A4_INCHES)
                top = _draw_page_frame(fig, page=pages, **frame)
                _comparison_chart_page(fig, top, comparison, labels)
                pdf.savefig(fig, dpi=150)
    data = buffer.getvalue()
    LOGGER.info(
        "report rendered: study %s, %d pages, %d structures, %d bytes in %.2f s",
        volume.study_instance_uid, pages, len(keys), len(data), time.perf_counter() - started,
    )
    return data
