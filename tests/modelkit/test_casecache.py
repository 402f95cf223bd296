"""The training's case cache: same batches as in memory, reused when unchanged, rebuilt when
a source changes or an entry is damaged, and the same trained model either way."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from modelkit.casecache import CaseCache
from modelkit.train_settings import TrainSettings
from modelkit.training import _batch_for_step, build_transforms, load_cases, train
from pipeline.bundle import METADATA_PATH
from pipeline.labels import load_label_table
from tests.modelkit.test_training import _settings, _write_cases

torch.set_num_threads(1)


def _load(data: Path, settings: TrainSettings, cache: CaseCache | None, soft: bool = True):
    return load_cases((data,), (), load_label_table(), settings.preprocess, soft, cache=cache, indices=True)


@pytest.mark.parametrize("soft", [True, False])
def test_cached_cases_are_memory_mapped_and_give_the_same_batches(tmp_path: Path, soft: bool) -> None:
    settings = _settings(tmp_path, soft_labels=soft, samples_per_volume=2)
    data = settings.data_dirs[0]
    in_memory = _load(data, settings, None, soft)
    cached = _load(data, settings, CaseCache(tmp_path / "cache"), soft)
    assert [c.name for c in cached] == [c.name for c in in_memory] == ["case0", "case1"]
    assert isinstance(cached[0].image, np.memmap) and isinstance(cached[0].class_indices[1], np.memmap)
    assert (cached[0].soft is not None) == soft
    for a, b in zip(in_memory, cached):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
        assert len(a.class_indices) == len(b.class_indices) == 30
        assert all(np.array_equal(x, y) for x, y in zip(a.class_indices, b.class_indices))
    transforms = build_transforms(settings, 30)
    for step in range(4):
        xa, ya = _batch_for_step(in_memory, transforms, settings, step)
        xb, yb = _batch_for_step(cached, transforms, settings, step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_second_load_reuses_entries_and_a_changed_source_or_setting_is_prepared_again(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    data = settings.data_dirs[0]
    first = CaseCache(tmp_path / "cache")
    _load(data, settings, first)
    assert (first.prepared, first.reused) == (2, 0)
    again = CaseCache(tmp_path / "cache")
    _load(data, settings, again)
    assert (again.prepared, again.reused) == (0, 2)

    label = data / "case1_label.nii.gz"
    st = label.stat()
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # the label file was edited
    edited = CaseCache(tmp_path / "cache")
    _load(data, settings, edited)
    assert (edited.prepared, edited.reused) == (1, 1)

    other_grid = _settings(tmp_path, preprocess=type(settings.preprocess)(spacing_mm=(3.0, 3.0, 3.0)))
    regridded = CaseCache(tmp_path / "cache")
    cases = _load(data, other_grid, regridded)
    assert regridded.prepared == 2 and cases[0].image.shape != _load(data, settings, None)[0].image.shape
    assert not list((tmp_path / "cache").glob(".tmp-*"))  # no half-written entries left behind


def test_a_damaged_entry_is_prepared_again_with_a_warning(tmp_path: Path, caplog) -> None:
    settings = _settings(tmp_path)
    data = settings.data_dirs[0]
    reference = _load(data, settings, None)
    _load(data, settings, CaseCache(tmp_path / "cache"))
    entry = next(p for p in (tmp_path / "cache").iterdir() if p.name.startswith("case0-"))
    soft = entry / "soft.npy"
    soft.write_bytes(soft.read_bytes()[:200])  # truncated (disk full, killed copy)
    cache = CaseCache(tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="modelkit.casecache"):
        cases = _load(data, settings, cache)
    assert (cache.prepared, cache.reused) == (1, 1)
    assert "cannot be read" in caplog.text and "case0" in caplog.text
    assert np.array_equal(cases[0].soft, reference[0].soft)


def test_training_from_the_cache_matches_training_in_memory_and_reuses_it(tmp_path: Path, caplog) -> None:
    labels = load_label_table()
    with caplog.at_level(logging.INFO, logger="modelkit.training"):
        cached = train(_settings(tmp_path, output_bundle=tmp_path / "b1"), labels)
    # one line per set of folders: the training folder's 2 cases, then the validation folder's (the same files
    # without the patch indices: another entry each)
    assert caplog.text.count("case cache") == 2 and caplog.text.count("0 case(s) reused, 2 prepared") == 2
    assert any((tmp_path / "ckpt" / "case_cache").glob("case0-*/entry.json"))
    in_memory = train(_settings(tmp_path, output_bundle=tmp_path / "b2", case_cache=False,
                                checkpoint_dir=tmp_path / "ckpt2"), labels)
    assert not (tmp_path / "ckpt2" / "case_cache").exists()
    losses = [[h["loss"] for h in json.loads((b / METADATA_PATH).read_text())["training"]["history"]]
              for b in (cached, in_memory)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="modelkit.training"):
        train(_settings(tmp_path, output_bundle=tmp_path / "b3", case_cache_dir=tmp_path / "ckpt" / "case_cache",
                        checkpoint_dir=tmp_path / "ckpt3"), labels)
    assert "2 case(s) reused, 0 prepared" in caplog.text


def test_case_cache_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="case_cache must be true or false"):
        _settings(tmp_path, case_cache="yes")
    s = TrainSettings.from_dict({"data_dirs": ["d"], "output_bundle": "o", "checkpoint_dir": "c",
                                 "case_cache_dir": "/var/tmp/cases"})
    assert s.case_cache is True and s.case_cache_dir == Path("/var/tmp/cases")


def test_an_incomplete_folder_is_replaced_and_a_failed_write_names_the_cache_and_the_way_out(tmp_path: Path,
                                                                                           monkeypatch) -> None:
    import time

    import modelkit.casecache as casecache

    settings = _settings(tmp_path)
    data = settings.data_dirs[0]
    _load(data, settings, CaseCache(tmp_path / "cache"))
    entry = next(p for p in (tmp_path / "cache").iterdir() if p.name.startswith("case1-"))
    (entry / "entry.json").unlink()  # e.g. copied in part
    stale = tmp_path / "cache" / ".tmp-case9-abc-1-deadbeef"
    stale.mkdir()
    os.utime(stale, (time.time() - 7 * 3600,) * 2)  # left by a run killed hours ago
    fresh = tmp_path / "cache" / ".tmp-case8-abc-2-feedbeef"
    fresh.mkdir()  # another run writing right now
    cache = CaseCache(tmp_path / "cache")
    cases = _load(data, settings, cache)
    assert (cache.prepared, cache.reused) == (1, 1) and (entry / "entry.json").is_file()
    assert np.array_equal(cases[1].image, _load(data, settings, None)[1].image)
    assert not stale.exists() and fresh.exists()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(casecache.np, "save", disk_full)
    with pytest.raises(OSError, match=r"case cache .*cannot write the entry of case case0 .*No space left.*"
                                      r"case_cache_dir.*case_cache = false"):
        _load(data, settings, CaseCache(tmp_path / "other"))
    assert not [p for p in (tmp_path / "other").iterdir()]  # nothing half-written
