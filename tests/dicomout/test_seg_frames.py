"""The bulk BINARY SEG (dicomout.seg_frames) against the SEG highdicom builds from the whole label array.

Same inputs, both written and read back: every attribute, every per-frame functional group item and the
pixel data must be equal (only the generated DimensionOrganizationUID and the creation times differ); the
bulk SEG must read back with highdicom to the label map, frame positions first, and pass dciodvfy.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from dicomout.seg import build_seg, segment_map
from pipeline.types import SIDE_NAMES, Segmentation, Volume
from pipeline.volume import load_volume
from tests.dicomout.test_seg import (
    EQUIPMENT,
    GEOMETRIES,
    MODEL_NAME,
    MODEL_VERSION,
    check_frames_against_label_map,
    labels_with_codes,
    varied_hu,
)
from tests.support.dciodvfy import run_dciodvfy
from tests.support.synthetic_ct import write_ct_series

TIMES = {"ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime", "ContributionDateTime"}


def gappy_segmentation(volume: Volume) -> Segmentation:
    """Structures over their own slice ranges, a structure with a gap of slices, slices with no label
    at both ends and in the middle (empty frames and empty slices to omit), a one-voxel structure."""
    labels = labels_with_codes()
    n, rows, cols = volume.shape
    k, r, c = np.meshgrid(*(np.arange(s) for s in volume.shape), indexing="ij")
    label_map = np.zeros(volume.shape, dtype=np.uint8)
    side_map = np.zeros(volume.shape, dtype=np.uint8)
    for i in range(6):
        inside = ((r - (8 + 6 * i)) ** 2 + (c - (10 + 7 * i)) ** 2 < 30) & (k >= 1 + i) & (k < n - 3 - (i % 3))
        label_map[inside] = 1 + 3 * i
        side_map[inside] = np.where(c[inside] < cols // 2, 1, 2)
    label_map[n // 2] = 0  # a slice with no structure at all
    side_map[n // 2] = 0
    gap = (label_map == 4) & (k >= 5) & (k < 8)  # structure 4 with a gap of slices
    label_map[gap], side_map[gap] = 0, 0
    label_map[n - 2, rows - 1, cols - 1], side_map[n - 2, rows - 1, cols - 1] = 20, 2  # one voxel, last column
    return Segmentation(label_map, side_map, labels, MODEL_NAME, MODEL_VERSION, volume.affine_lps)


def elements(ds: Dataset) -> dict[str, object]:
    """Every element but the times and the generated DimensionOrganizationUID, sequences recursively."""
    out: dict[str, object] = {}
    for elem in ds:
        if elem.keyword in TIMES or elem.keyword == "DimensionOrganizationUID":
            continue
        if elem.VR == "SQ":
            out[elem.keyword] = [elements(item) for item in elem.value]
        else:
            out[elem.keyword or str(elem.tag)] = elem.value
    return out


def case(tmp_path: Path, geometry: str, cols: int) -> tuple[list[Path], Volume, Segmentation]:
    paths = write_ct_series(tmp_path / "ct", n_slices=20, rows=48, cols=cols, hu=varied_hu, **GEOMETRIES[geometry])
    volume = load_volume(paths)
    return paths, volume, gappy_segmentation(volume)


@pytest.mark.parametrize("cols", [64, 60], ids=["aligned-columns", "unaligned-columns"])
@pytest.mark.parametrize("geometry", ["HFS", "FFS", "HFS-reversed-files"])
def test_bulk_seg_equals_highdicom_seg(tmp_path: Path, geometry: str, cols: int) -> None:
    paths, volume, seg = case(tmp_path, geometry, cols)
    written = {}
    for name, highdicom_frames in (("bulk", False), ("highdicom", True)):
        ds = build_seg(
            volume, seg, paths, transfer_syntax_uid=ExplicitVRLittleEndian, highdicom_frames=highdicom_frames,
            **EQUIPMENT,
        )
        assert isinstance(ds, hd.seg.Segmentation) is highdicom_frames  # the bulk path did build this one
        written[name] = tmp_path / f"{name}.dcm"
        ds.save_as(written[name], enforce_file_format=True)
    bulk, ref = (pydicom.dcmread(written[name]) for name in ("bulk", "highdicom"))
    assert int(bulk.NumberOfFrames) == int(ref.NumberOfFrames) > 0
    assert bulk.PixelData == ref.PixelData
    bulk_frames, ref_frames = bulk.PerFrameFunctionalGroupsSequence, ref.PerFrameFunctionalGroupsSequence
    assert len(bulk_frames) == len(ref_frames)
    for i, (a, b) in enumerate(zip(bulk_frames, ref_frames, strict=True)):
        assert elements(a) == elements(b), f"frame {i + 1}"
    bulk_rest, ref_rest = elements(bulk), elements(ref)
    for key in ("PerFrameFunctionalGroupsSequence", "PixelData"):
        bulk_rest.pop(key), ref_rest.pop(key)
    assert bulk_rest.keys() == ref_rest.keys()
    for key in ref_rest:
        assert bulk_rest[key] == ref_rest[key], key
    assert bulk.file_meta.TransferSyntaxUID == ref.file_meta.TransferSyntaxUID


@pytest.mark.parametrize("geometry", ["HFS", "FFS", "HFS-reversed-files", "HFS-flipped-columns"])
def test_bulk_seg_reads_back_to_the_label_map(tmp_path: Path, geometry: str) -> None:
    """Frames placed by their own positions; a slice with no segment and a segment with a gap shift nothing."""
    paths, volume, seg = case(tmp_path, geometry, 64)
    out = tmp_path / "seg.dcm"
    build_seg(volume, seg, paths, **EQUIPMENT).save_as(out, enforce_file_format=True)
    assert pydicom.dcmread(out, stop_before_pixels=True).file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    check_frames_against_label_map(out, paths, volume, seg)
    # The segment with a gap has no frame on the gap's slices, and no frame at all sits on the empty slice.
    read = pydicom.dcmread(out)
    uid_of = dict(enumerate(volume.sop_instance_uids))
    numbers = segment_map(read)
    gap_number = next(n for (key, side), n in numbers.items() if seg.labels.by_key(key).id == 4)
    frame_slices: dict[int, set[str]] = {}
    for item in read.PerFrameFunctionalGroupsSequence:
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        uid = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        frame_slices.setdefault(number, set()).add(uid)
    assert not frame_slices[gap_number] & {uid_of[k] for k in (5, 6, 7)}
    assert uid_of[volume.shape[0] // 2] not in set().union(*frame_slices.values())
    assert set(SIDE_NAMES.values()) >= {side for _, side in numbers}


def test_bulk_seg_passes_dciodvfy(tmp_path: Path) -> None:
    paths, volume, seg = case(tmp_path, "HFS", 64)
    out = tmp_path / "seg.dcm"
    build_seg(volume, seg, paths, **EQUIPMENT).save_as(out, enforce_file_format=True)
    report = run_dciodvfy(out)
    assert report.errors == (), report.output


def test_highdicom_builds_every_frame_when_the_skeleton_is_not_as_expected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dicomout.seg as seg_module
    from dicomout.seg_frames import BulkFrameError

    def refuse(*args: object, **kwargs: object) -> Dataset:
        raise BulkFrameError("skeleton has 3 frames; expected one per source slice (20)")

    monkeypatch.setattr(seg_module, "fill_binary_frames", refuse)
    paths, volume, seg = case(tmp_path, "HFS", 64)
    ds = build_seg(volume, seg, paths, **EQUIPMENT)
    assert isinstance(ds, hd.seg.Segmentation)
    out = tmp_path / "seg.dcm"
    ds.save_as(out, enforce_file_format=True)
    check_frames_against_label_map(out, paths, volume, seg)
