"""A tiny training run: the loss falls, a loadable bundle appears, resume continues the step count."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from modelkit.nifti import RAS_TO_LPS, list_nifti_cases, load_nifti_pair
from modelkit.train_settings import TrainSettings
from modelkit.training import CHECKPOINT_NAME, train
from pipeline.bundle import METADATA_PATH, load_bundle
from pipeline.labels import load_label_table
from pipeline.network import NetworkSettings
from pipeline.preprocess import PreprocessSettings
from tests.support.dicom_cases import thigh_arrays

torch.set_num_threads(1)


def _write_cases(folder: Path, n: int = 2) -> None:
    """Tiny synthetic 'thighs': body of fat with a muscle (1) and a bone (28) cylinder each side."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        hu, lab = thigh_arrays(rng=rng)
        affine_lps = np.array([[0, 0, 4.0, -80], [0, 4.0, 0, -56], [4.0, 0, 0, 0], [0, 0, 0, 1]])
        nib.save(nib.Nifti1Image(hu, RAS_TO_LPS @ affine_lps), str(folder / f"case{i}_ct.nii.gz"))
        nib.save(nib.Nifti1Image(lab, RAS_TO_LPS @ affine_lps), str(folder / f"case{i}_label.nii.gz"))


def _settings(tmp_path: Path, **kw) -> TrainSettings:
    data = tmp_path / "data"
    if not data.is_dir():
        _write_cases(data)
    base = dict(
        data_dirs=(data,), val_dirs=(data,), output_bundle=tmp_path / "bundle", checkpoint_dir=tmp_path / "ckpt",
        iterations=8, val_every=4, lr=3e-3, warmup_iterations=1, samples_per_volume=2, num_threads=1, seed=7,
        affine_prob=0.0,
        network=NetworkSettings(img_size=(32, 32, 32), feature_size=8, hidden_size=48, mlp_dim=96, num_heads=2),
        preprocess=PreprocessSettings(spacing_mm=(4.0, 4.0, 4.0)),
    )
    base.update(kw)
    return TrainSettings(**base)


def test_nifti_pair_loading_and_listing(tmp_path: Path) -> None:
    _write_cases(tmp_path)
    cases = list_nifti_cases(tmp_path)
    assert [c.name for c in cases] == ["case0", "case1"]
    hu, lab, affine = load_nifti_pair(cases[0].ct_path, cases[0].label_path, load_label_table())
    assert hu.shape == lab.shape == (24, 28, 40) and lab.dtype == np.uint8
    assert np.allclose(affine[:3, 3], (-80, -56, 0))  # LPS, as written
    bad = tmp_path / "bad_label.nii.gz"
    nib.save(nib.Nifti1Image(np.full((24, 28, 40), 31, np.uint8), RAS_TO_LPS @ affine), str(bad))
    with pytest.raises(ValueError, match=r"label values \[31\] are not in the label table \(allowed 0..29\)"):
        load_nifti_pair(cases[0].ct_path, bad, load_label_table())


def test_tiny_training_lowers_loss_writes_bundle_and_resumes(tmp_path: Path) -> None:
    labels = load_label_table()
    out = train(_settings(tmp_path), labels)
    meta = json.loads((out / METADATA_PATH).read_text())
    history = meta["training"]["history"]
    assert [h["step"] for h in history] == [4, 8]
    assert history[-1]["loss"] < history[0]["loss"]
    assert meta["training"]["seed"] == 7 and "validation_mean_dice_model_grid" in meta["metrics"]
    bundle = load_bundle(out, labels, "cpu")
    assert bundle.name == "thighnode_demo" and bundle.sliding_window.mirror is False

    ckpt = tmp_path / "ckpt" / CHECKPOINT_NAME
    assert torch.load(ckpt, weights_only=True)["step"] == 8
    resumed = train(_settings(tmp_path, iterations=12, resume=ckpt, output_bundle=tmp_path / "bundle2",
                                     sw_mirror=True), labels)
    assert load_bundle(resumed, labels, "cpu").sliding_window.mirror is True
    meta2 = json.loads((resumed / METADATA_PATH).read_text())
    assert [h["step"] for h in meta2["training"]["history"]] == [4, 8, 12]
    assert meta2["training"]["iterations"] == 12
    assert torch.load(ckpt, weights_only=True)["step"] == 12


def test_settings_from_toml(tmp_path: Path) -> None:
    cfg = Path(__file__).resolve().parents[2] / "config" / "train_demo.toml"
    s = TrainSettings.from_toml(cfg)
    assert s.network.hidden_size < 768 and s.preprocess.gamma == 2.0 and s.seed
    stages = [s] + [TrainSettings.from_toml(cfg.with_name(f"train_demo_stage{n}.toml")) for n in (2, 3, 4, 5, 6)]
    for before, after in zip(stages, stages[1:]):
        assert after.init_weights == before.output_bundle  # each stage starts from the one before
        assert set(before.data_dirs) < set(after.data_dirs)  # on more subjects
        assert after.network == s.network and after.preprocess == s.preprocess
    # stage 7 (post-operative and limited fields of view) fine-tunes stage 6's weights on stage 1-2 subjects
    # and new ones with implants, and is the only stage that writes the shipped bundle
    last = TrainSettings.from_toml(cfg.with_name("train_demo_stage7.toml"))
    assert last.init_weights == stages[-1].output_bundle and last.network == s.network and last.preprocess == s.preprocess
    assert set(stages[1].data_dirs) < set(last.data_dirs)
    assert any(spec.implant_fraction > 0 for d, spec in last.phantoms.items() if d in map(str, last.data_dirs))
    stages.append(last)
    # one case cache for all stages: a stage reuses the folders the stages before prepared
    assert s.case_cache and s.case_cache_dir is not None and {st.case_cache_dir for st in stages} == {s.case_cache_dir}
    assert [st.output_bundle == Path("bundles/thighnode_demo") for st in stages] == [False] * 6 + [True]
    assert [st.calibrate_volumes for st in stages] == [False] * 5 + [True, True]
    # held-out phantom folders are never trained, validated or calibrated on
    for stage in stages:
        held_out = {d for d, spec in stage.phantoms.items() if spec.seed in (3, 5, 16, 18)}
        used = {*map(Path, stage.data_dirs), *map(Path, stage.val_dirs), *map(Path, stage.calibration_dirs)}
        assert not used & {Path(d) for d in held_out}
    assert len({d for d, spec in stages[-2].phantoms.items() if spec.seed in (3, 5)}) == 2
    # calibration on generated phantoms, none trained on: 44 for stage 6, 32 for the shipped stage 7
    for stage, n in ((stages[-2], 44), (last, 32)):
        calibration = [*stage.val_dirs, *stage.calibration_dirs]
        assert all(str(d) in stage.phantoms for d in calibration)  # generated from seeds when missing
        assert not set(map(Path, calibration)) & set(map(Path, stage.data_dirs))
        assert sum(stage.phantoms[str(d)].n_subjects for d in calibration) == n
        assert len({stage.phantoms[str(d)].seed for d in calibration}) == len(calibration)  # distinct subjects
    bad = tmp_path / "bad.toml"
    bad.write_text('data_dirs = ["x"]\noutput_bundle = "b"\ncheckpoint_dir = "c"\nlearning_rate = 1\n')
    with pytest.raises(ValueError, match="unknown training settings \\['learning_rate'\\]"):
        TrainSettings.from_toml(bad)


def test_settings_base_file_is_read_first_and_the_file_overrides_it(tmp_path: Path) -> None:
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "base.toml").write_text(
        'data_dirs = ["a"]\noutput_bundle = "b1"\ncheckpoint_dir = "c1"\nlr = 2e-3\nseed = 7\n'
        '[network]\nhidden_size = 96\nmlp_dim = 384\n[preprocess]\ngamma = 2.0\n'
        '[[phantoms]]\ndir = "a"\nn_subjects = 4\nseed = 1\n'
        '[[phantoms]]\ndir = "v"\nn_subjects = 2\nseed = 2\n')
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "child.toml"  # base is relative to the file, not to the working directory
    child.write_text(
        'base = "../cfg/base.toml"\ndata_dirs = ["a", "a2"]\noutput_bundle = "b2"\nlr = 5e-4\n'
        '[network]\nhidden_size = 48\n'
        '[[phantoms]]\ndir = "a2"\nn_subjects = 3\nseed = 6\n'
        '[[phantoms]]\ndir = "v"\nn_subjects = 5\nseed = 9\n')
    s = TrainSettings.from_toml(child)
    assert s.data_dirs == (Path("a"), Path("a2")) and s.output_bundle == Path("b2") and s.lr == 5e-4
    assert s.checkpoint_dir == Path("c1") and s.seed == 7  # not in the file: the base's
    assert s.network.hidden_size == 48 and s.network.mlp_dim == 384  # tables merge key by key
    assert s.preprocess.gamma == 2.0
    # [[phantoms]] merge by folder: the base's, a folder named again replaced, new ones added
    assert {d: (p.n_subjects, p.seed) for d, p in s.phantoms.items()} == {"a": (4, 1), "v": (5, 9), "a2": (3, 6)}
    (tmp_path / "cfg" / "base.toml").write_text('base = "../sub/child.toml"\n')
    with pytest.raises(ValueError, match="base .* loop"):
        TrainSettings.from_toml(child)
    child.write_text('base = "nowhere.toml"\n')
    with pytest.raises(ValueError, match="nowhere.toml does not exist"):
        TrainSettings.from_toml(child)
    child.write_text('base = 3\n')
    with pytest.raises(ValueError, match="base must be a file name"):
        TrainSettings.from_toml(child)


def test_data_folders_take_one_folder_or_several_in_order_each_once(tmp_path: Path) -> None:
    from modelkit.nifti import data_folders

    a, b = tmp_path / "a", tmp_path / "b"
    assert data_folders(a) == [a] and data_folders(str(a)) == [a]
    assert data_folders([str(b), a, b]) == [b, a]  # a folder named twice is not counted twice


def test_nifti_listing_images_tr_layout(tmp_path: Path) -> None:
    _write_cases(tmp_path / "flat", 1)
    (tmp_path / "ds" / "imagesTr").mkdir(parents=True)
    (tmp_path / "ds" / "labelsTr").mkdir(parents=True)
    (tmp_path / "flat" / "case0_ct.nii.gz").rename(tmp_path / "ds" / "imagesTr" / "thigh_001_0000.nii.gz")
    (tmp_path / "flat" / "case0_label.nii.gz").rename(tmp_path / "ds" / "labelsTr" / "thigh_001.nii.gz")
    cases = list_nifti_cases(tmp_path / "ds")
    assert [(c.name, c.ct_path.name, c.label_path.name) for c in cases] == [
        ("thigh_001", "thigh_001_0000.nii.gz", "thigh_001.nii.gz")]
    with pytest.raises(ValueError, match="holds no NIfTI pairs"):
        list_nifti_cases(tmp_path / "flat")


def _nnunet_folder(tmp_path: Path, values: dict[int, int]) -> Path:
    """An imagesTr/labelsTr folder whose one label file uses other values (``values``: our id -> theirs)."""
    _write_cases(tmp_path / "flat", 1)
    ds = tmp_path / "ds"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir(parents=True)
    (tmp_path / "flat" / "case0_ct.nii.gz").rename(ds / "imagesTr" / "thigh_001_0000.nii.gz")
    img = nib.load(str(tmp_path / "flat" / "case0_label.nii.gz"))
    ours = np.asarray(img.dataobj).astype(np.int64)
    theirs = np.zeros_like(ours)
    for our_id, their_value in values.items():
        theirs[ours == our_id] = their_value
    nib.save(nib.Nifti1Image(theirs.astype(np.uint16), img.affine), str(ds / "labelsTr" / "thigh_001.nii.gz"))
    return ds


def test_dataset_json_names_map_the_label_values_to_the_table(tmp_path: Path) -> None:
    from modelkit.nifti import load_nifti_case

    labels = load_label_table()
    femur = labels.by_key("femur").id
    ds = _nnunet_folder(tmp_path, {1: 7, femur: 300})  # our sartorius (1) is their 7, femur their 300
    reference, _, _ = load_nifti_pair(tmp_path / "flat" / "case0_label.nii.gz",
                                      tmp_path / "flat" / "case0_label.nii.gz", labels)
    names = {"background": 0, "Sartorius_Left": 7, "femur right": 300, "Gluteus maximus muscle": 12}  # nnU-Net v2
    (ds / "dataset.json").write_text(json.dumps({"name": "site", "labels": names}))
    case = list_nifti_cases(ds)[0]
    assert case.label_names_path == ds / "dataset.json" and case.files[-1] == ds / "dataset.json"
    _, truth = load_nifti_case(case, labels)
    assert np.array_equal(truth, reference.astype(np.uint8))  # 7 -> 1, 300 -> femur, 0 stays
    assert set(np.unique(truth)) == {0, 1, femur}

    msd = {"0": "background", "7": "sartorius", "300": "Femur"}  # Decathlon: value -> name
    (ds / "dataset.json").write_text(json.dumps({"labels": msd}))
    assert np.array_equal(load_nifti_case(list_nifti_cases(ds)[0], labels)[1], truth)

    (ds / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "sartorius": 7, "bladder": 300}}))
    with pytest.raises(ValueError, match=r"label\(s\) 300 'bladder' match no structure"):
        load_nifti_case(list_nifti_cases(ds)[0], labels)
    (ds / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "sartorius": 7}}))
    with pytest.raises(ValueError, match=r"label values \[300\] are not named in .*dataset.json"):
        load_nifti_case(list_nifti_cases(ds)[0], labels)
    (ds / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "thigh": [7, 300]}}))
    with pytest.raises(ValueError, match="region labels are not"):
        list_nifti_cases(ds)
    (ds / "dataset.json").write_text(json.dumps({"numTraining": 1}))  # no labels object: values are our ids
    assert list_nifti_cases(ds)[0].label_names_path is None
    with pytest.raises(ValueError, match=r"label values \[300\] are not in the label table"):
        load_nifti_case(list_nifti_cases(ds)[0], labels)


def test_training_reads_a_dataset_json_folder_and_its_edit_makes_new_cache_entries(tmp_path: Path) -> None:
    from modelkit.casecache import CaseCache
    from modelkit.training import load_cases

    labels = load_label_table()
    ds = _nnunet_folder(tmp_path, {1: 2, labels.by_key("femur").id: 1})
    (ds / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "femur": 1, "sartorius": 2}}))
    pre = PreprocessSettings(spacing_mm=(4.0, 4.0, 4.0))
    cache = CaseCache(tmp_path / "cache")
    first = load_cases((ds,), (), labels, pre, cache=cache)
    assert set(np.unique(first[0].label)) == {0, 1, labels.by_key("femur").id}
    (ds / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "femur": 1, "gracilis": 2}}))
    again = load_cases((ds,), (), labels, pre, cache=cache)
    assert cache.counts()[:2] == (0, 2)  # the edited names are not served from the old entry
    assert set(np.unique(again[0].label)) == {0, labels.by_key("gracilis").id, labels.by_key("femur").id}


def test_bf16_autocast_with_batch_dice_lowers_the_loss(tmp_path: Path) -> None:
    out = train(_settings(tmp_path, precision="bf16", batch_dice=True), load_label_table())
    meta = json.loads((out / METADATA_PATH).read_text())
    history = meta["training"]["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert meta["training"]["settings"]["precision"] == "bf16" and meta["training"]["settings"]["batch_dice"] is True
    bundle = load_bundle(out, load_label_table(), "cpu")
    assert all(p.dtype == torch.float32 for p in bundle.network.parameters())  # weights stay float32


def test_mirror_must_be_a_boolean(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sw_mirror must be true or false"):
        _settings(tmp_path, sw_mirror="yes")


def test_unknown_precision_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="precision must be 'fp32' or 'bf16'; saw 'fp16'"):
        _settings(tmp_path, precision="fp16")


def test_training_can_calibrate_the_volumes_on_the_validation_set(tmp_path: Path) -> None:
    out = train(_settings(tmp_path, calibrate_volumes=True), load_label_table())
    meta = json.loads((out / METADATA_PATH).read_text())
    assert len(meta["class_weights"]) == 30 and meta["class_weights"][0] == 1.0
    assert meta["class_weights_calibration"]["cases"] == ["case0", "case1"]
    assert load_bundle(out, load_label_table(), "cpu").class_weights == pytest.approx(meta["class_weights"])


def test_calibration_can_use_more_cases_than_the_validation_set(tmp_path: Path) -> None:
    """calibration_dirs: extra labelled cases (never the test set) for a steadier volume calibration."""
    extra = tmp_path / "calib"
    _write_cases(extra, 1)
    (extra / "case0_ct.nii.gz").rename(extra / "extra0_ct.nii.gz")
    (extra / "case0_label.nii.gz").rename(extra / "extra0_label.nii.gz")
    settings = _settings(tmp_path, calibrate_volumes=True, iterations=4, calibration_dirs=(extra,),
                         calibration_objective="median")
    meta = json.loads((train(settings, load_label_table()) / METADATA_PATH).read_text())
    calibration = meta["class_weights_calibration"]
    assert calibration["cases"] == ["case0", "case1", "extra0"]
    assert calibration["objective"] == "median" and "median over the cases" in calibration["method"]
    # the per-case errors (what evaluate reports) are recorded beside the pooled ones
    assert set(calibration["mean_case_volume_error_after"]) == set(calibration["pooled_volume_error_after"])
    parsed = TrainSettings.from_dict({"data_dirs": ["d"], "output_bundle": "b", "checkpoint_dir": "c",
                                      "calibration_dirs": ["x", "y"]})
    assert parsed.calibration_dirs == (Path("x"), Path("y"))
    assert parsed.calibration_objective == "pooled"
    with pytest.raises(ValueError, match="calibration_objective must be one of pooled, median; saw 'mean'"):
        TrainSettings.from_dict({"data_dirs": ["d"], "output_bundle": "b", "checkpoint_dir": "c",
                                 "calibration_objective": "mean"})


def test_ensure_phantoms_can_generate_only_the_sets_asked_for(tmp_path: Path) -> None:
    from modelkit.train_settings import PhantomDataSettings
    from modelkit.training import ensure_phantoms

    train_dir, test_dir = tmp_path / "train", tmp_path / "test"
    settings = _settings(tmp_path, phantoms={str(train_dir): PhantomDataSettings(1, 1, (8.0, 8.0, 8.0)),
                                             str(test_dir): PhantomDataSettings(1, 3, (8.0, 8.0, 8.0))})
    ensure_phantoms(settings, only=(test_dir,))
    assert [p.name for p in sorted(test_dir.glob("*_ct.nii.gz"))] == ["phantom_3_000_ct.nii.gz"]
    assert not train_dir.exists()
    ensure_phantoms(settings)
    assert [p.name for p in sorted(train_dir.glob("*_ct.nii.gz"))] == ["phantom_1_000_ct.nii.gz"]


def test_training_phantoms_carry_varied_atrophy_on_most_subjects() -> None:
    """Most training subjects have one to several atrophied muscles (0.6-0.95 of normal, one side
    or both), so a model learns to follow the muscle tissue rather than a muscle's usual outline;
    the subject itself (sex, height, size, ...) does not depend on the atrophy draw."""
    from modelkit.train_settings import PhantomDataSettings
    from modelkit.training import phantom_params
    from pipeline.labels import load_label_table

    muscles = {l.key for l in load_label_table().labels if not l.is_bone}
    spec = PhantomDataSettings(24, 1, (2.0, 2.0, 2.0))
    params = [phantom_params(spec, i) for i in range(24)]
    with_atrophy = [p for p in params if p.atrophy]
    assert len(with_atrophy) >= 0.6 * len(params)
    assert max(len(p.atrophy) for p in params) >= 3
    sides = set()
    for p in with_atrophy:
        for key, frac in p.atrophy.items():
            name, _, side = key.partition(":")
            assert name in muscles
            sides.add(side)
            assert 0.6 <= frac <= 0.95
    assert sides == {"", "left", "right"}
    assert [phantom_params(spec, i) for i in range(24)] == params  # drawn from the seeds only
    assert len({(p.sex, round(p.height_m, 3)) for p in params}) > 12


def test_training_can_start_from_a_bundles_weights(tmp_path: Path) -> None:
    """Fine-tuning (e.g. on a finer model grid, or a site's data): init_weights = a bundle folder."""
    labels = load_label_table()
    first = train(_settings(tmp_path, output_bundle=tmp_path / "first"), labels)
    start = torch.load(first / "models" / "model.pt", weights_only=True)
    # no training step: the written model is exactly the one it started from
    same = train(_settings(tmp_path, iterations=0, init_weights=first, output_bundle=tmp_path / "same",
                           checkpoint_dir=tmp_path / "c0"), labels)
    copied = torch.load(same / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(start[k], copied[k]) for k in start)
    fresh = train(_settings(tmp_path, iterations=0, output_bundle=tmp_path / "fresh", checkpoint_dir=tmp_path / "c1"),
                  labels)
    assert not all(torch.equal(start[k], v) for k, v in torch.load(fresh / "models" / "model.pt",
                                                                        weights_only=True).items())
    meta = json.loads((same / METADATA_PATH).read_text())
    assert meta["training"]["settings"]["init_weights"] == str(first)
    assert meta["training"]["init_weights_sha256"] == hashlib.sha256((first / "models" / "model.pt").read_bytes()).hexdigest()


def test_init_weights_of_another_architecture_is_refused_clearly(tmp_path: Path) -> None:
    labels = load_label_table()
    first = train(_settings(tmp_path, iterations=0, output_bundle=tmp_path / "first"), labels)
    other = NetworkSettings(img_size=(32, 32, 32), feature_size=8, hidden_size=96, mlp_dim=96, num_heads=2)
    with pytest.raises(ValueError, match=r"init_weights .*first.* do not fit the network"):
        train(_settings(tmp_path, iterations=0, init_weights=first, network=other, checkpoint_dir=tmp_path / "c2"),
              labels)
    with pytest.raises(ValueError, match=r"init_weights .*missing.* does not exist"):
        train(_settings(tmp_path, iterations=0, init_weights=tmp_path / "missing", checkpoint_dir=tmp_path / "c3"),
              labels)


def test_a_missing_calibration_folder_fails_before_training(tmp_path: Path) -> None:
    """A wrong calibration_dirs path must not cost a whole training run (it failed only at the end)."""
    settings = _settings(tmp_path, calibrate_volumes=True, calibration_dirs=(tmp_path / "nowhere",))
    with pytest.raises(ValueError, match=r"nowhere"):
        train(settings, load_label_table())
    assert not (tmp_path / "ckpt" / CHECKPOINT_NAME).exists()
    assert not (tmp_path / "bundle").exists()


def test_loss_weights_pick_the_dice_and_cross_entropy_terms(tmp_path: Path) -> None:
    """The first step's loss (same seed, same weights, same patches) is lambda_dice * Dice + lambda_ce * CE."""
    def first_loss(name: str, **kw) -> float:
        out = train(_settings(tmp_path, iterations=1, val_every=1, output_bundle=tmp_path / name,
                              checkpoint_dir=tmp_path / f"ckpt_{name}", **kw), load_label_table())
        meta = json.loads((out / METADATA_PATH).read_text())
        return meta["training"]["history"][0]["loss"]

    both = first_loss("both")
    ce = first_loss("ce", lambda_dice=0.0)
    dice = first_loss("dice", lambda_ce=0.0)
    assert ce > 0 and dice > 0 and abs(ce - dice) > 1e-3
    assert both == pytest.approx(ce + dice, rel=1e-4)
    assert first_loss("ce2", lambda_dice=0.0, lambda_ce=2.0) == pytest.approx(2 * ce, rel=1e-4)


@pytest.mark.parametrize("kw, message", [
    ({"lambda_dice": -1.0}, "lambda_dice must be a number from 0 to 100"),
    ({"lambda_ce": "1"}, "lambda_ce must be a number from 0 to 100"),
    ({"lambda_dice": 0.0, "lambda_ce": 0.0}, "both 0"),
])
def test_loss_weights_are_checked(tmp_path: Path, kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _settings(tmp_path, **kw)
