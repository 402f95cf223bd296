"""A reader's corrected Segmentation coming back over DICOM: recognition, records, ground truth.

A Segmentation (PS3.3 A.51) received by C-STORE for a study the node has measured, whose
SOPInstanceUID the node did not write, is a *correction* (a reader edited the node's SEG in
3D Slicer or OHIF and sent it back). The node's own SEG echoed back by a PACS is not: every
SOPInstanceUID the node wrote is derived (:mod:`dicomout.uids`) and kept as a file in
``<data_dir>/outputs/<StudyInstanceUID>/``, so it is recognised by its UID.

The assembler turns any late instance into a new job; the workflow asks
:func:`pending_segs` which SEG instances of the study are not yet handled, applies each
(:meth:`thighnode.workflow.Workflow`), and records the outcome here, one row per SEG
instance (``corrections``): ``own`` (ours echoed back), ``accepted`` (measured, verified SR
and PDF queued, stored as ground truth; the corrected measurements of every structure and side
beside the model's, :data:`VERIFIED_MEASUREMENTS`, while the model's stay in the results store)
or ``refused`` with the reason. A refused SEG's
file stays in the spool; nothing is deleted.

Ground truth for training (:func:`store_case`), under the node's data directory::

    corrected/<StudyInstanceUID>/case.json   {"study_uid", "series_uid", "patient_key",
                                              "seg_sop_instance_uid", "observer", "received_at"}
    corrected/<StudyInstanceUID>/ct/         the CT series' files (hard links of the spooled files)
    corrected/<StudyInstanceUID>/seg.dcm     the reader's SEG as received
    corrected-history/<StudyInstanceUID>/<time>/   an earlier correction of the study, kept (outside
                                             the case folder, so the case stays one CT series + one SEG)

``patient_key`` is the SHA-256 (hex) of ``IssuerOfPatientID + "/" + PatientID``: no PHI in
the JSON. The retention purge deletes spooled files only, never ``corrected/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from pydicom.dataset import Dataset

from node_errors import NodeError
from pipeline.labels import LabelTable
from pipeline.postprocess import split_sides
from pipeline.segread import SEG_SOP_CLASS_UID, SegLabels
from pipeline.types import SIDE_NONE, PatientInfo, Segmentation, Volume
from scp.db import SqliteStore
from scp.types import ReceivedInstance

log = logging.getLogger(__name__)

OWN = "own"
ACCEPTED = "accepted"
REFUSED = "refused"
CORRECTION_STATES = (OWN, ACCEPTED, REFUSED)

CORRECTED_DIR = "corrected"
VERIFIED_MEASUREMENTS = "verified_measurements"
"""Key of an accepted correction's detail: every structure/side, model and corrected (voxels, cm³, g)."""
MIN_STRUCTURE_SHARE = 0.5
"""A correction must hold at least this share of the structure/sides the model found (else: partial)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS corrections (
    seg_sop_instance_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL DEFAULT '',
    job_id INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    observer TEXT NOT NULL DEFAULT '',
    received_at REAL NOT NULL,
    handled_at REAL NOT NULL,
    detail_json TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS corrections_study ON corrections(study_uid, handled_at);
"""


class CorrectionRefused(NodeError):
    """A received SEG cannot be used as a correction (the message is the recorded reason)."""


@dataclass(frozen=True)
class CorrectionRecord:
    """How one received SEG instance was handled."""

    seg_sop_instance_uid: str
    study_uid: str
    series_uid: str
    job_id: int
    state: str
    reason: str
    observer: str
    received_at: float
    handled_at: float
    detail: dict[str, Any]

    def to_summary(self) -> dict[str, Any]:
        """For the job record and `thighnode status --json`: no observer name (a person's name) and not
        the full verified measurements (those stay in the ``corrections`` table)."""
        return {"seg_sop_instance_uid": self.seg_sop_instance_uid, "state": self.state, "reason": self.reason,
                **{k: v for k, v in self.detail.items() if k != VERIFIED_MEASUREMENTS}}


class CorrectionStore(SqliteStore):
    """The ``corrections`` table: one row per received SEG instance, once handled."""

    SCHEMA = _SCHEMA

    def record(self, record: CorrectionRecord) -> None:
        if record.state not in CORRECTION_STATES:
            raise ValueError(f"correction state {record.state!r}; allowed: {', '.join(CORRECTION_STATES)}")
        with self._lock:
            self._db.execute(
                "INSERT INTO corrections VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (seg_sop_instance_uid) "
                "DO UPDATE SET study_uid = excluded.study_uid, series_uid = excluded.series_uid, "
                "job_id = excluded.job_id, state = excluded.state, reason = excluded.reason, "
                "observer = excluded.observer, received_at = excluded.received_at, "
                "handled_at = excluded.handled_at, detail_json = excluded.detail_json",
                (record.seg_sop_instance_uid, record.study_uid, record.series_uid, record.job_id, record.state,
                 record.reason, record.observer, record.received_at, record.handled_at, json.dumps(record.detail)),
            )
        log.info("correction SEG %s of study %s: %s", record.seg_sop_instance_uid, record.study_uid, record.state)

    def known(self, sop_instance_uids: Iterable[str]) -> set[str]:
        uids = list(sop_instance_uids)
        if not uids:
            return set()
        with self._lock:
            rows = self._db.execute(
                f"SELECT seg_sop_instance_uid FROM corrections WHERE seg_sop_instance_uid IN ({','.join('?' * len(uids))})",
                uids,
            ).fetchall()
        return {r[0] for r in rows}

    def records(self, *, study_uid: str | None = None, limit: int = 1000) -> list[CorrectionRecord]:
        query, args = "SELECT * FROM corrections", []
        if study_uid is not None:
            query += " WHERE study_uid = ?"
            args.append(study_uid)
        query += " ORDER BY handled_at DESC LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._db.execute(query, args).fetchall()
        return [
            CorrectionRecord(r["seg_sop_instance_uid"], r["study_uid"], r["series_uid"], r["job_id"], r["state"],
                             r["reason"], r["observer"], r["received_at"], r["handled_at"], json.loads(r["detail_json"]))
            for r in rows
        ]


# -- recognition ---------------------------------------------------------------------------


def own_sop_instance_uids(outputs_dir: Path, study_uid: str) -> set[str]:
    """SOPInstanceUIDs of what the node wrote for a study (``<kind>_<SOPInstanceUID>.dcm``)."""
    folder = Path(outputs_dir) / study_uid
    if not folder.is_dir():
        return set()
    return {p.stem.split("_", 1)[1] for p in folder.glob("*_*.dcm")}


def pending_segs(instances: Sequence[ReceivedInstance], handled: set[str]) -> list[ReceivedInstance]:
    """The study's Segmentation instances not handled yet, in the order received."""
    return [i for i in instances if i.sop_class_uid == SEG_SOP_CLASS_UID and i.sop_instance_uid not in handled]


def new_ct_since(instances: Sequence[ReceivedInstance], since: float | None) -> int:
    """How many CT instances arrived after ``since`` (the model's results were saved); all when None."""
    return sum(1 for i in instances if i.modality == "CT" and (since is None or i.received_at > since))


def _uids_in(ds: Dataset, sequence: str, keyword: str) -> set[str]:
    return {str(item.get(keyword, "")) for item in ds.get(sequence, None) or () if item.get(keyword)}


def check_references(ds: Dataset, *, study_uid: str, series_uid: str, frame_of_reference_uid: str) -> None:
    """The SEG must belong to the study and refer to the series the node measured (PS3.3 C.8.20.2:
    ReferencedSeriesSequence, or the frames' SourceImageSequence via the frame of reference)."""
    if str(ds.get("StudyInstanceUID", "")) != study_uid:
        raise CorrectionRefused(f"SEG StudyInstanceUID {ds.get('StudyInstanceUID', '')!r} is not the study {study_uid}")
    referenced = _uids_in(ds, "ReferencedSeriesSequence", "SeriesInstanceUID")
    if referenced and series_uid not in referenced:
        raise CorrectionRefused(
            f"SEG references series {', '.join(sorted(referenced))} (ReferencedSeriesSequence); the node measured "
            f"series {series_uid}: a correction must be drawn on the measured CT series"
        )
    seg_for = str(ds.get("FrameOfReferenceUID", ""))
    if seg_for != frame_of_reference_uid:
        raise CorrectionRefused(
            f"SEG FrameOfReferenceUID {seg_for!r} differs from the measured CT's {frame_of_reference_uid!r}: "
            "mismatched geometry"
        )


def corrected_segmentation(
    read: SegLabels, volume: Volume, labels: LabelTable, *, model_name: str, model_version: str, model_sha256: str = ""
) -> Segmentation:
    """The reader's labels as a :class:`Segmentation` of the model whose output was corrected (name, version,
    weights' sha256); a segment without a side gets the midline's."""
    side_map = read.side_map
    if np.any((read.label_map > 0) & (side_map == SIDE_NONE)):
        femur = labels.id_for_name("femur")
        midline = split_sides(read.label_map, volume.affine_lps, femur_id=femur)
        side_map = np.where((read.label_map > 0) & (side_map == SIDE_NONE), midline, side_map).astype(np.uint8)
    return Segmentation(read.label_map, side_map, labels, model_name, model_version, volume.affine_lps, model_sha256)


def check_coverage(model_keys: set[tuple[str, str]], corrected_keys: set[tuple[str, str]]) -> list[tuple[str, str]]:
    """The model's structure/sides the correction lacks; CorrectionRefused when it holds too few (partial)."""
    missing = sorted(model_keys - corrected_keys)
    if model_keys and len(model_keys & corrected_keys) < MIN_STRUCTURE_SHARE * len(model_keys):
        raise CorrectionRefused(
            f"partial SEG: it holds {len(model_keys & corrected_keys)} of the {len(model_keys)} structure/sides the "
            f"model found (at least {MIN_STRUCTURE_SHARE:.0%} are required to replace the model's segmentation); "
            f"missing e.g. {', '.join(f'{k} {s}' for k, s in missing[:5])}"
        )
    return missing


def observer_of(ds: Dataset) -> str:
    """ContentCreatorName (PS3.3 Table 10-12, Content Identification Macro) as text; "" when absent."""
    value = ds.get("ContentCreatorName", "")
    return "" if value is None else str(value).strip()


# -- ground truth ----------------------------------------------------------------------------


def patient_key(patient: PatientInfo) -> str:
    """SHA-256 hex of IssuerOfPatientID + "/" + PatientID (the case folder holds no PHI)."""
    return hashlib.sha256(f"{patient.issuer_of_patient_id}/{patient.patient_id}".encode("utf-8")).hexdigest()


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat()


def store_case(
    data_dir: Path,
    *,
    study_uid: str,
    series_uid: str,
    patient: PatientInfo,
    seg_sop_instance_uid: str,
    observer: str,
    received_at: float,
    ct_paths: Sequence[Path],
    seg_path: Path,
) -> Path:
    """Write ``corrected/<study>/`` (module docstring); an earlier correction moves to
    ``corrected-history/<study>/<time>/``.

    The new case is staged beside the folder and moved in, so the folder always holds one
    complete case. The same SEG stored again (a resumed job) replaces itself without a copy.
    """
    root = Path(data_dir) / CORRECTED_DIR / study_uid
    staging = Path(data_dir) / f"{CORRECTED_DIR}-staging" / f"{study_uid}-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    (staging / "ct").mkdir(parents=True)
    for path in ct_paths:
        _link_or_copy(Path(path), staging / "ct" / Path(path).name)
    shutil.copy2(seg_path, staging / "seg.dcm")
    case = {
        "study_uid": study_uid, "series_uid": series_uid, "patient_key": patient_key(patient),
        "seg_sop_instance_uid": seg_sop_instance_uid, "observer": observer, "received_at": _iso(received_at),
    }
    (staging / "case.json").write_text(json.dumps(case, indent=2) + "\n", encoding="utf-8")
    root.mkdir(parents=True, exist_ok=True)
    current = root / "case.json"
    names = ("case.json", "ct", "seg.dcm")
    if current.exists():
        earlier = json.loads(current.read_text(encoding="utf-8"))
        if earlier.get("seg_sop_instance_uid") == seg_sop_instance_uid:
            for name in names:
                _remove(root / name)
        else:
            previous = (Path(data_dir) / f"{CORRECTED_DIR}-history" / study_uid
                        / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ"))
            previous.mkdir(parents=True)
            for name in names:
                if (root / name).exists():
                    os.replace(root / name, previous / name)
    for name in ("ct", "seg.dcm", "case.json"):  # case.json last: its presence means a complete case
        os.replace(staging / name, root / name)
    staging.rmdir()
    log.info("correction of study %s stored as ground truth (%d CT files)", study_uid, len(ct_paths))
    return root


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
