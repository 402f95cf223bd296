"""NIfTI image/label pairs for training and evaluation.

NIfTI stores an affine from voxel index ``(i, j, k, 1)`` to RAS+ mm; LPS is RAS with x and y
negated, so ``affine_lps = diag(-1, -1, 1, 1) @ affine_ras``. The array is returned in the
file's own axis order (any orientation: dcm2niix, 3D Slicer, our phantoms); the
preprocessing's canonical transform handles the layout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.labels import LabelTable

logger = logging.getLogger(__name__)

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
CT_SUFFIX = "_ct.nii.gz"
LABEL_SUFFIX = "_label.nii.gz"


class NiftiError(PipelineError, ValueError):
    """A NIfTI file or pair is unusable (message names the file, the check and the value).

    A PipelineError, so the CLI prints it as a one-line error; still a ValueError for callers."""


@dataclass(frozen=True)
class NiftiCase:
    """One training/evaluation case: a CT file and its label file."""

    name: str
    ct_path: Path
    label_path: Path


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except FileNotFoundError as exc:
        raise NiftiError(f"NIfTI file {path} does not exist") from exc
    except Exception as exc:  # nibabel raises various errors on bad files
        raise NiftiError(f"{path} is not a readable NIfTI file: {exc}") from exc
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise NiftiError(f"{path}: array must be 3-D; shape is {data.shape}")
    return data, RAS_TO_LPS @ np.asarray(img.affine, dtype=np.float64)


def load_nifti_pair(
    ct_path: Path, label_path: Path, labels: LabelTable | None = None, *, atol_mm: float = 1e-3
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(hu float32, labels uint8, affine_lps 4x4)`` of a CT/label pair.

    Checks that the two share shape and affine (within ``atol_mm``) and, when ``labels``
    is given, that every label value is 0 or an id of the table.
    """
    ct_path, label_path = Path(ct_path), Path(label_path)
    hu, affine = _load(ct_path)
    lab, lab_affine = _load(label_path)
    if hu.shape != lab.shape:
        raise NiftiError(f"{label_path}: shape {lab.shape} differs from the CT {ct_path} shape {hu.shape}")
    if not np.allclose(affine, lab_affine, atol=atol_mm):
        raise NiftiError(
            f"{label_path}: affine differs from the CT {ct_path} affine by up to "
            f"{np.abs(affine - lab_affine).max():.4g} mm (allowed {atol_mm} mm)"
        )
    if not np.all(np.isfinite(lab)) or np.any(np.asarray(lab) != np.round(lab)):
        raise NiftiError(f"{label_path}: label values must be integers")
    lab_int = np.asarray(lab).astype(np.int64)
    if labels is not None:
        values = np.unique(lab_int)
        bad = [int(v) for v in values if v < 0 or v > len(labels.labels)]
        if bad:
            raise NiftiError(
                f"{label_path}: label values {bad[:10]} are not in the label table (allowed 0..{len(labels.labels)})"
            )
    elif lab_int.min() < 0 or lab_int.max() > 255:
        raise NiftiError(f"{label_path}: label values span {lab_int.min()}..{lab_int.max()}; allowed 0..255")
    return np.asarray(hu, dtype=np.float32), lab_int.astype(np.uint8), affine


def load_nifti_case(case: NiftiCase, labels: LabelTable):  # -> tuple[pipeline.types.Volume, np.ndarray]
    """A labelled case as the Volume the Segmenter takes (LPS affine, the case name as its series,
    no DICOM identifiers) and its label map on the same grid."""
    from pipeline.types import Volume

    hu, truth, affine = load_nifti_pair(case.ct_path, case.label_path, labels)
    volume = Volume(hu=hu, affine_lps=affine, frame_of_reference_uid="", study_instance_uid="",
                    series_instance_uid=case.name, sop_class_uid="", sop_instance_uids=())
    return volume, truth


def data_folders(data_dir) -> list[Path]:
    """``data_dir`` as a list of folders: one folder (str or Path) or several, in order, each once."""
    if isinstance(data_dir, (str, Path)):
        return [Path(data_dir)]
    return list(dict.fromkeys(Path(d) for d in data_dir))


def list_nifti_cases(data_dir: Path) -> list[NiftiCase]:
    """The pairs of a folder: ``<name>_ct.nii.gz`` + ``<name>_label.nii.gz`` (in the folder or in
    one sub-folder per case), or
    ``imagesTr/<name>.nii.gz`` (also ``<name>_0000.nii.gz``) + ``labelsTr/<name>.nii.gz``.
    Sorted by name; a CT without its label is an error."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise NiftiError(f"data folder {data_dir} does not exist")
    cases: list[NiftiCase] = []
    images, labels_dir = data_dir / "imagesTr", data_dir / "labelsTr"
    if images.is_dir() and labels_dir.is_dir():
        for ct in sorted(images.glob("*.nii*")):
            name = ct.name.split(".nii")[0]
            base = name[:-5] if name.endswith("_0000") else name
            ext = ct.name[len(name):]
            label = labels_dir / f"{base}{ext}"
            if not label.is_file():
                raise NiftiError(f"{ct}: no label file {label}")
            cases.append(NiftiCase(base, ct, label))
    else:
        found = sorted(data_dir.glob(f"*{CT_SUFFIX}")) or sorted(data_dir.glob(f"*/*{CT_SUFFIX}"))
        for ct in found:  # a flat folder, or one folder per case (as `thighnode phantom` writes)
            base = ct.name[: -len(CT_SUFFIX)]
            label = ct.parent / f"{base}{LABEL_SUFFIX}"
            if not label.is_file():
                raise NiftiError(f"{ct}: no label file {label}")
            cases.append(NiftiCase(base, ct, label))
    if not cases:
        raise NiftiError(
            f"{data_dir} holds no NIfTI pairs (looked for *{CT_SUFFIX} + *{LABEL_SUFFIX}, or imagesTr/ + labelsTr/)"
        )
    return cases
