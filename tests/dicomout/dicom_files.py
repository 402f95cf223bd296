"""Small synthetic DICOM files for the output-stage tests (test support)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ImplicitVRLittleEndian, generate_uid

from tests.conftest import require_tool


def write_ct_series(
    directory: Path,
    n_slices: int = 3,
    *,
    size: int = 64,
    study_uid: str | None = None,
    transfer_syntax: UID = ImplicitVRLittleEndian,
) -> list[Path]:
    """Write ``n_slices`` axial 64x64 CT slices (int16, HU ramp + slice index) of one series."""
    directory.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    frame_uid = generate_uid()
    paths = []
    for k in range(n_slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = transfer_syntax
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientName = "Synthetic^Thigh"
        ds.PatientID = "SYN0001"
        ds.StudyDate = "20240102"
        ds.StudyTime = "101500"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.Modality = "CT"
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-100.0, -100.0, 3.0 * k]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [1.5, 1.5]
        ds.SliceThickness = 3.0
        ds.KVP = 120
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = size
        ds.Columns = size
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        pixels = (np.add.outer(np.arange(size), np.arange(size)) * 8 + 100 * k).astype(np.int16)
        ds.PixelData = pixels.tobytes()
        path = directory / f"ct_{k + 1:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def compress_jpegls(source: Path, target: Path) -> Path:
    """JPEG-LS lossless copy of ``source`` made by dcmtk's dcmcjpls."""
    tool = require_tool("dcmcjpls")
    completed = subprocess.run([tool, str(source), str(target)], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, f"dcmcjpls failed: {completed.stderr}"
    return target
