"""The SynthSeg-style contrast augmentation (modelkit.augment) and its training settings."""

from __future__ import annotations

import numpy as np
import pytest

from modelkit.augment import RandTissueContrastd, TissueContrastSettings
from modelkit.train_settings import TrainSettings
from pipeline.preprocess import window_gamma

WINDOW = (-57.0, 164.0)


def _patch() -> tuple[np.ndarray, np.ndarray]:
    """Two structures of the same 50 HU side by side on fat; soft labels as 0/255 uint8."""
    hu = np.full((16, 16, 16), -100.0, dtype=np.float32)
    soft = np.zeros((3, 16, 16, 16), dtype=np.uint8)
    hu[4:12, 2:8, 4:12] = 50.0
    hu[4:12, 8:14, 4:12] = 50.0
    soft[1, 4:12, 2:8, 4:12] = 255
    soft[2, 4:12, 8:14, 4:12] = 255
    soft[0] = 255 - soft[1] - soft[2]
    return window_gamma(hu, *WINDOW, 2.0)[None], soft


def _transform(**kw) -> RandTissueContrastd:
    t = RandTissueContrastd("image", "soft", TissueContrastSettings(**{"prob": 1.0, **kw}), WINDOW, 2.0)
    t.set_random_state(seed=7)
    return t


def test_zero_strength_gives_the_image_back() -> None:
    image, soft = _patch()
    t = _transform(structure_sd_hu=0, global_sd_hu=0, contrast_fraction=0, bias_hu=0, blur_max_vox=0)
    out = t({"image": image, "soft": soft})["image"]
    np.testing.assert_allclose(out, image, atol=1e-5)


def test_structures_of_equal_hu_come_out_different_and_in_range() -> None:
    image, soft = _patch()
    t = _transform(structure_sd_hu=15, global_sd_hu=0, contrast_fraction=0, bias_hu=0, blur_max_vox=0)
    out = np.asarray(t({"image": image, "soft": soft})["image"])
    a, b = out[0][soft[1] == 255], out[0][soft[2] == 255]
    assert a.std() < 1e-5 and b.std() < 1e-5  # each structure stays homogeneous
    assert abs(float(a.mean()) - float(b.mean())) > 1e-3
    assert out.min() >= 0.0 and out.max() <= 1.0 and out.dtype == np.float32


def test_same_seed_same_patch_and_prob_zero_is_identity() -> None:
    image, soft = _patch()
    first = np.asarray(_transform()({"image": image, "soft": soft})["image"])
    second = np.asarray(_transform()({"image": image, "soft": soft})["image"])
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(first, image)
    off = _transform(structure_sd_hu=15)
    off.prob = 0.0
    np.testing.assert_array_equal(np.asarray(off({"image": image, "soft": soft})["image"]), image)


def test_settings_reject_bad_values_naming_the_key(tmp_path) -> None:
    base = {"data_dirs": [str(tmp_path)], "output_bundle": str(tmp_path / "b"), "checkpoint_dir": str(tmp_path / "c")}
    with pytest.raises(ValueError, match="blur_max_vox"):
        TrainSettings.from_dict({**base, "contrast_blur_max_vox": -1})
    with pytest.raises(ValueError, match="prob"):
        TrainSettings.from_dict({**base, "contrast_prob": 2})
    assert TrainSettings.from_dict({**base, "contrast_prob": 0.5}).tissue_contrast().prob == 0.5


def test_build_transforms_puts_it_in_the_chain(tmp_path) -> None:
    from modelkit.training import build_transforms

    base = {"data_dirs": [str(tmp_path)], "output_bundle": str(tmp_path / "b"), "checkpoint_dir": str(tmp_path / "c")}
    with_it = build_transforms(TrainSettings.from_dict({**base, "contrast_prob": 0.5}), 3)
    without = build_transforms(TrainSettings.from_dict(base), 3)
    names = lambda c: [type(t).__name__ for t in c.transforms]  # noqa: E731
    assert "RandTissueContrastd" in names(with_it) and "RandTissueContrastd" not in names(without)


def test_bone_above_the_window_stays_white_and_fat_stays_black() -> None:
    image, soft = _patch()
    hu = np.full((16, 16, 16), 50.0, dtype=np.float32)
    hu[:, :, :4] = 900.0  # bone, clipped to 1 by the window
    hu[:, :, 12:] = -100.0  # fat, clipped to 0
    image = window_gamma(hu, *WINDOW, 2.0)[None]
    t = _transform(structure_sd_hu=12, global_sd_hu=10, contrast_fraction=0.15, bias_hu=20, blur_max_vox=0)
    out = np.asarray(t({"image": image, "soft": soft})["image"])[0]
    assert out[:, :, :4].min() == 1.0
    assert float(out[:, :, 13:].mean()) < 0.02  # a 50 HU margin: strong offsets may lift some fat a little


def test_clutter_paints_soft_tissue_blobs_into_unlabelled_tissue_near_structures_only() -> None:
    image, soft = _patch()
    hu = np.full((16, 16, 16), -100.0, dtype=np.float32)
    hu[4:12, 2:14, 4:12] = 50.0
    image = window_gamma(hu, *WINDOW, 2.0)[None]
    quiet = dict(structure_sd_hu=0, global_sd_hu=0, contrast_fraction=0, bias_hu=0, blur_max_vox=0)
    t = _transform(clutter_prob=1.0, **quiet)
    out = np.asarray(t({"image": image, "soft": soft})["image"])[0]
    inside = soft[0] < 128
    np.testing.assert_allclose(out[inside], image[0][inside], atol=1e-5)  # the structures keep their HU
    changed = np.abs(out - image[0]) > 1e-3
    assert changed.any() and not changed[inside].any()
    far = np.ones_like(inside)
    far[max(0, 4 - 7):12 + 7, :, max(0, 4 - 7):12 + 7] = False
    assert not changed[far].any()  # nothing painted beyond a few voxels of the structures
    without = np.asarray(_transform(clutter_prob=0.0, **quiet)({"image": image, "soft": soft})["image"])[0]
    np.testing.assert_allclose(without, image[0], atol=1e-5)


def test_fat_infiltration_lowers_hu_inside_the_structures_only() -> None:
    image, soft = _patch()
    quiet = dict(structure_sd_hu=0, global_sd_hu=0, contrast_fraction=0, bias_hu=0, blur_max_vox=0)
    out = np.asarray(_transform(fat_prob=1.0, fat_fraction_max=0.3, **quiet)({"image": image, "soft": soft})["image"])[0]
    inside = soft[0] < 128
    np.testing.assert_allclose(out[~inside], image[0][~inside], atol=1e-5)  # fat and background untouched
    lowered = out < image[0] - 1e-3
    assert lowered[inside].mean() > 0.005 and not (out > image[0] + 1e-3).any()
    assert lowered[inside].mean() < 0.45
    without = np.asarray(_transform(fat_prob=0.0, **quiet)({"image": image, "soft": soft})["image"])[0]
    np.testing.assert_allclose(without, image[0], atol=1e-5)


def test_fat_infiltration_leaves_bone_white() -> None:
    image, soft = _patch()
    hu = np.full((16, 16, 16), 50.0, dtype=np.float32)
    hu[4:12, 2:8, 4:12] = 900.0  # structure 1 is bone (clipped to 1 by the window)
    image = window_gamma(hu, *WINDOW, 2.0)[None]
    quiet = dict(structure_sd_hu=0, global_sd_hu=0, contrast_fraction=0, bias_hu=0, blur_max_vox=0)
    out = np.asarray(_transform(fat_prob=1.0, fat_fraction_max=0.5, **quiet)({"image": image, "soft": soft})["image"])[0]
    assert out[soft[1] == 255].min() == 1.0


def test_elastic_deformation_moves_image_and_labels_together(tmp_path) -> None:
    import torch

    from modelkit.training import build_transforms

    base = {"data_dirs": [str(tmp_path)], "output_bundle": str(tmp_path / "b"), "checkpoint_dir": str(tmp_path / "c"),
            "affine_prob": 0.0, "flip_prob": 0.0, "intensity_prob": 0.0, "noise_prob": 0.0,
            "elastic_prob": 1.0, "network": {"img_size": [16, 16, 16]}}
    chain = build_transforms(TrainSettings.from_dict(base), 3)
    assert "Rand3DElasticd" in [type(t).__name__ for t in chain.transforms]
    _, soft = _patch()
    label = np.argmax(soft, axis=0).astype(np.int64)[None]
    image = (soft[1:2].astype(np.float32) / 255.0)  # the image is structure 1's mask: must stay its label
    chain.set_random_state(seed=3)
    out = chain({"image": torch.as_tensor(image), "soft": torch.as_tensor(soft.astype(np.float32)),
                 "label": torch.as_tensor(label), "class_indices": None})
    sample = out[0] if isinstance(out, list) else out
    img, sft = np.asarray(sample["image"])[0], np.asarray(sample["soft"])[1] / 255.0
    moved = np.abs(img - image[0]) > 0.5
    assert moved.mean() > 0.01  # the structure's outline moved by voxels, not by a rounding error
    np.testing.assert_allclose(img, sft, atol=1e-4)  # and the labels moved with it


def test_elastic_and_fat_settings_are_validated(tmp_path) -> None:
    base = {"data_dirs": [str(tmp_path)], "output_bundle": str(tmp_path / "b"), "checkpoint_dir": str(tmp_path / "c")}
    with pytest.raises(ValueError, match="elastic_prob"):
        TrainSettings.from_dict({**base, "elastic_prob": 1.5})
    with pytest.raises(ValueError, match="fat_fraction_max"):
        TrainSettings.from_dict({**base, "contrast_fat_fraction_max": 1.2})
