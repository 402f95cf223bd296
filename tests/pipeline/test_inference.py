"""Segmenter on a small Volume: a Segmentation on the volume's own grid."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.bundle import load_bundle, write_bundle
from pipeline.errors import SegmentationError
from pipeline.inference import Segmenter, select_device
from pipeline.labels import load_label_table
from pipeline.network import NetworkSettings, build_network
from pipeline.preprocess import PreprocessSettings
from pipeline.types import SIDE_LEFT, SIDE_RIGHT, Segmentation, Volume

torch.set_num_threads(1)
TINY = NetworkSettings(img_size=(32, 32, 32), feature_size=8, hidden_size=48, mlp_dim=96, num_heads=2)


def _volume(affine: np.ndarray) -> Volume:
    shape = (20, 24, 28)
    k, r, c = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    hu = np.where(((r - 12) / 10) ** 2 + ((c - 14) / 12) ** 2 < 1, 40.0, -1000.0).astype(np.float32)
    return Volume(hu=hu, affine_lps=affine, frame_of_reference_uid="1.2", study_instance_uid="1.3",
                  series_instance_uid="1.4", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uids=())


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    labels = load_label_table()
    torch.manual_seed(0)
    net = build_network(TINY, labels.num_classes)
    path = write_bundle(tmp_path_factory.mktemp("b") / "tiny", net, TINY, PreprocessSettings(spacing_mm=(4, 4, 4)),
                        labels, {"name": "tiny", "version": "0.0.1"})
    return load_bundle(path, labels, "cpu")


@pytest.mark.parametrize("affine", [
    np.array([[0, 0, 2.0, -30], [0, 2.0, 0, -20], [3.0, 0, 0, 10], [0, 0, 0, 1]]),  # HFS: rows +y, columns +x
    np.array([[0, 0, -2.0, 30], [0, 2.0, 0, -20], [-3.0, 0, 0, 10], [0, 0, 0, 1]]),  # FFS, slices descending
])
def test_segment_returns_segmentation_on_volume_grid(bundle, affine) -> None:
    volume = _volume(affine)
    seg = Segmenter(bundle, device="cpu", num_threads=1).segment(volume)
    assert isinstance(seg, Segmentation)
    assert seg.label_map.shape == volume.shape and seg.side_map.shape == volume.shape
    assert seg.label_map.dtype == np.uint8
    assert np.array_equal(seg.affine_lps, volume.affine_lps)
    assert (seg.model_name, seg.model_version) == ("tiny", "0.0.1")
    assert seg.label_map.max() <= 29
    assert set(np.unique(seg.side_map)) <= {0, SIDE_RIGHT, SIDE_LEFT}
    assert np.all(seg.side_map[seg.label_map == 0] == 0)


def test_segment_is_thread_safe_and_deterministic(bundle) -> None:
    volume = _volume(np.diag([3.0, 2.0, 2.0, 1.0]))
    segmenter = Segmenter(bundle, device="cpu", num_threads=1)
    results: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda: results.append(segmenter.segment(volume).label_map)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and np.array_equal(results[0], results[1])


def test_select_device() -> None:
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(SegmentationError, match="CUDA is not available"):
            select_device("cuda")


def test_mirror_averages_the_input_and_its_left_right_mirror(bundle) -> None:
    from pipeline.inference import predict_scores

    rng = np.random.default_rng(0)
    image = rng.random((1, 20, 24, 28)).astype(np.float32)
    net, roi, dev = bundle.network, bundle.network_settings.img_size, torch.device("cpu")
    plain = predict_scores(net, image, roi, dev)
    mirrored = predict_scores(net, image[..., ::-1].copy(), roi, dev)
    both = predict_scores(net, image, roi, dev, mirror=True)
    expected = 0.5 * (plain + torch.flip(mirrored, dims=(-1,)))
    assert torch.allclose(both, expected, atol=1e-5)
    assert not torch.allclose(both, plain, atol=1e-4)  # the untrained network is not symmetric
    assert torch.allclose(both.sum(0), torch.ones_like(both[0]), atol=1e-4)


def test_bundle_carries_the_mirror_setting(tmp_path: Path) -> None:
    from pipeline.bundle import BundleError, SlidingWindowSettings

    labels = load_label_table()
    net = build_network(TINY, labels.num_classes)
    path = write_bundle(tmp_path / "m", net, TINY, PreprocessSettings(spacing_mm=(4, 4, 4)), labels,
                        {"name": "m", "version": "1"}, SlidingWindowSettings(mirror=True))
    loaded = load_bundle(path, labels, "cpu")
    assert loaded.sliding_window.mirror is True
    assert Segmenter(loaded, device="cpu")._mirror is True
    assert Segmenter(loaded, device="cpu", mirror=False)._mirror is False
    with pytest.raises(ValueError, match="mirror"):
        SlidingWindowSettings(mirror="yes")  # type: ignore[arg-type]
    meta = path / "configs" / "metadata.json"
    meta.write_text(meta.read_text().replace('"mirror": true', '"mirror": "yes"'))
    with pytest.raises(BundleError, match="mirror"):
        load_bundle(path, labels, "cpu")


def test_segmenter_describes_what_it_runs(tmp_path: Path) -> None:
    """The node logs this at start: the settings that change the numbers it reports."""
    from pipeline.bundle import SlidingWindowSettings

    labels = load_label_table()
    net = build_network(TINY, labels.num_classes)
    path = write_bundle(tmp_path / "m", net, TINY, PreprocessSettings(spacing_mm=(2.5, 2.5, 3.0)), labels,
                        {"name": "m", "version": "1"}, SlidingWindowSettings(overlap=0.5, mirror=True),
                        class_weights=[1.0] * labels.num_classes)
    text = Segmenter(load_bundle(path, labels, "cpu"), device="cpu", sw_batch_size=3).describe()
    assert "model grid 2.5 x 2.5 x 3 mm" in text and "overlap 0.5 gaussian" in text
    assert "sw_batch_size 3" in text and "mirror on" in text and "volume calibration on" in text
    assert "device cpu" in text
    plain = write_bundle(tmp_path / "p", net, TINY, PreprocessSettings(spacing_mm=(4, 4, 4)), labels,
                         {"name": "p", "version": "1"})
    text = Segmenter(load_bundle(plain, labels, "cpu"), device="cpu", mirror=False).describe()
    assert "mirror off" in text and "volume calibration off" in text and "model grid 4 x 4 x 4 mm" in text


def test_metal_is_never_labelled(bundle) -> None:
    """Bone labels exclude the metal: voxels at or above the metal threshold come out as background."""
    affine = np.array([[0, 0, 2.0, -30], [0, 2.0, 0, -20], [3.0, 0, 0, 10], [0, 0, 0, 1]])
    volume = _volume(affine)
    hu = volume.hu.copy()
    hu[5:15, 10:14, 12:16] = 3500.0  # a stem inside the body
    import dataclasses

    with_metal = dataclasses.replace(volume, hu=hu)
    kept = Segmenter(bundle, device="cpu", num_threads=1, metal_exclude_hu=None).segment(with_metal)
    assert kept.label_map[hu >= 2000].any()  # the (random) tiny model labels some of it
    seg = Segmenter(bundle, device="cpu", num_threads=1).segment(with_metal)
    assert not seg.label_map[hu >= 2000].any()
    assert seg.label_map[hu < 2000].any()


def test_bundle_carries_the_precision_setting(tmp_path: Path) -> None:
    from pipeline.bundle import BundleError, SlidingWindowSettings

    labels = load_label_table()
    net = build_network(TINY, labels.num_classes)
    path = write_bundle(tmp_path / "m", net, TINY, PreprocessSettings(spacing_mm=(4, 4, 4)), labels,
                        {"name": "m", "version": "1"}, SlidingWindowSettings(precision="bf16"))
    loaded = load_bundle(path, labels, "cpu")
    assert loaded.sliding_window.precision == "bf16"
    assert Segmenter(loaded, device="cpu")._precision == "bf16"
    assert Segmenter(loaded, device="cpu", precision="fp32")._precision == "fp32"
    assert "precision fp32 (float32)" in Segmenter(loaded, device="cpu", precision="fp32").describe()
    with pytest.raises(SegmentationError, match="precision 'fp16'"):
        Segmenter(loaded, device="cpu", precision="fp16")
    with pytest.raises(ValueError, match="precision"):
        SlidingWindowSettings(precision="half")
    meta = path / "configs" / "metadata.json"
    meta.write_text(meta.read_text().replace('"precision": "bf16"', '"precision": "half"'))
    with pytest.raises(BundleError, match="precision"):
        load_bundle(path, labels, "cpu")
    old = path / "configs" / "metadata.json"  # a bundle written before the setting: float32
    old.write_text(old.read_text().replace(',\n    "precision": "half"', ""))
    assert load_bundle(path, labels, "cpu").sliding_window.precision == "fp32"


def test_autocast_dtype_follows_the_device(monkeypatch) -> None:
    from pipeline import inference

    cpu = torch.device("cpu")
    assert inference.autocast_dtype(cpu, "fp32") is None
    monkeypatch.setattr(inference, "cpu_supports_bf16", lambda: True)
    assert inference.autocast_dtype(cpu, "bf16") is torch.bfloat16
    monkeypatch.setattr(inference, "cpu_supports_bf16", lambda: False)
    assert inference.autocast_dtype(cpu, "bf16") is None  # emulated bfloat16 is slower than float32
    with pytest.raises(SegmentationError, match="allowed fp32, bf16"):
        inference.autocast_dtype(cpu, "int8")


@pytest.mark.skipif(not __import__("pipeline.inference", fromlist=["x"]).cpu_supports_bf16(),
                    reason="this CPU has no native bfloat16 (AVX512-BF16 / AMX)")
def test_bf16_runs_the_network_in_bfloat16_for_the_label_map_and_the_uncertainty(bundle) -> None:
    """bf16 changes the scores a little (the network's arithmetic), for the label map's pass and every
    test-time augmentation alike; the output stays float32 probabilities."""
    from pipeline.inference import predict_samples, predict_scores

    rng = np.random.default_rng(1)
    image = rng.random((1, 20, 24, 28)).astype(np.float32)
    net, roi, dev = bundle.network, bundle.network_settings.img_size, torch.device("cpu")
    fp32 = predict_scores(net, image, roi, dev)
    bf16 = predict_scores(net, image, roi, dev, precision="bf16")
    assert bf16.dtype == torch.float32 and torch.allclose(bf16.sum(0), torch.ones_like(bf16[0]), atol=1e-4)
    assert not torch.equal(bf16, fp32) and torch.allclose(bf16, fp32, atol=0.05)
    samples32 = list(predict_samples(net, image, roi, dev, 2))
    samples16 = list(predict_samples(net, image, roi, dev, 2, precision="bf16"))
    assert torch.equal(samples16[0], bf16) and torch.equal(samples32[0], fp32)
    assert not torch.equal(samples16[1], samples32[1]) and torch.allclose(samples16[1], samples32[1], atol=0.05)
    volume = _volume(np.diag([3.0, 2.0, 2.0, 1.0]))
    seg = Segmenter(bundle, device="cpu", num_threads=1, precision="bf16", uncertainty="tta").segment(volume)
    assert seg.label_map.shape == volume.shape and seg.uncertainty is not None
