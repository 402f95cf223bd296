"""Writers of a phantom: NIfTI pair, ground truth JSON and a DICOM CT Image Storage series."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from modelkit.phantom_types import Phantom, PhantomError, ground_truth
from pipeline.labels import LabelTable

logger = logging.getLogger(__name__)

NIFTI_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_UID_ROOT = "thighnode-phantom"


def phantom_uid(*parts: object) -> str:
    """Deterministic UID (2.25 form, PS3.5 B.2) from the given parts."""
    from pydicom.uid import generate_uid

    return str(generate_uid(prefix=None, entropy_srcs=[_UID_ROOT, *(str(p) for p in parts)]))


def write_nifti_pair(phantom: Phantom, out_dir: Path, name: str) -> tuple[Path, Path]:
    """Write ``<name>_ct.nii.gz`` (int16 HU) and ``<name>_label.nii.gz`` (uint8).

    The arrays are stored as they are, axis order ``(k, r, c)``; the NIfTI affine is
    ``NIFTI_LPS_TO_RAS @ affine_lps`` (RAS, mm; sform and qform code 1). A loader gets
    the LPS affine back with ``NIFTI_LPS_TO_RAS @ img.affine`` (the matrix is its own
    inverse) and keeps the array as it is.
    """
    import nibabel as nib

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    affine_ras = NIFTI_LPS_TO_RAS @ phantom.affine_lps
    hu = np.clip(np.rint(phantom.hu), -1024, 32767).astype(np.int16)
    paths = (out_dir / f"{name}_ct.nii.gz", out_dir / f"{name}_label.nii.gz")
    for arr, path in ((hu, paths[0]), (np.asarray(phantom.labels, dtype=np.uint8), paths[1])):
        img = nib.Nifti1Image(arr, affine_ras)
        img.header.set_xyzt_units("mm")
        img.set_sform(affine_ras, code=1)
        img.set_qform(affine_ras, code=1)
        nib.save(img, str(path))
    return paths


def write_ground_truth(phantom: Phantom, path: Path, labels: LabelTable | None = None) -> None:
    """Write ``ground_truth(phantom, labels)`` as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ground_truth(phantom, labels), indent=1), encoding="utf-8")


def _resample_inplane(phantom: Phantom, pixel_spacing_mm: float | None, matrix: int | None) -> tuple[np.ndarray, np.ndarray]:
    """HU and LPS affine resampled in-plane over the same field of view."""
    hu, affine = np.asarray(phantom.hu), np.asarray(phantom.affine_lps, dtype=float)
    if pixel_spacing_mm is None and matrix is None:
        return hu, affine
    _, dy, dx = phantom.spacing_mm
    fov_r, fov_c = hu.shape[1] * dy, hu.shape[2] * dx
    if matrix is not None:
        n_r = n_c = int(matrix)
        new_dy, new_dx = fov_r / n_r, fov_c / n_c
    else:
        assert pixel_spacing_mm is not None
        n_r, n_c = int(round(fov_r / pixel_spacing_mm)), int(round(fov_c / pixel_spacing_mm))
        new_dy, new_dx = fov_r / n_r, fov_c / n_c
    out = ndimage.zoom(hu, (1.0, n_r / hu.shape[1], n_c / hu.shape[2]), order=1, mode="nearest", grid_mode=True)
    new = affine.copy()
    new[:3, 1] = affine[:3, 1] / dy * new_dy
    new[:3, 2] = affine[:3, 2] / dx * new_dx
    # first voxel centre: the old first edge plus half a new pixel
    new[:3, 3] = affine[:3, 3] - 0.5 * affine[:3, 1] - 0.5 * affine[:3, 2] + 0.5 * new[:3, 1] + 0.5 * new[:3, 2]
    return out.astype(np.float32), new


def write_dicom_series(
    phantom: Phantom,
    out_dir: Path,
    *,
    patient_id: str | None = None,
    patient_name: str | None = None,
    patient_sex: str | None = None,
    birth_date: str = "19600101",
    height_m: float | None = None,
    weight_kg: float | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    study_date: str = "20240101",
    study_time: str = "090000",
    accession: str = "",
    study_id: str = "1",
    study_description: str = "CT thighs",
    series_number: int = 2,
    series_description: str = "Thigh CT soft tissue (phantom)",
    kernel: str = "STANDARD",
    kvp: float = 120.0,
    transfer_syntax: str | None = None,
    pixel_spacing_mm: float | None = None,
    matrix: int | None = None,
) -> list[Path]:
    """Write the phantom as a CT Image Storage series (PS3.3 A.3), one file per slice.

    Modules: Patient (C.7.1.1), General Study (C.7.2.1), Patient Study (C.7.2.2,
    PatientSize/PatientWeight), General Series (C.7.3.1), Frame of Reference (C.7.4.1),
    General Equipment (C.7.5.1), General Image (C.7.6.1), Image Plane (C.7.6.2), Image
    Pixel (C.7.6.3), CT Image (C.8.2.1), VOI LUT (C.11.2), SOP Common (C.12.1).
    Pixel values: unsigned 16 bit, HU = stored - 1024. Files are named
    ``<SOPInstanceUID>.dcm``; InstanceNumber 1 is the most superior slice. UIDs not
    given are derived from the seed. ``pixel_spacing_mm`` or ``matrix`` resample the
    slices in-plane (same field of view). ``transfer_syntax``: Explicit VR Little
    Endian (default), Implicit VR Little Endian or RLE Lossless.
    """
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

    params = phantom.params
    ts = transfer_syntax or ExplicitVRLittleEndian
    allowed = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless)
    if ts not in allowed:
        raise PhantomError(f"write_dicom_series: transfer_syntax {ts!r} is not supported; allowed: {allowed}")
    sex = patient_sex if patient_sex is not None else params.sex
    if sex not in ("F", "M", "O", ""):
        raise PhantomError(f"write_dicom_series: patient_sex {sex!r}; allowed: F, M, O or empty")
    height = float(height_m if height_m is not None else params.height_m)
    weight = float(weight_kg if weight_kg is not None else round(22.0 * params.size**2 * height**2 * (1 + params.fat_fraction - 0.25), 1))
    header = _SeriesHeader(
        patient_id=patient_id if patient_id is not None else f"PHANTOM{params.seed:06d}",
        patient_name=patient_name if patient_name is not None else f"Phantom^Subject{params.seed}",
        patient_sex=sex, birth_date=birth_date, height_m=height, weight_kg=weight,
        study_uid=study_uid or phantom_uid("study", params.seed, params.scan_seed),
        series_uid=series_uid or phantom_uid("series", params.seed, params.scan_seed, series_number),
        frame_of_reference_uid=frame_of_reference_uid or phantom_uid("for", params.seed, params.scan_seed),
        study_date=study_date, study_time=study_time, accession=accession, study_id=study_id,
        study_description=study_description, series_number=series_number, series_description=series_description,
        kernel=kernel, kvp=kvp, transfer_syntax=ts,
    )
    hu, affine = _resample_inplane(phantom, pixel_spacing_mm, matrix)
    stored = np.clip(np.rint(hu) + 1024.0, 0, 65535).astype(np.uint16)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [_write_slice(out_dir, header, stored, affine, k) for k in range(hu.shape[0])]
    logger.info("wrote DICOM series: %d instances, %dx%d", hu.shape[0], hu.shape[1], hu.shape[2])
    return paths


@dataclass(frozen=True)
class _SeriesHeader:
    """What every slice of a written series shares (patient, study, series, equipment)."""

    patient_id: str
    patient_name: str
    patient_sex: str
    birth_date: str
    height_m: float
    weight_kg: float
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    study_date: str
    study_time: str
    accession: str
    study_id: str
    study_description: str
    series_number: int
    series_description: str
    kernel: str
    kvp: float
    transfer_syntax: str


def _write_slice(out_dir: Path, header: _SeriesHeader, stored: np.ndarray, affine: np.ndarray, k: int) -> Path:
    """Slice ``k`` of ``stored`` (uint16, HU + 1024) as ``<SOPInstanceUID>.dcm``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, RLELossless

    ts = header.transfer_syntax
    n_k = stored.shape[0]
    dz = float(np.linalg.norm(affine[:3, 0]))
    dy = float(np.linalg.norm(affine[:3, 1]))
    dx = float(np.linalg.norm(affine[:3, 2]))
    row_dir = affine[:3, 2] / dx
    col_dir = affine[:3, 1] / dy
    sop_uid = phantom_uid("sop", header.series_uid, k)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if ts == RLELossless else ts
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    _put_series_header(ds, header, dz)
    ds.InstanceNumber = n_k - k  # 1: the most superior slice
    pos = affine @ np.array([k, 0.0, 0.0, 1.0])
    ds.ImagePositionPatient = [_ds_str(v) for v in pos[:3]]
    ds.ImageOrientationPatient = [_ds_str(v) for v in (*row_dir, *col_dir)]
    ds.SliceLocation = _ds_str(pos[2])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = int(stored.shape[1])
    ds.Columns = int(stored.shape[2])
    ds.PixelSpacing = [_ds_str(dy), _ds_str(dx)]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.WindowCenter = "50"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.PixelData = stored[k].tobytes()
    if ts == RLELossless:
        ds.compress(RLELossless, encoding_plugin="pydicom")
    path = out_dir / f"{sop_uid}.dcm"
    ds.save_as(path, enforce_file_format=True, implicit_vr=(ts == ImplicitVRLittleEndian), little_endian=True)
    return path


def _put_series_header(ds: Any, h: _SeriesHeader, dz: float) -> None:
    """Patient, General/Patient Study, General Series, Frame of Reference, General Equipment and the
    CT Image attributes every slice shares."""
    ds.StudyDate = h.study_date
    ds.SeriesDate = h.study_date
    ds.AcquisitionDate = h.study_date
    ds.ContentDate = h.study_date
    ds.StudyTime = h.study_time
    ds.SeriesTime = h.study_time
    ds.AcquisitionTime = h.study_time
    ds.ContentTime = h.study_time
    ds.AccessionNumber = h.accession
    ds.Modality = "CT"
    ds.Manufacturer = "thighnode phantom"
    ds.InstitutionName = "thighnode"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = h.study_description
    ds.SeriesDescription = h.series_description
    ds.ManufacturerModelName = "pipeline.phantom"  # the module's first home; kept: written series stay as they were
    ds.PatientName = h.patient_name
    ds.PatientID = h.patient_id
    ds.PatientBirthDate = h.birth_date
    ds.PatientSex = h.patient_sex
    ds.PatientSize = f"{h.height_m:.2f}"
    ds.PatientWeight = f"{h.weight_kg:.1f}"
    ds.BodyPartExamined = "LEG"
    ds.ImageLaterality = "B"  # both legs (satisfies the Laterality 2C condition)
    ds.SliceThickness = f"{dz:.3f}".rstrip("0").rstrip(".")
    ds.KVP = f"{h.kvp:g}"
    ds.SoftwareVersions = "thighnode-phantom-1"
    ds.ConvolutionKernel = h.kernel
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = h.study_uid
    ds.SeriesInstanceUID = h.series_uid
    ds.StudyID = h.study_id
    ds.SeriesNumber = int(h.series_number)
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = h.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""


def _ds_str(value: float) -> str:
    """A DS value (max 16 characters)."""
    v = float(value)
    if abs(v) < 1e-9:
        v = 0.0
    text = f"{v:.6f}".rstrip("0").rstrip(".")
    return text if len(text) <= 16 else f"{v:.8g}"
