"""Enhanced CT / Legacy Converted Enhanced CT (multi-frame, PS3.3 A.38 / A.70): writer, loading, selection.

The reference for every multi-frame object is the single-frame series that
write_ct_series writes with the same geometry and HU function: both must load to the
same HU array and affine.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    LegacyConvertedEnhancedCTImageStorage,
    RLELossless,
    generate_uid,
)

from pipeline.errors import DeclinedError, VolumeError
from pipeline.selection import select_series
from pipeline.volume import load_volume, source_frames
from tests.support.dciodvfy import dciodvfy_errors
from tests.support.synthetic_ct import write_ct_series, write_enhanced_ct, write_localizer

GRID = dict(rows=16, cols=20)  # rows != cols so that r/c mix-ups show
N = 12


def _hu(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Distinct values along every axis, so that any flip or shift changes the array."""
    return np.round(3 * x + 7 * y + 11 * z)


def _edit(path: Path, change: Callable[[Dataset], None]) -> Path:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path, enforce_file_format=True)
    return path


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _frame_ipp(ds: Dataset, frame_number: int) -> np.ndarray:
    item = ds.PerFrameFunctionalGroupsSequence[frame_number - 1]
    return np.asarray([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])


# ---------------------------------------------------------------- writer


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        dict(transfer_syntax=JPEGLSLossless, reverse_frame_order=True),
        dict(transfer_syntax=RLELossless, per_frame_groups=True),
        dict(sop_class_uid=LegacyConvertedEnhancedCTImageStorage),
        dict(sop_class_uid=LegacyConvertedEnhancedCTImageStorage, per_frame_groups=True),
    ],
    ids=["enhanced", "enhanced-jpegls-reversed", "enhanced-rle-per-frame", "legacy", "legacy-per-frame"],
)
def test_writer_output_is_valid(tmp_path: Path, kwargs: dict) -> None:
    path = write_enhanced_ct(tmp_path, n_frames=4, **GRID, **kwargs)
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == kwargs.get("sop_class_uid", EnhancedCTImageStorage)
    assert ds.file_meta.TransferSyntaxUID == kwargs.get("transfer_syntax", ExplicitVRLittleEndian)
    assert int(ds.NumberOfFrames) == 4 and len(ds.PerFrameFunctionalGroupsSequence) == 4
    assert ds.pixel_array.shape == (4, 16, 20)
    assert dciodvfy_errors(path) == []


# ---------------------------------------------------------------- loading: same as single-frame


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        dict(reverse_frame_order=True),
        dict(col_dir=(0, -1, 0)),
        dict(col_dir=(0, -1, 0), reverse_frame_order=True, per_frame_groups=True),
        dict(row_dir=(-1, 0, 0), col_dir=(0, -1, 0), origin=(30.0, 12.5, -410.0)),
        dict(transfer_syntax=JPEGLSLossless, reverse_frame_order=True),
        dict(transfer_syntax=RLELossless),
        dict(transfer_syntax=JPEG2000Lossless, rows=32, cols=40),
        dict(sop_class_uid=LegacyConvertedEnhancedCTImageStorage),
        dict(sop_class_uid=LegacyConvertedEnhancedCTImageStorage, reverse_frame_order=True, per_frame_groups=True),
        dict(sop_class_uid=LegacyConvertedEnhancedCTImageStorage, transfer_syntax=RLELossless, col_dir=(0, -1, 0)),
    ],
    ids=[
        "enhanced",
        "reversed-frames",
        "flipped-columns",
        "flipped-columns-reversed-per-frame-groups",
        "prone-offset-origin",
        "jpegls-reversed",
        "rle",
        "jpeg2000",
        "legacy",
        "legacy-reversed-per-frame-groups",
        "legacy-rle-flipped-columns",
    ],
)
def test_enhanced_loads_like_the_single_frame_series(tmp_path: Path, kwargs: dict) -> None:
    grid = {**GRID, **{k: kwargs.pop(k) for k in ("rows", "cols") if k in kwargs}}
    geometry = {k: kwargs[k] for k in ("row_dir", "col_dir", "origin") if k in kwargs}
    reference = load_volume(write_ct_series(tmp_path / "single", n_slices=N, **grid, **geometry, hu=_hu), min_slices=10)
    path = write_enhanced_ct(tmp_path / "multi", n_frames=N, **grid, hu=_hu, **kwargs)
    ds = pydicom.dcmread(path, stop_before_pixels=True)

    vol = load_volume([path], min_slices=10)

    assert vol.shape == (N, grid["rows"], grid["cols"])
    np.testing.assert_array_equal(vol.hu, reference.hu)
    np.testing.assert_allclose(vol.affine_lps, reference.affine_lps, atol=1e-9)
    assert vol.sop_instance_uids == (str(ds.SOPInstanceUID),) * N
    assert vol.sop_class_uid == kwargs.get("sop_class_uid", EnhancedCTImageStorage)
    assert vol.series_instance_uid == str(ds.SeriesInstanceUID)
    assert vol.frame_of_reference_uid == reference.frame_of_reference_uid
    # Slice k is the frame whose PlanePosition is affine @ (k, 0, 0, 1).
    frames = source_frames([path])
    expected = list(range(N, 0, -1)) if kwargs.get("reverse_frame_order") else list(range(1, N + 1))
    assert frames == [(str(ds.SOPInstanceUID), n) for n in expected]
    for k, (_, n) in enumerate(frames):
        np.testing.assert_allclose(vol.affine_lps @ [k, 0, 0, 1.0], [*_frame_ipp(ds, n), 1.0], atol=1e-4)


def test_legacy_converted_by_highdicom_loads_like_its_sources(tmp_path: Path) -> None:
    """An independent writer: highdicom's Legacy Converted Enhanced CT of a single-frame series."""
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    paths = write_ct_series(tmp_path / "single", n_slices=N, **GRID, hu=_hu, reverse_file_order=True, kernel="B70f")
    converted = LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in paths],
        series_instance_uid=generate_uid(entropy_srcs=["hd-series"]),
        series_number=7,
        sop_instance_uid=generate_uid(entropy_srcs=["hd-sop"]),
        instance_number=1,
    )
    out = tmp_path / "legacy.dcm"
    converted.save_as(out)
    reference = load_volume(paths, min_slices=10)
    vol = load_volume([out], min_slices=10)
    np.testing.assert_array_equal(vol.hu, reference.hu)
    np.testing.assert_allclose(vol.affine_lps, reference.affine_lps, atol=1e-9)
    ds = pydicom.dcmread(out, stop_before_pixels=True)
    frame_positions = np.asarray([_frame_ipp(ds, n) for n in range(1, N + 1)])
    for k, (uid, n) in enumerate(source_frames([out])):
        assert uid == str(ds.SOPInstanceUID)
        slice_position = reference.affine_lps[:3, 3] + k * reference.affine_lps[:3, 0]
        assert int(np.argmin(np.linalg.norm(frame_positions - slice_position, axis=1))) + 1 == n
    chosen = select_series(
        {str(ds.SeriesInstanceUID): [out]}, study_instance_uid=str(ds.StudyInstanceUID), min_slices=10
    )
    assert chosen.convolution_kernel == "B70f"  # from the Unassigned Shared Converted Attributes


def test_per_frame_rescale_is_applied_per_frame(tmp_path: Path) -> None:
    reference = load_volume(write_ct_series(tmp_path / "single", n_slices=N, **GRID, hu=_hu), min_slices=10)
    path = write_enhanced_ct(tmp_path / "multi", n_frames=N, **GRID, hu=_hu, per_frame_groups=True)

    def change(ds: Dataset) -> None:
        item = ds.PerFrameFunctionalGroupsSequence[4].PixelValueTransformationSequence[0]
        item.RescaleIntercept = "-1000"  # frame 5 (slice 4): +24 HU
        item.RescaleSlope = "2"  # and stored values doubled

    _edit(path, change)
    vol = load_volume([path], min_slices=10)
    expected = reference.hu.copy()
    expected[4] = (reference.hu[4] + 1024) * 2 - 1000
    np.testing.assert_array_equal(vol.hu, expected)


def test_series_split_over_two_multi_frame_instances(tmp_path: Path) -> None:
    reference = load_volume(write_ct_series(tmp_path / "single", n_slices=N, **GRID, hu=_hu), min_slices=10)
    series_uid = generate_uid(entropy_srcs=["split-series"])
    # frames 0..5 in the second file (reversed), 6..11 in the first
    upper = write_enhanced_ct(
        tmp_path / "multi", n_frames=6, **GRID, hu=_hu, series_uid=series_uid, seed="upper",
        origin=(-25.6, -25.6, 12.0), file_name="A.dcm",
    )
    lower = write_enhanced_ct(
        tmp_path / "multi", n_frames=6, **GRID, hu=_hu, series_uid=series_uid, seed="lower",
        reverse_frame_order=True, transfer_syntax=RLELossless, file_name="B.dcm",
    )
    up, low = _uid(upper), _uid(lower)
    assert up != low

    vol = load_volume([upper, lower], min_slices=10)

    np.testing.assert_array_equal(vol.hu, reference.hu)
    np.testing.assert_allclose(vol.affine_lps, reference.affine_lps, atol=1e-9)
    assert vol.sop_instance_uids == (low,) * 6 + (up,) * 6
    assert source_frames([upper, lower]) == [(low, n) for n in (6, 5, 4, 3, 2, 1)] + [(up, n) for n in range(1, 7)]


def test_multi_frame_headers_given_replace_the_header_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = [write_enhanced_ct(tmp_path, n_frames=N, **GRID, hu=_hu, reverse_frame_order=True)]
    reference, frames = load_volume(paths, min_slices=10), source_frames(paths)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]

    def no_header_reads(*args, **kwargs):
        raise AssertionError("a header was read again")

    monkeypatch.setattr(pydicom, "dcmread", no_header_reads)
    vol = load_volume(paths, min_slices=10, headers=headers)
    np.testing.assert_array_equal(vol.hu, reference.hu)
    np.testing.assert_array_equal(vol.affine_lps, reference.affine_lps)
    assert vol.sop_instance_uids == reference.sop_instance_uids
    assert source_frames(paths, headers=headers) == frames


def test_source_frames_of_a_single_frame_series(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, n_slices=N, **GRID, reverse_file_order=True)
    vol = load_volume(paths, min_slices=10)
    assert source_frames(paths) == [(uid, 1) for uid in vol.sop_instance_uids]


def test_multi_frame_is_filled_frame_by_frame(tmp_path: Path) -> None:
    load_volume([write_enhanced_ct(tmp_path / "warm", n_frames=2, rows=8, cols=8)], min_slices=1)  # lazy imports
    n, rows, cols = 24, 192, 192
    path = write_enhanced_ct(tmp_path / "big", n_frames=n, rows=rows, cols=cols, hu=lambda x, y, z: 0 * x)
    volume_bytes = n * rows * cols * 4
    tracemalloc.start()
    try:
        vol = load_volume([path])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert vol.hu.nbytes == volume_bytes
    # decoding all frames at once (ds.pixel_array, int16) would add half a volume on top
    assert peak < 1.3 * volume_bytes, f"peak {peak} bytes for a {volume_bytes}-byte volume"


# ---------------------------------------------------------------- declines on frames


def _positions(ds: Dataset, position: Callable[[int, np.ndarray], list[float]]) -> None:
    for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        ipp = np.asarray([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        item.PlanePositionSequence[0].ImagePositionPatient = [f"{v:.6g}" for v in position(i, ipp)]


def test_tilt_in_the_header_of_frames_is_declined(tmp_path: Path) -> None:
    path = write_enhanced_ct(tmp_path, n_frames=N, **GRID)

    def tilt(ds: Dataset) -> None:
        ds.SharedFunctionalGroupsSequence[0].CTAcquisitionDetailsSequence[0].GantryDetectorTilt = "-12"

    _edit(path, tilt)
    with pytest.raises(VolumeError, match=r"GantryDetectorTilt \(0018,1120\) of SOPInstanceUID \S+ frame 1 is -12 deg"):
        load_volume([path], min_slices=10)
    # selection lets a tilted axial series through so that load_volume declines it with that reason
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    chosen = select_series(
        {str(ds.SeriesInstanceUID): [path]}, study_instance_uid=str(ds.StudyInstanceUID), min_slices=10
    )
    assert chosen.paths == (path,)


def test_tilt_in_frame_positions_is_declined(tmp_path: Path) -> None:
    path = write_enhanced_ct(tmp_path, n_frames=N, **GRID, reverse_frame_order=True)
    shear = np.tan(np.radians(15.0))
    _edit(path, lambda ds: _positions(ds, lambda i, p: [p[0], p[1] + shear * p[2], p[2]]))
    with pytest.raises(VolumeError, match=r"tilt: slice positions .* deviate 15\.0 degrees") as info:
        load_volume([path], min_slices=10)
    assert isinstance(info.value, DeclinedError)


def test_uneven_frame_spacing_is_declined(tmp_path: Path) -> None:
    path = write_enhanced_ct(tmp_path, n_frames=N, **GRID)
    z = [0, 2, 4, 6, 8, 10, 12.3, 14.3, 16.3, 18.3, 20.3, 22.3]
    _edit(path, lambda ds: _positions(ds, lambda i, p: [p[0], p[1], z[i]]))
    uid = _uid(path)
    with pytest.raises(VolumeError) as info:
        load_volume([path], min_slices=10)
    msg = str(info.value)
    assert "uneven slice spacing" in msg and "min 2.000, median 2.000, max 2.300 mm" in msg
    assert f"worst between SOPInstanceUID {uid} frame 6 and {uid} frame 7" in msg


def test_missing_frame_is_declined(tmp_path: Path) -> None:
    path = write_enhanced_ct(tmp_path, n_frames=N, **GRID)
    # frame 6 moved on top of frame 7's neighbour: a gap at 10 mm and two frames 2 mm apart elsewhere
    _edit(path, lambda ds: _positions(ds, lambda i, p: [p[0], p[1], p[2] + (2.0 if i >= 5 else 0.0)]))
    with pytest.raises(VolumeError, match=r"uneven slice spacing.*max 4\.000 mm.*1 missing slice"):
        load_volume([path], min_slices=10)


def test_duplicate_frame_positions_are_declined(tmp_path: Path) -> None:
    path = write_enhanced_ct(tmp_path, n_frames=N, **GRID)
    _edit(path, lambda ds: _positions(ds, lambda i, p: [p[0], p[1], 8.0 if i == 5 else p[2]]))
    uid = _uid(path)
    with pytest.raises(VolumeError) as info:
        load_volume([path], min_slices=10)
    msg = str(info.value)
    assert "duplicate slice position [-25.6, -25.6, 8.0]" in msg
    assert f"{uid} frame 5" in msg and f"{uid} frame 6" in msg


def test_mixed_orientation_between_frames_is_declined(tmp_path: Path) -> None:
    path = write_enhanced_ct(tmp_path, n_frames=N, **GRID, per_frame_groups=True)

    def change(ds: Dataset) -> None:
        ds.PerFrameFunctionalGroupsSequence[5].PlaneOrientationSequence[0].ImageOrientationPatient = [
            1, 0, 0, 0, 0.99, 0.14106736,
        ]

    _edit(path, change)
    with pytest.raises(VolumeError, match=r"mixed ImageOrientationPatient \(0020,0037\): \S+ \S+ frame 6 has .*0\.99"):
        load_volume([path], min_slices=10)


def test_missing_plane_position_of_a_frame(tmp_path: Path) -> None:
    path = write_enhanced_ct(tmp_path, n_frames=N, **GRID)
    _edit(path, lambda ds: delattr(ds.PerFrameFunctionalGroupsSequence[3], "PlanePositionSequence"))
    with pytest.raises(VolumeError, match=r"ImagePositionPatient \(0020,0032\) is missing or empty in \S+ \S+ frame 4"):
        load_volume([path], min_slices=10)


def test_number_of_frames_must_match_the_functional_groups(tmp_path: Path) -> None:
    path = write_enhanced_ct(tmp_path, n_frames=N, **GRID)
    _edit(path, lambda ds: setattr(ds, "NumberOfFrames", 13))
    with pytest.raises(VolumeError, match=r"NumberOfFrames \(0028,0008\) '?13'? but 12 PerFrameFunctional"):
        load_volume([path], min_slices=10)


def test_min_slices_counts_frames(tmp_path: Path) -> None:
    path = write_enhanced_ct(tmp_path, n_frames=N, **GRID)
    assert load_volume([path], min_slices=N).shape[0] == N
    expected = r"the series has 12 slice\(s\) \(frames of 1 multi-frame instance\(s\).*at least 13 required"
    with pytest.raises(VolumeError, match=expected):
        load_volume([path], min_slices=N + 1)


# ---------------------------------------------------------------- selection


def _enhanced(tmp_path: Path, name: str, **kwargs) -> tuple[str, list[Path]]:
    kwargs.setdefault("n_frames", 20)
    path = write_enhanced_ct(tmp_path / name, rows=8, cols=8, seed=name, **kwargs)
    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID), [path]


def test_enhanced_soft_tissue_kernel_wins_over_bone(tmp_path: Path) -> None:
    bone_uid, bone = _enhanced(tmp_path, "bone", kernel="B70f", description="Thigh 1.0 B70f", series_number=3)
    soft_uid, soft = _enhanced(tmp_path, "soft", kernel="B30f", description="Thigh 1.0 B30f", series_number=2)
    loc = write_localizer(tmp_path / "loc")
    loc_uid = str(pydicom.dcmread(loc).SeriesInstanceUID)
    study = str(pydicom.dcmread(soft[0], stop_before_pixels=True).StudyInstanceUID)
    assert study == str(pydicom.dcmread(bone[0], stop_before_pixels=True).StudyInstanceUID)

    chosen = select_series({bone_uid: bone, soft_uid: soft, loc_uid: [loc]}, study_instance_uid=study)

    assert chosen.series_instance_uid == soft_uid
    assert chosen.convolution_kernel == "B30f"
    assert chosen.slice_thickness_mm == pytest.approx(2.0)
    assert "soft-tissue kernel" in chosen.rule and "B70f" in chosen.rule
    reasons = dict(chosen.rejected)
    assert f"lost to {soft_uid}" in reasons[bone_uid] and "soft-tissue kernel" in reasons[bone_uid]
    assert "LOCALIZER" in reasons[loc_uid]
    assert load_volume(chosen.paths).shape == (20, 8, 8)


def test_legacy_converted_kernel_from_unassigned_attributes(tmp_path: Path) -> None:
    bone_uid, bone = _enhanced(tmp_path, "bone", kernel="BONE", slice_spacing=1.0)
    soft_uid, soft = _enhanced(
        tmp_path, "soft", kernel="STANDARD", slice_spacing=2.5, sop_class_uid=LegacyConvertedEnhancedCTImageStorage
    )
    study = str(pydicom.dcmread(soft[0], stop_before_pixels=True).StudyInstanceUID)
    chosen = select_series({bone_uid: bone, soft_uid: soft}, study_instance_uid=study)
    assert chosen.series_instance_uid == soft_uid
    assert chosen.convolution_kernel == "STANDARD"
    assert "'BONE' (bone" in chosen.rule


def test_selection_counts_frames_and_reads_frame_type(tmp_path: Path) -> None:
    few_uid, few = _enhanced(tmp_path, "few", n_frames=12)
    loc_uid, loc = _enhanced(tmp_path, "loc")

    def localizer(ds: Dataset) -> None:
        ds.SharedFunctionalGroupsSequence[0].CTImageFrameTypeSequence[0].FrameType = [
            "ORIGINAL", "PRIMARY", "LOCALIZER", "NONE",
        ]

    _edit(loc[0], localizer)
    good_uid, good = _enhanced(tmp_path, "good")
    study = str(pydicom.dcmread(good[0], stop_before_pixels=True).StudyInstanceUID)
    chosen = select_series({few_uid: few, loc_uid: loc, good_uid: good}, study_instance_uid=study)
    assert chosen.series_instance_uid == good_uid
    reasons = dict(chosen.rejected)
    assert "12 frame(s) in 1 multi-frame instance(s); at least 20 required" in reasons[few_uid]
    assert "ImageType/FrameType is ORIGINAL\\PRIMARY\\LOCALIZER\\NONE in 20 of 20 frame(s)" in reasons[loc_uid]


def test_enhanced_sop_class_without_functional_groups_is_rejected(tmp_path: Path) -> None:
    good = write_ct_series(tmp_path / "good", n_slices=20, rows=8, cols=8)
    bad = write_ct_series(tmp_path / "bad", n_slices=20, rows=8, cols=8, sop_class_uid=EnhancedCTImageStorage, seed=1)
    good_uid = str(pydicom.dcmread(good[0]).SeriesInstanceUID)
    bad_uid = str(pydicom.dcmread(bad[0]).SeriesInstanceUID)
    study = str(pydicom.dcmread(good[0]).StudyInstanceUID)
    chosen = select_series({good_uid: good, bad_uid: bad}, study_instance_uid=study)
    assert chosen.series_instance_uid == good_uid
    assert "PerFrameFunctionalGroupsSequence (5200,9230) is missing" in dict(chosen.rejected)[bad_uid]
