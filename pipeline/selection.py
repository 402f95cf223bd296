"""Choose the one CT series of a study that the pipeline will segment.

Only headers are read (``pydicom.dcmread(..., stop_before_pixels=True)``), each once: the
chosen series' headers are handed on in ``SelectedSeries.headers`` (same order as its
paths) for :func:`pipeline.volume.load_volume` to take instead of reading them again.
A *slice* is a single-frame instance or one frame of a multi-frame Enhanced CT (PS3.3
A.38) / Legacy Converted Enhanced CT (A.70) object, whose per-frame attributes come
from the Multi-frame Functional Groups (C.7.6.16, read through
:func:`pipeline.multiframe.frame_headers`). The rules, in order:

Hard rules (a series failing one is rejected with the reason):

1. every instance belongs to the study (StudyInstanceUID);
2. Modality is ``CT`` (PS3.3 C.7.3.1.1.1);
3. SOPClassUID is CT Image Storage, Enhanced CT Image Storage or Legacy Converted
   Enhanced CT Image Storage (PS3.4 B.5), the same for every instance; a multi-frame
   class must carry its PerFrameFunctionalGroupsSequence (an object without it is
   declined: its frames have no geometry);
4. ImageType (PS3.3 C.8.2.1.1.1, C.8.15.2.1.1) and, per frame, FrameType
   (CTImageFrameTypeSequence, C.8.15.3.1) hold no ``LOCALIZER`` / ``SCOUT`` value;
5. axial: the slice normal (row x column direction of ImageOrientationPatient,
   PS3.3 C.7.6.2.1.1; PlaneOrientationSequence for a frame) lies within
   :data:`AXIAL_MAX_ANGLE_DEG` of the patient z axis.
   When GantryDetectorTilt is set, the limit widens to ``|tilt| + 5°`` so that a
   tilted-gantry axial series is *selected* here and declined by ``load_volume`` with
   a tilt reason (tilt is judged there, from the header and the slice positions);
6. at least ``min_slices`` slices (instances, or frames of multi-frame objects);
7. slice thickness (SliceThickness, of PixelMeasuresSequence for a frame, else the
   median distance between slice positions) at most ``max_slice_thickness_mm``.

Preferences among the survivors (the first that differs decides):

a. ImageType ``ORIGINAL\\PRIMARY`` over DERIVED / SECONDARY (a derived series is
   only chosen when no original one survives; the rule says so); for frames, their
   FrameType;
b. a soft-tissue kernel over a bone / lung / sharp one (:func:`classify_kernel`;
   ConvolutionKernel of the first slice: for a frame, from CTReconstructionSequence, or
   the Unassigned Converted Attributes of a Legacy Converted object);
c. the thinnest slices;
d. the most coverage along the slice normal;
e. the most slices, then the lowest SeriesNumber, then SeriesInstanceUID
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
from pipeline.multiframe import (
    CT_IMAGE_STORAGE,
    ENHANCED_CT_IMAGE_STORAGE,
    LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE,
    frame_headers,
    is_multi_frame,
)

logger = logging.getLogger(__name__)

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
    n_instances: int  # slices: instances, or frames of multi-frame objects
    series_number: int
    multi_frame: bool = False
    headers: tuple[Dataset, ...] = ()  # pixel-less headers of ``paths``, same order

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
    "most slices",
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
        return f"{c.n_instances} frames" if c.multi_frame else f"{c.n_instances} instances"
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


def _image_type(ds: Dataset, keyword: str = "ImageType") -> tuple[str, ...]:
    return tuple(str(v).upper() for v in (ds.get(keyword) or ()))


def _sop_class_reason(ds: Dataset, path: Path) -> str:
    """Why an instance's SOPClassUID rules its series out (hard rule 3), or ''."""
    sop_class = str(ds.get("SOPClassUID", "") or "")
    allowed = (
        f"allowed: {CT_IMAGE_STORAGE} (CT Image Storage), {ENHANCED_CT_IMAGE_STORAGE} (Enhanced CT Image Storage), "
        f"{LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE} (Legacy Converted Enhanced CT Image Storage)"
    )
    name = UID(sop_class).name if sop_class else "missing"
    if sop_class in (ENHANCED_CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE):
        if not ds.get("PerFrameFunctionalGroupsSequence"):
            return (
                f"SOPClassUID is {sop_class} ({name}) (multi-frame Enhanced CT is not supported without its "
                f"Multi-frame Functional Groups: PerFrameFunctionalGroupsSequence (5200,9230) is missing in "
                f"{path.name}, so its frames have no geometry); {allowed} with the functional groups of PS3.3 C.7.6.16"
            )
        return ""
    if sop_class != CT_IMAGE_STORAGE:
        return f"SOPClassUID is {sop_class or '(missing)'} ({name}); {allowed}"
    return ""


class _Rejected(Exception):
    """A hard rule rules the series out; the message is the reason."""


@dataclass(frozen=True)
class _HardRules:
    """The limits of the hard rules that depend on the call (rules 1, 6 and 7)."""

    study_instance_uid: str
    max_slice_thickness_mm: float
    min_slices: int


def _check_series(
    series_uid: str, paths: Sequence[Path], rules: _HardRules
) -> tuple[_Candidate | None, str, str]:
    """(candidate or None, reason if rejected, SeriesDescription)."""
    if not paths:
        return None, "no instances", ""
    try:
        first = _read_header(paths[0])
    except (InvalidDicomError, OSError) as exc:
        return None, f"{paths[0].name} is not readable as DICOM ({exc})", ""
    description = str(first.get("SeriesDescription", "") or "")
    try:
        return _candidate(series_uid, paths, first, description, rules), "", description
    except _Rejected as exc:
        return None, str(exc), description


def _candidate(
    series_uid: str, paths: Sequence[Path], first: Dataset, description: str, rules: _HardRules
) -> _Candidate:
    """The series as a candidate when it passes the hard rules, in the order of the module docstring."""
    headers = _series_headers(first, paths)
    multi_frame = is_multi_frame(first)
    # One header per slice (the frames of multi-frame objects).
    slices: list[tuple[Dataset, Dataset]] = [(h, f) for h in headers for f in frame_headers(h)]
    _check_study(headers, rules.study_instance_uid)
    image_types, original_primary = _check_image_types(slices, multi_frame)
    first_slice = slices[0][1] if slices else first
    normal = _axial_normal(first_slice)
    _check_slice_count(len(slices), len(headers), len(paths), multi_frame, rules.min_slices)
    coverage, thickness = _coverage_and_thickness(slices, normal, first_slice, rules.max_slice_thickness_mm)
    kernel = _first_str(first_slice.get("ConvolutionKernel"))
    try:
        series_number = int(first.get("SeriesNumber") or 0)
    except (TypeError, ValueError):
        series_number = 0
    return _Candidate(
        series_uid=series_uid,
        paths=tuple(paths),
        description=description,
        kernel=kernel,
        kernel_class=classify_kernel(kernel, description),
        original_primary=original_primary,
        image_type="\\".join(image_types[0]),
        thickness_mm=thickness,
        coverage_mm=coverage,
        n_instances=len(slices),
        series_number=series_number,
        multi_frame=multi_frame,
        headers=tuple(headers),
    )


def _series_headers(first: Dataset, paths: Sequence[Path]) -> list[Dataset]:
    """The headers of every instance (``first`` is that of ``paths[0]``): Modality CT, one allowed SOP class."""
    modality = str(first.get("Modality", "") or "")
    if modality != "CT":
        raise _Rejected(f"Modality is {modality!r}; allowed: 'CT'")
    reason = _sop_class_reason(first, paths[0])
    if reason:
        raise _Rejected(reason)
    headers: list[Dataset] = [first]
    for p in paths[1:]:
        try:
            headers.append(_read_header(p))
        except (InvalidDicomError, OSError) as exc:
            raise _Rejected(f"{p.name} is not readable as DICOM ({exc})") from exc
    sop_class = str(first.get("SOPClassUID", "") or "")
    for h, p in zip(headers[1:], paths[1:]):
        other = str(h.get("SOPClassUID", "") or "")
        if other != sop_class:
            raise _Rejected(
                f"mixed SOPClassUID: {p.name} has {other or '(missing)'}, {paths[0].name} has {sop_class}; "
                "allowed: one SOP class per series"
            )
        reason = _sop_class_reason(h, p)
        if reason:
            raise _Rejected(reason)
    return headers


def _check_study(headers: Sequence[Dataset], study_instance_uid: str) -> None:
    """Every instance belongs to the study (hard rule 1)."""
    foreign = [str(h.get("StudyInstanceUID", "")) for h in headers if h.get("StudyInstanceUID") != study_instance_uid]
    if foreign:
        raise _Rejected(
            f"{len(foreign)} instance(s) have StudyInstanceUID {foreign[0]!r}; expected {study_instance_uid!r}"
        )


def _check_image_types(
    slices: Sequence[tuple[Dataset, Dataset]], multi_frame: bool
) -> tuple[list[tuple[str, ...]], bool]:
    """No localizer / scout slice (hard rule 4); each slice's ImageType and whether all are ORIGINAL\\PRIMARY.

    Per slice: the instance's ImageType, and a frame's FrameType where it has one.
    """
    image_types = [_image_type(h) for h, _ in slices]
    frame_types = [_image_type(f, "FrameType") if f is not h else () for h, f in slices]
    localizers = [
        t for pair in zip(image_types, frame_types) for t in pair if "LOCALIZER" in t or "SCOUT" in t
    ]
    if localizers:
        shown = "\\".join(localizers[0])
        n_bad = sum(1 for i, f in zip(image_types, frame_types) if {"LOCALIZER", "SCOUT"} & set(i + f))
        what = "ImageType/FrameType" if multi_frame else "ImageType"
        unit = "frame(s)" if multi_frame else "instance(s)"
        raise _Rejected(
            f"{what} is {shown} in {n_bad} of {len(slices)} {unit}: "
            "localizer/scout images are not a volume; allowed: no LOCALIZER or SCOUT value"
        )
    original_primary = all((f or i)[:2] == ("ORIGINAL", "PRIMARY") for i, f in zip(image_types, frame_types))
    return image_types, original_primary


def _axial_normal(first_slice: Dataset) -> np.ndarray:
    """The slice normal of an axial series (hard rule 5; the limit widens by a declared gantry tilt)."""
    normal = _normal(first_slice)
    if normal is None:
        raise _Rejected("ImageOrientationPatient (0020,0037) is missing or invalid; required to judge axial")
    angle = math.degrees(math.acos(min(1.0, abs(float(normal[2])))))
    tilt = _float(first_slice, "GantryDetectorTilt") or 0.0
    limit = max(AXIAL_MAX_ANGLE_DEG, abs(tilt) + TILT_ANGLE_MARGIN_DEG) if tilt else AXIAL_MAX_ANGLE_DEG
    if angle > limit:
        raise _Rejected(
            f"not axial: slice normal is {angle:.1f} degrees from the patient z axis "
            f"(ImageOrientationPatient {list(first_slice.ImageOrientationPatient)}); allowed: <= {limit:g} degrees"
        )
    return normal


def _check_slice_count(n_slices: int, n_headers: int, n_paths: int, multi_frame: bool, min_slices: int) -> None:
    """At least ``min_slices`` slices (hard rule 6)."""
    if n_slices < min_slices:
        if multi_frame:
            raise _Rejected(
                f"{n_slices} frame(s) in {n_headers} multi-frame instance(s); at least {min_slices} required"
            )
        raise _Rejected(f"{n_paths} instance(s); at least {min_slices} required")


def _coverage_and_thickness(
    slices: Sequence[tuple[Dataset, Dataset]], normal: np.ndarray, first_slice: Dataset, max_thickness_mm: float
) -> tuple[float, float | None]:
    """Coverage along the normal (mm) and slice thickness (mm, or None), within the limit (hard rule 7)."""
    offsets: list[float] = []
    for _, h in slices:
        ipp = h.get("ImagePositionPatient")
        if ipp is not None and len(ipp) == 3:
            try:
                offsets.append(float(np.dot(np.asarray([float(x) for x in ipp]), normal)))
            except (TypeError, ValueError):
                pass
    offsets.sort()
    coverage = offsets[-1] - offsets[0] if len(offsets) >= 2 else 0.0
    thickness = _float(first_slice, "SliceThickness")
    if (thickness is None or thickness <= 0) and len(offsets) >= 2:
        gaps = np.diff(offsets)
        thickness = float(np.median(gaps)) if float(np.median(gaps)) > 0 else None
    if thickness is not None and thickness > max_thickness_mm:
        raise _Rejected(f"slice thickness is {thickness:g} mm; allowed: <= {max_thickness_mm:g} mm")
    return coverage, thickness


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
    rules = _HardRules(study_instance_uid, max_slice_thickness_mm, min_slices)
    candidates: list[_Candidate] = []
    rejected: list[tuple[str, str, str]] = []  # (uid, description, reason)
    for uid in sorted(series):
        paths = [Path(p) for p in series[uid]]
        cand, reason, description = _check_series(uid, sorted(paths), rules)
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
    rule = _winning_rule(candidates, rules)
    losers = [(uid, reason) for uid, _, reason in rejected] + _losing_reasons(winner, candidates[1:])
    logger.info(
        "select_series end: study %s, chose %s (%d slices) of %d series in %.2f s; rule: %s",
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
        headers=winner.headers,
        patient=patient_info(winner.headers[0]),
        study_date=str(winner.headers[0].get("StudyDate", "") or "").strip(),
    )


def _winning_rule(candidates: Sequence[_Candidate], rules: _HardRules) -> str:
    """Why ``candidates[0]`` (sorted by preference) won, in words."""
    winner = candidates[0]
    hard = (
        "modality CT, CT Image Storage or (Legacy Converted) Enhanced CT, no localizer, axial, "
        f">= {rules.min_slices} slices, "
        f"thickness <= {rules.max_slice_thickness_mm:g} mm"
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
    return rule


def _losing_reasons(winner: _Candidate, others: Sequence[_Candidate]) -> list[tuple[str, str]]:
    """(SeriesInstanceUID, the preference it lost on) for each candidate but the winner."""
    losers = []
    for c in others:
        i = _first_difference(winner, c)
        losers.append(
            (
                c.series_uid,
                f"lost to {winner.series_uid} on '{_PREFERENCES[i]}': {_describe(c, i)} vs {_describe(winner, i)}",
            )
        )
    return losers


def _positive(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if v > 0 and math.isfinite(v) else None


def patient_info(ds: Dataset) -> PatientInfo:
    """Patient attributes of one header (Patient and Patient Study modules, PS3.3 C.7.1.1, C.7.2.2).

    PatientSize (m) becomes ``height_m`` and PatientWeight (kg) ``weight_kg``; an empty,
    zero or unparsable value gives ``None``, and so does a PatientSize outside
    0.3..3.0 m (e.g. centimetres written by mistake), rather than a wrong BMI.
    """
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
