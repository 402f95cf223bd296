"""The PDF output: the report (:mod:`dicomout.report`) as an Encapsulated PDF (PS3.3 A.45.1;
:mod:`dicomout.pdf`) in the source study."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from pydicom.dataset import Dataset

from dicomout.context import StudyContext
from dicomout.pdf import build_encapsulated_pdf
from dicomout.report import ReportHeader, render_report
from dicomout.uids import PDF_SERIES, PDF_VERIFIED_SERIES

DOCUMENT_TITLE = "Thigh and hip muscle CT measurements"
VERIFIED_TITLE = "verified, corrected by the reader"


class PdfOutput:
    """The multi-page report, with the demonstration banner when the model is one."""

    name = "pdf"
    needs: tuple[str, ...] = ()

    def build(self, context: StudyContext, built: Mapping[str, Dataset]) -> Dataset:
        headers = context.selected.headers
        model = context.model
        header = ReportHeader.from_dataset(
            headers[0], node_version=context.software_version, model_name=model.name,
            model_version=model.version, demonstration_model=model.demonstration,
        )
        verification = context.verification
        if verification is not None:
            header = replace(header, verified_by=verification.observer_display)
        series_info = PDF_SERIES if verification is None else PDF_VERIFIED_SERIES
        pdf_bytes = render_report(
            context.volume, context.segmentation, context.measurements, context.selected.patient, study=header,
            comparison=context.comparison, prior_search=context.prior_search,
            corrections=verification.differences if verification is not None else (),
        )
        return build_encapsulated_pdf(
            pdf_bytes,
            headers[0],
            series_uid=context.output_uid("pdf.series"),
            sop_uid=context.output_uid("pdf.instance"),
            document_title=DOCUMENT_TITLE if verification is None else f"{DOCUMENT_TITLE} ({VERIFIED_TITLE})",
            manufacturer=context.settings.manufacturer,
            software_version=context.software_version,
            content_datetime=context.content_time,
            series_number=series_info.number,
            **({} if verification is None else {"series_description": f"{series_info.title} (thighnode)"}),
            source_instances=[(ds.SOPClassUID, ds.SOPInstanceUID) for ds in headers],
            institution_name=context.settings.institution_name or None,
        )
