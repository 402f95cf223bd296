"""A reader's correction of the node's SEG, as 3D Slicer or OHIF would send it back (test support):
the node's own BINARY SEG with one segment's largest frame erased (and optionally another segment's
largest frame grown into unlabelled pixels), a new SOP Instance UID and series, another manufacturer
and a ContentCreatorName."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from scipy import ndimage
from pydicom.pixels import pack_bits
from pydicom.uid import generate_uid

READER = "Reader^Test"


def make_correction(seg_path: Path, out_dir: Path, *, erase: str = "gluteus maximus right",
                    reader: str = READER) -> tuple[Path, int]:
    """Write the corrected SEG into ``out_dir``; returns (its path, the number of voxels erased)."""
    path, erased, _ = make_edited_correction(seg_path, out_dir, erase=erase, reader=reader)
    return path, erased


def make_edited_correction(seg_path: Path, out_dir: Path, *, erase: str = "gluteus maximus right",
                           enlarge: str | None = None, grow_px: int = 2,
                           reader: str = READER) -> tuple[Path, int, int]:
    """Write the corrected SEG into ``out_dir``: ``erase``'s largest frame emptied, ``enlarge``'s largest
    frame grown by ``grow_px`` pixels into pixels no segment holds at that position; returns (its path, the
    voxels erased, the voxels added)."""
    ds = pydicom.dcmread(seg_path)
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns)).copy()
    items = ds.PerFrameFunctionalGroupsSequence

    def largest_frame(label: str) -> int:
        number = next(int(s.SegmentNumber) for s in ds.SegmentSequence if str(s.SegmentLabel).lower() == label)
        of_segment = [f for f, item in enumerate(items)
                      if int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber) == number]
        return max(of_segment, key=lambda i: int(frames[i].sum()))

    def position(f: int) -> tuple[float, ...]:
        return tuple(round(float(v), 3) for v in items[f].PlanePositionSequence[0].ImagePositionPatient)

    f = largest_frame(erase)
    erased = int(frames[f].sum())
    frames[f] = 0
    added = 0
    if enlarge is not None:
        g = largest_frame(enlarge)
        occupied = np.zeros(frames[g].shape, dtype=bool)
        for other in range(len(items)):
            if position(other) == position(g):
                occupied |= frames[other].astype(bool)
        grown = ndimage.binary_dilation(frames[g].astype(bool), iterations=grow_px) & ~occupied
        frames[g] = (frames[g].astype(bool) | grown).astype(frames.dtype)
        added = int(grown.sum())
    ds.PixelData = pack_bits(frames.ravel())
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesDescription = "Segmentation edited in Slicer"
    ds.Manufacturer = "3D Slicer"
    ds.ContentCreatorName = reader
    path = Path(out_dir) / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, erased, added
