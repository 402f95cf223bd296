"""Encapsulated PDF Storage: the report PDF as a DICOM instance in the source study.

Builds an Encapsulated PDF IOD (SOP Class 1.2.840.10008.5.1.4.1.1.104.1, PS3.3 A.45.1)
with its modules (PS3.3 A.45.1-1):

* Patient (C.7.1.1) and General Study (C.7.2.1), plus the Patient Study attributes
  (C.7.2.2) that are present, copied from the source CT header, so the document files
  into the same patient and study (same StudyInstanceUID);
* Encapsulated Document Series (C.24.1): Modality "DOC", a new series;
* General Equipment (C.7.5.1) and SC Equipment (C.8.6.1, ConversionType "WSD":
  workstation);
* Encapsulated Document (C.24.2): InstanceNumber, ContentDate/Time,
  AcquisitionDateTime, BurnedInAnnotation "YES" (the PDF prints the patient's name and
  ID), DocumentTitle, ConceptNameCodeSequence, SourceInstanceSequence (the CT images
  the report was derived from), MIMETypeOfEncapsulatedDocument "application/pdf",
  EncapsulatedDocument (padded to an even length with one NUL, C.24.2.1) and
  EncapsulatedDocumentLength (the unpadded length);
* SOP Common (C.12.1), with SpecificCharacterSet "ISO_IR 192" (UTF-8) whenever a text
  value is not plain ASCII (PS3.5 6.1.2.3).

Document title code: LOINC 25045-6 "CT Report" from CID 7000 "Diagnostic Imaging
Report Document Title" (PS3.16), the CT-specific member of the CID that DICOM uses
for report document titles.

The dataset carries a file meta (Explicit VR Little Endian); write it with
``pydicom.dcmwrite(path, ds, enforce_file_format=True)``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from datetime import datetime

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

from dicomout.errors import OutputError
from scp.validate import validate_uid

LOGGER = logging.getLogger(__name__)

__all__ = [
    "ENCAPSULATED_PDF_STORAGE",
    "REPORT_CONCEPT_NAME",
    "EncapsulatedPdfError",
    "build_encapsulated_pdf",
]

ENCAPSULATED_PDF_STORAGE = UID("1.2.840.10008.5.1.4.1.1.104.1")
REPORT_CONCEPT_NAME: tuple[str, str, str] = ("25045-6", "LN", "CT Report")
"""(CodeValue, CodingSchemeDesignator, CodeMeaning) of the document title, CID 7000."""

_PATIENT_KEYWORDS: tuple[str, ...] = (
    # Patient module (C.7.1.1); type 2 ones are written empty when the source lacks them
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "OtherPatientIDsSequence",
    "PatientComments",
    "PatientSpeciesDescription",
    "PatientBreedDescription",
    "ResponsiblePerson",
    "ResponsibleOrganization",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    # Patient Study module (C.7.2.2), optional
    "PatientAge",
    "PatientSize",
    "PatientWeight",
)
_STUDY_KEYWORDS: tuple[str, ...] = (
    # General Study module (C.7.2.1)
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "PhysiciansOfRecord",
    "ProcedureCodeSequence",
)
_TYPE2_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
_TEXT_VRS = frozenset({"AE", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UT"})


class EncapsulatedPdfError(OutputError):
    """An argument of :func:`build_encapsulated_pdf` breaks a rule of PS3.3 A.45.1."""


def _check_uid(name: str, value: str) -> UID:
    return UID(validate_uid(str(value), name, EncapsulatedPdfError))


def _needs_utf8(ds: Dataset) -> bool:
    """Whether any text value in ``ds`` (nested sequences included) is not ASCII."""
    for element in ds.iterall():
        if element.VR not in _TEXT_VRS or element.value is None:
            continue
        values = element.value if element.VM > 1 else [element.value]
        for value in values:
            if any(ord(ch) > 127 for ch in str(value)):
                return True
    return False


def build_encapsulated_pdf(
    pdf_bytes: bytes,
    source: pydicom.Dataset,
    *,
    series_uid: str,
    sop_uid: str,
    document_title: str,
    manufacturer: str,
    software_version: str,
    content_datetime: datetime,
    series_number: int = 903,
    series_description: str = "Thigh muscle report (thighnode)",
    instance_number: int = 1,
    source_instances: Sequence[tuple[str, str]] = (),
    institution_name: str | None = None,
) -> Dataset:
    """Wrap ``pdf_bytes`` as an Encapsulated PDF instance of the source's study (PS3.3 A.45.1).

    Args:
        pdf_bytes: the PDF; must start with ``%PDF-``.
        source: a header of the source CT series (pixel data not needed): patient and
            study attributes are copied from it.
        series_uid, sop_uid: SeriesInstanceUID and SOPInstanceUID of the new instance
            (deterministic UIDs give the same instance on reprocessing).
        document_title: DocumentTitle (0042,0010).
        manufacturer, software_version: General Equipment Manufacturer / SoftwareVersions
            (also the SC Equipment secondary capture device's).
        content_datetime: ContentDate/Time, AcquisitionDateTime and InstanceCreation
            date/time (a naive or aware datetime; written as local digits).
        series_number, series_description, instance_number: of the new series/instance.
        source_instances: (SOPClassUID, SOPInstanceUID) of the images the report was derived
            from, for SourceInstanceSequence; empty references ``source`` itself.
        institution_name: InstitutionName of the equipment; ``None`` copies the source's.

    Returns:
        The dataset with a file meta for Explicit VR Little Endian.

    Raises:
        EncapsulatedPdfError: not a PDF, an invalid UID, a source without
            StudyInstanceUID, a non-positive series or instance number, an empty title.
    """
    _check_pdf(pdf_bytes)
    series_uid = _check_uid("series_uid", series_uid)
    sop_uid = _check_uid("sop_uid", sop_uid)
    study_uid = _check_study(source)
    _check_numbers_and_title(series_number, instance_number, document_title)
    pairs = _source_pairs(source, source_instances)

    src = copy.deepcopy(source)
    src.decode()  # text values as str, whatever the source's SpecificCharacterSet
    ds = _patient_and_study(src, study_uid)
    date = content_datetime.strftime("%Y%m%d")
    time_ = content_datetime.strftime("%H%M%S")

    _add_series(ds, series_uid, series_number, series_description, date, time_)
    _add_equipment(ds, src, manufacturer, software_version, institution_name)

    # Encapsulated Document (C.24.2)
    ds.InstanceNumber = instance_number
    ds.ContentDate = date
    ds.ContentTime = time_
    ds.AcquisitionDateTime = content_datetime.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = document_title
    _add_document(ds, bytes(pdf_bytes), pairs)

    # SOP Common (C.12.1)
    ds.SOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time_
    if _needs_utf8(ds):
        ds.SpecificCharacterSet = "ISO_IR 192"
    ds.file_meta = _file_meta(sop_uid)
    LOGGER.info(
        "encapsulated PDF built: study %s series %s instance %s, %d bytes of PDF, %d source instances",
        study_uid, series_uid, sop_uid, int(ds.EncapsulatedDocumentLength), len(pairs),
    )
    return ds


def _check_pdf(pdf_bytes: bytes) -> None:
    if not isinstance(pdf_bytes, (bytes, bytearray)) or not bytes(pdf_bytes[:5]) == b"%PDF-":
        head = bytes(pdf_bytes[:8]) if isinstance(pdf_bytes, (bytes, bytearray)) else type(pdf_bytes).__name__
        raise EncapsulatedPdfError(f"pdf_bytes must be a PDF starting with b'%PDF-'; starts with {head!r}")


def _check_numbers_and_title(series_number: int, instance_number: int, document_title: str) -> None:
    for name, number in (("series_number", series_number), ("instance_number", instance_number)):
        if not isinstance(number, int) or isinstance(number, bool) or not 1 <= number <= 2**31 - 1:
            raise EncapsulatedPdfError(f"{name} is {number!r}; allowed: an integer 1 .. 2147483647 (IS)")
    if not document_title.strip():
        raise EncapsulatedPdfError("document_title is empty; allowed: a non-empty title (DocumentTitle, ST)")


def _check_study(source: Dataset) -> UID:
    """The source's StudyInstanceUID, which the document joins."""
    if "StudyInstanceUID" not in source or not str(source.StudyInstanceUID).strip():
        raise EncapsulatedPdfError("source dataset has no StudyInstanceUID; the report must join the source study")
    return _check_uid("source StudyInstanceUID", source.StudyInstanceUID)


def _source_pairs(source: Dataset, source_instances: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """(SOPClassUID, SOPInstanceUID) for SourceInstanceSequence: those given, else the source itself."""
    pairs = [(str(c), str(i)) for c, i in source_instances]
    if not pairs:
        if "SOPClassUID" not in source or "SOPInstanceUID" not in source:
            raise EncapsulatedPdfError(
                "source_instances is empty and the source dataset has no SOPClassUID/SOPInstanceUID to reference"
            )
        pairs = [(str(source.SOPClassUID), str(source.SOPInstanceUID))]
    for class_uid, instance_uid in pairs:
        _check_uid("source instance SOPClassUID", class_uid)
        _check_uid("source instance SOPInstanceUID", instance_uid)
    return pairs


def _patient_and_study(src: Dataset, study_uid: UID) -> Dataset:
    """Patient (C.7.1.1), Patient Study (C.7.2.2) and General Study (C.7.2.1) copied from the source."""
    ds = Dataset()
    for keyword in _PATIENT_KEYWORDS + _STUDY_KEYWORDS:
        if keyword in src:
            ds[keyword] = copy.deepcopy(src[keyword])
    for keyword in _TYPE2_KEYWORDS:
        if keyword not in ds:
            setattr(ds, keyword, "")
    ds.StudyInstanceUID = study_uid
    return ds


def _add_series(ds: Dataset, series_uid: UID, number: int, description: str, date: str, time_: str) -> None:
    """Encapsulated Document Series (C.24.1): a new DOC series."""
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = number
    ds.SeriesDescription = description
    ds.SeriesDate = date
    ds.SeriesTime = time_


def _add_equipment(
    ds: Dataset, src: Dataset, manufacturer: str, software_version: str, institution_name: str | None
) -> None:
    """General Equipment (C.7.5.1) and SC Equipment (C.8.6.1); InstitutionName ``None`` copies the source's."""
    ds.Manufacturer = manufacturer
    institution = src.get("InstitutionName", "") if institution_name is None else institution_name
    if institution:
        ds.InstitutionName = institution
    ds.SoftwareVersions = software_version
    ds.ConversionType = "WSD"
    ds.SecondaryCaptureDeviceManufacturer = manufacturer
    ds.SecondaryCaptureDeviceSoftwareVersions = software_version


def _add_document(ds: Dataset, document: bytes, pairs: Sequence[tuple[str, str]]) -> None:
    """The rest of Encapsulated Document (C.24.2): title code, sources, the PDF padded to even length."""
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = REPORT_CONCEPT_NAME
    ds.ConceptNameCodeSequence = DicomSequence([code])
    references = []
    for class_uid, instance_uid in pairs:
        item = Dataset()
        item.ReferencedSOPClassUID = class_uid
        item.ReferencedSOPInstanceUID = instance_uid
        references.append(item)
    ds.SourceInstanceSequence = DicomSequence(references)
    ds.VerificationFlag = "UNVERIFIED"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(document)
    ds.EncapsulatedDocument = document + (b"\x00" if len(document) % 2 else b"")


def _file_meta(sop_uid: UID) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ENCAPSULATED_PDF_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta
