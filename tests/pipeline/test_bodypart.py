"""pipeline.bodypart: the femoral-shaft search and the femur label volumes (the bone machinery of pipeline.coverage)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.bodypart import femur_label_volumes_ml, find_femoral_shafts
from pipeline.coverage import CoveragePolicy, check_field_of_view
from pipeline.labels import LabelTable, load_label_table
from modelkit.phantom import Phantom, PhantomParams, generate_phantom
from pipeline.types import SIDE_LEFT, SIDE_RIGHT, Segmentation, Volume
from pipeline.volume import load_volume

PIXEL_MM = 2.0
DZ_MM = 4.0


@pytest.fixture(scope="module")
def table() -> LabelTable:
    return load_label_table()


def _volume(hu: np.ndarray, z_sign: float = 1.0) -> Volume:
    n_r, n_c = hu.shape[1:]
    x0 = -(n_c - 1) / 2 * PIXEL_MM
    y0 = -(n_r - 1) / 2 * PIXEL_MM
    z0 = 0.0 if z_sign > 0 else DZ_MM * (hu.shape[0] - 1)
    affine = np.array([[0, 0, PIXEL_MM, x0], [0, PIXEL_MM, 0, y0], [z_sign * DZ_MM, 0, 0, z0], [0, 0, 0, 1.0]])
    return Volume(hu.astype(np.float32), affine, "", "1.2.3", "1.2.3.4", "1.2.840.10008.5.1.4.1.1.2", ())


def _synthetic(
    n_slices: int,
    bones_k: tuple[int, int],
    bones: list[tuple[float, float, float, float]],
) -> np.ndarray:
    """Axial slices 240 x 240 pixels (480 mm): a soft-tissue body ellipse and bone cross-sections.

    ``bones``: (x mm, y mm, semi-axis x mm, semi-axis y mm) of cortical rings (1200 HU, 5 mm
    thick) filled with marrow (0 HU), present in slices bones_k[0]..bones_k[1]-1.
    """
    n = 240
    coords = (np.arange(n) - (n - 1) / 2) * PIXEL_MM
    y, x = np.meshgrid(coords, coords, indexing="ij")
    hu = np.full((n_slices, n, n), -1000.0, dtype=np.float32)
    body = (x / 230.0) ** 2 + (y / 150.0) ** 2 <= 1.0
    hu[:, body] = 40.0
    for bx, by, ax, ay in bones:
        outer = ((x - bx) / ax) ** 2 + ((y - by) / ay) ** 2 <= 1.0
        inner = ((x - bx) / (ax - 5.0)) ** 2 + ((y - by) / (ay - 5.0)) ** 2 <= 1.0
        hu[bones_k[0] : bones_k[1], outer] = 1200.0
        hu[bones_k[0] : bones_k[1], inner] = 0.0
    return hu


FEMORA = [(-90.0, 0.0, 14.0, 13.0), (90.0, 0.0, 14.0, 13.0)]


def test_two_round_shafts_over_80_mm_pass() -> None:
    volume = _volume(_synthetic(30, (5, 25), FEMORA))
    search = find_femoral_shafts(volume)
    assert search.pair_slices == 20
    assert search.run_mm == pytest.approx(80.0)
    assert search.run_z_mm == pytest.approx((20.0, 96.0))


def test_slice_order_does_not_matter() -> None:
    volume = _volume(_synthetic(30, (5, 25), FEMORA)[::-1].copy(), z_sign=-1.0)
    search = find_femoral_shafts(volume)
    assert search.run_mm == pytest.approx(80.0) and search.run_z_mm == pytest.approx((20.0, 96.0))


def test_a_short_run_is_measured() -> None:
    volume = _volume(_synthetic(30, (5, 15), FEMORA))  # 10 slices = 40 mm
    search = find_femoral_shafts(volume)
    assert search.run_mm == pytest.approx(40.0)
    assert "the longest run covers 40 mm (z 20..56 mm)" in search.describe()


def test_one_sided_bone_is_not_a_pair() -> None:
    search = find_femoral_shafts(_volume(_synthetic(30, (0, 30), FEMORA[:1])))
    assert search.run_mm == 0.0 and "round bone on one side only in 30 slices" in search.describe()


@pytest.mark.parametrize(
    ("bones", "kind"),
    [
        ([(0.0, 90.0, 20.0, 18.0)], "midline bone (spine, sacrum, sternum, symphysis)"),  # vertebral body
        ([(-200.0, 0.0, 12.0, 12.0), (200.0, 0.0, 12.0, 12.0)], "far-lateral bone (arms)"),  # humeri
        ([(-100.0, 40.0, 60.0, 12.0), (100.0, 40.0, 60.0, 12.0)], "large or elongated bone (iliac wings, pelvis, femoral neck)"),  # iliac wings
        ([(-120.0, -60.0, 6.0, 6.0), (120.0, -60.0, 6.0, 6.0)], "small or thin bone (ribs)"),
    ],
)
def test_other_bones_do_not_count(bones: list[tuple[float, float, float, float]], kind: str) -> None:
    message = find_femoral_shafts(_volume(_synthetic(30, (0, 30), bones))).describe()
    assert "0 of 30 axial slices (z 0..116 mm)" in message
    assert f"{kind} in 30 slices" in message, message


def test_femur_label_volumes(table: LabelTable) -> None:
    hu = _synthetic(30, (5, 25), FEMORA)
    volume = _volume(hu)
    labels = np.zeros(hu.shape, np.uint8)
    sides = np.zeros(hu.shape, np.uint8)
    seg = Segmentation(labels, sides, table, "unit", "0", affine_lps=volume.affine_lps)
    assert femur_label_volumes_ml(seg, volume.voxel_volume_ml) == (0.0, 0.0)
    femur = table.by_key("femur").id
    labels = labels.copy()
    sides = sides.copy()
    labels[5:25, 100:140, 30:70] = femur  # 20*40*40 voxels of 16 mm³ = 512 cm³
    sides[labels == femur] = SIDE_RIGHT
    seg = Segmentation(labels, sides, table, "unit", "0", affine_lps=volume.affine_lps)
    assert femur_label_volumes_ml(seg, volume.voxel_volume_ml) == pytest.approx((512.0, 0.0))


# --------------------------------------------------------------------------- phantom and real CT


@pytest.fixture(scope="module")
def phantom(table: LabelTable) -> Phantom:
    return generate_phantom(PhantomParams(seed=2, spacing_mm=(4.0, 3.0, 3.0), implant="left"), table)


def test_phantom_shafts_run_far(phantom: Phantom) -> None:
    search = find_femoral_shafts(Volume(phantom.hu, phantom.affine_lps, "", "1", "2", "3", ()))
    assert search.run_mm >= 150.0  # the phantom's shafts (implant stem included)


def test_tcia_chest_abdomen_ct_has_no_shafts(shared_data: Path) -> None:
    volume = load_volume(sorted((shared_data / "tcia-pancreas-ct" / "dcm").glob("*.dcm")))
    search = find_femoral_shafts(volume)
    assert search.run_mm == 0.0
    message = search.describe()
    assert "0 of 134 axial slices (z 86..485 mm)" in message
    assert "midline bone (spine, sacrum, sternum, symphysis) in 134 slices" in message
    assert "small or thin bone (ribs)" in message and "large or elongated bone" in message


def test_totalseg_hip_ct_has_femur_labels_but_no_shaft(shared_data: Path, table: LabelTable) -> None:
    """Mid-abdomen to just below the hip joints, left hip prosthesis.

    The scan ends at the intertrochanteric region: its proximal femora (heads, necks,
    trochanters; TotalSegmentator labels ~120 cm³ each) are there, but not one slice shows
    a shaft cross-section (they are large and elongated, the native right one a broken ring
    at 3 mm): it is a hip/pelvis CT, not a thigh CT. The node used to decline it as "not a
    thigh CT: no femoral shafts over 60 mm"; the field-of-view policy (pipeline.coverage)
    now accepts it by its hips (tests/pipeline/test_coverage.py).
    """
    folder = shared_data / "totalseg-hip-ct"
    img = nib.load(folder / "example_ct.nii.gz")
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine  # RAS -> LPS
    volume = Volume(np.asarray(img.dataobj, dtype=np.float32), affine, "", "1", "2", "3", ())
    ts = np.asarray(nib.load(folder / "example_seg_fast_force_split.nii.gz").dataobj)
    labels = np.where(np.isin(ts, (75, 76)), table.by_key("femur").id, 0).astype(np.uint8)
    sides = np.select([ts == 75, ts == 76], [SIDE_LEFT, SIDE_RIGHT], 0).astype(np.uint8)
    seg = Segmentation(labels, sides, table, "TotalSegmentator", "2", affine_lps=affine)

    right_ml, left_ml = femur_label_volumes_ml(seg, volume.voxel_volume_ml)  # type: ignore[misc]
    assert 100.0 < right_ml < 140.0 and 100.0 < left_ml < 140.0  # README: 118.7 / 121.2 ml

    search = find_femoral_shafts(volume)
    assert search.n_slices == 112 and search.pair_slices == 0 and search.run_mm == 0.0
    assert "0 of 112 axial slices (z 94..427 mm)" in search.describe()
    assert check_field_of_view(volume, CoveragePolicy()).get("hip") is not None  # what the workflow asks now


def test_bone_components_in_the_bone_box_equal_those_of_the_whole_slice(monkeypatch) -> None:
    """find_bone_components labels only the box around the slab's bone: every component, its hole filling
    (a ring's marrow, not a bay open to the slice border), its moments, thickness and dense share are the
    same as over the whole slice, also for bone touching the slice border."""
    import pipeline.bodypart as bodypart

    inside = _synthetic(6, (1, 5), FEMORA + [(0.0, -60.0, 30.0, 12.0)])
    edges = inside.copy()
    edges[2:4, 100:140, 0:12] = 900.0  # bone cut by the left edge of the slice
    edges[3, 0:30, 60:64] = edges[3, 0:30, 80:84] = edges[3, 26:30, 60:84] = 900.0  # a bay open to the top edge
    edges[4, 200:239, 200:239] = 700.0
    edges[4, 210:220, 210:220] = 100.0  # a hole near the bottom right corner
    volumes = [_volume(inside), _volume(edges)]
    boxed = [bodypart.find_bone_components(v) for v in volumes]
    monkeypatch.setattr(bodypart, "_bone_box", lambda m: (slice(0, m.shape[1]), slice(0, m.shape[2])) if m.any() else None)
    for got, volume in zip(boxed, volumes):
        whole = bodypart.find_bone_components(volume)
        assert got.slice_idx.size == whole.slice_idx.size >= 12
        for name in ("z_mm", "slice_idx", "offset_mm", "y_mm", "area_mm2", "roundness", "inscribed_mm", "dense_fraction"):
            assert np.array_equal(getattr(got, name), getattr(whole, name), equal_nan=True), name
    empty = bodypart.find_bone_components(_volume(np.full((3, 20, 20), -1000.0)))
    assert empty.slice_idx.size == 0 and empty.n_slices == 3
