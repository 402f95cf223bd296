"""Encapsulated PDF Storage (PS3.3 A.45.1): written, validated with dciodvfy, read back."""

from __future__ import annotations

import io
import subprocess
from datetime import datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from dicomout.pdf import ENCAPSULATED_PDF_STORAGE, REPORT_CONCEPT_NAME, EncapsulatedPdfError, build_encapsulated_pdf
from tests.conftest import require_tool
from tests.support.synthetic_ct import write_ct_series

SERIES_UID = "1.2.826.0.1.3680043.8.498.1001"
SOP_UID = "1.2.826.0.1.3680043.8.498.1001.1"
WHEN = datetime(2024, 3, 16, 9, 30, 5)


@pytest.fixture(scope="module")
def pdf_bytes() -> bytes:
    from matplotlib.backends.backend_pdf import PdfPages
    from matplotlib.figure import Figure

    buffer = io.BytesIO()
    with PdfPages(buffer, metadata={"CreationDate": None}) as pdf:
        fig = Figure(figsize=(8.27, 11.69))
        fig.text(0.1, 0.9, "thigh report")
        pdf.savefig(fig)
    return buffer.getvalue()


def _source(tmp_path: Path, **patient: str) -> pydicom.Dataset:
    path = write_ct_series(tmp_path / "ct", n_slices=2, patient=patient or None)[0]
    return pydicom.dcmread(path, stop_before_pixels=True)


def _build(pdf: bytes, source: pydicom.Dataset, **kwargs: object) -> pydicom.Dataset:
    args: dict[str, object] = {
        "series_uid": SERIES_UID,
        "sop_uid": SOP_UID,
        "document_title": "Thigh muscle CT measurements",
        "manufacturer": "thighnode",
        "software_version": "0.3.0",
        "content_datetime": WHEN,
    }
    args.update(kwargs)
    return build_encapsulated_pdf(pdf, source, **args)  # type: ignore[arg-type]


def _write(ds: pydicom.Dataset, path: Path) -> Path:
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def test_dciodvfy_accepts_it_and_it_reads_back(pdf_bytes: bytes, tmp_path: Path) -> None:
    source = _source(tmp_path, PatientName="Müller^Zoë")
    path = _write(_build(pdf_bytes, source), tmp_path / "report.dcm")

    tool = require_tool("dciodvfy")
    result = subprocess.run([tool, str(path)], capture_output=True, text=True)
    report = result.stdout + result.stderr
    assert "EncapsulatedPDF" in report
    problems = [line for line in report.splitlines() if line.startswith(("Error", "Warning"))]
    assert problems == [], report

    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.file_meta.MediaStorageSOPClassUID == ENCAPSULATED_PDF_STORAGE
    assert back.SOPClassUID == ENCAPSULATED_PDF_STORAGE
    assert back.SOPInstanceUID == SOP_UID
    assert back.SeriesInstanceUID == SERIES_UID
    assert back.Modality == "DOC"
    assert back.SeriesNumber == 903
    assert back.SeriesDescription == "Thigh muscle report (thighnode)"
    assert back.InstanceNumber == 1
    assert back.ConversionType == "WSD"
    assert back.BurnedInAnnotation == "YES"
    assert back.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert (back.ContentDate, back.ContentTime, back.AcquisitionDateTime) == ("20240316", "093005", "20240316093005")
    code = back.ConceptNameCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == REPORT_CONCEPT_NAME
    document = bytes(back.EncapsulatedDocument)[: back.EncapsulatedDocumentLength]
    assert document == pdf_bytes
    assert back.SourceInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    # same patient and study as the source
    for keyword in ("StudyInstanceUID", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate",
                    "PatientSex", "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName",
                    "StudyDescription"):
        assert back[keyword].value == source[keyword].value, keyword
    assert str(back.PatientName) == "Müller^Zoë"
    assert back.SpecificCharacterSet == "ISO_IR 192"


def test_ascii_only_dataset_has_no_utf8_charset(pdf_bytes: bytes, tmp_path: Path) -> None:
    ds = _build(pdf_bytes, _source(tmp_path))
    assert "SpecificCharacterSet" not in ds
    assert str(ds.PatientName) == "Synthetic^Thigh"


def test_odd_length_document_is_padded_and_length_recorded(pdf_bytes: bytes, tmp_path: Path) -> None:
    odd = pdf_bytes if len(pdf_bytes) % 2 else pdf_bytes + b"\n"
    path = _write(_build(odd, _source(tmp_path)), tmp_path / "odd.dcm")
    back = pydicom.dcmread(path)
    assert len(back.EncapsulatedDocument) == len(odd) + 1
    assert back.EncapsulatedDocument[-1:] == b"\x00"
    assert back.EncapsulatedDocumentLength == len(odd)
    assert bytes(back.EncapsulatedDocument)[: back.EncapsulatedDocumentLength] == odd


def test_source_instances_are_referenced(pdf_bytes: bytes, tmp_path: Path) -> None:
    refs = [("1.2.840.10008.5.1.4.1.1.2", f"1.2.3.{k}") for k in range(1, 4)]
    ds = _build(pdf_bytes, _source(tmp_path), source_instances=refs, series_number=42, instance_number=3)
    assert [(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in ds.SourceInstanceSequence] == refs
    assert (ds.SeriesNumber, ds.InstanceNumber) == (42, 3)


def test_refuses_what_is_not_a_pdf(tmp_path: Path) -> None:
    with pytest.raises(EncapsulatedPdfError, match=r"starting with b'%PDF-'; starts with b'<html>"):
        _build(b"<html></html>", _source(tmp_path))


def test_refuses_invalid_uid(pdf_bytes: bytes, tmp_path: Path) -> None:
    with pytest.raises(EncapsulatedPdfError, match=r"sop_uid '1\.02\.x' is not a valid UID"):
        _build(pdf_bytes, _source(tmp_path), sop_uid="1.02.x")


def test_refuses_source_without_study(pdf_bytes: bytes, tmp_path: Path) -> None:
    source = _source(tmp_path)
    del source.StudyInstanceUID
    with pytest.raises(EncapsulatedPdfError, match="no StudyInstanceUID"):
        _build(pdf_bytes, source)
