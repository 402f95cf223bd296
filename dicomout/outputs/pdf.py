"""The PDF output: the report (:mod:`dicomout.report`) as an Encapsulated PDF (PS3.3 A.45.1;
:mod:`dicomout.pdf`) in the source study."""

from __future__ import annotations

from collections.abc import Mapping

from pydicom.dataset import Dataset

from dicomout.context import StudyContext
from dicomout.pdf import build_encapsulated_pdf
from dicomout.report import ReportHeader, render_report
from dicomout.uids import PDF_SERIES, output_uid

DOCUMENT_TITLE = "Thigh and hip muscle CT measurements"


class PdfOutput:
    """The multi-page report, with the demonstration banner when the model is one."""

    name = "pdf"
    needs: tuple[str, ...] = ()

    def build(self, context: StudyContext, built: Mapping[str, Dataset]) -> Dataset:
        headers = context.selected.headers
        model = context.model
        header = ReportHeader.from_dataset(
            headers[0], node_version=context.software_version, model_name=model.name,
            model_version=model.version, demonstration_model=model.demonstration, model_sha256=model.sha256,
        )
        pdf_bytes = render_report(
            context.volume, context.segmentation, context.measurements, context.selected.patient, study=header,
            comparison=context.comparison, prior_search=context.prior_search,
        )
        series = context.selected.series_instance_uid
        return build_encapsulated_pdf(
            pdf_bytes,
            headers[0],
            series_uid=output_uid(series, model.version, "pdf.series"),
            sop_uid=output_uid(series, model.version, "pdf.instance"),
            document_title=DOCUMENT_TITLE,
            manufacturer=context.settings.manufacturer,
            software_version=context.software_version,
            content_datetime=context.content_time,
            series_number=PDF_SERIES.number,
            source_instances=[(ds.SOPClassUID, ds.SOPInstanceUID) for ds in headers],
            institution_name=context.settings.institution_name or None,
        )
