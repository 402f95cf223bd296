"""Deterministic synthetic CT series for tests (CT Image Storage, PS3.3 A.3).

:func:`write_ct_series` writes one complete single-frame CT Image Storage series
(Patient, General Study, Patient Study, General Series, Frame of Reference, General
Equipment, General Acquisition, General Image, Image Plane, Image Pixel, CT Image,
VOI LUT and SOP Common modules, PS3.3 A.3.3) whose geometry and voxel values are
known exactly, so that a test can check that a loader puts each value at the right
LPS position. :func:`write_localizer` writes a one-frame LOCALIZER image.

Geometry (PS3.3 C.7.6.2.1.1): slice ``k`` (0-based) lies at
``origin + k * slice_spacing * normal`` where ``normal = row_dir x col_dir``; with a
``gantry_tilt`` the image plane is rotated about the patient x axis (as GE writes
it: ``col_dir`` (0, 1, 0) becomes (0, cos t, -sin t)) while the slices still step
along the *untilted* normal (the table axis), so the series is sheared like a real
tilted acquisition. Voxel ``(k, r, c)`` is at
``position_k + r * pixel_spacing[0] * col_dir + c * pixel_spacing[1] * row_dir``.

Everything is deterministic: UIDs are derived with
``pydicom.uid.generate_uid(entropy_srcs=...)`` from the arguments (and ``seed``), so
two calls with the same arguments write identical files, and all series of one
PatientID share one StudyInstanceUID and FrameOfReferenceUID unless told otherwise.

This module is imported by other test suites (ingress, end to end, phantom); keep
the signature stable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    LegacyConvertedEnhancedCTImageStorage,
    RLELossless,
    UID,
    generate_uid,
)

__all__ = [
    "DEFAULT_PATIENT",
    "KEEP",
    "COMPRESSED_TRANSFER_SYNTAXES",
    "write_ct_series",
    "write_localizer",
    "write_enhanced_ct",
    "slice_positions",
    "default_hu",
]

DEFAULT_PATIENT: Mapping[str, str] = {
    "PatientName": "Synthetic^Thigh",
    "PatientID": "TN-SYN-0001",
    "IssuerOfPatientID": "THIGHNODE-TEST",
    "PatientBirthDate": "19600314",
    "PatientSex": "F",
    "PatientAge": "064Y",
    "PatientSize": "1.68",
    "PatientWeight": "72",
}
"""Patient/Patient Study attributes written unless ``patient=`` overrides them."""

COMPRESSED_TRANSFER_SYNTAXES: tuple[UID, ...] = (JPEGLSLossless, JPEG2000Lossless, RLELossless)
"""Transfer syntaxes the writer can encode (via pydicom's encoders)."""


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


KEEP = _Keep()
"""Returned by an ``extra`` callable: leave that attribute of slice k as written."""

_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

HuSource = np.ndarray | Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None


def _unit(v: Sequence[float]) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    n = float(np.linalg.norm(a))
    if n == 0.0:
        raise ValueError(f"direction {tuple(v)} has zero length")
    return a / n


def _tilted_directions(
    row_dir: Sequence[float], col_dir: Sequence[float], gantry_tilt: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, col, step direction) for a given gantry tilt in degrees."""
    row = _unit(row_dir)
    col = _unit(col_dir)
    step = np.cross(row, col)
    if gantry_tilt:
        t = np.deg2rad(gantry_tilt)
        rot = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(t), np.sin(t)], [0.0, -np.sin(t), np.cos(t)]])
        row, col = rot @ row, rot @ col
    return row, col, step


def slice_positions(
    n_slices: int,
    *,
    slice_spacing: float = 2.0,
    row_dir: Sequence[float] = (1, 0, 0),
    col_dir: Sequence[float] = (0, 1, 0),
    origin: Sequence[float] = (-25.6, -25.6, 0.0),
    gantry_tilt: float = 0.0,
) -> np.ndarray:
    """ImagePositionPatient (n, 3) of slices k = 0..n-1 as :func:`write_ct_series` writes them."""
    _, _, step = _tilted_directions(row_dir, col_dir, gantry_tilt)
    return np.asarray(origin, dtype=np.float64)[None, :] + np.arange(n_slices)[:, None] * slice_spacing * step


def default_hu(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Default phantom as a function of LPS (mm): air, a soft-tissue disc (radius 18 mm about
    the z axis) whose value rises 1 HU per mm of z, and a bone rod (radius 4 mm) at x = +8 mm."""
    r = np.hypot(x, y)
    hu = np.full(np.broadcast(x, y, z).shape, -1000.0)
    hu = np.where(r <= 18.0, 40.0 + np.round(z), hu)
    hu = np.where(np.hypot(x - 8.0, y) <= 4.0, 700.0, hu)
    return hu


def _ds_str(v: float) -> str:
    """A DS value (at most 16 characters) for v."""
    s = f"{v:.10g}"
    if len(s) > 16:
        s = f"{v:.8g}"
    return "0" if s in ("-0", "-0.0") else s


def _stored_values(
    hu: HuSource,
    *,
    positions: np.ndarray,
    row: np.ndarray,
    col: np.ndarray,
    pixel_spacing: tuple[float, float],
    shape: tuple[int, int, int],
    rescale_slope: float,
    rescale_intercept: float,
) -> np.ndarray:
    """Stored int16 values (slice order k) of ``hu`` (array, function of LPS or None)."""
    n_slices, rows, cols = shape
    if hu is None or callable(hu):
        f = hu if hu is not None else default_hu
        kk, rr, cc = np.meshgrid(np.arange(n_slices), np.arange(rows), np.arange(cols), indexing="ij")
        pts = (
            positions[kk]
            + (rr * pixel_spacing[0])[..., None] * col
            + (cc * pixel_spacing[1])[..., None] * row
        )
        hu_arr = np.asarray(f(pts[..., 0], pts[..., 1], pts[..., 2]), dtype=np.float64)
        hu_arr = np.broadcast_to(hu_arr, (n_slices, rows, cols))
    else:
        hu_arr = np.asarray(hu, dtype=np.float64)
        if hu_arr.shape != (n_slices, rows, cols):
            raise ValueError(f"hu has shape {hu_arr.shape}; expected {(n_slices, rows, cols)}")
    stored = np.round((hu_arr - rescale_intercept) / rescale_slope)
    if stored.min() < -32768 or stored.max() > 32767:
        raise ValueError(
            f"stored values {stored.min()}..{stored.max()} do not fit int16 "
            f"(slope {rescale_slope}, intercept {rescale_intercept})"
        )
    return stored.astype(np.int16)


def write_ct_series(
    out_dir: Path,
    *,
    n_slices: int = 20,
    rows: int = 64,
    cols: int = 64,
    pixel_spacing: tuple[float, float] = (0.8, 0.8),
    slice_spacing: float = 2.0,
    slice_thickness: float | None = None,
    row_dir: Sequence[float] = (1, 0, 0),
    col_dir: Sequence[float] = (0, 1, 0),
    origin: Sequence[float] = (-25.6, -25.6, 0.0),
    patient_position: str = "HFS",
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_uid: str | None = None,
    series_number: int = 1,
    modality: str = "CT",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    kernel: str = "STANDARD",
    description: str = "",
    sop_class_uid: str = CTImageStorage,
    hu: HuSource = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    reverse_file_order: bool = False,
    instance_number_descending: bool = False,
    rescale_slope: float = 1.0,
    rescale_intercept: float = -1024.0,
    patient: Mapping[str, str] | None = None,
    gantry_tilt: float = 0.0,
    extra: Mapping[str, Any] | None = None,
    seed: str | int = 0,
    file_prefix: str = "CT",
) -> list[Path]:
    """Write a CT Image Storage series into ``out_dir`` (created) and return its files.

    Args:
        out_dir: folder for the files ``<file_prefix><nnnn>.dcm``.
        n_slices, rows, cols: grid size; slice ``k`` is at ``origin + k*slice_spacing*normal``.
        pixel_spacing: PixelSpacing (row spacing, column spacing) in mm.
        slice_spacing: distance between slice centres in mm (along the table axis when tilted).
        slice_thickness: SliceThickness in mm; ``None`` writes ``slice_spacing``.
        row_dir, col_dir: ImageOrientationPatient (normalised; before any gantry tilt).
        origin: ImagePositionPatient of slice 0 (mm, LPS).
        patient_position: PatientPosition (HFS, FFS, HFP, FFP, HFDL ...); the geometry comes
            only from ``row_dir``/``col_dir``/``origin``, as in a real file.
        study_uid, series_uid, frame_uid: ``None`` derives them: StudyInstanceUID and
            FrameOfReferenceUID from PatientID only (so all series of one patient share them
            unless ``study_uid`` is given), SeriesInstanceUID from the study UID, series
            number, description, kernel and ``seed``.
        modality, image_type, kernel, description: Modality, ImageType, ConvolutionKernel,
            SeriesDescription.
        sop_class_uid: SOPClassUID; only the class UID changes (the modules stay CT Image's),
            for tests that must reject e.g. Enhanced CT.
        hu: HU values as an array of shape ``(n_slices, rows, cols)`` in slice order ``k``, or
            a function ``f(x, y, z)`` of LPS coordinates (mm, arrays of shape
            ``(n_slices, rows, cols)``) returning HU; ``None`` uses :func:`default_hu`.
            Values are rounded to stored integers: ``round((hu - intercept) / slope)``.
        transfer_syntax: Explicit/Implicit VR Little Endian, or JPEG-LS Lossless, JPEG 2000
            Lossless (rows and cols >= 32), RLE Lossless (encoded with ``Dataset.compress``,
            SOP UIDs kept).
        reverse_file_order: file 0 holds the last slice (so file order is descending along
            the normal).
        instance_number_descending: InstanceNumber runs n..1 along the normal.
        rescale_slope, rescale_intercept: RescaleSlope / RescaleIntercept.
        patient: Patient attributes merged over :data:`DEFAULT_PATIENT`.
        gantry_tilt: GantryDetectorTilt in degrees; also tilts the image plane (see module doc).
        extra: attributes set on every slice after everything else (keyword -> value;
            a callable value is called with the slice index ``k``; ``None`` deletes the
            attribute, :data:`KEEP` leaves it as written).
        seed: mixed into the derived SeriesInstanceUID and SOPInstanceUIDs, to get distinct
            series (or distinct instances of one ``series_uid``) from otherwise equal calls.
        file_prefix: file name prefix (to write two series into one folder).

    Returns:
        The written paths, sorted by file name (file ``i`` = ``<prefix><i:04d>.dcm``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pat = dict(DEFAULT_PATIENT)
    pat.update(patient or {})
    transfer_syntax = UID(transfer_syntax)
    if transfer_syntax not in _UNCOMPRESSED + COMPRESSED_TRANSFER_SYNTAXES:
        raise ValueError(
            f"transfer_syntax {transfer_syntax} ({transfer_syntax.name}) is not supported; "
            f"allowed: {[str(u) for u in _UNCOMPRESSED + COMPRESSED_TRANSFER_SYNTAXES]}"
        )

    if transfer_syntax == JPEG2000Lossless and min(rows, cols) < 32:
        # OpenJPEG encodes 6 resolution levels, which need tiles of at least 2**5 pixels.
        raise ValueError(f"JPEG 2000 needs rows and cols >= 32 (OpenJPEG's 6 resolutions); got {rows}x{cols}")
    if study_uid is None:
        study_uid = generate_uid(entropy_srcs=["study", pat["PatientID"]])
    if frame_uid is None:
        frame_uid = generate_uid(entropy_srcs=["frame", study_uid])
    if series_uid is None:
        series_uid = generate_uid(
            entropy_srcs=["series", study_uid, str(series_number), description, kernel, str(seed)]
        )

    row, col, _ = _tilted_directions(row_dir, col_dir, gantry_tilt)
    positions = slice_positions(
        n_slices,
        slice_spacing=slice_spacing,
        row_dir=row_dir,
        col_dir=col_dir,
        origin=origin,
        gantry_tilt=gantry_tilt,
    )

    stored = _stored_values(
        hu,
        positions=positions,
        row=row,
        col=col,
        pixel_spacing=pixel_spacing,
        shape=(n_slices, rows, cols),
        rescale_slope=rescale_slope,
        rescale_intercept=rescale_intercept,
    )

    thickness = slice_spacing if slice_thickness is None else slice_thickness
    normal = np.cross(row, col)
    paths: list[Path] = []
    for k in range(n_slices):
        file_index = n_slices - 1 - k if reverse_file_order else k
        instance_number = n_slices - k if instance_number_descending else k + 1
        sop_uid = generate_uid(entropy_srcs=["sop", series_uid, str(seed), str(k)])
        ds = _base_dataset(
            pat=pat,
            study_uid=study_uid,
            series_uid=series_uid,
            frame_uid=frame_uid,
            sop_class_uid=sop_class_uid,
            sop_uid=sop_uid,
            series_number=series_number,
            modality=modality,
            description=description,
            patient_position=patient_position,
        )
        ds.ImageType = list(image_type)
        ds.InstanceNumber = instance_number
        ds.AcquisitionNumber = 1
        ds.ContentDate = "20240315"
        ds.ContentTime = f"1016{k % 60:02d}"
        ds.AcquisitionDate = "20240315"
        ds.AcquisitionTime = "101600"
        ds.BurnedInAnnotation = "NO"
        ds.ImageLaterality = "B"  # both thighs; satisfies the Laterality condition (C.7.3.1)
        # Image Plane (PS3.3 C.7.6.2)
        ds.PixelSpacing = [_ds_str(pixel_spacing[0]), _ds_str(pixel_spacing[1])]
        ds.ImageOrientationPatient = [_ds_str(v) for v in (*row, *col)]
        ds.ImagePositionPatient = [_ds_str(v) for v in positions[k]]
        ds.SliceThickness = _ds_str(thickness)
        ds.SliceLocation = _ds_str(float(positions[k] @ normal))
        # Image Pixel (C.7.6.3) and CT Image (C.8.2.1)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = _ds_str(rescale_intercept)
        ds.RescaleSlope = _ds_str(rescale_slope)
        if "LOCALIZER" not in image_type:
            ds.RescaleType = "HU"  # C.8.2.1.1.8: not HU for ORIGINAL LOCALIZER images
        ds.KVP = "120"
        ds.DataCollectionDiameter = "500"
        ds.ReconstructionDiameter = _ds_str(max(rows * pixel_spacing[0], cols * pixel_spacing[1]))
        ds.DistanceSourceToDetector = "1040"
        ds.DistanceSourceToPatient = "570"
        ds.GantryDetectorTilt = _ds_str(gantry_tilt)
        ds.TableHeight = "150"
        ds.RotationDirection = "CW"
        ds.ExposureTime = "500"
        ds.XRayTubeCurrent = 200
        ds.Exposure = 100
        ds.FilterType = "BODY FILTER"
        ds.GeneratorPower = 24
        ds.FocalSpots = "1.2"
        ds.ConvolutionKernel = kernel
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.PixelData = stored[k].tobytes()
        for kw, value in (extra or {}).items():
            v = value(k) if callable(value) else value
            if v is KEEP:
                continue
            if v is None:
                if kw in ds:
                    delattr(ds, kw)
            else:
                setattr(ds, kw, v)
        _set_transfer_syntax(ds, transfer_syntax)
        path = out_dir / f"{file_prefix}{file_index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return sorted(paths)


def _base_dataset(
    *,
    pat: Mapping[str, str],
    study_uid: str,
    series_uid: str,
    frame_uid: str,
    sop_class_uid: str,
    sop_uid: str,
    series_number: int,
    modality: str,
    description: str,
    patient_position: str,
) -> Dataset:
    """Patient, study, series, frame of reference, equipment and SOP Common attributes."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = "20240315"
    ds.InstanceCreationTime = "101700"
    # Patient (C.7.1.1) / Patient Study (C.7.2.2)
    for kw, v in pat.items():
        setattr(ds, kw, v)
    # General Study (C.7.2.1)
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20240315"
    ds.StudyTime = "101500"
    ds.ReferringPhysicianName = "Referrer^Test"
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC0001"
    ds.StudyDescription = "CT THIGHS"
    # General Series (C.7.3.1)
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate = "20240315"
    ds.SeriesTime = "101600"
    ds.SeriesDescription = description
    ds.BodyPartExamined = "LEG"
    ds.PatientPosition = patient_position
    # Frame of Reference (C.7.4.1)
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    # General Equipment (C.7.5.1)
    ds.Manufacturer = "ThighNode Synthetic"
    ds.InstitutionName = "Test Hospital"
    ds.StationName = "CTSIM01"
    ds.ManufacturerModelName = "SynthCT 64"
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = "1.0"
    return ds


def _set_transfer_syntax(ds: Dataset, transfer_syntax: UID) -> None:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    if transfer_syntax in _UNCOMPRESSED:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        return
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.compress(transfer_syntax, generate_instance_uid=False)


def write_localizer(
    out_dir: Path,
    *,
    rows: int = 64,
    cols: int = 128,
    pixel_spacing: tuple[float, float] = (1.0, 1.0),
    origin: Sequence[float] = (-32.0, 0.0, 60.0),
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_uid: str | None = None,
    series_number: int = 100,
    description: str = "Topogram 0.6 T20f",
    patient: Mapping[str, str] | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    seed: str | int = 0,
    file_prefix: str = "LOC",
) -> Path:
    """Write a one-frame coronal localizer (ImageType ORIGINAL\\PRIMARY\\LOCALIZER, CT Image
    Storage, PS3.3 C.8.2.1.1.1) and return its path.

    Rows run head to feet (ImageOrientationPatient column direction (0, 0, -1)), columns
    right to left (row direction (1, 0, 0)).
    """
    paths = write_ct_series(
        out_dir,
        n_slices=1,
        rows=rows,
        cols=cols,
        pixel_spacing=pixel_spacing,
        slice_spacing=1.0,
        slice_thickness=1.0,
        row_dir=(1, 0, 0),
        col_dir=(0, 0, -1),
        origin=origin,
        study_uid=study_uid,
        series_uid=series_uid,
        frame_uid=frame_uid,
        series_number=series_number,
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        kernel="T20f",
        description=description,
        hu=lambda x, y, z: np.where(np.abs(x) < 20.0, 30.0, -1000.0),
        transfer_syntax=transfer_syntax,
        patient=patient,
        seed=seed,
        file_prefix=file_prefix,
    )
    return paths[0]


def _item(**attributes: Any) -> Dataset:
    """A sequence item with the given keyword attributes."""
    item = Dataset()
    for kw, v in attributes.items():
        setattr(item, kw, v)
    return item


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    return _item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


def write_enhanced_ct(
    out_dir: Path,
    *,
    n_frames: int = 20,
    rows: int = 64,
    cols: int = 64,
    pixel_spacing: tuple[float, float] = (0.8, 0.8),
    slice_spacing: float = 2.0,
    row_dir: Sequence[float] = (1, 0, 0),
    col_dir: Sequence[float] = (0, 1, 0),
    origin: Sequence[float] = (-25.6, -25.6, 0.0),
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_uid: str | None = None,
    hu: HuSource = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    reverse_frame_order: bool = False,
    sop_class_uid: str = EnhancedCTImageStorage,
    seed: str | int = 0,
    series_number: int = 1,
    kernel: str = "STANDARD",
    description: str = "",
    rescale_slope: float = 1.0,
    rescale_intercept: float = -1024.0,
    per_frame_groups: bool = False,
    file_name: str = "ECT0000.dcm",
) -> Path:
    """Write one multi-frame Enhanced CT Image (PS3.3 A.38.1) or Legacy Converted Enhanced CT
    Image (PS3.3 A.70) into ``out_dir`` (created) and return its path.

    The geometry and HU values are those :func:`write_ct_series` writes for the same
    arguments (``n_frames`` = ``n_slices``; no gantry tilt): slice ``k`` lies at
    ``origin + k * slice_spacing * (row_dir x col_dir)``, and ``hu`` is an array in slice
    order ``k`` or a function of LPS (``None``: :func:`default_hu`). With the same
    ``study_uid``/``frame_uid`` (derived from PatientID by default) both writers put a
    value at the same LPS point, so loaders can be compared one against the other.

    Multi-frame Functional Groups (C.7.6.16): per frame, Frame Content (StackID "1",
    InStackPositionNumber k + 1, DimensionIndexValues) and Plane Position (Patient);
    shared (or per frame when ``per_frame_groups``) Plane Orientation, Pixel Measures,
    Pixel Value Transformation (RescaleType HU), Frame VOI LUT and, for Enhanced CT, the CT
    macros (CT Image Frame Type ORIGINAL\\PRIMARY\\VOLUME\\NONE, CT Reconstruction with
    ``kernel`` as ConvolutionKernel, CT Acquisition Details with GantryDetectorTilt 0 ...).
    A Legacy Converted Enhanced CT (``sop_class_uid`` LegacyConvertedEnhancedCTImageStorage)
    carries ConvolutionKernel and GantryDetectorTilt in the Unassigned Shared Converted
    Attributes Sequence instead, and references made-up source CT Image instances.

    Args:
        reverse_frame_order: frame 1 holds the last slice (frames run down the normal).
        transfer_syntax: Explicit/Implicit VR Little Endian, JPEG-LS Lossless, JPEG 2000
            Lossless (rows, cols >= 32) or RLE Lossless; every frame is encoded.
        seed: mixed into the derived SeriesInstanceUID and SOPInstanceUID, so that several
            instances of one ``series_uid`` (a series split over multi-frame objects) differ.
        per_frame_groups: put Plane Orientation, Pixel Measures, Pixel Value Transformation
            and (Enhanced CT) CT Reconstruction in every PerFrameFunctionalGroupsSequence
            item rather than in the SharedFunctionalGroupsSequence.
        file_name: name of the file in ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    transfer_syntax = UID(transfer_syntax)
    sop_class_uid = UID(sop_class_uid)
    if sop_class_uid not in (EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage):
        raise ValueError(
            f"sop_class_uid {sop_class_uid} ({sop_class_uid.name}) is not supported; allowed: "
            f"{EnhancedCTImageStorage} (Enhanced CT), {LegacyConvertedEnhancedCTImageStorage} (Legacy Converted)"
        )
    if transfer_syntax not in _UNCOMPRESSED + COMPRESSED_TRANSFER_SYNTAXES:
        raise ValueError(
            f"transfer_syntax {transfer_syntax} ({transfer_syntax.name}) is not supported; "
            f"allowed: {[str(u) for u in _UNCOMPRESSED + COMPRESSED_TRANSFER_SYNTAXES]}"
        )
    if transfer_syntax == JPEG2000Lossless and min(rows, cols) < 32:
        raise ValueError(f"JPEG 2000 needs rows and cols >= 32 (OpenJPEG's 6 resolutions); got {rows}x{cols}")
    legacy = sop_class_uid == LegacyConvertedEnhancedCTImageStorage
    pat = dict(DEFAULT_PATIENT)
    if study_uid is None:
        study_uid = generate_uid(entropy_srcs=["study", pat["PatientID"]])
    if frame_uid is None:
        frame_uid = generate_uid(entropy_srcs=["frame", study_uid])
    if series_uid is None:
        series_uid = generate_uid(
            entropy_srcs=[
                "enhanced-series", study_uid, sop_class_uid, str(series_number), description, kernel, str(seed)
            ]
        )
    sop_uid = generate_uid(entropy_srcs=["enhanced-sop", series_uid, str(seed)])

    row, col, step = _tilted_directions(row_dir, col_dir, 0.0)
    positions = slice_positions(n_frames, slice_spacing=slice_spacing, row_dir=row_dir, col_dir=col_dir, origin=origin)
    stored = _stored_values(
        hu,
        positions=positions,
        row=row,
        col=col,
        pixel_spacing=pixel_spacing,
        shape=(n_frames, rows, cols),
        rescale_slope=rescale_slope,
        rescale_intercept=rescale_intercept,
    )
    slice_of_frame = [n_frames - 1 - f if reverse_frame_order else f for f in range(n_frames)]

    ds = _base_dataset(
        pat=pat,
        study_uid=study_uid,
        series_uid=series_uid,
        frame_uid=frame_uid,
        sop_class_uid=sop_class_uid,
        sop_uid=sop_uid,
        series_number=series_number,
        modality="CT",
        description=description,
        patient_position="HFS",
    )
    # Enhanced CT Image (C.8.15.2) / Legacy Converted Enhanced CT: image description.
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ContentQualification = "PRODUCT"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.AcquisitionNumber = 1
    ds.AcquisitionDateTime = "20240315101600"
    ds.AcquisitionDuration = 10.0
    # Multi-frame Functional Groups (C.7.6.16)
    ds.InstanceNumber = 1
    ds.ContentDate = "20240315"
    ds.ContentTime = "101600"
    ds.NumberOfFrames = n_frames
    # Image Pixel (C.7.6.3)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    # Acquisition Context (C.7.6.14)
    ds.AcquisitionContextSequence = []
    # Multi-frame Dimension (C.7.6.17): stack, position in stack.
    dim_uid = generate_uid(entropy_srcs=["dimension", sop_uid])
    ds.DimensionOrganizationSequence = [_item(DimensionOrganizationUID=dim_uid)]
    ds.DimensionOrganizationType = "3D"
    ds.DimensionIndexSequence = [
        _item(
            DimensionOrganizationUID=dim_uid,
            DimensionIndexPointer=0x00209056,  # StackID
            FunctionalGroupPointer=0x00209111,  # FrameContentSequence
            DimensionDescriptionLabel="Stack ID",
        ),
        _item(
            DimensionOrganizationUID=dim_uid,
            DimensionIndexPointer=0x00209057,  # InStackPositionNumber
            FunctionalGroupPointer=0x00209111,
            DimensionDescriptionLabel="In-Stack Position Number",
        ),
    ]

    ct_groups = _enhanced_ct_groups(kernel=kernel, rows=rows, cols=cols, pixel_spacing=pixel_spacing)
    movable: dict[str, Dataset] = {
        "PlaneOrientationSequence": _item(ImageOrientationPatient=[_ds_str(v) for v in (*row, *col)]),
        "PixelMeasuresSequence": _item(
            PixelSpacing=[_ds_str(pixel_spacing[0]), _ds_str(pixel_spacing[1])],
            SliceThickness=_ds_str(slice_spacing),
        ),
        "PixelValueTransformationSequence": _item(
            RescaleIntercept=_ds_str(rescale_intercept), RescaleSlope=_ds_str(rescale_slope), RescaleType="HU"
        ),
    }
    if not legacy:
        movable["CTReconstructionSequence"] = ct_groups.pop("CTReconstructionSequence")
    shared = Dataset()
    shared.FrameVOILUTSequence = [_item(WindowCenter="40", WindowWidth="400")]
    shared.FrameAnatomySequence = [
        _item(AnatomicRegionSequence=[_code("68367000", "SCT", "Thigh")], FrameLaterality="B")
    ]
    if legacy:
        shared.CTImageFrameTypeSequence = [ct_groups["CTImageFrameTypeSequence"]]
        shared.UnassignedSharedConvertedAttributesSequence = [
            _item(
                ConvolutionKernel=kernel,
                GantryDetectorTilt="0",
                KVP="120",
                ReconstructionDiameter=_ds_str(max(rows * pixel_spacing[0], cols * pixel_spacing[1])),
            )
        ]
    else:
        for kw, item in ct_groups.items():
            setattr(shared, kw, [item])
        shared.IrradiationEventIdentificationSequence = [
            _item(IrradiationEventUID=generate_uid(entropy_srcs=["irradiation", series_uid]))
        ]
    if not per_frame_groups:
        for kw, item in movable.items():
            setattr(shared, kw, [item])
    ds.SharedFunctionalGroupsSequence = [shared]

    per_frame: list[Dataset] = []
    for f in range(n_frames):
        k = slice_of_frame[f]
        item = Dataset()
        content = _item(
            StackID="1",
            InStackPositionNumber=k + 1,
            DimensionIndexValues=[1, k + 1],
        )
        if legacy:
            content.FrameAcquisitionNumber = 1
        else:
            content.FrameAcquisitionDateTime = "20240315101600"
            content.FrameReferenceDateTime = "20240315101600"
            content.FrameAcquisitionDuration = 500.0
        item.FrameContentSequence = [content]
        item.PlanePositionSequence = [_item(ImagePositionPatient=[_ds_str(v) for v in positions[k]])]
        if legacy:
            source_uid = generate_uid(entropy_srcs=["legacy-source", series_uid, str(seed), str(k)])
            item.ConversionSourceAttributesSequence = [
                _item(ReferencedSOPClassUID=CTImageStorage, ReferencedSOPInstanceUID=source_uid)
            ]
            item.UnassignedPerFrameConvertedAttributesSequence = [
                _item(SliceLocation=_ds_str(float(positions[k] @ step)))
            ]
        if per_frame_groups:
            for kw, group in movable.items():
                setattr(item, kw, [_copy_item(group)])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = stored[slice_of_frame].tobytes()
    _set_transfer_syntax(ds, transfer_syntax)
    path = out_dir / file_name
    ds.save_as(path, enforce_file_format=True)
    return path


def _copy_item(item: Dataset) -> Dataset:
    out = Dataset()
    for elem in item:
        out.add_new(elem.tag, elem.VR, elem.value)
    return out


def _enhanced_ct_groups(*, kernel: str, rows: int, cols: int, pixel_spacing: tuple[float, float]) -> dict[str, Dataset]:
    """The CT-specific functional group macros of Enhanced CT (PS3.3 C.8.15.3), one item each."""
    fov = max(rows * pixel_spacing[0], cols * pixel_spacing[1])
    return {
        "CTImageFrameTypeSequence": _item(
            FrameType=["ORIGINAL", "PRIMARY", "VOLUME", "NONE"],
            PixelPresentation="MONOCHROME",
            VolumetricProperties="VOLUME",
            VolumeBasedCalculationTechnique="NONE",
        ),
        "CTAcquisitionTypeSequence": _item(AcquisitionType="SPIRAL", ConstantVolumeFlag="NO", FluoroscopyFlag="NO"),
        "CTAcquisitionDetailsSequence": _item(
            DataCollectionDiameter="500",
            GantryDetectorTilt="0",
            TableHeight="150",
            RotationDirection="CW",
            RevolutionTime=0.5,
            SingleCollimationWidth=0.6,
            TotalCollimationWidth=38.4,
        ),
        "CTTableDynamicsSequence": _item(TableSpeed=50.0, TableFeedPerRotation=25.0, SpiralPitchFactor=0.65),
        "CTPositionSequence": _item(
            TablePosition=0.0,
            ReconstructionTargetCenterPatient=[0.0, 0.0, 0.0],
            DataCollectionCenterPatient=[0.0, 0.0, 0.0],
        ),
        "CTGeometrySequence": _item(DistanceSourceToDetector=1040.0, DistanceSourceToDataCollectionCenter=570.0),
        "CTReconstructionSequence": _item(
            ReconstructionAlgorithm="FILTER_BACK_PROJ",
            ConvolutionKernel=kernel,
            ConvolutionKernelGroup="SOFT_TISSUE",
            ReconstructionDiameter=_ds_str(fov),
            ReconstructionPixelSpacing=[float(pixel_spacing[0]), float(pixel_spacing[1])],
            ReconstructionAngle=360.0,
            ImageFilter="NONE",
        ),
        "CTExposureSequence": _item(
            ExposureTimeInms=500.0, XRayTubeCurrentInmA=200.0, ExposureInmAs=100.0, ExposureModulationType="NONE"
        ),
        "CTXRayDetailsSequence": _item(
            KVP="120", FocalSpots="1.2", FilterType="BODY FILTER", FilterMaterial="ALUMINUM"
        ),
    }
