"""Issue 24 (a 1000-slice study within 4 GB): the slab-wise / in-place steps of the segment stage give
exactly what the whole-volume steps gave. The references below are the steps as they were before."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import ndimage

import pipeline.postprocess as postprocess
import pipeline.preprocess as preprocess
from pipeline.bundle import load_bundle, write_bundle
from pipeline.inference import Segmenter, _exclude_metal, predict_samples, scale_classes
from pipeline.labels import load_label_table
from pipeline.network import NetworkSettings, build_network
from pipeline.preprocess import PreprocessSettings, all_axis_codes, CanonicalTransform
from pipeline.types import SIDE_LEFT, SIDE_NONE, SIDE_RIGHT, Volume
from pipeline.uncertainty import UNCERTAINTY_TTA, bin_counts, quantise_entropy, summarise, voxel_entropy

torch.set_num_threads(1)
TINY = NetworkSettings(img_size=(16, 16, 16), feature_size=8, hidden_size=48, mlp_dim=96, num_heads=2)


# --------------------------------------------------------------------------- the steps as they were


def _ref_bbox(mask: np.ndarray):
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if len(hits) == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def _ref_midline(label_map, affine_lps, femur_id):
    a = np.asarray(affine_lps, dtype=np.float64)
    if femur_id is not None:
        box = _ref_bbox(label_map == femur_id)
        if box is not None:
            femur = label_map[box] == femur_id
            offset = np.array([b.start for b in box], dtype=np.float64)
            comps, count = ndimage.label(femur)
            if count >= 2:
                sizes = np.bincount(comps.ravel())
                sizes[0] = 0
                biggest = [int(i) for i in np.argsort(sizes)[::-1][:2]]
                if sizes[biggest[1]] >= 0.2 * sizes[biggest[0]]:
                    centres = ndimage.center_of_mass(femur, comps, biggest)
                    xs = [float(a[0, :3] @ (np.asarray(c) + offset) + a[0, 3]) for c in centres]
                    return 0.5 * (xs[0] + xs[1])
    box = _ref_bbox(label_map > 0)
    if box is None:
        centre = (np.asarray(label_map.shape, dtype=np.float64) - 1) / 2
        return float(a[0, :3] @ centre + a[0, 3])
    xs = [float(a[0, :3] @ np.array([ck, cr, cc], dtype=np.float64) + a[0, 3])
          for ck in (box[0].start, box[0].stop - 1) for cr in (box[1].start, box[1].stop - 1)
          for cc in (box[2].start, box[2].stop - 1)]
    return 0.5 * (min(xs) + max(xs))


def _ref_keep_largest(label_map, side_map, min_fraction=0.2):
    out = np.array(label_map, copy=True)
    for index, box in enumerate(ndimage.find_objects(label_map)):
        if box is None:
            continue
        sub_labels, sub_sides = label_map[box], side_map[box]
        for side in (SIDE_NONE, SIDE_RIGHT, SIDE_LEFT):
            mask = (sub_labels == index + 1) & (sub_sides == side)
            if not mask.any():
                continue
            comps, count = ndimage.label(mask)
            if count <= 1:
                continue
            sizes = np.bincount(comps.ravel())
            sizes[0] = 0
            out[box][mask & (sizes[comps] < min_fraction * sizes.max())] = 0
    return out


def _ref_paste(cropped, plan):
    full = np.zeros(plan.canonical.canonical_shape, dtype=np.uint8)
    full[plan.crop_slices()] = cropped
    return np.ascontiguousarray(plan.canonical.invert(full))


def _ref_predict_tta(sg: Segmenter, volume: Volume):
    image, plan = preprocess.prepare(volume.hu, volume.affine_lps, sg.bundle.preprocess_settings)
    counts, total, label_probs = [], None, None
    with torch.inference_mode():
        for i, probs in enumerate(predict_samples(sg._network, image, sg.bundle.network_settings.img_size,
                                                  sg.device, sg._uncertainty_samples, sw_batch_size=sg._sw_batch_size,
                                                  overlap=sg._overlap, mode=sg._mode)):
            scaled = probs if sg.bundle.class_weights is None else scale_classes(probs, sg.bundle.class_weights)
            labels = torch.argmax(scaled, dim=0).to(torch.uint8).numpy()
            affine = np.asarray(plan.model_affine_lps)
            counts.append(bin_counts(labels, postprocess.split_sides(labels, affine, femur_id=sg._femur_id),
                                     len(sg.bundle.labels.labels)))
            total = probs.clone() if total is None else total.add_(probs)
            if i == 0:
                label_probs = probs
            elif i == 1 and sg._mirror:
                label_probs += probs
                label_probs *= 0.5
        total /= float(len(counts))
        entropy = voxel_entropy(total)
    return label_probs, plan, entropy, counts


def _ref_segment(segmenter: Segmenter, volume: Volume):
    """Segmenter.segment with uncertainty as it ran before issue 24's memory work."""
    femur_id = segmenter._femur_id
    probs, plan, entropy, counts = _ref_predict_tta(segmenter, volume)
    probs = scale_classes(probs, segmenter.bundle.class_weights) if segmenter.bundle.class_weights is not None else probs
    label_map = preprocess.restore_probabilities(probs, plan, slab_budget_bytes=1 << 40)
    _exclude_metal(label_map, volume.hu, 2000.0)
    side_map = postprocess.split_sides(label_map, volume.affine_lps, _ref_midline(label_map, volume.affine_lps, femur_id))
    label_map = _ref_keep_largest(label_map, side_map)
    side_map = np.where(label_map > 0, side_map, 0).astype(np.uint8)
    entropy_u8 = _ref_paste(preprocess.resample_labels(quantise_entropy(entropy), plan.crop_shape), plan)
    structures = summarise(entropy_u8, label_map, side_map, counts, len(segmenter.bundle.labels.labels),
                           method=UNCERTAINTY_TTA, thresholds=segmenter.uncertainty_thresholds,
                           entropy_scale=1.0 / 255.0)
    return label_map, side_map, entropy_u8, structures


# --------------------------------------------------------------------------- tests


def _label_volume(seed: int, shape=(30, 18, 22)) -> np.ndarray:
    """Blobs of a few labels with islands of every size, on both sides."""
    rng = np.random.default_rng(seed)
    field = ndimage.uniform_filter(rng.normal(size=(4,) + shape), size=(1, 3, 3, 3))
    labels = (np.argmax(field, axis=0) + 1).astype(np.uint8)
    labels[field.max(axis=0) < 0.15] = 0
    return labels


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("slab", [1, 3, 64])
def test_keep_largest_components_slab_wise_and_in_place_equal_the_whole_box_step(seed: int, slab: int) -> None:
    lab = _label_volume(seed)
    side = postprocess.split_sides(lab, np.diag([1.0, 1.0, 1.0, 1.0]), midline_x_mm=10.5)
    ref = _ref_keep_largest(lab, side)
    assert not np.array_equal(ref, lab)  # islands were dropped: the case is not trivial
    before = lab.copy()
    assert np.array_equal(postprocess.keep_largest_components(lab, side, slab=slab), ref)
    assert np.array_equal(lab, before)  # a new array by default
    out = postprocess.keep_largest_components(lab, side, slab=slab, out=lab)
    assert out is lab and np.array_equal(lab, ref)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("femur_id", [None, 1, 3, 9])
def test_midline_from_find_objects_equals_the_mask_boxes(seed: int, femur_id) -> None:
    lab = _label_volume(seed)
    lab[:, :, 9:12] = 0  # two femur-like parts
    affine = np.array([[0, 0.5, 0.7, 3.0], [0, 0.9, 0, 1], [2.0, 0, 0, -4], [0, 0, 0, 1]])
    assert postprocess.find_midline_x_mm(lab, affine, femur_id) == _ref_midline(lab, affine, femur_id)
    empty = np.zeros((3, 4, 5), np.uint8)
    assert postprocess.find_midline_x_mm(empty, affine, femur_id) == _ref_midline(empty, affine, femur_id)


@pytest.mark.parametrize("perm,flips", all_axis_codes())
def test_paste_into_the_original_grid_equals_paste_then_transpose(perm, flips) -> None:
    shape = (5, 6, 7)
    canonical = CanonicalTransform(perm, flips, shape)
    can_shape = canonical.canonical_shape
    plan = preprocess.PreprocessPlan(shape, tuple(map(tuple, np.eye(4))), canonical, (1, 0, 2),
                                     (can_shape[0], can_shape[1] - 1, can_shape[2] - 1), (2, 2, 2),
                                     tuple(map(tuple, np.eye(4))), PreprocessSettings())
    cropped = np.random.default_rng(1).integers(1, 200, size=plan.crop_shape, dtype=np.uint8)
    got = preprocess._paste(cropped, plan)
    assert got.flags.c_contiguous and np.array_equal(got, _ref_paste(cropped, plan))


def test_restore_probabilities_in_several_slabs_equals_one_slab() -> None:
    rng = np.random.default_rng(3)
    plan = preprocess.plan_preprocessing(np.zeros((23, 17, 19), np.float32), np.diag([-1.3, 1.1, 0.9, 1.0]),
                                         PreprocessSettings(spacing_mm=(4.0, 3.0, 3.5)))
    scores = torch.from_numpy(ndimage.uniform_filter(rng.random((5,) + plan.model_shape), size=(1, 2, 2, 2))
                              .astype(np.float32))
    one = preprocess.restore_probabilities(scores, plan, slab_budget_bytes=1 << 40)
    many = preprocess.restore_probabilities(scores, plan, slab_budget_bytes=600)
    assert np.array_equal(one, many) and len(np.unique(one)) > 2


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    labels = load_label_table()
    torch.manual_seed(0)
    net = build_network(TINY, labels.num_classes)
    path = write_bundle(tmp_path_factory.mktemp("b") / "tiny", net, TINY, PreprocessSettings(spacing_mm=(4, 4, 4)),
                        labels, {"name": "tiny", "version": "0.0.1"})
    return load_bundle(path, labels, "cpu")


@pytest.mark.parametrize("mirror,samples", [(False, 2), (True, 3)])
@pytest.mark.parametrize("affine", [
    np.array([[0, 0, 2.0, -30], [0, 2.0, 0, -20], [3.0, 0, 0, 10], [0, 0, 0, 1]]),  # HFS
    np.array([[0, 0, -2.0, 30], [0, 2.0, 0, -20], [-3.0, 0, 0, 10], [0, 0, 0, 1]]),  # FFS, slices descending
    np.array([[0, 2.0, 0, -30], [3.0, 0, 0, -20], [0, 0, -2.0, 10], [0, 0, 0, 1]]),  # sagittal-like axes
])
def test_segment_with_small_slabs_equals_the_whole_volume_steps(bundle, affine, mirror, samples, monkeypatch) -> None:
    shape = (26, 24, 28)
    k, r, c = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    rng = np.random.default_rng(0)
    hu = np.where(((r - 12) / 10) ** 2 + ((c - 14) / 12) ** 2 < 1, 40.0 + 60 * rng.random(shape), -1000.0)
    hu[2, 1, 1] = hu[20, 22, 26] = 100.0  # specks outside the body: not the largest component
    hu[10:14, 10:13, 8:12] = 400.0
    volume = Volume(hu=hu.astype(np.float32), affine_lps=affine, frame_of_reference_uid="1.2",
                    study_instance_uid="1.3", series_instance_uid="1.4",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uids=())
    weights = tuple(0.8 + 0.4 * np.random.default_rng(5).random(bundle.labels.num_classes))  # volume calibration
    segmenter = Segmenter(dataclasses.replace(bundle, class_weights=weights), device="cpu", num_threads=1,
                          uncertainty="tta", uncertainty_samples=samples, mirror=mirror)
    monkeypatch.setattr(preprocess, "BODY_SLAB_VOXELS", 1)  # the default of foreground_bbox is bound already
    real_bbox = preprocess.foreground_bbox
    monkeypatch.setattr(preprocess, "foreground_bbox", lambda *a, **kw: real_bbox(*a, **kw, slab_voxels=2 * 24 * 28))
    real_keep = postprocess.keep_largest_components
    import pipeline.inference as inference

    monkeypatch.setattr(inference, "keep_largest_components", lambda *a, **kw: real_keep(*a, **kw, slab=2))
    seg = segmenter.segment(volume)
    monkeypatch.undo()
    ref_labels, ref_sides, ref_entropy, ref_structures = _ref_segment(segmenter, volume)
    assert len(np.unique(ref_labels)) > 2
    assert np.array_equal(seg.label_map, ref_labels)
    assert np.array_equal(seg.side_map, ref_sides)
    assert np.array_equal(seg.uncertainty.entropy_map_u8, ref_entropy)
    assert dict(seg.uncertainty.structures) == ref_structures
    mask = preprocess.body_mask(preprocess.canonical_transform(shape, affine).apply(volume.hu), -500.0)
    plan = preprocess.plan_preprocessing(volume.hu, affine, segmenter.bundle.preprocess_settings)
    spacing = [float(np.linalg.norm(plan.canonical.apply_affine(affine)[:3, i])) for i in range(3)]
    box = _ref_bbox(mask)
    for axis in range(3):
        margin = int(np.ceil(10.0 / spacing[axis]))
        assert plan.crop_start[axis] == max(0, box[axis].start - margin)
        assert plan.crop_stop[axis] == min(mask.shape[axis], box[axis].stop + margin)


def _ref_femur_reach_mm(segmentation, z_axis, bottom_index, affine_lps):
    reach = {"right": 0.0, "left": 0.0}
    femur = segmentation.label_map == segmentation.labels.by_key("femur").id
    other_axes = tuple(a for a in range(femur.ndim) if a != z_axis)
    step_mm = abs(float(affine_lps[2, z_axis]))
    for side, code in (("right", SIDE_RIGHT), ("left", SIDE_LEFT)):
        indices = np.flatnonzero((femur & (segmentation.side_map == code)).any(axis=other_axes))
        if indices.size:
            reach[side] = float(np.abs(indices - bottom_index).max() * step_mm)
    return reach


@pytest.mark.parametrize("z_axis", [0, 1, 2])
@pytest.mark.parametrize("seed", range(3))
def test_femur_reach_and_segmented_regions_slab_wise_equal_the_whole_map(z_axis: int, seed: int) -> None:
    from pipeline.coverage import regions_from_segmentation
    from pipeline.groups import femur_reach_mm
    from pipeline.types import Segmentation

    table = load_label_table()
    shape = [12, 14, 13]
    shape[z_axis] = 41  # slabs of 16 and a remainder along z
    rng = np.random.default_rng(seed)
    lab = rng.choice(np.array([0, table.by_key("femur").id, table.by_key("vastus_lateralis").id,
                               table.by_key("gluteus_maximus").id], np.uint8), size=shape, p=[0.7, 0.02, 0.2, 0.08])
    side = np.where(lab > 0, rng.choice(np.array([SIDE_RIGHT, SIDE_LEFT], np.uint8), size=shape), 0).astype(np.uint8)
    affine = np.eye(4)[[2, 1, 0, 3]] if z_axis == 0 else np.eye(4)[[0, 2, 1, 3]] if z_axis == 1 else np.eye(4)
    affine[:3, :3] *= 1.5
    seg = Segmentation(lab, side, table, "unit", "0", affine_lps=affine)
    for bottom in (0, 40):
        got = femur_reach_mm(seg, z_axis, bottom, affine)
        assert got == _ref_femur_reach_mm(seg, z_axis, bottom, affine) and got["right"] > 0
    for voxel_ml in (0.002, 0.01, 0.25):
        assert regions_from_segmentation(seg, voxel_ml) == _ref_regions(seg, voxel_ml)
    assert _ref_regions(seg, 0.25)  # not an empty answer


def _ref_regions(segmentation, voxel_ml):
    """pipeline.coverage.regions_from_segmentation as it was (one bincount of the whole map)."""
    from pipeline.coverage import MIN_SEGMENTED_ML, SEGMENTATION_REGIONS

    labels = segmentation.label_map
    axis = int(np.argmax(np.abs(segmentation.affine_lps[2, :3])))
    counts = np.bincount(labels.ravel(), minlength=segmentation.labels.num_classes)
    first = np.bincount(np.take(labels, 0, axis=axis).ravel(), minlength=counts.size)
    last = np.bincount(np.take(labels, -1, axis=axis).ravel(), minlength=counts.size)
    found = []
    for region, groups in SEGMENTATION_REGIONS:
        ids = [label.id for label in segmentation.labels.labels if label.group in groups]
        if not ids or counts[ids].sum() * voxel_ml < MIN_SEGMENTED_ML:
            continue
        found.append(f"{region} (cut)" if bool(first[ids].sum() or last[ids].sum()) else region)
    return tuple(found)
