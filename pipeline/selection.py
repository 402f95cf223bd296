"""Choose the one CT series of a study that the pipeline will segment.

Only headers are read (``pydicom.dcmread(..., stop_before_pixels=True)``). The rules,
in order:

Hard rules (a series failing one is rejected with the reason):

1. every instance belongs to the study (StudyInstanceUID);
2. Modality is ``CT`` (PS3.3 C.7.3.1.1.1);
3. SOPClassUID is CT Image Storage (PS3.4 B.5). Enhanced / Legacy Converted Enhanced
   CT (multi-frame, PS3.3 A.38 / A.70) is *declined* here with that reason;
   :func:`pipeline.volume.load_volume` reads single-frame CT Image Storage only;
4. ImageType (PS3.3 C.8.2.1.1.1) holds no ``LOCALIZER`` / ``SCOUT`` value;
5. axial: the slice normal (row x column direction of ImageOrientationPatient,
   PS3.3 C.7.6.2.1.1) lies within :data:`AXIAL_MAX_ANGLE_DEG` of the patient z axis.
   When GantryDetectorTilt is set, the limit widens to ``|tilt| + 5°`` so that a
   tilted-gantry axial series is *selected* here and declined by ``load_volume`` with
   a tilt reason (tilt is judged there, from the header and the slice positions);
6. at least ``min_slices`` instances;
7. slice thickness (SliceThickness, else the median distance between slice
   positions) at most ``max_slice_thickness_mm``.

Preferences among the survivors (the first that differs decides):

a. ImageType ``ORIGINAL\\PRIMARY`` over DERIVED / SECONDARY (a derived series is
   only chosen when no original one survives; the rule says so);
b. a soft-tissue kernel over a bone / lung / sharp one (:func:`classify_kernel`);
c. the thinnest slices;
d. the most coverage along the slice normal;
e. the most instances, then the lowest SeriesNumber, then SeriesInstanceUID
   (only so that the result is deterministic).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import UID

from pipeline.errors import SelectionError
from pipeline.types import PatientInfo, SelectedSeries

logger = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"

AXIAL_MAX_ANGLE_DEG = 20.0
"""Largest angle between the slice normal and the patient z axis for an axial series."""

TILT_ANGLE_MARGIN_DEG = 5.0
"""Extra angle allowed beyond |GantryDetectorTilt| so that tilted series reach load_volume."""

KERNEL_SOFT = "soft"
KERNEL_BONE = "bone"
KERNEL_LUNG = "lung"
KERNEL_SHARP = "sharp"

# Vendor kernel tables (ConvolutionKernel, 0018,1210). Sources: vendor CT reconstruction
# kernel guides (Siemens SOMATOM "B/Br/Bv/Bf/Bl/Hr/I/Ir/Q/Qr/D/J/T" + sharpness number;
# GE Discovery/Revolution kernel list; Philips Brilliance/IQon filters; Canon Aquilion FC
# numbers). A kernel not matched by any row is treated as soft tissue (the safe default for
# vendor "standard" names such as GE STANDARD/SOFT/STD+, Philips A/B/C/YA, Siemens B30f).
#
#   vendor           pattern (case-insensitive, first value of ConvolutionKernel)   class
#   Siemens          letters B/Br/Bv/Bf/Hr/Hf/I/Ir/Q/Qr/D/Dr/J/Jr/T/Tr + number >= 60 sharp (bone)
#   Siemens          Bl + number (dedicated lung kernels, e.g. Bl57, Bl64)          lung
#   GE               BONE, BONEPLUS, BONE+                                           bone
#   GE               LUNG, CHEST                                                     lung
#   GE               EDGE, DETAIL, ULTRA                                             sharp
#   Philips          D, E (+ optional A-C suffix, e.g. EB)                           sharp (bone)
#   Philips          L, LA, LB, LC                                                   lung
#   Philips          Y family YB..YF (YA is the standard body filter)                sharp
#   Canon / Toshiba  FC + number >= 30 (FC30 bone, FC5x lung, FC8x HR)                sharp
#   any vendor       kernel or SeriesDescription containing BONE/KNOCHEN, LUNG/LUNGE,
#                    SHARP, EDGE                                                     bone/lung/sharp
_SIEMENS_KERNEL = re.compile(r"^(B|BR|BV|BF|HR|HF|I|IR|Q|QR|D|DR|J|JR|T|TR)(\d{2})")
_SIEMENS_LUNG_KERNEL = re.compile(r"^BL\d{2}")
_GE_KERNELS: Mapping[str, str] = {
    "BONE": KERNEL_BONE,
    "BONEPLUS": KERNEL_BONE,
    "BONE+": KERNEL_BONE,
    "LUNG": KERNEL_LUNG,
    "CHEST": KERNEL_LUNG,
    "EDGE": KERNEL_SHARP,
    "DETAIL": KERNEL_SHARP,
    "ULTRA": KERNEL_SHARP,
}
_PHILIPS_SHARP_KERNEL = re.compile(r"^([DE][A-C]?|Y[B-F])$")
_PHILIPS_LUNG_KERNEL = re.compile(r"^L[A-C]?$")
_CANON_KERNEL = re.compile(r"^FC(\d{2})")
_KEYWORDS: tuple[tuple[str, str], ...] = (
    ("BONE", KERNEL_BONE),
    ("KNOCHEN", KERNEL_BONE),
    ("LUNG", KERNEL_LUNG),
    ("SHARP", KERNEL_SHARP),
    ("EDGE", KERNEL_SHARP),
)


def classify_kernel(kernel: str, description: str = "") -> str:
    """Classify a reconstruction kernel as ``soft``, ``bone``, ``lung`` or ``sharp``.

    ``kernel`` is ConvolutionKernel (its first value when multi-valued),
    ``description`` SeriesDescription; see the vendor table in this module.
    """
    k = kernel.strip().upper()
    if k:
        if _SIEMENS_LUNG_KERNEL.match(k):
            return KERNEL_LUNG
        m = _SIEMENS_KERNEL.match(k)
        if m and int(m.group(2)) >= 60:
            return KERNEL_SHARP
        if k in _GE_KERNELS:
            return _GE_KERNELS[k]
        if _PHILIPS_SHARP_KERNEL.match(k):
            return KERNEL_SHARP
        if _PHILIPS_LUNG_KERNEL.match(k):
            return KERNEL_LUNG
        m = _CANON_KERNEL.match(k)
        if m and int(m.group(1)) >= 30:
            return KERNEL_SHARP
    text = f"{k} {description.upper()}"
    for word, cls in _KEYWORDS:
        if word in text:
            return cls
    return KERNEL_SOFT


@dataclass(frozen=True)
class _Candidate:
    """A series that passed the hard rules, with what the preferences compare."""

    series_uid: str
    paths: tuple[Path, ...]
    description: str
    kernel: str
    kernel_class: str
    original_primary: bool
    image_type: str
    thickness_mm: float | None
    coverage_mm: float
    n_instances: int
    series_number: int

    def key(self) -> tuple[Any, ...]:
        return (
            not self.original_primary,
            self.kernel_class != KERNEL_SOFT,
            self.thickness_mm if self.thickness_mm is not None else math.inf,
            -round(self.coverage_mm, 3),
            -self.n_instances,
            self.series_number,
            self.series_uid,
        )


_PREFERENCES: tuple[str, ...] = (
    "ImageType ORIGINAL\\PRIMARY over DERIVED/SECONDARY",
    "soft-tissue kernel over bone/lung/sharp",
    "thinnest slices",
    "most coverage along the slice normal",
    "most instances",
    "lowest SeriesNumber",
    "lowest SeriesInstanceUID",
)


def _describe(c: _Candidate, rule_index: int) -> str:
    """The value a preference compares, in words."""
    if rule_index == 0:
        return f"ImageType {c.image_type}"
    if rule_index == 1:
        return f"kernel {c.kernel!r} ({c.kernel_class}, SeriesDescription {c.description!r})"
    if rule_index == 2:
        return "thickness unknown" if c.thickness_mm is None else f"{c.thickness_mm:g} mm slices"
    if rule_index == 3:
        return f"{c.coverage_mm:.1f} mm coverage"
    if rule_index == 4:
        return f"{c.n_instances} instances"
    if rule_index == 5:
        return f"SeriesNumber {c.series_number}"
    return f"SeriesInstanceUID {c.series_uid}"


def _first_difference(a: _Candidate, b: _Candidate) -> int:
    for i, (x, y) in enumerate(zip(a.key(), b.key())):
        if x != y:
            return i
    return len(_PREFERENCES) - 1


def _read_header(path: Path) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def _float(ds: Dataset, keyword: str) -> float | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _first_str(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        return str(value[0]) if len(value) else ""
    return str(value)


def _normal(ds: Dataset) -> np.ndarray | None:
    iop = ds.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return None
    try:
        v = np.asarray([float(x) for x in iop], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    n = np.cross(v[:3], v[3:])
    norm = float(np.linalg.norm(n))
    return None if norm < 1e-6 else n / norm


def _check_series(
    series_uid: str,
    paths: Sequence[Path],
    *,
    study_instance_uid: str,
    max_slice_thickness_mm: float,
    min_slices: int,
) -> tuple[_Candidate | None, str, str]:
    """(candidate or None, reason if rejected, SeriesDescription)."""
    if not paths:
        return None, "no instances", ""
    try:
        first = _read_header(paths[0])
    except (InvalidDicomError, OSError) as exc:
        return None, f"{paths[0].name} is not readable as DICOM ({exc})", ""
    description = str(first.get("SeriesDescription", "") or "")

    modality = str(first.get("Modality", "") or "")
    if modality != "CT":
        return None, f"Modality is {modality!r}; allowed: 'CT'", description
    sop_class = str(first.get("SOPClassUID", "") or "")
    if sop_class != CT_IMAGE_STORAGE:
        name = UID(sop_class).name if sop_class else "missing"
        extra = (
            " (multi-frame Enhanced CT is not supported; the scanner can send single-frame CT Image Storage)"
            if sop_class in (ENHANCED_CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE)
            else ""
        )
        return (
            None,
            f"SOPClassUID is {sop_class or '(missing)'} ({name}){extra}; "
            f"allowed: {CT_IMAGE_STORAGE} (CT Image Storage)",
            description,
        )

    # Headers of every instance: image type, positions, study membership.
    headers: list[Dataset] = [first]
    for p in paths[1:]:
        try:
            headers.append(_read_header(p))
        except (InvalidDicomError, OSError) as exc:
            return None, f"{p.name} is not readable as DICOM ({exc})", description

    foreign = [str(h.get("StudyInstanceUID", "")) for h in headers if h.get("StudyInstanceUID") != study_instance_uid]
    if foreign:
        return (
            None,
            f"{len(foreign)} instance(s) have StudyInstanceUID {foreign[0]!r}; expected {study_instance_uid!r}",
            description,
        )

    image_types = [tuple(str(v).upper() for v in (h.get("ImageType") or ())) for h in headers]
    localizers = [t for t in image_types if "LOCALIZER" in t or "SCOUT" in t]
    if localizers:
        shown = "\\".join(localizers[0])
        return (
            None,
            f"ImageType is {shown} in {len(localizers)} of {len(headers)} instance(s): "
            "localizer/scout images are not a volume; allowed: no LOCALIZER or SCOUT value",
            description,
        )
    original_primary = all(t[:2] == ("ORIGINAL", "PRIMARY") for t in image_types)

    normal = _normal(first)
    if normal is None:
        return None, "ImageOrientationPatient (0020,0037) is missing or invalid; required to judge axial", description
    angle = math.degrees(math.acos(min(1.0, abs(float(normal[2])))))
    tilt = _float(first, "GantryDetectorTilt") or 0.0
    limit = max(AXIAL_MAX_ANGLE_DEG, abs(tilt) + TILT_ANGLE_MARGIN_DEG) if tilt else AXIAL_MAX_ANGLE_DEG
    if angle > limit:
        return (
            None,
            f"not axial: slice normal is {angle:.1f} degrees from the patient z axis "
            f"(ImageOrientationPatient {list(first.ImageOrientationPatient)}); allowed: <= {limit:g} degrees",
            description,
        )

    if len(paths) < min_slices:
        return None, f"{len(paths)} instance(s); at least {min_slices} required", description

    offsets: list[float] = []
    for h in headers:
        ipp = h.get("ImagePositionPatient")
        if ipp is not None and len(ipp) == 3:
            try:
                offsets.append(float(np.dot(np.asarray([float(x) for x in ipp]), normal)))
            except (TypeError, ValueError):
                pass
    offsets.sort()
    coverage = offsets[-1] - offsets[0] if len(offsets) >= 2 else 0.0
    thickness = _float(first, "SliceThickness")
    if (thickness is None or thickness <= 0) and len(offsets) >= 2:
        gaps = np.diff(offsets)
        thickness = float(np.median(gaps)) if float(np.median(gaps)) > 0 else None
    if thickness is not None and thickness > max_slice_thickness_mm:
        return (
            None,
            f"slice thickness is {thickness:g} mm; allowed: <= {max_slice_thickness_mm:g} mm",
            description,
        )

    kernel = _first_str(first.get("ConvolutionKernel"))
    try:
        series_number = int(first.get("SeriesNumber") or 0)
    except (TypeError, ValueError):
        series_number = 0
    return (
        _Candidate(
            series_uid=series_uid,
            paths=tuple(paths),
            description=description,
            kernel=kernel,
            kernel_class=classify_kernel(kernel, description),
            original_primary=original_primary,
            image_type="\\".join(image_types[0]),
            thickness_mm=thickness,
            coverage_mm=coverage,
            n_instances=len(paths),
            series_number=series_number,
        ),
        "",
        description,
    )


def select_series(
    series: Mapping[str, Sequence[Path]],
    *,
    study_instance_uid: str,
    max_slice_thickness_mm: float = 5.0,
    min_slices: int = 20,
) -> SelectedSeries:
    """Choose the series to segment from ``series`` (SeriesInstanceUID -> instance files).

    Applies the rules of the module docstring; every other series is listed in
    ``SelectedSeries.rejected`` with its reason, and ``rule`` says why the winner won.

    Raises:
        SelectionError: no series passes the hard rules; the message lists every series
            (SeriesInstanceUID, SeriesDescription) with its reason.
    """
    started = time.monotonic()
    logger.info("select_series start: study %s, %d series", study_instance_uid, len(series))
    candidates: list[_Candidate] = []
    rejected: list[tuple[str, str, str]] = []  # (uid, description, reason)
    for uid in sorted(series):
        paths = [Path(p) for p in series[uid]]
        cand, reason, description = _check_series(
            uid,
            sorted(paths),
            study_instance_uid=study_instance_uid,
            max_slice_thickness_mm=max_slice_thickness_mm,
            min_slices=min_slices,
        )
        if cand is None:
            logger.info("series %s rejected: %s", uid, reason)
            rejected.append((uid, description, reason))
        else:
            candidates.append(cand)

    if not candidates:
        lines = [f"  {uid} ({desc!r}): {reason}" for uid, desc, reason in rejected]
        raise SelectionError(
            f"no series of study {study_instance_uid} is a usable axial CT series "
            f"(checked {len(series)} series):\n" + ("\n".join(lines) if lines else "  (the study holds no series)"),
            study_uid=study_instance_uid,
        )

    candidates.sort(key=_Candidate.key)
    winner = candidates[0]
    hard = (
        f"modality CT, CT Image Storage, no localizer, axial, >= {min_slices} slices, "
        f"thickness <= {max_slice_thickness_mm:g} mm"
    )
    if len(candidates) == 1:
        rule = f"only series passing the rules ({hard})"
    else:
        runner_up = candidates[1]
        i = _first_difference(winner, runner_up)
        rule = (
            f"preferred by '{_PREFERENCES[i]}': {_describe(winner, i)} vs {_describe(runner_up, i)} "
            f"(series {runner_up.series_uid}); {len(candidates)} series passed the rules ({hard})"
        )
    if not winner.original_primary:
        rule += (
            f"; DERIVED/SECONDARY series (ImageType {winner.image_type}) used because "
            "no ORIGINAL\\PRIMARY series qualified"
        )

    losers = [(uid, reason) for uid, _, reason in rejected]
    for c in candidates[1:]:
        i = _first_difference(winner, c)
        losers.append(
            (
                c.series_uid,
                f"lost to {winner.series_uid} on '{_PREFERENCES[i]}': {_describe(c, i)} vs {_describe(winner, i)}",
            )
        )

    logger.info(
        "select_series end: study %s, chose %s (%d instances) of %d series in %.2f s; rule: %s",
        study_instance_uid,
        winner.series_uid,
        winner.n_instances,
        len(series),
        time.monotonic() - started,
        rule,
    )
    return SelectedSeries(
        study_instance_uid=study_instance_uid,
        series_instance_uid=winner.series_uid,
        paths=winner.paths,
        rule=rule,
        description=winner.description,
        convolution_kernel=winner.kernel,
        slice_thickness_mm=winner.thickness_mm,
        rejected=tuple(losers),
    )


def _positive(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if v > 0 and math.isfinite(v) else None


def read_patient_info(path: Path) -> PatientInfo:
    """Patient attributes of one instance (Patient and Patient Study modules, PS3.3 C.7.1.1, C.7.2.2).

    PatientSize (m) becomes ``height_m`` and PatientWeight (kg) ``weight_kg``; an empty,
    zero or unparsable value gives ``None``, and so does a PatientSize outside
    0.3..3.0 m (e.g. centimetres written by mistake), rather than a wrong BMI.
    """
    ds = _read_header(Path(path))
    height = _positive(ds.get("PatientSize"))
    if height is not None and not 0.3 <= height <= 3.0:
        logger.warning("PatientSize %.3g is not a height in metres (0.3..3.0); ignored", height)
        height = None
    sex = str(ds.get("PatientSex", "") or "").upper()
    return PatientInfo(
        patient_id=str(ds.get("PatientID", "") or ""),
        issuer_of_patient_id=str(ds.get("IssuerOfPatientID", "") or ""),
        patient_name=str(ds.get("PatientName", "") or ""),
        birth_date=str(ds.get("PatientBirthDate", "") or ""),
        sex=sex if sex in ("F", "M", "O") else "",
        age=str(ds.get("PatientAge", "") or ""),
        height_m=height,
        weight_kg=_positive(ds.get("PatientWeight")),
    )
