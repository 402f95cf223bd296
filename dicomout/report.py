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
  volume, mass, volume/height², SMI; a group the field of view does not cover reads "not
  reported", with the muscles and why under the table), the sarcopenia screen with its
  threshold, the threshold's source and a "not calibrated for CT" caveat when so (when its
  group is not reported: "not assessed" and the SMI of the group measured instead, with no
  threshold unless the site configured one for that group), the quality flags in
  words, and two pictures: an axial slice at the level of the largest thigh muscle
  area and a coronal reformat, CT in a soft-tissue window (-160..240 HU) with the
  segmentation in the label colours (alpha 0.4) and R/L markers; with ``[model] uncertainty =
  "tta"`` a third picture: the axial slice with the most voxel entropy inside the structures, the
  entropy of the test-time augmentation samples' mean probabilities in red to yellow.
* **page 2 (structures)** -- one row per structure, right and left side by side
  (volume cm³, mean HU, mass g, fat %), the total of both sides, the uncertainty (mean
  normalised entropy right / left, "*" = low confidence; only with uncertainty on) and the flags;
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
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dicomout.errors import ReportError
from dicomout.report_correction import correction_chunks, draw_correction_page
from dicomout.report_comparison import comparison_table, draw_comparison_chart_page, draw_comparison_table_page
from dicomout.report_layout import DEMONSTRATION_BANNER, Cell, ReportHeader, draw_page_frame, structure_order
from dicomout.report_overlay import (
    WINDOW_HU,
    OverlayImage,
    axial_entropy_rgb,
    axial_overlay_rgb,
    coronal_overlay_rgb,
)
from dicomout.report_pages import draw_chart_page, draw_structure_page, draw_summary_page, structure_rows
from pipeline.correction import StructureDifference
from pipeline.labels import LabelTable
from pipeline.types import Comparison, Measurements, PatientInfo, PriorSearch, Segmentation, Volume

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

STRUCTURE_ROWS_PER_PAGE = 38
COMPARISON_ROWS_PER_PAGE = 30
"""Rows of the change table per page (the first page also holds the comparison's header)."""

_A4_INCHES = (8.27, 11.69)
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


@dataclass(frozen=True)
class _PagePlan:
    """Which rows go on which page, and the page numbers that follow."""

    structure_chunks: list[list[list[Cell]]]
    comparison_chunks: list[list[list[Cell]]]
    comparison_notes: list[str]
    chart_page: int
    pages: int

    @property
    def comparison_pages(self) -> str:
        return f"pages {self.chart_page + 1}–{self.pages}"


def _chunks(rows: list[list[Cell]], n: int) -> list[list[list[Cell]]]:
    return [rows[i:i + n] for i in range(0, len(rows), n)] or [[]]


def _plan_pages(
    measurements: Measurements, labels: LabelTable, keys: list[str], comparison: Comparison | None
) -> _PagePlan:
    chunks = _chunks(structure_rows(measurements, labels, keys), STRUCTURE_ROWS_PER_PAGE)
    cmp_chunks: list[list[list[Cell]]] = []
    cmp_notes: list[str] = []
    if comparison is not None:
        table = comparison_table(comparison, labels)
        cmp_notes = table.notes
        cmp_chunks = _chunks(table.rows, COMPARISON_ROWS_PER_PAGE)
    chart_page = 1 + len(chunks) + 1
    pages = chart_page + (len(cmp_chunks) + 1 if comparison is not None else 0)
    return _PagePlan(chunks, cmp_chunks, cmp_notes, chart_page, pages)


def _check_types(comparison: object, prior_search: object) -> None:
    if comparison is not None and not isinstance(comparison, Comparison):
        raise ReportError(
            f"comparison is a {type(comparison).__name__}; allowed: pipeline.types.Comparison or None"
        )
    if prior_search is not None and not isinstance(prior_search, PriorSearch):
        raise ReportError(
            f"prior_search is a {type(prior_search).__name__}; allowed: pipeline.types.PriorSearch or None"
        )


def _pdf_metadata(study: ReportHeader) -> dict[str, Any]:
    return {
        "Title": "Thigh muscle CT measurements",
        "Author": "thighnode",
        "Subject": "Thigh and hip muscle volumes, mass and SMI",
        "Creator": f"thighnode {study.node_version}".strip(),
        "CreationDate": None,
    }


def render_report(
    volume: Volume,
    segmentation: Segmentation,
    measurements: Measurements,
    patient: PatientInfo,
    *,
    study: ReportHeader,
    comparison: Comparison | None = None,
    prior_search: PriorSearch | None = None,
    corrections: Sequence[StructureDifference] = (),
) -> bytes:
    """Render the report (layout in the module docstring) and return the PDF bytes.

    ``comparison`` (the current study against the patient's prior study) adds the
    "Comparison with prior study" pages; without one, ``prior_search`` (where the node
    looked) is reported on the last page as "No prior study found".
    ``corrections`` (a reader's correction; ``study.verified_by`` names the reader) adds
    the pages of the model's values against the corrected ones at the end
    (:mod:`dicomout.report_correction`).

    Raises:
        ReportError: the segmentation is not on the volume's grid, the geometry cannot
            be oriented, or ``comparison`` / ``prior_search`` is not of its type.
    """
    from matplotlib import rc_context
    from matplotlib.backends.backend_pdf import PdfPages
    from matplotlib.figure import Figure

    started = time.perf_counter()
    _check_types(comparison, prior_search)
    labels = segmentation.labels
    axial = axial_overlay_rgb(volume, segmentation)
    coronal = coronal_overlay_rgb(volume, segmentation)
    keys = structure_order(measurements, labels)
    plan = _plan_pages(measurements, labels, keys, comparison)
    corrected = correction_chunks(corrections) if corrections else []
    frame = {
        "pages": plan.pages + len(corrected), "patient": patient, "measurements": measurements, "study": study,
        "model_name": study.model_name or segmentation.model_name, "model_sha256": study.model_sha256 or segmentation.model_sha256,
        "model_version": study.model_version or segmentation.model_version,
    }
    buffer = io.BytesIO()
    with _RC_LOCK, rc_context(_RC), PdfPages(buffer, metadata=_pdf_metadata(study)) as pdf:

        def page(number: int) -> tuple[Any, float]:
            fig = Figure(figsize=_A4_INCHES)
            return fig, draw_page_frame(fig, page=number, **frame)

        fig, top = page(1)
        draw_summary_page(fig, top, measurements, labels, axial, coronal, axial_entropy_rgb(volume, segmentation))
        pdf.savefig(fig, dpi=150)
        last = len(plan.structure_chunks) - 1
        for i, chunk in enumerate(plan.structure_chunks):
            fig, top = page(2 + i)
            draw_structure_page(fig, top, chunk, continued=i > 0, last=i == last, measurements=measurements)
            pdf.savefig(fig, dpi=150)
        fig, top = page(plan.pages)  # the chart page carries the last page's number (as it always has)
        draw_chart_page(fig, top, measurements, labels, comparison, prior_search, plan.comparison_pages)
        pdf.savefig(fig, dpi=150)
        if comparison is not None:
            last = len(plan.comparison_chunks) - 1
            for i, chunk in enumerate(plan.comparison_chunks):
                fig, top = page(plan.chart_page + 1 + i)
                draw_comparison_table_page(
                    fig, top, comparison, chunk, plan.comparison_notes, continued=i > 0, last=i == last
                )
                pdf.savefig(fig, dpi=150)
            fig, top = page(plan.pages)
            draw_comparison_chart_page(fig, top, comparison, labels)
            pdf.savefig(fig, dpi=150)
        for i, chunk in enumerate(corrected):
            fig, top = page(plan.pages + 1 + i)
            draw_correction_page(fig, top, chunk, reader=study.verified_by or "the reader", continued=i > 0)
            pdf.savefig(fig, dpi=150)
    data = buffer.getvalue()
    LOGGER.info(
        "report rendered: study %s, %d pages, %d structures, %d bytes in %.2f s",
        volume.study_instance_uid, plan.pages + len(corrected), len(keys), len(data), time.perf_counter() - started,
    )
    return data
