"""NIfTI image/label pairs for training and evaluation.

NIfTI stores an affine from voxel index ``(i, j, k, 1)`` to RAS+ mm; LPS is RAS with x and y
negated, so ``affine_lps = diag(-1, -1, 1, 1) @ affine_ras``. The array is returned in the
file's own axis order (any orientation: dcm2niix, 3D Slicer, our phantoms); the
preprocessing's canonical transform handles the layout.

Label values are the ids of config/labels.toml, unless the folder has a ``dataset.json``
with a ``labels`` object (nnU-Net v2: ``{"background": 0, "gluteus_maximus_left": 1, ...}``;
Medical Segmentation Decathlon: ``{"0": "background", "1": "...", ...}``): then each value is
mapped to the table by its name (key, name or SNOMED meaning; case, punctuation, side and
"muscle" words ignored, so a left and a right label both become the one sideless structure),
and a name that fits no structure is an error naming it.
"""

from __future__ import annotations

import json
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
DATASET_JSON = "dataset.json"
BACKGROUND_NAMES = ("background", "bg", "clear label", "unlabeled", "unlabelled")


class NiftiError(PipelineError, ValueError):
    """A NIfTI file or pair is unusable (message names the file, the check and the value).

    A PipelineError, so the CLI prints it as a one-line error; still a ValueError for callers."""


@dataclass(frozen=True)
class NiftiCase:
    """One training/evaluation case: a CT file and its label file."""

    name: str
    ct_path: Path
    label_path: Path
    #: The folder's dataset.json when it names the label values (see the module doc), else None.
    label_names_path: Path | None = None

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file the case's arrays come from."""
        return (self.ct_path, self.label_path) + ((self.label_names_path,) if self.label_names_path else ())


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


def read_label_names(path: Path) -> dict[int, str]:
    """Label value -> name from a dataset.json's ``labels`` (nnU-Net v2 name -> value, or MSD
    value -> name); ``{}`` when the file has no ``labels`` object (e.g. a phantom study index)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise NiftiError(f"{path} cannot be read as JSON: {exc}") from exc
    raw = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(raw, dict) or not raw:
        return {}
    out: dict[int, str] = {}
    for key, value in raw.items():
        if isinstance(value, bool) or isinstance(value, (list, dict)):
            raise NiftiError(f"{path}: label {key!r} is {value!r}; only one integer value per name is supported "
                             "(nnU-Net region labels are not)")
        if isinstance(value, int):  # nnU-Net v2: name -> value
            number, name = value, str(key)
        elif str(key).strip().lstrip("-").isdigit():  # MSD: "value" -> name
            number, name = int(str(key).strip()), str(value)
        else:
            raise NiftiError(f"{path}: labels entry {key!r}: {value!r} is neither name -> integer value "
                             "(nnU-Net v2) nor \"integer value\" -> name (Decathlon)")
        if number in out:
            raise NiftiError(f"{path}: label value {number} is given twice ({out[number]!r}, {name!r})")
        out[number] = name
    return out


def label_lookup(names: dict[int, str], labels: LabelTable, source: Path | str) -> np.ndarray:
    """Look-up table (source value -> table id, -1 for values the names do not give) of a
    dataset.json's names; NiftiError naming every name that fits no structure."""
    if min(names) < 0 or max(names) > 65535:
        raise NiftiError(f"{source}: label values must be 0..65535; saw {min(names)}..{max(names)}")
    lut = np.full(max(names) + 1, -1, dtype=np.int64)
    unmatched = []
    for value, name in sorted(names.items()):
        if name.strip().lower() in BACKGROUND_NAMES:
            lut[value] = 0
        elif (label_id := labels.id_for_name(name)) is not None:
            lut[value] = label_id
        else:
            unmatched.append(f"{value} {name!r}")
    if unmatched:
        raise NiftiError(
            f"{source}: label(s) {', '.join(unmatched[:10])} match no structure of the label table by key, name or "
            f"SNOMED meaning (keys: {', '.join(labels.keys())}); rename them in {DATASET_JSON}, or set those voxels "
            "to 0 in the label files if they are structures the model does not learn"
        )
    return lut


def load_nifti_pair(
    ct_path: Path, label_path: Path, labels: LabelTable | None = None, *, atol_mm: float = 1e-3,
    label_names_path: Path | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(hu float32, labels uint8, affine_lps 4x4)`` of a CT/label pair.

    Checks that the two share shape and affine (within ``atol_mm``) and, when ``labels``
    is given, that every label value is 0 or an id of the table. With ``label_names_path``
    (a dataset.json naming the values) the values are first mapped to the table by name.
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
        values = np.unique(lab_int)  # once per volume: the mapped values follow from these
        names = read_label_names(label_names_path) if label_names_path is not None else {}
        if names:
            lut = label_lookup(names, labels, label_names_path)
            unnamed = [int(v) for v in values if v < 0 or v >= len(lut) or lut[v] < 0]
            if unnamed:
                raise NiftiError(f"{label_path}: label values {unnamed[:10]} are not named in {label_names_path} "
                                 f"(named: {', '.join(str(v) for v in sorted(names))})")
            lab_int = lut[lab_int]
            values = np.unique(lut[values])
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

    hu, truth, affine = load_nifti_pair(case.ct_path, case.label_path, labels, label_names_path=case.label_names_path)
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
    names_file = data_dir / DATASET_JSON
    if names_file.is_file() and read_label_names(names_file):
        cases = [NiftiCase(c.name, c.ct_path, c.label_path, names_file) for c in cases]
    return cases
