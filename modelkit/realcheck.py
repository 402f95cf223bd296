"""Compare a bundle's segmentation of the real TotalSegmentator hip CT with its reference labels.

The reference (../shared/data/totalseg-hip-ct) is TotalSegmentator's own output for that CT, with ids
femur L/R 75/76, hip bone L/R 77/78, gluteus maximus L/R 80/81, medius 82/83, minimus 84/85. Our table
has no "hip bone": our `ilium` is one part of it, so its Dice against the whole hip bone is bounded
well below 1 by construction (reported, not hidden). The CT has a left hip prosthesis.

Usage: thighnode realcheck [--bundle DIR] [--data DIR]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from modelkit.nifti import RAS_TO_LPS
from pipeline.labels import LabelTable, load_label_table
from pipeline.types import SIDE_LEFT, SIDE_RIGHT, Segmentation, Volume

_REPO = Path(__file__).resolve().parents[1]
#: The repository's demonstration bundle, and the real CT with its reference labels beside the repository.
REPO_BUNDLE = _REPO / "bundles" / "thighnode_demo"
DEFAULT_DATA_DIR = _REPO.parent / "shared" / "data" / "totalseg-hip-ct"

# (our label key, side) -> TotalSegmentator v2 "total" id in the reference file
REFERENCE_IDS: dict[tuple[str, int], int] = {
    ("femur", SIDE_LEFT): 75,
    ("femur", SIDE_RIGHT): 76,
    ("ilium", SIDE_LEFT): 77,  # reference: whole hip bone
    ("ilium", SIDE_RIGHT): 78,
    ("gluteus_maximus", SIDE_LEFT): 80,
    ("gluteus_maximus", SIDE_RIGHT): 81,
    ("gluteus_medius", SIDE_LEFT): 82,
    ("gluteus_medius", SIDE_RIGHT): 83,
    ("gluteus_minimus", SIDE_LEFT): 84,
    ("gluteus_minimus", SIDE_RIGHT): 85,
}


@dataclass(frozen=True)
class RealScore:
    key: str
    side: str
    dice: float
    predicted_ml: float
    reference_ml: float


def load_reference_case(data_dir: Path) -> tuple[Volume, np.ndarray]:
    """The CT as a Volume (axes as stored, LPS affine) and the reference label array on the same grid."""
    ct = nib.load(str(data_dir / "example_ct.nii.gz"))
    ref = nib.load(str(data_dir / "example_seg_fast_force_split.nii.gz"))
    if ct.shape != ref.shape or not np.allclose(ct.affine, ref.affine, atol=1e-3):
        raise ValueError("the reference labels are not on the CT's grid")
    hu = np.asarray(ct.dataobj, dtype=np.float32)
    volume = Volume(
        hu=hu,
        affine_lps=RAS_TO_LPS @ ct.affine,
        frame_of_reference_uid="2.25.1",
        study_instance_uid="2.25.2",
        series_instance_uid="2.25.3",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uids=(),
    )
    return volume, np.asarray(ref.dataobj, dtype=np.int16)


def score_against_reference(segmentation: Segmentation, reference: np.ndarray, voxel_ml: float) -> list[RealScore]:
    scores = []
    for (key, side), ref_id in REFERENCE_IDS.items():
        label = segmentation.labels.by_key(key)
        pred = (segmentation.label_map == label.id) & (segmentation.side_map == side)
        truth = reference == ref_id
        denom = pred.sum() + truth.sum()
        dice = float(2 * (pred & truth).sum() / denom) if denom else float("nan")
        scores.append(
            RealScore(key, "left" if side == SIDE_LEFT else "right", dice,
                      float(pred.sum() * voxel_ml), float(truth.sum() * voxel_ml))
        )
    return scores


def run(bundle_dir: Path, data_dir: Path, labels: LabelTable | None = None) -> tuple[Segmentation, list[RealScore]]:
    from pipeline.bundle import load_bundle
    from pipeline.inference import Segmenter

    labels = labels or load_label_table()
    volume, reference = load_reference_case(data_dir)
    segmenter = Segmenter(load_bundle(bundle_dir, labels, device="auto"))
    segmentation = segmenter.segment(volume)
    return segmentation, score_against_reference(segmentation, reference, volume.voxel_volume_ml)


def format_scores(scores: list[RealScore]) -> str:
    """The scores as a table, with the mean Dice over the structure-sides that have one."""
    lines = [f"{'structure':<18}{'side':<7}{'Dice':>7}{'ours cm³':>11}{'reference cm³':>15}"]
    for s in scores:
        lines.append(f"{s.key:<18}{s.side:<7}{s.dice:>7.3f}{s.predicted_ml:>11.1f}{s.reference_ml:>15.1f}")
    valid = [s.dice for s in scores if s.dice == s.dice]
    lines.append(f"mean Dice over {len(valid)} structure-sides: {np.mean(valid):.3f} "
                 "(ilium vs whole hip bone is bounded below 1 by definition)")
    return "\n".join(lines)
