"""A test-only fourth output, loaded by import path from ``[outputs] enabled``: an Encapsulated
PDF "note" that says how many segments the SEG has (so it needs the SEG)."""

from __future__ import annotations

from collections.abc import Mapping

from pydicom.dataset import Dataset

from dicomout.context import StudyContext
from dicomout.pdf import build_encapsulated_pdf
from dicomout.uids import output_uid

MINIMAL_PDF = b"%PDF-1.4\n%%EOF\n"


class NoteOutput:
    name = "note"
    needs: tuple[str, ...] = ("seg",)

    def build(self, context: StudyContext, built: Mapping[str, Dataset]) -> Dataset:
        segments = len(built["seg"].SegmentSequence)
        series = context.selected.series_instance_uid
        return build_encapsulated_pdf(
            MINIMAL_PDF,
            context.selected.headers[0],
            series_uid=output_uid(series, context.model.version, "note.series"),
            sop_uid=output_uid(series, context.model.version, "note.instance"),
            document_title=f"Test note: {segments} segments",
            manufacturer=context.settings.manufacturer,
            software_version=context.software_version,
            content_datetime=context.content_time,
            series_number=990,
        )


NOT_A_BUILDER = object()
