"""Cost of the integrity check on receipt (scp.integrity), per instance, beside what the handler already did.

Not a test. Encodes one synthetic 512x512 int16 CT instance (~0.5 MB, Explicit VR Little Endian, with a
ReferencedImageSequence) and times, in the same run, over N repetitions:

* ``header``     - scp.handlers.read_header (what the handler read before: the baseline);
* ``integrity``  - scp.integrity.check_dataset with the node's default limits (every element's length,
                   native Pixel Data length; pixel data skipped, not copied);
* ``sha256``     - scp.integrity.dataset_sha256 (paid only for a duplicate SOP Instance UID);
* ``write``      - scp.spool.write_instance (the durable write the handler does anyway: fsync file + dir),
                   on --dir, to put the figures beside the write that dominates a C-STORE.

    python bench/bench_integrity.py [--count 200] [--dir /path/on/the/spool/disk]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from scp.handlers import read_header
from scp.integrity import IntegrityLimits, check_dataset, dataset_sha256
from scp.spool import write_instance

STUDY = "1.2.826.0.1.3680043.8.498.9901"


def _instance() -> bytes:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = STUDY + ".1"
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ref = Dataset()
    ref.ReferencedSOPClassUID = CTImageStorage
    ref.ReferencedSOPInstanceUID = generate_uid()
    ds.ReferencedImageSequence = [ref]
    ds.Rows = ds.Columns = 512
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = np.random.default_rng(0).integers(-1000, 2000, (512, 512), dtype=np.int16).tobytes()
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = False, True
    write_dataset(fp, ds)
    return fp.getvalue()


def _time(fn, count: int) -> list[float]:  # noqa: ANN001
    out = []
    for _ in range(count):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    data = _instance()
    limits = IntegrityLimits(max_element_bytes=16 * 1024 * 1024, max_instance_bytes=2 * 1024**3)
    assert check_dataset(data, ExplicitVRLittleEndian, limits) is None
    with tempfile.TemporaryDirectory(dir=args.dir) as spool:
        n = [0]

        def write() -> None:
            n[0] += 1
            write_instance(Path(spool), STUDY, STUDY + ".1", f"{STUDY}.{n[0]}", data)

        rows = {
            "header (baseline)": _time(lambda: read_header(BytesIO(data), ExplicitVRLittleEndian), args.count),
            "integrity": _time(lambda: check_dataset(data, ExplicitVRLittleEndian, limits), args.count),
            "sha256 (duplicates only)": _time(lambda: dataset_sha256(data), args.count),
            "write (durable)": _time(write, args.count),
        }
    base = statistics.median(rows["header (baseline)"])
    print(f"{len(data) / 1e6:.2f} MB instance, {args.count} repetitions, medians:")
    for name, times in rows.items():
        med = statistics.median(times)
        print(f"  {name:<26} {med * 1e6:9.1f} us   x{med / base:6.1f} of the header read")


if __name__ == "__main__":
    main()
