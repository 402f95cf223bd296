"""The SR carries each structure's uncertainty (pipeline.uncertainty) as coded items: written,
validated with dciodvfy, read back with highdicom."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import highdicom as hd
import pytest

from dicomout import codes
from dicomout.context import Equipment
from dicomout.seg import build_seg, segment_map
from dicomout.sr import build_sr
from pipeline.types import Measurements, Segmentation, StructureUncertainty
from tests.dicomout.test_seg import EQUIPMENT, MODEL_NAME, MODEL_VERSION, make_case
from tests.dicomout.test_sr import hand_made_measurements, read_report
from tests.support.dciodvfy import run_dciodvfy


def _with_uncertainty(m: Measurements) -> Measurements:
    """Every found structure gets a summary; those with an even label id are low confidence."""
    structures = tuple(
        dataclasses.replace(s, uncertainty=StructureUncertainty(
            "tta", 2, 0.01 * s.label_id, 0.5 * s.label_id, low_confidence=s.label_id % 2 == 0))
        if s.voxel_count else s
        for s in m.structures
    )
    return dataclasses.replace(m, structures=structures)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("sr_unc")
    paths, volume, seg = make_case(tmp, "HFS")
    seg = Segmentation(seg.label_map, seg.side_map, seg.labels, MODEL_NAME, MODEL_VERSION, volume.affine_lps)
    seg_ds = build_seg(volume, seg, paths, **EQUIPMENT)
    measurements = _with_uncertainty(hand_made_measurements(volume, seg))
    sr = build_sr(measurements, seg_ds, paths, volume=volume, labels=seg.labels, equipment=Equipment(**EQUIPMENT))
    path = tmp / "sr.dcm"
    sr.save_as(path)
    return {"path": path, "seg_ds": seg_ds, "measurements": measurements}


def test_sr_with_uncertainty_passes_dciodvfy(built: dict) -> None:
    report = run_dciodvfy(built["path"])
    assert report.errors == (), report.output


def test_each_structure_group_carries_entropy_volume_cv_and_the_flag(built: dict) -> None:
    groups = read_report(built["path"]).get_volumetric_roi_measurement_groups()
    smap = segment_map(built["seg_ds"])
    m: Measurements = built["measurements"]
    assert groups
    flagged = 0
    for g in groups:
        (number,) = g.referenced_segment.referenced_segment_numbers
        key, side = next(ks for ks, n in smap.items() if n == number)
        u = m.structure(key, side).uncertainty
        (entropy,) = g.get_measurements(name=codes.SEGMENTATION_ENTROPY)
        (spread,) = g.get_measurements(name=codes.VOLUME_SPREAD)
        assert float(entropy.value) == pytest.approx(u.mean_entropy)
        assert float(spread.value) == pytest.approx(u.volume_cv_pct)
        assert entropy.unit == codes.UNIT_ONE and spread.unit == codes.UNIT_PERCENT
        assert entropy.method == codes.TEST_TIME_AUGMENTATION
        (flag,) = g.get_qualitative_evaluations(name=codes.LOW_CONFIDENCE)
        assert flag.value == (codes.YES if u.low_confidence else codes.NO)
        flagged += u.low_confidence
    assert 0 < flagged < len(groups)


def test_no_uncertainty_items_without_uncertainty(tmp_path: Path) -> None:
    paths, volume, seg = make_case(tmp_path, "HFS")
    seg_ds = build_seg(volume, seg, paths, **EQUIPMENT)
    sr = build_sr(hand_made_measurements(volume, seg), seg_ds, paths, volume=volume, labels=seg.labels,
                  equipment=Equipment(**EQUIPMENT))
    path = tmp_path / "sr.dcm"
    sr.save_as(path)
    for g in read_report(path).get_volumetric_roi_measurement_groups():
        assert g.get_measurements(name=codes.SEGMENTATION_ENTROPY) == []
        assert g.get_qualitative_evaluations(name=codes.LOW_CONFIDENCE) == []
    assert isinstance(hd.sr.srread(path), hd.sr.Comprehensive3DSR)
