"""Post-processing: side split at the midline, largest component per structure and side."""

from __future__ import annotations

import numpy as np

from pipeline.postprocess import find_midline_x_mm, keep_largest_components, split_sides
from pipeline.types import SIDE_LEFT, SIDE_NONE, SIDE_RIGHT

# canonical-like layout: axis 2 runs toward +x (patient left), 2 mm voxels, x0 = -40 mm
AFFINE = np.array([[0, 0, 2.0, -40.0], [0, 2.0, 0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1]])


def test_split_sides_by_x() -> None:
    lab = np.zeros((4, 4, 40), np.uint8)
    lab[:, :, 5:15] = 3
    lab[:, :, 25:35] = 3
    side = split_sides(lab, AFFINE, midline_x_mm=0.0)  # x = 0 at column 20
    assert np.all(side[:, :, 5:15] == SIDE_RIGHT)
    assert np.all(side[:, :, 25:35] == SIDE_LEFT)
    assert np.all(side[lab == 0] == SIDE_NONE)


def test_midline_from_femora_and_flipped_axis() -> None:
    lab = np.zeros((6, 6, 40), np.uint8)
    lab[1:5, 1:5, 4:8] = 28  # right femur, centre column 5.5
    lab[1:5, 1:5, 30:34] = 28  # left femur, centre column 31.5
    lab[1:5, 1:5, 0:2] = 3  # asymmetric muscle: body centre would differ
    assert find_midline_x_mm(lab, AFFINE, femur_id=28) == (5.5 + 31.5) / 2 * 2.0 - 40.0
    flipped = AFFINE.copy()
    flipped[:3, 2] *= -1  # columns toward patient right
    side = split_sides(lab, flipped, femur_id=28)
    assert np.all(side[1:5, 1:5, 4:8] == SIDE_LEFT) and np.all(side[1:5, 1:5, 30:34] == SIDE_RIGHT)


def test_keep_largest_components_per_structure_and_side() -> None:
    lab = np.zeros((10, 10, 40), np.uint8)
    lab[2:8, 2:8, 4:10] = 5  # right, big
    lab[0, 0, 0] = 5  # right, stray voxel
    lab[2:8, 2:8, 28:34] = 5  # left, big (kept: own side)
    lab[9, 9, 39] = 5  # left, stray
    lab[2:4, 2:4, 12:14] = 7  # another structure, one component
    side = split_sides(lab, AFFINE, midline_x_mm=0.0)
    before = lab.copy()
    out = keep_largest_components(lab, side)
    assert np.array_equal(lab, before)  # input untouched
    assert out[0, 0, 0] == 0 and out[9, 9, 39] == 0
    assert np.all(out[2:8, 2:8, 4:10] == 5) and np.all(out[2:8, 2:8, 28:34] == 5)
    assert np.all(out[2:4, 2:4, 12:14] == 7)


def test_a_structure_in_two_comparable_parts_keeps_both() -> None:
    """Islands are dropped, not a second large part (a muscle seen in two parts, e.g. across a gap)."""
    lab = np.zeros((20, 10, 20), np.uint8)
    lab[0:6, 2:8, 2:8] = 9  # lower part, 216 voxels
    lab[10:15, 2:8, 2:8] = 9  # upper part, 180 voxels (83 % of the largest)
    lab[18, 0, 0] = 9  # island
    lab[17:19, 8:10, 8:10] = 9  # island of 8 voxels (4 % of the largest)
    side = split_sides(lab, AFFINE, midline_x_mm=100.0)  # all on one side
    out = keep_largest_components(lab, side)
    assert np.all(out[0:6, 2:8, 2:8] == 9) and np.all(out[10:15, 2:8, 2:8] == 9)
    assert out[18, 0, 0] == 0 and np.all(out[17:19, 8:10, 8:10] == 0)
    only_largest = keep_largest_components(lab, side, min_fraction=1.0)
    assert np.all(only_largest[10:15, 2:8, 2:8] == 0)
