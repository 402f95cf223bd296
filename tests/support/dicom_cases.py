"""Tiny labelled DICOM cases for training tests: a CT series (:func:`tests.support.synthetic_ct.write_ct_series`)
and a DICOM-SEG drawn on it (highdicom, as in tests/modelkit/test_segimport.py), in a case folder.

:func:`write_dicom_case` writes the layout of a case folder a site exports (CT files and ``seg.dcm``, or the
CT in ``ct/``); :func:`write_corrected_case` the node's corrected-case layout (modelkit.sitecases):
``<node_data_dir>/corrected/<StudyInstanceUID>/{case.json, ct/, seg.dcm}``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from pipeline.labels import load_label_table
from tests.modelkit.test_segimport import _description, _to_bytes
from tests.support.synthetic_ct import write_ct_series

SHAPE = (24, 28, 40)  # slices, rows, columns
SPACING_MM = 4.0


def thigh_arrays(seed: int = 0, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(hu, labels) of two tiny 'thighs': fat body, a sartorius (1) and a femur (28) cylinder each side; the
    noise from ``rng`` when given (several cases from one stream), else from ``seed``."""
    rng = rng if rng is not None else np.random.default_rng(seed)
    k, r, c = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    lab = np.zeros(SHAPE, np.uint8)
    body = ((r - 14) / 12) ** 2 + ((c - 20) / 18) ** 2 < 1
    for cx in (10, 30):
        lab[((r - 14) / 6) ** 2 + ((c - cx) / 5) ** 2 < 1] = 1
        lab[((r - 14) / 2.5) ** 2 + ((c - cx) / 2.5) ** 2 < 1] = 28
    hu = np.where(body, -100.0, -1000.0).astype(np.float32)
    hu[lab == 1], hu[lab == 28] = 50.0, 700.0
    hu += rng.normal(0, 8, SHAPE).astype(np.float32)
    return hu, lab


def write_dicom_case(folder: Path, *, study_uid: str, patient_id: str, issuer: str = "SITE", seed: int = 0,
                     ct_subdir: str = "ct", seg_name: str = "seg.dcm") -> tuple[str, str]:
    """Write a CT series under ``folder/ct_subdir`` and its SEG (sartorius, femur) as ``folder/seg_name``;
    return (SeriesInstanceUID of the CT, SOPInstanceUID of the SEG)."""
    import highdicom as hd

    labels = load_label_table()
    hu, lab = thigh_arrays(seed)
    files = write_ct_series(
        folder / ct_subdir, n_slices=SHAPE[0], rows=SHAPE[1], cols=SHAPE[2],
        pixel_spacing=(SPACING_MM, SPACING_MM), slice_spacing=SPACING_MM, origin=(-80.0, -56.0, 0.0),
        study_uid=study_uid, hu=hu, patient={"PatientID": patient_id, "IssuerOfPatientID": issuer}, seed=seed,
    )
    cts = [pydicom.dcmread(str(f)) for f in files]
    cts.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    keys = ("sartorius", "femur")
    mask = np.stack([lab == labels.by_key(key).id for key in keys], axis=-1).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=cts, pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[
            _description(i + 1, labels.by_key(key).name, labels.by_key(key).snomed_code, labels.by_key(key).name)
            for i, key in enumerate(keys)
        ],
        series_instance_uid=generate_uid(), series_number=100, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer="test", manufacturer_model_name="test", software_versions="0", device_serial_number="0",
    )
    (folder / seg_name).write_bytes(_to_bytes(seg))
    return str(cts[0].SeriesInstanceUID), str(seg.SOPInstanceUID)


def patient_key(patient_id: str, issuer: str = "SITE") -> str:
    """The corrected-case contract's patient key: sha256 hex of IssuerOfPatientID + "/" + PatientID."""
    return hashlib.sha256(f"{issuer}/{patient_id}".encode()).hexdigest()


def write_corrected_case(node_data_dir: Path, *, patient_id: str, seed: int = 0, issuer: str = "SITE",
                         study_uid: str | None = None) -> Path:
    """One corrected study as the node stores it; returns its case folder."""
    study_uid = study_uid or generate_uid()
    folder = node_data_dir / "corrected" / study_uid
    series_uid, seg_uid = write_dicom_case(folder, study_uid=study_uid, patient_id=patient_id, issuer=issuer,
                                           seed=seed)
    record = {"study_uid": study_uid, "series_uid": series_uid, "patient_key": patient_key(patient_id, issuer),
              "seg_sop_instance_uid": seg_uid, "observer": "Radiologist^A", "received_at": "2026-12-01T10:00:00Z"}
    (folder / "case.json").write_text(json.dumps(record), encoding="utf-8")
    return folder


def write_case_json_only(node_data_dir: Path, *, patient_id: str, issuer: str = "SITE",
                         study_uid: str | None = None) -> Path:
    """A corrected case folder with case.json and empty ct/ + seg.dcm placeholders (enough for the split,
    which reads case.json only)."""
    study_uid = study_uid or generate_uid()
    folder = node_data_dir / "corrected" / study_uid
    (folder / "ct").mkdir(parents=True)
    (folder / "seg.dcm").write_bytes(b"")
    record = {"study_uid": study_uid, "series_uid": study_uid + ".1", "patient_key": patient_key(patient_id, issuer),
              "seg_sop_instance_uid": study_uid + ".2", "observer": "Radiologist^A",
              "received_at": "2026-12-01T10:00:00Z"}
    (folder / "case.json").write_text(json.dumps(record), encoding="utf-8")
    return folder
