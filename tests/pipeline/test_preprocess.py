"""Preprocessing: canonical orientation, window/gamma, foreground crop, prepare/restore round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.preprocess import (
    PreprocessSettings,
    all_axis_codes,
    apply_to_labels,
    canonical_transform,
    foreground_bbox,
    prepare,
    restore_labels,
    restore_probabilities,
    restore_probabilities_dense,
    uniform_cells,
    window_gamma,
)

torch.set_num_threads(1)


def _oriented_affine(perm: tuple[int, int, int], flips: tuple[bool, bool, bool], spacing=(2.0, 0.8, 0.9)) -> np.ndarray:
    """An affine whose array axis j runs along world axis perm[j] (negated when flipped)."""
    a = np.eye(4)
    for j, world in enumerate(perm):
        a[world, j] = (-1.0 if flips[j] else 1.0) * spacing[j]
    a[:3, 3] = (12.5, -30.0, 101.0)
    return a


def _phantom(shape=(30, 48, 48)) -> tuple[np.ndarray, np.ndarray]:
    """Body (fat) with an ellipsoid (muscle, label 3) off centre; HU with noise."""
    k, r, c = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    body = ((k - 15) / 14) ** 2 + ((r - 24) / 23) ** 2 + ((c - 24) / 23) ** 2 < 1
    obj = ((k - 14) / 9) ** 2 + ((r - 23) / 17) ** 2 + ((c - 25) / 16) ** 2 < 1
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[body] = -100.0
    hu[obj] = 50.0
    hu += np.random.default_rng(0).normal(0, 5, shape).astype(np.float32)
    return hu, (obj * 3).astype(np.uint8)


def test_canonical_round_trip_all_48_orientations() -> None:
    rng = np.random.default_rng(1)
    array = rng.normal(size=(5, 6, 7)).astype(np.float32)
    codes = all_axis_codes()
    assert len(codes) == 48
    for perm, flips in codes:
        affine = _oriented_affine(perm, flips)
        t = canonical_transform(array.shape, affine)
        can = t.apply(array)
        assert np.array_equal(t.invert(can), array), (perm, flips)
        can_affine = t.apply_affine(affine)
        # canonical axes run +z, +y, +x with positive steps
        assert can_affine[2, 0] > 0 and can_affine[1, 1] > 0 and can_affine[0, 2] > 0, (perm, flips, can_affine)
        # every voxel keeps its world position
        idx = np.array([[1, 2, 3], [4, 5, 6], [0, 0, 0]])
        for i in idx:
            world = affine @ np.r_[i, 1.0]
            ci = np.linalg.solve(can_affine, world)[:3]
            ci_r = np.round(ci).astype(int)
            assert np.allclose(ci, ci_r, atol=1e-9)
            assert can[tuple(ci_r)] == array[tuple(i)]


def test_canonical_keeps_leading_channel_axis() -> None:
    t = canonical_transform((4, 5, 6), _oriented_affine((1, 0, 2), (True, False, True)))
    stack = np.arange(2 * 4 * 5 * 6).reshape(2, 4, 5, 6)
    assert np.array_equal(t.invert(t.apply(stack)), stack)
    assert t.apply(stack).shape[0] == 2


def test_window_gamma_values() -> None:
    hu = np.array([-1000.0, -57.0, 53.5, 164.0, 3000.0], dtype=np.float32)
    out = window_gamma(hu)
    assert out.dtype == np.float32
    assert out[0] == 0.0 and out[1] == 0.0
    assert out[3] == pytest.approx(1.0) and out[4] == pytest.approx(1.0)
    assert out[2] == pytest.approx(0.25, abs=1e-6)  # middle of the window, squared
    assert window_gamma(np.array([53.5], np.float32), gamma=1.0)[0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="hi > lo"):
        window_gamma(hu, lo=10, hi=10)


def test_foreground_bbox_takes_largest_component_with_margin() -> None:
    hu = np.full((20, 30, 40), -1000.0, dtype=np.float32)
    hu[5:15, 10:20, 10:30] = 0.0  # body
    hu[0:2, 0:2, 0:2] = 0.0  # small speck (e.g. table), not the largest component
    start, stop = foreground_bbox(hu, (2.0, 1.0, 1.0), margin_mm=4.0)
    assert start == (3, 6, 6)
    assert stop == (17, 24, 34)
    empty_start, empty_stop = foreground_bbox(np.full((4, 5, 6), -1000.0), (1, 1, 1))
    assert empty_start == (0, 0, 0) and empty_stop == (4, 5, 6)


@pytest.mark.parametrize("perm,flips", [((0, 1, 2), (False, False, False)), ((2, 0, 1), (True, False, True)),
                                        ((1, 2, 0), (False, True, True))])
def test_prepare_restore_round_trip(perm, flips) -> None:
    hu, lab = _phantom()
    t_hu = np.ascontiguousarray(np.transpose(hu, perm))
    t_lab = np.ascontiguousarray(np.transpose(lab, perm))
    spacing = tuple((2.0, 0.8, 0.9)[p] for p in perm)
    affine = np.eye(4)
    for j in range(3):
        affine[j, j] = spacing[j] * (-1 if flips[j] else 1)
    settings = PreprocessSettings(spacing_mm=(2.0, 2.0, 2.0), foreground_margin_mm=3.0)
    image, plan = prepare(t_hu, affine, settings)
    assert image.shape == (1,) + plan.model_shape and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert np.allclose(plan.model_spacing_mm, 2.0, atol=0.2)
    model_labels = apply_to_labels(t_lab, plan)
    onehot = np.stack([(model_labels == i).astype(np.float32) for i in range(4)])
    restored = restore_probabilities(onehot, plan, slab_budget_bytes=4096)  # force many slabs
    assert restored.shape == t_lab.shape and restored.dtype == np.uint8
    dice = 2 * np.sum((restored == 3) & (t_lab == 3)) / (np.sum(restored == 3) + np.sum(t_lab == 3))
    assert dice >= 0.95
    nearest = restore_labels(model_labels, plan)
    assert nearest.shape == t_lab.shape
    # every model voxel maps back to where it came from: the model affine agrees with the original
    model_affine = np.asarray(plan.model_affine_lps)
    centre_model = np.linalg.solve(model_affine, affine @ np.r_[np.argwhere(t_lab == 3).mean(0), 1.0])[:3]
    assert model_labels[tuple(np.round(centre_model).astype(int))] == 3


def test_restore_rejects_wrong_shape() -> None:
    hu, _ = _phantom()
    _, plan = prepare(hu, np.diag([2.0, 1.0, 1.0, 1.0]), PreprocessSettings(spacing_mm=(3, 3, 3)))
    with pytest.raises(ValueError, match="not \\(C"):
        restore_probabilities(np.zeros((2, 3, 3, 3), np.float32), plan)


def _smooth_scores(shape: tuple[int, int, int], classes: int, seed: int) -> np.ndarray:
    """Softmax of smooth random fields: structures of a few voxels, continuous scores (no ties)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand((1, classes) + tuple(max(2, n // 4) for n in shape), generator=g)
    fields = torch.nn.functional.interpolate(low, size=shape, mode="trilinear", align_corners=False)[0]
    return torch.softmax(fields * 30.0, dim=0).numpy()


@pytest.mark.parametrize("perm,flips,model_mm", [
    ((0, 1, 2), (False, False, False), (2.0, 2.0, 2.0)),  # upsampled on every axis
    ((2, 0, 1), (True, False, True), (3.0, 1.6, 0.6)),  # downsampled along one axis
    ((1, 2, 0), (False, True, True), (1.0, 2.4, 1.8)),
])
def test_restore_probabilities_gives_the_dense_restore_labels(perm, flips, model_mm) -> None:
    hu, _ = _phantom()
    t_hu = np.ascontiguousarray(np.transpose(hu, perm))
    affine = np.eye(4)
    for j in range(3):
        affine[j, j] = (2.0, 0.8, 0.9)[perm[j]] * (-1 if flips[j] else 1)
    _, plan = prepare(t_hu, affine, PreprocessSettings(spacing_mm=model_mm, foreground_margin_mm=3.0))
    scores = _smooth_scores(plan.model_shape, 6, seed=sum(perm))
    dense = restore_probabilities_dense(scores, plan)
    fast = restore_probabilities(scores, plan, slab_budget_bytes=64 * 1024)  # many slabs and chunks
    assert fast.shape == dense.shape == t_hu.shape and fast.dtype == np.uint8
    assert np.array_equal(fast, dense), f"{np.count_nonzero(fast != dense)} of {fast.size} voxels differ"
    # the interpolation matters here: nearest-neighbour labels differ from it on many voxels
    nearest = restore_labels(np.argmax(scores, axis=0).astype(np.uint8), plan)
    assert np.count_nonzero(nearest != dense) > 0.001 * dense.size


def test_uniform_cells_marks_cells_whose_8_corners_share_a_label() -> None:
    labels = np.zeros((3, 4, 5), dtype=np.uint8)
    labels[2, 3, 4] = 1  # the far corner: only the cells touching it are mixed
    cells = uniform_cells(labels)
    mixed = {tuple(int(v) for v in i) for i in np.argwhere(~cells)}
    assert mixed == {(1, 2, 3), (1, 2, 4), (1, 3, 3), (1, 3, 4), (2, 2, 3), (2, 2, 4), (2, 3, 3)}


def test_settings_validation() -> None:
    with pytest.raises(ValueError, match="spacing_mm"):
        PreprocessSettings(spacing_mm=(1.0, 0.0, 1.0))
    s = PreprocessSettings(spacing_mm=(3, 3, 3))
    assert PreprocessSettings.from_dict(s.to_dict()) == s


def _mask_bbox(mask: np.ndarray):
    """The box the whole-volume labelling gave (the reference for the slab-wise body_bbox)."""
    if not mask.any():
        return None
    start, stop = [], []
    for axis in range(3):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        start.append(int(hits[0]))
        stop.append(int(hits[-1]) + 1)
    return tuple(start), tuple(stop)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("slab_slices", [1, 2, 3, 7, 100])
def test_body_bbox_slab_wise_equals_whole_volume_labelling(seed: int, slab_slices: int) -> None:
    from pipeline.preprocess import body_bbox, body_mask

    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(5, 25)), int(rng.integers(4, 12)), int(rng.integers(4, 12)))
    # smoothed noise: blobs of many sizes, some spanning several slabs, some joined only across a border
    noise = rng.normal(size=shape)
    from scipy import ndimage

    hu = (ndimage.uniform_filter(noise, size=3) * 3000.0 - 800.0).astype(np.float32)
    got = body_bbox(hu, -500.0, slab_voxels=slab_slices * shape[1] * shape[2])
    assert got == _mask_bbox(body_mask(hu, -500.0))


@pytest.mark.parametrize("slab_slices", [1, 2, 4, 50])
def test_body_bbox_ties_go_to_the_first_component_in_c_order(slab_slices: int) -> None:
    from pipeline.preprocess import body_bbox, body_mask

    hu = np.full((12, 6, 6), -1000.0, dtype=np.float32)
    hu[8:11, 0:2, 0:2] = 0.0  # 12 voxels, later slices
    hu[1:4, 4:6, 4:6] = 0.0  # 12 voxels, first in C order: the winner of a tie
    hu[5, 0, 5] = 0.0  # a speck
    # a U joined only through a later slab: two pieces in the first slabs, one component
    hu[4:7, 3, 0] = 0.0
    hu[4:7, 3, 2] = 0.0
    hu[6, 3, 1] = 0.0  # 7 voxels
    ref = _mask_bbox(body_mask(hu, -500.0))
    assert body_bbox(hu, -500.0, slab_voxels=slab_slices * 36) == ref == ((1, 4, 4), (4, 6, 6))
    hu[6, 2, 0:3] = 0.0  # the U grows to 10 voxels; then 13 > 12: it wins
    hu[6, 1, 0:3] = 0.0
    ref = _mask_bbox(body_mask(hu, -500.0))
    assert body_bbox(hu, -500.0, slab_voxels=slab_slices * 36) == ref == ((4, 1, 0), (7, 4, 3))
    assert body_bbox(np.full((3, 4, 5), -1000.0), -500.0) is None
