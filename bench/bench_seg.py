"""Benchmark of the DICOM-SEG encodings: BINARY vs LABELMAP (each lossless transfer syntax).

Each encoding's size is printed as a share of the source CT's bytes (its 16-bit pixel data,
slices x rows x columns x 2: a lower bound of the CT files, so the share is not flattered)
beside the target of issue 24 (BINARY <= 10 %, LABELMAP <= 1 %; encoding <= 3 s) and beside
the baseline, highdicom's defaults (BINARY, Explicit VR Little Endian, empty frames omitted, every
frame built by highdicom's Segmentation constructor: ``build_seg(..., highdicom_frames=True)``),
measured in the same run ("x base": size and encode time as a multiple of the baseline's). "encode s"
is build_seg plus writing the file with dicomout.files.write_part10 as the node does (Deflate happens on
writing), wall clock; "cpu s" the process's
CPU time for the same (on a shared machine the wall clock also counts waiting for a core). "frames by":
highdicom, or dicomout.seg_frames (bulk; BINARY with native frames and empty frames omitted). A small
SEG is built first so that neither the baseline nor any row pays highdicom's one-time loading of its
tables of the standard.

Builds a synthetic 512 x 512 x 300 label map at 0.8 x 0.8 x 1.0 mm with every structure
of the label table on both sides (29 x 2 segments, elliptic cross-sections around each
femur, each spanning its own range of slices), then for each encoding prints the
:func:`dicomout.seg.build_seg` time, the number of frames, the bytes on disk, and the
highdicom read-back time (``segread`` + ``get_volume(combine_segments=True)``), and
checks that the read-back label volume equals the encoded one.

The source CT headers are made in memory (no pixel data is needed to build a SEG).

Usage: .venv/bin/python bench/bench_seg.py [--slices 300] [--size 512] [--only BINARY] [--skip-jpeg2000-binary]
       [--skip-kept-empty]
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
import time
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicomout.files import write_part10  # noqa: E402
from dicomout.seg import build_seg, plan_segments  # noqa: E402
from pipeline.labels import LabelTable, load_label_table  # noqa: E402
from pipeline.types import Segmentation, Volume  # noqa: E402

PIXEL_MM = 0.8
SLICE_MM = 1.0
SHORT_NAMES = {
    ExplicitVRLittleEndian: "Explicit VR LE (native)",
    DeflatedExplicitVRLittleEndian: "Deflated Explicit VR LE",
    RLELossless: "RLE Lossless",
    JPEGLSLossless: "JPEG-LS Lossless",
    JPEG2000Lossless: "JPEG 2000 Lossless",
}
TARGET_PCT = {"BINARY": 10.0, "LABELMAP": 1.0}
TARGET_ENCODE_S = 3.0
# (type, transfer syntax, omit empty frames, frames by highdicom); the first is the baseline (highdicom's
# defaults). The bulk builder (False) applies to BINARY with native frames and empty frames omitted.
ENCODINGS = (
    ("BINARY", ExplicitVRLittleEndian, True, True),
    ("BINARY", ExplicitVRLittleEndian, False, True),
    ("BINARY", ExplicitVRLittleEndian, True, False),
    ("BINARY", DeflatedExplicitVRLittleEndian, True, True),
    ("BINARY", DeflatedExplicitVRLittleEndian, True, False),
    ("BINARY", JPEG2000Lossless, True, True),
    ("LABELMAP", RLELossless, True, True),
    ("LABELMAP", DeflatedExplicitVRLittleEndian, True, True),
    ("LABELMAP", JPEGLSLossless, True, True),
    ("LABELMAP", JPEG2000Lossless, True, True),
    ("LABELMAP", ExplicitVRLittleEndian, True, True),
)

DEFAULTS = {
    ("BINARY", DeflatedExplicitVRLittleEndian, True, False): "BINARY, the node's default (deflated, bulk frames)",
    ("LABELMAP", DeflatedExplicitVRLittleEndian, True, True): "LABELMAP, the node's default (deflated)",
}


def bench_labels() -> LabelTable:
    records = load_label_table().to_records()
    for rec in records:  # tolerate a table whose SNOMED codes are still being filled in
        if not rec["snomed_code"]:
            rec["snomed_code"] = str(900000000 + rec["id"])
    return LabelTable.from_records(records)


def make_headers(n_slices: int, size: int) -> tuple[list[Dataset], np.ndarray]:
    """Single-frame CT headers (axial HFS, slices ascending in z) and the matching affine."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    origin = np.array([-size * PIXEL_MM / 2, -size * PIXEL_MM / 2, 0.0])
    template = Dataset()
    template.SpecificCharacterSet = "ISO_IR 100"
    template.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    template.StudyInstanceUID, template.SeriesInstanceUID, template.FrameOfReferenceUID = study, series, frame
    template.PatientName, template.PatientID, template.PatientBirthDate, template.PatientSex = "Bench^Seg", "B1", "", "F"
    template.AccessionNumber, template.StudyID, template.StudyDate, template.StudyTime = "", "1", "20240101", "120000"
    template.ReferringPhysicianName, template.Modality, template.SeriesNumber = "", "CT", 1
    template.Rows = template.Columns = size
    template.PixelSpacing = [PIXEL_MM, PIXEL_MM]
    template.SliceThickness = SLICE_MM
    template.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    template.PositionReferenceIndicator = ""
    headers = []
    for k in range(n_slices):
        ds = copy.deepcopy(template)
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(origin[0]), float(origin[1]), float(origin[2] + k * SLICE_MM)]
        headers.append(ds)
    affine = np.eye(4)
    affine[:3, 0] = (0, 0, SLICE_MM)
    affine[:3, 1] = (0, PIXEL_MM, 0)
    affine[:3, 2] = (PIXEL_MM, 0, 0)
    affine[:3, 3] = origin
    return headers, affine


def make_label_map(n_slices: int, size: int, n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Elliptic cross-sections of every structure around each femur, each over its own slices."""
    rng = np.random.default_rng(0)
    label_map = np.zeros((n_slices, size, size), dtype=np.uint8)
    side_map = np.zeros_like(label_map)
    rr, cc = np.mgrid[0:size, 0:size]
    for side, centre_c in ((1, size * 0.3), (2, size * 0.7)):
        centre_r = size * 0.5
        for i in range(n_labels):
            angle = 2 * np.pi * i / n_labels
            radius = size * (0.07 + 0.05 * (i % 3))
            cr, cc0 = centre_r + radius * np.sin(angle), centre_c + radius * np.cos(angle)
            ar, ac = size * rng.uniform(0.015, 0.035), size * rng.uniform(0.015, 0.035)
            mask = ((rr - cr) / ar) ** 2 + ((cc - cc0) / ac) ** 2 <= 1.0
            start = int(rng.integers(0, n_slices // 3))
            stop = int(rng.integers(n_slices // 2, n_slices))
            region = label_map[start:stop]
            region[:, mask] = i + 1
            side_map[start:stop][:, mask] = side
    return label_map, side_map


def warm_up(labels: LabelTable) -> None:
    """A 20-slice SEG each way, not timed: highdicom loads its tables of the standard once per process."""
    headers, affine = make_headers(20, 64)
    volume = _volume(headers, affine, 20, 64)
    label_map, side_map = make_label_map(20, 64, len(labels.labels))
    seg = Segmentation(label_map, side_map, labels, "thighnode demo", "0.1.0", affine)
    for by_highdicom in (True, False):
        build_seg(volume, seg, headers, manufacturer="thighnode project", software_version="0.1.0",
                  device_serial="BENCH", highdicom_frames=by_highdicom)


def _volume(headers: list[Dataset], affine: np.ndarray, n_slices: int, size: int) -> Volume:
    return Volume(
        hu=np.broadcast_to(np.float32(0), (n_slices, size, size)),
        affine_lps=affine,
        frame_of_reference_uid=str(headers[0].FrameOfReferenceUID),
        study_instance_uid=str(headers[0].StudyInstanceUID),
        series_instance_uid=str(headers[0].SeriesInstanceUID),
        sop_class_uid=str(headers[0].SOPClassUID),
        sop_instance_uids=tuple(str(h.SOPInstanceUID) for h in headers),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--only", choices=("BINARY", "LABELMAP"), default=None)
    parser.add_argument("--skip-jpeg2000-binary", action="store_true", help="leave out BINARY JPEG 2000 (slow)")
    parser.add_argument("--skip-kept-empty", action="store_true", help="leave out BINARY with empty frames kept")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    labels = bench_labels()
    headers, affine = make_headers(args.slices, args.size)
    volume = _volume(headers, affine, args.slices, args.size)
    t0 = time.perf_counter()
    label_map, side_map = make_label_map(args.slices, args.size, len(labels.labels))
    seg = Segmentation(label_map, side_map, labels, "thighnode demo", "0.1.0", affine)
    segments, expected = plan_segments(seg, "2.25.1")
    print(
        f"label map {args.slices}x{args.size}x{args.size}, {len(segments)} segments, "
        f"{int(np.count_nonzero(label_map)) / label_map.size:.1%} labelled, made in {time.perf_counter() - t0:.1f} s"
    )
    ct_bytes = args.slices * args.size * args.size * 2
    print(f"source CT pixel data {ct_bytes / 1e6:.1f} MB; targets: BINARY <= 10 %, LABELMAP <= 1 % of it, "
          f"encode <= {TARGET_ENCODE_S:g} s")
    print(f"{'type':9} {'transfer syntax':24} {'empty':5} {'frames by':9} {'encode s':>8} {'cpu s':>6} {'frames':>7} "
          f"{'MB':>9} {'% of CT':>8} {'target':>6} {'met':>4} {'x base':>13} {'read s':>7}  check")
    warm_up(labels)
    baseline: tuple[float, float] | None = None
    results: dict[tuple[str, str, bool, bool], tuple[float, float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seg_type, ts, omit, by_highdicom in ENCODINGS:
            if args.only and seg_type != args.only:
                continue
            if args.skip_jpeg2000_binary and (seg_type, ts) == ("BINARY", JPEG2000Lossless):
                continue
            if args.skip_kept_empty and not omit:
                continue
            t0, c0 = time.perf_counter(), time.process_time()
            ds = build_seg(
                volume,
                seg,
                headers,
                segmentation_type=seg_type,
                transfer_syntax_uid=ts,
                manufacturer="thighnode project",
                software_version="0.1.0",
                device_serial="BENCH",
                omit_empty_frames=omit,
                highdicom_frames=by_highdicom,
            )
            path = Path(tmp) / f"{seg_type}-{ts}-{omit}-{by_highdicom}.dcm"
            write_part10(ds, path)  # as the node writes it (save_as's bytes)
            build_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
            n_frames = int(ds.NumberOfFrames)
            size_bytes = path.stat().st_size
            size_mb = size_bytes / 1e6
            pct = 100.0 * size_bytes / ct_bytes
            if baseline is None and seg_type == "BINARY":
                baseline = (size_bytes, build_s)
            del ds
            t0 = time.perf_counter()
            read = hd.seg.segread(path)
            vol = read.get_volume(combine_segments=True, relabel=False)
            read_s = time.perf_counter() - t0
            arr = vol.array
            nonempty = np.flatnonzero(expected.reshape(expected.shape[0], -1).any(axis=1))
            span = expected[nonempty.min() : nonempty.max() + 1] if arr.shape[0] != expected.shape[0] else expected
            # highdicom's volume covers the frames present and may run either way along the normal.
            ok = arr.shape == span.shape and (np.array_equal(arr, span) or np.array_equal(arr[::-1], span))
            check = "equal" if ok else f"DIFFERENT (shape {arr.shape} vs {span.shape})"
            ratio = f"{size_bytes / baseline[0]:6.3f} {build_s / baseline[1]:6.2f}" if baseline else f"{'-':>13}"
            met = "both" if pct <= TARGET_PCT[seg_type] and build_s <= TARGET_ENCODE_S else (
                "size" if pct <= TARGET_PCT[seg_type] else "no")
            print(
                f"{seg_type:9} {SHORT_NAMES[ts]:24} {'omit' if omit else 'keep':5} "
                f"{'highdicom' if by_highdicom or seg_type != 'BINARY' else 'bulk':9} {build_s:8.2f} {cpu_s:6.2f} "
                f"{n_frames:7d} {size_mb:9.2f} {pct:7.2f}% {TARGET_PCT[seg_type]:5.0f}% {met:>4} {ratio} "
                f"{read_s:7.2f}  {check}",
                flush=True,
            )
            results[(seg_type, ts, omit, by_highdicom)] = (pct, build_s, cpu_s)
            del read, vol, arr
            path.unlink()
    for key, name in DEFAULTS.items():
        if key in results and baseline:
            pct, build_s, cpu_s = results[key]
            seg_type = key[0]
            print(
                f"{name}: {pct:.2f} % of the CT (target <= {TARGET_PCT[seg_type]:g} %), encode {build_s:.2f} s wall, "
                f"{cpu_s:.2f} s CPU (target <= {TARGET_ENCODE_S:g} s): {build_s / baseline[1]:.2f} x the baseline's "
                f"{baseline[1]:.2f} s"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
