"""load_volume: geometry (affine vs. written positions), HU values, compression, declines."""

from __future__ import annotations

import subprocess
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    EnhancedCTImageStorage,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from pipeline.errors import DeclinedError, VolumeError
from pipeline.volume import PADDING_HU, load_volume
from tests.conftest import require_tool
from tests.support.synthetic_ct import KEEP, slice_positions, write_ct_series

SMALL = dict(n_slices=12, rows=16, cols=20)  # rows != cols so that r/c mix-ups show


def _random_hu(n: int, rows: int, cols: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 2000, size=(n, rows, cols)).astype(np.float64)


def _headers(paths: list[Path]) -> dict[str, pydicom.Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in paths)}


def _assert_geometry(vol, paths: list[Path], hu_written: np.ndarray, positions: np.ndarray) -> None:
    """Every slice's ImagePositionPatient == affine @ (k,0,0,1); every written voxel is found
    at its LPS position."""
    headers = _headers(paths)
    assert set(vol.sop_instance_uids) == set(headers)
    for k, uid in enumerate(vol.sop_instance_uids):
        ipp = np.asarray([float(v) for v in headers[uid].ImagePositionPatient])
        np.testing.assert_allclose(vol.affine_lps @ np.array([k, 0, 0, 1.0]), [*ipp, 1.0], atol=1e-4)
    # LPS point of each written voxel (k, r, c) from the header values, mapped back to an index.
    ds0 = next(iter(headers.values()))
    iop = np.asarray([float(v) for v in ds0.ImageOrientationPatient])
    ps = [float(v) for v in ds0.PixelSpacing]
    n, rows, cols = hu_written.shape
    kk, rr, cc = np.meshgrid(np.arange(n), np.arange(rows), np.arange(cols), indexing="ij")
    pts = positions[kk] + (rr * ps[0])[..., None] * iop[3:] + (cc * ps[1])[..., None] * iop[:3]
    homog = np.concatenate([pts, np.ones(pts.shape[:-1] + (1,))], axis=-1)
    idx = np.einsum("ij,...j->...i", np.linalg.inv(vol.affine_lps), homog)[..., :3]
    np.testing.assert_allclose(idx, np.round(idx), atol=1e-3)
    idx = np.round(idx).astype(int)
    found = vol.hu[idx[..., 0], idx[..., 1], idx[..., 2]]
    np.testing.assert_array_equal(found, hu_written.astype(np.float32))


def _oblique() -> tuple[tuple[float, ...], tuple[float, ...]]:
    a, b = np.deg2rad(12.0), np.deg2rad(10.0)
    ry = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    m = rz @ ry
    return tuple(m @ [1, 0, 0]), tuple(m @ [0, 1, 0])


ORIENTATIONS = {
    "HFS": ((1, 0, 0), (0, 1, 0)),
    "FFS": ((-1, 0, 0), (0, 1, 0)),
    "HFP": ((-1, 0, 0), (0, -1, 0)),
    "FFP": ((1, 0, 0), (0, -1, 0)),
    "HFDL": ((0, -1, 0), (1, 0, 0)),
    "HFS-flipped-columns": ((1, 0, 0), (0, -1, 0)),
    "HFS-oblique": _oblique(),
}


@pytest.mark.parametrize("reverse_file_order", [False, True], ids=["files-ascending", "files-reversed"])
@pytest.mark.parametrize("descending", [False, True], ids=["in-ascending", "in-descending"])
@pytest.mark.parametrize("name", list(ORIENTATIONS))
def test_affine_maps_every_voxel_to_its_written_position(
    tmp_path: Path, name: str, descending: bool, reverse_file_order: bool
) -> None:
    row_dir, col_dir = ORIENTATIONS[name]
    hu = _random_hu(**{"n": 12, "rows": 16, "cols": 20})
    origin = (-30.0, 12.5, -410.0)
    paths = write_ct_series(
        tmp_path,
        **SMALL,
        pixel_spacing=(0.7, 0.9),
        slice_spacing=2.5,
        row_dir=row_dir,
        col_dir=col_dir,
        origin=origin,
        patient_position=name.split("-")[0],
        hu=hu,
        reverse_file_order=reverse_file_order,
        instance_number_descending=descending,
    )
    vol = load_volume(paths, min_slices=10)
    assert vol.shape == (12, 16, 20)
    assert vol.hu.dtype == np.float32
    np.testing.assert_allclose(vol.spacing_mm, (2.5, 0.7, 0.9), atol=1e-6)
    # slice axis points along +normal (row x col)
    normal = np.cross(row_dir, col_dir)
    assert float(vol.affine_lps[:3, 0] @ normal) > 0
    positions = slice_positions(12, slice_spacing=2.5, row_dir=row_dir, col_dir=col_dir, origin=origin)
    _assert_geometry(vol, paths, hu, positions)
    # slice k of the file writer is slice k of the volume (ascending along the normal)
    np.testing.assert_array_equal(vol.hu, hu.astype(np.float32))


def test_value_written_at_known_lps_point_is_found_there(tmp_path: Path) -> None:
    hu = np.full((12, 16, 20), -1000.0)
    hu[7, 3, 11] = 3000.0
    row_dir, col_dir = (-1, 0, 0), (0, -1, 0)  # prone
    paths = write_ct_series(
        tmp_path, **SMALL, row_dir=row_dir, col_dir=col_dir, origin=(100.0, 50.0, 20.0), hu=hu,
        patient_position="HFP", reverse_file_order=True,
    )
    # LPS of that voxel: slice 7 at z = 20 + 7*2 (normal (-x) x (-y) = +z), +3 rows along -y,
    # +11 columns along -x.
    point = np.array([100.0 - 11 * 0.8, 50.0 - 3 * 0.8, 20.0 + 7 * 2.0, 1.0])
    vol = load_volume(paths, min_slices=10)
    k, r, c = np.round(np.linalg.solve(vol.affine_lps, point)[:3]).astype(int)
    assert vol.hu[k, r, c] == 3000.0
    assert int((vol.hu == 3000.0).sum()) == 1


def test_uids_and_metadata(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, **SMALL, instance_number_descending=True)
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    vol = load_volume(paths, min_slices=10)
    assert vol.study_instance_uid == ds.StudyInstanceUID
    assert vol.series_instance_uid == ds.SeriesInstanceUID
    assert vol.frame_of_reference_uid == ds.FrameOfReferenceUID
    assert vol.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    assert len(set(vol.sop_instance_uids)) == 12
    assert not vol.hu.flags.writeable


def test_rescale_slope_and_intercept_are_applied(tmp_path: Path) -> None:
    hu = _random_hu(12, 16, 20) / 2.0  # multiples of 0.5 HU
    paths = write_ct_series(tmp_path, **SMALL, hu=hu, rescale_slope=0.5, rescale_intercept=-1000.0)
    np.testing.assert_array_equal(load_volume(paths, min_slices=10).hu, hu.astype(np.float32))


@pytest.mark.parametrize("ts", [pydicom.uid.ExplicitVRLittleEndian, ImplicitVRLittleEndian], ids=["explicit", "implicit"])
def test_pixel_padding_value_becomes_air(tmp_path: Path, ts: str) -> None:
    hu = _random_hu(12, 16, 20)
    hu[:, :2, :2] = -3024.0  # stored -2000 with intercept -1024
    paths = write_ct_series(tmp_path, **SMALL, hu=hu, transfer_syntax=ts, extra={"PixelPaddingValue": -2000})
    vol = load_volume(paths, min_slices=10)
    assert np.all(vol.hu[:, :2, :2] == PADDING_HU)
    np.testing.assert_array_equal(vol.hu[:, 2:, 2:], hu[:, 2:, 2:].astype(np.float32))


def test_pixel_padding_range(tmp_path: Path) -> None:
    hu = _random_hu(12, 16, 20)
    hu[:, 0, :] = -3024.0
    hu[:, 1, :] = -3000.0
    paths = write_ct_series(
        tmp_path, **SMALL, hu=hu, extra={"PixelPaddingValue": -2000, "PixelPaddingRangeLimit": -1976}
    )
    vol = load_volume(paths, min_slices=10)
    assert np.all(vol.hu[:, :2, :] == PADDING_HU)
    np.testing.assert_array_equal(vol.hu[:, 2:, :], hu[:, 2:, :].astype(np.float32))


@pytest.mark.parametrize("ts", [JPEGLSLossless, JPEG2000Lossless, RLELossless], ids=lambda u: u.name)
def test_compressed_series_loads_same_hu(tmp_path: Path, ts: str) -> None:
    grid = dict(n_slices=10, rows=32, cols=40)  # JPEG 2000 (OpenJPEG) needs >= 32 pixels a side
    hu = _random_hu(10, 32, 40, seed=5)
    hu[0, 0, 0], hu[1, 1, 1] = -2048.0, 3071.0  # beyond the usual 12-bit CT range
    plain = write_ct_series(tmp_path / "plain", **grid, hu=hu)
    packed = write_ct_series(tmp_path / "packed", **grid, hu=hu, transfer_syntax=ts)
    assert pydicom.dcmread(packed[0]).file_meta.TransferSyntaxUID == ts
    a, b = load_volume(plain, min_slices=10), load_volume(packed, min_slices=10)
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.affine_lps, b.affine_lps)
    assert a.sop_instance_uids == b.sop_instance_uids


def test_jpeg_lossless_from_dcmcjpeg_loads_same_hu(tmp_path: Path) -> None:
    tool = require_tool("dcmcjpeg")
    plain = write_ct_series(tmp_path / "plain", **SMALL, hu=_random_hu(12, 16, 20, seed=9))
    (tmp_path / "jpeg").mkdir()
    packed = []
    for p in plain:
        out = tmp_path / "jpeg" / p.name
        subprocess.run([tool, "+e1", str(p), str(out)], check=True, capture_output=True, timeout=60)
        packed.append(out)
    assert pydicom.dcmread(packed[0]).file_meta.TransferSyntaxUID == JPEGLosslessSV1
    np.testing.assert_array_equal(load_volume(plain, min_slices=10).hu, load_volume(packed, min_slices=10).hu)


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count pydicom.dcmread calls: header-only (stop_before_pixels) and full reads."""
    counts = {"headers": 0, "full": 0}
    real = pydicom.dcmread

    def counting(fp, *args, **kwargs):
        counts["headers" if kwargs.get("stop_before_pixels") else "full"] += 1
        return real(fp, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    return counts


def test_given_headers_replace_the_header_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hu = _random_hu(12, 16, 20, seed=3)
    paths = write_ct_series(tmp_path, **SMALL, hu=hu, reverse_file_order=True)
    reference = load_volume(paths, min_slices=10)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    counts = _count_reads(monkeypatch)
    vol = load_volume(paths, min_slices=10, headers=headers)
    assert counts == {"headers": 0, "full": len(paths)}  # each file read once more, for its pixels only
    np.testing.assert_array_equal(vol.hu, reference.hu)
    np.testing.assert_array_equal(vol.affine_lps, reference.affine_lps)
    assert vol.sop_instance_uids == reference.sop_instance_uids
    assert vol.series_instance_uid == reference.series_instance_uid


@pytest.mark.parametrize("headers", [None, ()], ids=["none", "empty"])
def test_without_headers_each_header_is_read_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, headers: tuple | None
) -> None:
    paths = write_ct_series(tmp_path, **SMALL)
    counts = _count_reads(monkeypatch)
    load_volume(paths, min_slices=10, headers=headers)
    assert counts == {"headers": len(paths), "full": len(paths)}


def test_given_headers_are_validated_like_read_ones(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, **SMALL)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    headers[4].Modality = "MR"
    with pytest.raises(VolumeError, match=r"Modality \(0008,0060\) of SOPInstanceUID .* is 'MR'"):
        load_volume(paths, min_slices=10, headers=headers)


def test_headers_must_match_paths_one_to_one(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, **SMALL)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    with pytest.raises(ValueError, match=r"11 header\(s\) given for 12 path\(s\)"):
        load_volume(paths, min_slices=10, headers=headers[:-1])


# ---------------------------------------------------------------- real data


def _tcia(shared_data: Path) -> list[Path]:
    paths = sorted((shared_data / "tcia-pancreas-ct" / "dcm").glob("*.dcm"))
    assert len(paths) == 134
    return paths


def test_real_tcia_series(shared_data: Path) -> None:
    paths = _tcia(shared_data)
    vol = load_volume(paths)
    assert vol.shape == (134, 512, 512)
    np.testing.assert_allclose(vol.spacing_mm, (3.0, 1.0742, 1.0742), atol=1e-3)
    assert -1001 <= float(vol.hu.min()) <= -999
    assert 1980 <= float(vol.hu.max()) <= 1995
    # InstanceNumber 134 is the bottom slice: it must be slice 0 (ascending z for HFS axial).
    by_in = {int(ds.InstanceNumber): str(ds.SOPInstanceUID) for ds in _headers(paths).values()}
    assert vol.sop_instance_uids[0] == by_in[134]
    assert vol.sop_instance_uids[-1] == by_in[1]
    np.testing.assert_allclose(vol.affine_lps[:3, 3], (-275.0, -178.1, 85.91), atol=1e-3)
    np.testing.assert_allclose(vol.affine_lps[:3, 3] + 133 * vol.affine_lps[:3, 0], (-275.0, -178.1, 484.91), atol=1e-2)
    # soft tissue in the middle of the body, air in the corner
    assert -200 < float(np.median(vol.hu[67, 230:280, 230:280])) < 200
    assert float(vol.hu[67, 0, 0]) < -900


def test_real_tcia_subset_compressed_dcmcjpls_and_j2k(shared_data: Path, tmp_path: Path) -> None:
    tool = require_tool("dcmcjpls")
    subset = _tcia(shared_data)[60:70]
    reference = load_volume(subset, min_slices=10)
    jls_dir, j2k_dir = tmp_path / "jls", tmp_path / "j2k"
    jls_dir.mkdir()
    j2k_dir.mkdir()
    jls, j2k = [], []
    for p in subset:
        out = jls_dir / p.name
        subprocess.run([tool, str(p), str(out)], check=True, capture_output=True, timeout=60)
        jls.append(out)
        ds = pydicom.dcmread(p)
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)
        ds.save_as(j2k_dir / p.name, enforce_file_format=True)
        j2k.append(j2k_dir / p.name)
    assert pydicom.dcmread(jls[0]).file_meta.TransferSyntaxUID == JPEGLSLossless
    assert pydicom.dcmread(j2k[0]).file_meta.TransferSyntaxUID == JPEG2000Lossless
    for packed in (jls, j2k):
        vol = load_volume(packed, min_slices=10)
        np.testing.assert_array_equal(vol.hu, reference.hu)
        np.testing.assert_array_equal(vol.affine_lps, reference.affine_lps)
        assert vol.sop_instance_uids == reference.sop_instance_uids


def test_real_ge_gantry_tilt_is_declined(shared_data: Path) -> None:
    paths = sorted((shared_data / "ge-gantry-tilt-ct" / "In_GE").glob("*.dcm"))
    assert len(paths) == 28
    with pytest.raises(VolumeError) as info:
        load_volume(paths)
    msg = str(info.value)
    assert "tilt" in msg
    assert "18.5 degrees" in msg
    assert isinstance(info.value, DeclinedError)


def test_real_ge_tilt_without_tilt_tag_is_declined_from_positions(shared_data: Path, tmp_path: Path) -> None:
    paths = []
    for p in sorted((shared_data / "ge-gantry-tilt-ct" / "In_GE").glob("*.dcm")):
        ds = pydicom.dcmread(p, stop_before_pixels=False)
        del ds.GantryDetectorTilt
        ds.save_as(tmp_path / p.name)
        paths.append(tmp_path / p.name)
    with pytest.raises(VolumeError, match=r"not along the slice normal; they deviate 18\.5 degrees"):
        load_volume(paths)


# ---------------------------------------------------------------- declines


def test_synthetic_tilt_header(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, **SMALL, gantry_tilt=-12.0)
    with pytest.raises(VolumeError, match=r"GantryDetectorTilt \(0018,1120\) .* is -12 degrees.*deviate 12\.0 degrees"):
        load_volume(paths, min_slices=10)


def test_synthetic_tilt_positions_only(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, **SMALL, gantry_tilt=15.0, extra={"GantryDetectorTilt": "0"})
    with pytest.raises(VolumeError, match=r"tilt: slice positions .* deviate 15\.0 degrees"):
        load_volume(paths, min_slices=10)


def test_mixed_orientation(tmp_path: Path) -> None:
    tilted = [1, 0, 0, 0, 0.99, 0.14106736]
    paths = write_ct_series(
        tmp_path, **SMALL, extra={"ImageOrientationPatient": lambda k: tilted if k == 5 else [1, 0, 0, 0, 1, 0]}
    )
    with pytest.raises(VolumeError, match=r"mixed ImageOrientationPatient \(0020,0037\).*0\.99"):
        load_volume(paths, min_slices=10)


def test_mixed_rows_columns(tmp_path: Path) -> None:
    a = write_ct_series(tmp_path / "a", **SMALL)
    uid = str(pydicom.dcmread(a[0]).SeriesInstanceUID)
    b = write_ct_series(tmp_path / "b", n_slices=12, rows=16, cols=24, series_uid=uid, seed="b")
    with pytest.raises(VolumeError, match=r"mixed Rows/Columns.* is 16x24.* is 16x20"):
        load_volume(a[:11] + b[11:], min_slices=10)


def test_mixed_pixel_spacing(tmp_path: Path) -> None:
    a = write_ct_series(tmp_path / "a", **SMALL)
    uid = str(pydicom.dcmread(a[0]).SeriesInstanceUID)
    b = write_ct_series(tmp_path / "b", **SMALL, pixel_spacing=(0.8, 0.9), series_uid=uid, seed="b")
    with pytest.raises(VolumeError, match=r"mixed PixelSpacing \(0028,0030\).*\[0\.8, 0\.9\]"):
        load_volume(a[:11] + b[11:], min_slices=10)


def test_mixed_series(tmp_path: Path) -> None:
    a = write_ct_series(tmp_path / "a", **SMALL)
    b = write_ct_series(tmp_path / "b", **SMALL, seed="other")
    with pytest.raises(VolumeError, match=r"mixed SeriesInstanceUID"):
        load_volume(a[:6] + b[6:], min_slices=10)


def test_duplicate_positions(tmp_path: Path) -> None:
    a = write_ct_series(tmp_path / "a", **SMALL)
    uid = str(pydicom.dcmread(a[0]).SeriesInstanceUID)
    b = write_ct_series(tmp_path / "b", **SMALL, series_uid=uid, seed="copy")
    dup_a = str(pydicom.dcmread(a[4]).SOPInstanceUID)
    dup_b = str(pydicom.dcmread(b[4]).SOPInstanceUID)
    assert dup_a != dup_b
    with pytest.raises(VolumeError) as info:
        load_volume(a + [b[4]], min_slices=10)
    msg = str(info.value)
    assert "duplicate slice position [-25.6, -25.6, 8.0]" in msg
    assert dup_a in msg and dup_b in msg


def test_missing_slice(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, **SMALL)
    with pytest.raises(VolumeError) as info:
        load_volume(paths[:5] + paths[6:], min_slices=10)
    msg = str(info.value)
    assert "uneven slice spacing" in msg
    assert "min 2.000, median 2.000, max 4.000 mm" in msg
    assert "1 missing slice" in msg


def test_uneven_spacing(tmp_path: Path) -> None:
    z = [0, 2, 4, 6, 8, 10, 12.3, 14.3, 16.3, 18.3, 20.3, 22.3]
    paths = write_ct_series(tmp_path, **SMALL, extra={"ImagePositionPatient": lambda k: [-25.6, -25.6, z[k]]})
    with pytest.raises(VolumeError, match=r"uneven slice spacing.*min 2\.000, median 2\.000, max 2\.300 mm.*within 0\.050 mm"):
        load_volume(paths, min_slices=10)


def test_spacing_within_tolerance_loads(tmp_path: Path) -> None:
    z = [0, 2, 4.015, 6, 8, 10, 12, 14.02, 16, 18, 20, 22]  # jitter below 0.05 mm
    paths = write_ct_series(tmp_path, **SMALL, extra={"ImagePositionPatient": lambda k: [-25.6, -25.6, z[k]]})
    vol = load_volume(paths, min_slices=10)
    assert vol.spacing_mm[0] == pytest.approx(2.0)


def test_too_few_slices(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, n_slices=5, rows=8, cols=8)
    with pytest.raises(VolumeError, match=r"5 instance\(s\); at least 20 required"):
        load_volume(paths)


def test_not_ct(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, **SMALL, modality="MR")
    with pytest.raises(VolumeError, match=r"Modality \(0008,0060\) .* is 'MR'; allowed: 'CT'"):
        load_volume(paths, min_slices=10)


def test_enhanced_ct_sop_class(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, **SMALL, sop_class_uid=EnhancedCTImageStorage)
    with pytest.raises(VolumeError, match=r"SOPClassUID.*1\.2\.840\.10008\.5\.1\.4\.1\.1\.2\.1 \(Enhanced CT Image Storage\)"):
        load_volume(paths, min_slices=10)


def test_multi_frame(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, **SMALL, extra={"NumberOfFrames": 3})
    with pytest.raises(VolumeError, match=r"multi-frame object \(NumberOfFrames 3"):
        load_volume(paths, min_slices=10)


@pytest.mark.parametrize(
    "keyword, tag",
    [
        ("ImagePositionPatient", "(0020,0032)"),
        ("ImageOrientationPatient", "(0020,0037)"),
        ("PixelSpacing", "(0028,0030)"),
        ("Rows", "(0028,0010)"),
        ("RescaleSlope", "(0028,1053)"),
    ],
)
def test_missing_geometry_tag(tmp_path: Path, keyword: str, tag: str) -> None:
    paths = write_ct_series(tmp_path, **SMALL, extra={keyword: lambda k: None if k == 3 else KEEP})
    with pytest.raises(VolumeError, match=rf"{keyword} \({tag[1:-1]}\) is missing"):
        load_volume(paths, min_slices=10)


def test_missing_pixel_data(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, **SMALL, extra={"PixelData": lambda k: None if k == 7 else KEEP})
    with pytest.raises(VolumeError, match=r"PixelData \(7FE0,0010\) is missing in SOPInstanceUID"):
        load_volume(paths, min_slices=10)


def test_not_dicom(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, **SMALL)
    paths[3].write_bytes(b"not a dicom file at all")
    with pytest.raises(VolumeError, match=r"CT0003\.dcm is not readable as a DICOM file"):
        load_volume(paths, min_slices=10)


def test_non_orthogonal_orientation(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, **SMALL, extra={"ImageOrientationPatient": [1, 0, 0, 0.2, 1, 0]})
    with pytest.raises(VolumeError, match=r"not two orthogonal unit vectors"):
        load_volume(paths, min_slices=10)


def test_memory_peak_is_about_one_volume(tmp_path: Path) -> None:
    n, rows, cols = 24, 192, 192
    paths = write_ct_series(tmp_path, n_slices=n, rows=rows, cols=cols, hu=lambda x, y, z: 0 * x)
    volume_bytes = n * rows * cols * 4
    tracemalloc.start()
    try:
        vol = load_volume(paths)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert vol.hu.nbytes == volume_bytes
    assert peak < 2.0 * volume_bytes, f"peak {peak} bytes for a {volume_bytes}-byte volume"
