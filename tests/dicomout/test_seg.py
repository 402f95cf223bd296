"""DICOM-SEG builder: geometry, pixels, segment descriptions and IOD validity, read back with highdicom."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from dicomout import codes
from dicomout.seg import (
    BuildError,
    build_seg,
    parse_tracking_id,
    segment_map,
    segment_tracking_uids,
)
from dicomout.uids import SEG_SERIES, output_uid, tracking_uid
from pipeline.labels import LabelTable, load_label_table
from pipeline.types import SIDE_NAMES, Segmentation, Volume
from pipeline.volume import load_volume
from tests.support.dciodvfy import UNKNOWN_IOD, run_dciodvfy
from tests.support.synthetic_ct import write_ct_series

MODEL_NAME = "thighnode demo"
MODEL_VERSION = "0.1.0"
EQUIPMENT = {"manufacturer": "thighnode project", "software_version": "0.1.0", "device_serial": "TN-TEST-1"}

LABELMAP_DCIODVFY_KNOWN = {
    UNKNOWN_IOD,
    # dicom3tools 2022 applies the BINARY rule to LABELMAP, whose background is segment 0.
    "Error - SegmentNumber not monotonically increasing from one by one - have SegmentSequence item "
    "number 1 (from one) with SegmentNumber of 0",
}


def labels_with_codes() -> LabelTable:
    """The configured label table, with a placeholder SNOMED id where one is still empty."""
    records = load_label_table().to_records()
    for rec in records:
        if not rec["snomed_code"]:
            rec["snomed_code"] = str(900000000 + rec["id"])
    return LabelTable.from_records(records)


def synthetic_segmentation(volume: Volume, labels: LabelTable) -> Segmentation:
    """A label map with no symmetry along any axis, right/left split at column 30."""
    k, r, c = np.meshgrid(*(np.arange(n) for n in volume.shape), indexing="ij")
    inside = (r > 6) & (r < 50) & (c > 3) & (c < 58) & (k < volume.shape[0] - 2)
    label_map = np.where(inside, 1 + ((k // 5) * 7 + (r // 15) * 3 + c // 19) % len(labels.labels), 0)
    side_map = np.where(label_map > 0, np.where(c < 30, 1, 2), 0)
    return Segmentation(
        label_map=label_map.astype(np.uint8),
        side_map=side_map.astype(np.uint8),
        labels=labels,
        model_name=MODEL_NAME,
        model_version=MODEL_VERSION,
        affine_lps=volume.affine_lps,
    )


GEOMETRIES = {
    "HFS": dict(row_dir=(1, 0, 0), col_dir=(0, 1, 0), patient_position="HFS"),
    "FFS": dict(row_dir=(-1, 0, 0), col_dir=(0, 1, 0), patient_position="FFS"),
    "HFS-reversed-files": dict(row_dir=(1, 0, 0), col_dir=(0, 1, 0), patient_position="HFS", reverse_file_order=True),
    "HFS-flipped-columns": dict(row_dir=(1, 0, 0), col_dir=(0, -1, 0), patient_position="HFS"),
}


def varied_hu(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """HU from -250 to 149 varying with position: fat and muscle values in every structure."""
    return -250.0 + np.mod(np.round(7 * x + 3 * y + 11 * z), 400.0)


def make_case(tmp_path: Path, geometry: str) -> tuple[list[Path], Volume, Segmentation]:
    paths = write_ct_series(tmp_path / "ct", n_slices=20, rows=56, cols=60, hu=varied_hu, **GEOMETRIES[geometry])
    volume = load_volume(paths)
    return paths, volume, synthetic_segmentation(volume, labels_with_codes())


def expected_mask(seg: Segmentation, k: int, key: str, side: str) -> np.ndarray:
    label = seg.labels.by_key(key)
    side_value = {v: s for s, v in SIDE_NAMES.items()}[side]
    return (seg.label_map[k] == label.id) & (seg.side_map[k] == side_value)


def check_frames_against_label_map(path: Path, paths: list[Path], volume: Volume, seg: Segmentation) -> None:
    """Per segment and source instance: pixels and ImagePositionPatient equal the label map's."""
    read = hd.seg.segread(path)
    smap = segment_map(read)
    present = {
        (lab.key, SIDE_NAMES[s])
        for lab in seg.labels.labels
        for s in (1, 2)
        if np.any((seg.label_map == lab.id) & (seg.side_map == s))
    }
    assert set(smap) == present

    numbers = sorted(smap.values())
    pixels = read.get_pixels_by_source_instance(
        source_sop_instance_uids=list(volume.sop_instance_uids),
        segment_numbers=numbers,
        assert_missing_frames_are_empty=True,
    )
    assert pixels.shape == (volume.shape[0], volume.shape[1], volume.shape[2], len(numbers))
    by_number = {n: key_side for key_side, n in smap.items()}
    for k in range(volume.shape[0]):
        for i, n in enumerate(numbers):
            key, side = by_number[n]
            np.testing.assert_array_equal(
                pixels[k, :, :, i].astype(bool), expected_mask(seg, k, key, side), err_msg=f"slice {k} segment {n}"
            )

    # Every frame sits where its source slice is and references it.
    source_ipp = {
        str(ds.SOPInstanceUID): [float(v) for v in ds.ImagePositionPatient]
        for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in paths)
    }
    for item in read.PerFrameFunctionalGroupsSequence:
        src = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        ipp = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(ipp, source_ipp[src], atol=1e-4)

    # The volume highdicom rebuilds from the SEG's own geometry equals the label map on the source grid.
    hd_volume = read.get_volume(combine_segments=True, relabel=False)
    to_ours = np.linalg.inv(volume.affine_lps) @ hd_volume.affine
    ii = np.stack(np.meshgrid(*(np.arange(n) for n in hd_volume.spatial_shape), indexing="ij"), -1).reshape(-1, 3)
    ours = to_ours[:3, :3] @ ii.T + to_ours[:3, 3:4]
    np.testing.assert_allclose(ours, np.round(ours), atol=1e-3)
    ours = np.round(ours).astype(int)
    number_of = {(seg.labels.by_key(k).id, {"right": 1, "left": 2}[s]): n for (k, s), n in smap.items()}
    lut = np.zeros((len(seg.labels.labels) + 1, 3), dtype=int)
    for (label_id, side_value), n in number_of.items():
        lut[label_id, side_value] = n
    expected = lut[seg.label_map[ours[0], ours[1], ours[2]], seg.side_map[ours[0], ours[1], ours[2]]]
    np.testing.assert_array_equal(hd_volume.array.reshape(-1), expected)


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_binary_seg_matches_label_map_on_source_grid(tmp_path: Path, geometry: str) -> None:
    paths, volume, seg = make_case(tmp_path, geometry)
    ds = build_seg(volume, seg, list(reversed(paths)), segmentation_type="BINARY", **EQUIPMENT)
    out = tmp_path / "seg.dcm"
    ds.save_as(out)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    check_frames_against_label_map(out, paths, volume, seg)
    report = run_dciodvfy(out)
    assert report.errors == (), report.output


@pytest.mark.parametrize(
    "geometry,transfer_syntax",
    [("FFS", DeflatedExplicitVRLittleEndian), ("HFS-reversed-files", JPEG2000Lossless)],
)
def test_compressed_binary_seg_reads_back_as_the_uncompressed_one(
    tmp_path: Path, geometry: str, transfer_syntax: str
) -> None:
    paths, volume, seg = make_case(tmp_path, geometry)
    compressed = tmp_path / "seg_compressed.dcm"
    plain = tmp_path / "seg_plain.dcm"
    build_seg(volume, seg, paths, transfer_syntax_uid=transfer_syntax, **EQUIPMENT).save_as(compressed)
    build_seg(volume, seg, paths, transfer_syntax_uid=ExplicitVRLittleEndian, **EQUIPMENT).save_as(plain)
    assert pydicom.dcmread(compressed, stop_before_pixels=True).file_meta.TransferSyntaxUID == transfer_syntax
    assert compressed.stat().st_size < plain.stat().st_size
    check_frames_against_label_map(compressed, paths, volume, seg)
    a = hd.seg.segread(compressed).get_volume(combine_segments=True, relabel=False)
    b = hd.seg.segread(plain).get_volume(combine_segments=True, relabel=False)
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine)
    report = run_dciodvfy(compressed)
    assert report.errors == (), report.output


def test_binary_default_is_deflated_with_empty_frames_omitted(tmp_path: Path) -> None:
    paths, volume, seg = make_case(tmp_path, "HFS")
    out = tmp_path / "seg.dcm"
    build_seg(volume, seg, paths, **EQUIPMENT).save_as(out)
    read = pydicom.dcmread(out)
    assert read.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    # One frame per segment and slice where that segment has a voxel, none for the empty ones.
    smap = segment_map(read)
    expected_frames = sum(
        int(expected_mask(seg, k, key, side).any()) for (key, side) in smap for k in range(volume.shape[0])
    )
    assert int(read.NumberOfFrames) == expected_frames < len(smap) * volume.shape[0]
    kept = build_seg(volume, seg, paths, omit_empty_frames=False, **EQUIPMENT)
    assert int(kept.NumberOfFrames) == len(smap) * volume.shape[0]


@pytest.mark.parametrize(
    "geometry,transfer_syntax",
    [
        ("HFS", DeflatedExplicitVRLittleEndian),
        ("HFS-flipped-columns", RLELossless),
        ("FFS", JPEGLSLossless),
        ("HFS-reversed-files", JPEG2000Lossless),
        ("HFS", ExplicitVRLittleEndian),
    ],
)
def test_labelmap_seg_matches_label_map(tmp_path: Path, geometry: str, transfer_syntax: str) -> None:
    paths, volume, seg = make_case(tmp_path, geometry)
    ds = build_seg(volume, seg, paths, segmentation_type="LABELMAP", transfer_syntax_uid=transfer_syntax, **EQUIPMENT)
    out = tmp_path / "seg.dcm"
    ds.save_as(out)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
    assert pydicom.dcmread(out, stop_before_pixels=True).file_meta.TransferSyntaxUID == transfer_syntax
    # One frame per slice that has a labelled voxel.
    assert int(ds.NumberOfFrames) == int(np.count_nonzero(seg.label_map.reshape(volume.shape[0], -1).any(axis=1)))
    check_frames_against_label_map(out, paths, volume, seg)
    report = run_dciodvfy(out)
    assert set(report.errors) <= LABELMAP_DCIODVFY_KNOWN, report.output


def test_segment_descriptions(tmp_path: Path) -> None:
    paths, volume, seg = make_case(tmp_path, "HFS")
    ds = build_seg(volume, seg, paths, **EQUIPMENT)
    uid = output_uid(volume.series_instance_uid, MODEL_VERSION, "seg.instance")
    assert ds.SOPInstanceUID == uid
    assert ds.SeriesInstanceUID == output_uid(volume.series_instance_uid, MODEL_VERSION, "seg.series")
    assert ds.SeriesNumber == SEG_SERIES.number
    assert ds.SeriesDescription == "Thigh muscles SEG (thighnode demo 0.1.0)"
    assert ds.StudyInstanceUID == volume.study_instance_uid
    assert ds.FrameOfReferenceUID == volume.frame_of_reference_uid
    referenced = {
        item.ReferencedSOPInstanceUID
        for series in ds.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }
    assert referenced == set(volume.sop_instance_uids)

    for item in ds.SegmentSequence:
        key, side = parse_tracking_id(item.TrackingID)
        label = seg.labels.by_key(key)
        assert item.SegmentLabel == f"{label.name} {side}"
        assert item.TrackingUID == tracking_uid(uid, key, side)
        cat = item.SegmentedPropertyCategoryCodeSequence[0]
        assert (cat.CodeValue, cat.CodingSchemeDesignator) == (codes.ANATOMICAL_STRUCTURE.value, "SCT")
        typ = item.SegmentedPropertyTypeCodeSequence[0]
        assert (typ.CodeValue, typ.CodingSchemeDesignator, typ.CodeMeaning) == (
            label.snomed_code,
            "SCT",
            label.snomed_meaning,
        )
        modifier = typ.SegmentedPropertyTypeModifierCodeSequence[0]
        assert modifier.CodeValue == {"right": "24028007", "left": "7771000"}[side]
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algo = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algo.AlgorithmName, algo.AlgorithmVersion) == (MODEL_NAME, MODEL_VERSION)
        assert algo.AlgorithmFamilyCodeSequence[0].CodeValue == codes.ARTIFICIAL_INTELLIGENCE.value
        rgb = hd.color.CIELabColor.from_dicom_value(item.RecommendedDisplayCIELabValue).to_rgb()
        assert np.max(np.abs(np.asarray(rgb, dtype=int) - np.asarray(label.color))) <= 2
    assert segment_tracking_uids(ds) == {
        int(i.SegmentNumber): tracking_uid(uid, *parse_tracking_id(i.TrackingID)) for i in ds.SegmentSequence
    }


def test_uids_are_deterministic_and_model_specific(tmp_path: Path) -> None:
    paths, volume, seg = make_case(tmp_path, "HFS")
    a = build_seg(volume, seg, paths, **EQUIPMENT)
    b = build_seg(volume, seg, paths, **EQUIPMENT)
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    assert [i.TrackingUID for i in a.SegmentSequence] == [i.TrackingUID for i in b.SegmentSequence]
    other = Segmentation(seg.label_map, seg.side_map, seg.labels, MODEL_NAME, "0.2.0", seg.affine_lps)
    c = build_seg(volume, other, paths, **EQUIPMENT)
    assert c.SOPInstanceUID != a.SOPInstanceUID and c.SeriesInstanceUID != a.SeriesInstanceUID
    for uid in (a.SOPInstanceUID, a.SeriesInstanceUID, c.SOPInstanceUID):
        assert uid.startswith("2.25.") and len(uid) <= 64


def test_missing_source_instance_is_refused(tmp_path: Path) -> None:
    paths, volume, seg = make_case(tmp_path, "HFS")
    with pytest.raises(BuildError, match="have no source instance"):
        build_seg(volume, seg, paths[1:], **EQUIPMENT)


def test_source_geometry_mismatch_is_refused(tmp_path: Path) -> None:
    paths, volume, seg = make_case(tmp_path, "HFS")
    shifted = Volume(
        hu=volume.hu,
        affine_lps=volume.affine_lps + np.array([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 5.0], [0, 0, 0, 0]]),
        frame_of_reference_uid=volume.frame_of_reference_uid,
        study_instance_uid=volume.study_instance_uid,
        series_instance_uid=volume.series_instance_uid,
        sop_class_uid=volume.sop_class_uid,
        sop_instance_uids=volume.sop_instance_uids,
    )
    seg = Segmentation(seg.label_map, seg.side_map, seg.labels, MODEL_NAME, MODEL_VERSION)
    with pytest.raises(BuildError, match="ImagePositionPatient"):
        build_seg(shifted, seg, paths, **EQUIPMENT)


def test_empty_snomed_code_is_refused(tmp_path: Path) -> None:
    paths, volume, seg = make_case(tmp_path, "HFS")
    records = seg.labels.to_records()
    records[0]["snomed_code"] = ""
    bad = Segmentation(seg.label_map, seg.side_map, LabelTable.from_records(records), MODEL_NAME, MODEL_VERSION)
    with pytest.raises(BuildError, match=r"label 1 \(sartorius\): snomed_code is ''"):
        build_seg(volume, bad, paths, **EQUIPMENT)


def test_empty_label_map_and_bad_type_are_refused(tmp_path: Path) -> None:
    paths, volume, seg = make_case(tmp_path, "HFS")
    empty = Segmentation(np.zeros_like(seg.label_map), np.zeros_like(seg.side_map), seg.labels, MODEL_NAME, MODEL_VERSION)
    with pytest.raises(BuildError, match="no labelled voxel"):
        build_seg(volume, empty, paths, **EQUIPMENT)
    with pytest.raises(BuildError, match="segmentation_type 'FRACTIONAL'"):
        build_seg(volume, seg, paths, segmentation_type="FRACTIONAL", **EQUIPMENT)
    with pytest.raises(BuildError, match="not allowed for BINARY"):
        build_seg(volume, seg, paths, transfer_syntax_uid=RLELossless, **EQUIPMENT)
