"""Small synthetic DICOM files for the ingress tests (written with pydicom)."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset as _write_dataset_body
from pydicom.uid import (
    UID,
    ComprehensiveSRStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)


def _base(sop_class: UID, study_uid: str, series_uid: str, modality: str, sop_uid: str | None) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.PatientName = "Test^Synthetic"
    ds.PatientID = "SYNTH-1"
    ds.StudyDate = "20240101"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    return ds


def _save(ds: Dataset, path: Path, transfer_syntax: UID = ExplicitVRLittleEndian) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _pixels(ds: Dataset, rows: int, cols: int) -> None:
    ds.Rows = rows
    ds.Columns = cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelData = (np.arange(rows * cols, dtype=np.int16).reshape(rows, cols) - 1000).tobytes()


def write_ct(
    path: Path,
    study_uid: str,
    series_uid: str,
    sop_uid: str | None = None,
    rows: int = 16,
    cols: int = 16,
    transfer_syntax: UID = ExplicitVRLittleEndian,
) -> Path:
    ds = _base(CTImageStorage, study_uid, series_uid, "CT", sop_uid)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    _pixels(ds, rows, cols)
    return _save(ds, path, transfer_syntax)


def write_secondary_capture(path: Path, study_uid: str, series_uid: str, modality: str = "OT") -> Path:
    ds = _base(SecondaryCaptureImageStorage, study_uid, series_uid, modality, None)
    ds.ConversionType = "WSD"
    _pixels(ds, 8, 8)
    return _save(ds, path)


def write_sr(path: Path, study_uid: str, series_uid: str) -> Path:
    ds = _base(ComprehensiveSRStorage, study_uid, series_uid, "SR", None)
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    return _save(ds, path)


def write_dataset(path: Path, ds: Dataset, transfer_syntax: UID = ExplicitVRLittleEndian) -> Path:
    """Save an arbitrary dataset (e.g. one missing attributes on purpose)."""
    return _save(ds, path, transfer_syntax)


def base_dataset(sop_class: UID, study_uid: str, series_uid: str, modality: str) -> Dataset:
    return _base(sop_class, study_uid, series_uid, modality, None)


def dataset_part(path: Path) -> bytes:
    """The bytes after the preamble, prefix and File Meta Information group (PS3.10 7.1)."""
    data = Path(path).read_bytes()
    assert data[128:132] == b"DICM", f"{path} has no DICM prefix"
    offset = 132
    while True:
        group = int.from_bytes(data[offset : offset + 2], "little")
        if group != 0x0002:
            return data[offset:]
        vr = data[offset + 4 : offset + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV"):
            length = int.from_bytes(data[offset + 8 : offset + 12], "little")
            offset += 12 + length
        else:
            length = int.from_bytes(data[offset + 6 : offset + 8], "little")
            offset += 8 + length


def transfer_syntax_of(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def encode_dataset(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """The dataset alone (no file meta) encoded in ``transfer_syntax``, as a C-STORE carries it."""
    fp = DicomBytesIO()
    fp.is_implicit_VR = transfer_syntax == ImplicitVRLittleEndian
    fp.is_little_endian = transfer_syntax != ExplicitVRBigEndian
    _write_dataset_body(fp, ds)
    data = fp.getvalue()
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = compressor.compress(data) + compressor.flush()
    return data


def c_get_part10(ds: Dataset, source_ae: str = "PACS") -> bytes:
    """A CT dataset as a C-GET sink receives it: the node's Part 10 head (scp.spool.file_head) then the
    dataset in Explicit VR Little Endian."""
    from scp.spool import file_head

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return file_head(meta, source_ae) + encode_dataset(ds)
