"""A reader's correction of the node's SEG, as 3D Slicer or OHIF would send it back (test support):
the node's own BINARY SEG with one segment's largest frame erased, a new SOP Instance UID and series,
another manufacturer and a ContentCreatorName."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.pixels import pack_bits
from pydicom.uid import generate_uid

READER = "Reader^Test"


def make_correction(seg_path: Path, out_dir: Path, *, erase: str = "gluteus maximus right",
                    reader: str = READER) -> tuple[Path, int]:
    """Write the corrected SEG into ``out_dir``; returns (its path, the number of voxels erased)."""
    ds = pydicom.dcmread(seg_path)
    number = next(int(s.SegmentNumber) for s in ds.SegmentSequence if str(s.SegmentLabel).lower() == erase)
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns)).copy()
    of_segment = [f for f, item in enumerate(ds.PerFrameFunctionalGroupsSequence)
                  if int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber) == number]
    f = max(of_segment, key=lambda i: int(frames[i].sum()))
    erased = int(frames[f].sum())
    frames[f] = 0
    ds.PixelData = pack_bits(frames.ravel())
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesDescription = "Segmentation edited in Slicer"
    ds.Manufacturer = "3D Slicer"
    ds.ContentCreatorName = reader
    path = Path(out_dir) / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, erased
