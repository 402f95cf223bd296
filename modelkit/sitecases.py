"""The node's corrected cases as training data, split into training and held-out cases by patient.

When a radiologist corrects a segmentation the node made and sends the corrected DICOM-SEG back, the
node stores the study as a case folder under its data directory::

    <node_data_dir>/corrected/<StudyInstanceUID>/
        case.json   {"study_uid", "series_uid", "patient_key", "seg_sop_instance_uid", "observer", "received_at"}
        ct/         the CT series the SEG was drawn on
        seg.dcm     the corrected DICOM-SEG

``patient_key`` is the sha256 hex of IssuerOfPatientID + "/" + PatientID (no patient data in the file).
Such a folder is a DICOM case (:func:`modelkit.segimport.load_dicom_case`).

:func:`split_corrected_cases` puts every study of one patient on the same side: a patient is held out when
``sha256(seed/patient_key)``, read as a number in [0, 1), is below ``held_out_fraction``. A patient's side
depends on the seed, the fraction and its own key only, so it stays put as corrected cases accumulate (a
later fine-tune with the same seed never trains on an earlier held-out patient). Only where that draw would
leave no patient on one side (a handful of patients) the lowest-ranked patient is held out, or the highest
trained. :func:`held_out_cases` gives the held-out case folders, for evaluating a fine-tuned bundle on the
cases it never saw (the bundle's metadata lists their StudyInstanceUIDs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)

CORRECTED_DIR = "corrected"
CASE_FILE = "case.json"
SEG_FILE = "seg.dcm"
CT_DIR = "ct"
CASE_KEYS = ("study_uid", "series_uid", "patient_key", "seg_sop_instance_uid", "observer", "received_at")
DEFAULT_HELD_OUT_FRACTION = 0.2
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class SiteCaseError(PipelineError, ValueError):
    """A corrected case folder does not follow the layout above (message names the file and the key)."""


@dataclass(frozen=True)
class CorrectedCase:
    """One corrected study of the node (``folder``: its case folder, a DICOM case)."""

    study_uid: str
    series_uid: str
    patient_key: str
    seg_sop_instance_uid: str
    observer: str
    received_at: str
    folder: Path


@dataclass(frozen=True)
class SiteSplit:
    """The corrected cases split by patient: ``train`` and ``held_out`` (each sorted by StudyInstanceUID)."""

    train: tuple[CorrectedCase, ...]
    held_out: tuple[CorrectedCase, ...]
    patients: int
    note: str  # what the split did, for the log


def _read_case(folder: Path) -> CorrectedCase:
    path = folder / CASE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SiteCaseError(f"corrected case {folder}: {CASE_FILE} is missing") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise SiteCaseError(f"corrected case {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SiteCaseError(f"corrected case {path}: a JSON object is required; saw {type(data).__name__}")
    for key in CASE_KEYS:
        if not isinstance(data.get(key), str) or not data[key]:
            raise SiteCaseError(f"corrected case {path}: {key} must be a non-empty string; saw {data.get(key)!r}")
    if data["study_uid"] != folder.name:
        raise SiteCaseError(f"corrected case {path}: study_uid {data['study_uid']!r} differs from its folder's "
                            f"name {folder.name!r}")
    if not _SHA256_HEX.fullmatch(data["patient_key"]):
        raise SiteCaseError(f"corrected case {path}: patient_key must be 64 lower-case hex digits (sha256); "
                            f"saw {len(data['patient_key'])} characters")
    if not (folder / SEG_FILE).is_file() or not (folder / CT_DIR).is_dir():
        raise SiteCaseError(f"corrected case {folder}: {SEG_FILE} and {CT_DIR}/ are required")
    return CorrectedCase(*(data[k] for k in CASE_KEYS), folder=folder)  # type: ignore[arg-type]


def read_corrected_cases(node_data_dir: Path) -> list[CorrectedCase]:
    """Every case under ``<node_data_dir>/corrected/``, sorted by StudyInstanceUID (none when that folder
    does not exist yet); SiteCaseError when ``node_data_dir`` itself is missing or a case is malformed."""
    node_data_dir = Path(node_data_dir)
    if not node_data_dir.is_dir():
        raise SiteCaseError(f"node_data_dir: folder {node_data_dir} does not exist")
    root = node_data_dir / CORRECTED_DIR
    if not root.is_dir():
        return []
    return [_read_case(d) for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))]


def _draw(seed: int, patient_key: str) -> float:
    """The patient's number in [0, 1) for this seed."""
    return int(hashlib.sha256(f"{int(seed)}/{patient_key}".encode("ascii")).hexdigest()[:15], 16) / 16**15


def split_by_patient(cases: list[CorrectedCase], seed: int, fraction: float = DEFAULT_HELD_OUT_FRACTION) -> SiteSplit:
    """Training and held-out cases, all studies of a patient on one side (see the module doc).

    With at least 2 patients and ``fraction`` > 0 at least one patient is held out and at least one trains;
    with fewer than 2 patients every case trains and none is held out."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
        raise SiteCaseError(f"held_out_fraction is {fraction!r}; allowed: a number, 0 <= fraction < 1")
    ranked = sorted({c.patient_key for c in cases}, key=lambda p: _draw(seed, p))
    if len(ranked) < 2 or fraction == 0:
        why = "fewer than 2 patients" if len(ranked) < 2 else "held_out_fraction = 0"
        return SiteSplit(tuple(cases), (), len(ranked),
                         f"{len(cases)} corrected case(s) of {len(ranked)} patient(s): all train, none held out "
                         f"({why})")
    held = {p for p in ranked if _draw(seed, p) < fraction} or {ranked[0]}
    if len(held) == len(ranked):
        held.discard(ranked[-1])
    train = tuple(c for c in cases if c.patient_key not in held)
    held_out = tuple(c for c in cases if c.patient_key in held)
    return SiteSplit(train, held_out, len(ranked),
                     f"{len(cases)} corrected case(s) of {len(ranked)} patients: {len(train)} train, "
                     f"{len(held_out)} held out ({len(held)} patient(s); seed {seed}, held_out_fraction {fraction})")


def split_corrected_cases(node_data_dir: Path, seed: int, fraction: float = DEFAULT_HELD_OUT_FRACTION) -> SiteSplit:
    """:func:`split_by_patient` of :func:`read_corrected_cases`."""
    return split_by_patient(read_corrected_cases(node_data_dir), seed, fraction)


def held_out_cases(node_data_dir: Path, seed: int, fraction: float = DEFAULT_HELD_OUT_FRACTION) -> list[Path]:
    """The case folders a fine-tune with these settings held out (for ``thighnode model compare``): pass the
    training settings' ``node_data_dir``, ``seed`` and ``held_out_fraction``, or the bundle metadata's
    ``training.held_out``. Cases corrected after that training may join the held-out side; the metadata's
    ``study_uids`` say which were held out then."""
    return [c.folder for c in split_corrected_cases(node_data_dir, seed, fraction).held_out]
