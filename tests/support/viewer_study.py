"""A small study for the viewer check: a CT series, its SEG (one per transfer syntax), an SR and a PDF.

The label map is chosen so that a viewer's mistakes show: one structure on the patient's right only (a
left-right flip moves it to the other half of the image), a structure whose centre moves 2 rows per slice
(a one-slice shift of the overlay moves it), and empty slices (the BINARY SEG omits their frames; a
reader that places frames by index instead of position shows the next slices' overlays there). The SEGs
are built by :func:`dicomout.seg.build_seg`, the SR by :func:`dicomout.sr.build_sr` and the PDF by
:func:`dicomout.pdf.build_encapsulated_pdf`, as the node does.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from dicomout.context import Equipment
from dicomout.pdf import build_encapsulated_pdf
from dicomout.seg import build_seg
from dicomout.sr import build_sr
from pipeline.types import Segmentation, Volume
from pipeline.volume import load_volume
from tests.dicomout.test_seg import EQUIPMENT, MODEL_NAME, MODEL_VERSION, labels_with_codes
from tests.dicomout.test_sr import hand_made_measurements
from tests.support.synthetic_ct import write_ct_series

N_SLICES, ROWS, COLS = 40, 128, 128
PIXEL_MM, SLICE_MM = 3.0, 5.0
EMPTY_SLICES = (10, 11, 12)
"""No label on these slices: the BINARY SEG has no frame for them."""
SEG_TRANSFER_SYNTAXES = {
    "deflate": DeflatedExplicitVRLittleEndian,
    "JPEG2000": JPEG2000Lossless,
    "none": ExplicitVRLittleEndian,
}


@dataclass(frozen=True)
class ViewerStudy:
    """The files of the study and the truth they were built from."""

    study_uid: str
    ct_paths: tuple[Path, ...]
    volume: Volume
    segmentation: Segmentation
    seg_paths: dict[str, Path]  # by compression name (SEG_TRANSFER_SYNTAXES)
    seg_series_uids: dict[str, str]
    sr_path: Path
    pdf_path: Path

    @property
    def all_paths(self) -> list[Path]:
        return [*self.ct_paths, *self.seg_paths.values(), self.sr_path, self.pdf_path]


def _hu(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """A soft-tissue disc on air, so the image has structure but no noise."""
    return np.where(x**2 + y**2 < 170.0**2, 40.0, -1000.0)


def viewer_label_map(labels_shape: tuple[int, int, int], sartorius: int, femur: int) -> tuple[np.ndarray, np.ndarray]:
    """(label_map, side_map): a sartorius disc on the patient's right (low columns: row direction +x, LPS),
    moving down 2 rows per slice, and a femur disc on the patient's left on the upper half of the slices;
    nothing on :data:`EMPTY_SLICES` nor on the last 2 slices."""
    k, r, c = np.meshgrid(*(np.arange(n) for n in labels_shape), indexing="ij")
    label_map = np.zeros(labels_shape, np.uint8)
    side_map = np.zeros(labels_shape, np.uint8)
    right = (r - (24 + 2 * k)) ** 2 + (c - 36) ** 2 < 12**2
    left = ((r - 64) ** 2 + (c - 96) ** 2 < 8**2) & (k >= labels_shape[0] // 2)
    label_map[right], side_map[right] = sartorius, 1
    label_map[left], side_map[left] = femur, 2
    for empty in (*EMPTY_SLICES, labels_shape[0] - 2, labels_shape[0] - 1):
        label_map[empty], side_map[empty] = 0, 0
    return label_map, side_map


def _pdf_bytes() -> bytes:
    from matplotlib.backends.backend_pdf import PdfPages
    from matplotlib.figure import Figure

    buffer = io.BytesIO()
    with PdfPages(buffer) as pdf:
        figure = Figure(figsize=(8.27, 11.69))
        figure.text(0.1, 0.9, "Thigh muscle report (viewer check)")
        pdf.savefig(figure)
    return buffer.getvalue()


def build_viewer_study(out_dir: Path) -> ViewerStudy:
    """Write the study under ``out_dir`` (ct/, seg-<compression>.dcm, sr.dcm, pdf.dcm)."""
    study_uid = generate_uid()
    ct_paths = write_ct_series(
        out_dir / "ct", n_slices=N_SLICES, rows=ROWS, cols=COLS, pixel_spacing=(PIXEL_MM, PIXEL_MM),
        slice_spacing=SLICE_MM, origin=(-COLS * PIXEL_MM / 2, -ROWS * PIXEL_MM / 2, 0.0), study_uid=study_uid,
        hu=_hu, patient={"PatientID": "VIEWER01", "PatientName": "Viewer^Check"}, description="viewer check CT",
    )
    volume = load_volume(ct_paths)
    labels = labels_with_codes()
    label_map, side_map = viewer_label_map(volume.shape, labels.by_key("sartorius").id, labels.by_key("femur").id)
    segmentation = Segmentation(label_map, side_map, labels, MODEL_NAME, MODEL_VERSION, volume.affine_lps)

    seg_paths: dict[str, Path] = {}
    seg_series: dict[str, str] = {}
    seg_datasets = {}
    for number, (name, ts) in enumerate(SEG_TRANSFER_SYNTAXES.items()):
        seg = build_seg(
            volume, segmentation, ct_paths, transfer_syntax_uid=ts, series_uid=generate_uid(),
            instance_uid=generate_uid(), series_number=910 + number, series_description=f"SEG {name}",
            **EQUIPMENT,
        )
        seg_paths[name] = out_dir / f"seg-{name}.dcm"
        seg.save_as(seg_paths[name], enforce_file_format=True)
        seg_series[name] = str(seg.SeriesInstanceUID)
        seg_datasets[name] = seg

    measurements = hand_made_measurements(volume, segmentation)
    sr = build_sr(
        measurements, seg_datasets["deflate"], ct_paths, volume=volume, labels=labels,
        equipment=Equipment(**EQUIPMENT),
    )
    sr_path = out_dir / "sr.dcm"
    sr.save_as(sr_path, enforce_file_format=True)

    source = pydicom.dcmread(ct_paths[0], stop_before_pixels=True)
    pdf = build_encapsulated_pdf(
        _pdf_bytes(), source, series_uid=generate_uid(), sop_uid=generate_uid(),
        document_title="Thigh muscle report", manufacturer=EQUIPMENT["manufacturer"],
        software_version=EQUIPMENT["software_version"], content_datetime=datetime(2024, 1, 2, 10, 30),
    )
    pdf_path = out_dir / "pdf.dcm"
    pdf.save_as(pdf_path, enforce_file_format=True)
    return ViewerStudy(
        study_uid=study_uid, ct_paths=tuple(ct_paths), volume=volume, segmentation=segmentation,
        seg_paths=seg_paths, seg_series_uids=seg_series, sr_path=sr_path, pdf_path=pdf_path,
    )
