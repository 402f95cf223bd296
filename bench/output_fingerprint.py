"""Fingerprint of what the node sends for one study: the label map and the SEG, SR and PDF bytes.

Used to show that a refactoring changes nothing a PACS receives. It runs the real node
(`python -m thighnode serve`, demonstration bundle) on loopback, pushes one phantom study with
dcmtk's storescu, waits for the job to end, and prints a SHA-256 per output:

- ``labelmap``: the SEG's frames decoded back into a label volume (what the model produced);
- ``seg`` / ``sr`` / ``pdf``: the DICOM files as written, with the attributes that hold the
  time of writing blanked (ContentDate/Time, InstanceCreationDate/Time, SeriesDate/Time,
  DateTime of SR content) and the PDF's own creation date fixed (SOURCE_DATE_EPOCH).

    python bench/output_fingerprint.py --input /tmp/fp_study --out fingerprint.json

The input study is generated once into ``--input`` (seeded phantom) and reused, so the same
DICOM files go in before and after a change. Compare two JSON files with ``--compare A B``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402

from tests.support.node import NodeProcess  # noqa: E402

STUDY = "1.2.826.0.1.3680043.8.498.99101"
_TIME_KEYWORDS = (
    "ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime",
    "SeriesDate", "SeriesTime", "DateTime", "ObservationDateTime", "AcquisitionDateTime",
    "ContributionDateTime",
    "DimensionOrganizationUID",  # highdicom draws a new one per SEG
)


def _generate(input_dir: Path) -> list[Path]:
    try:
        from modelkit.phantom import PhantomParams, generate_phantom, write_dicom_series
    except ImportError:  # before the model kit left pipeline/
        from pipeline.phantom import PhantomParams, generate_phantom, write_dicom_series  # type: ignore[no-redef]
    phantom = generate_phantom(PhantomParams(seed=5, spacing_mm=(4.0, 3.0, 3.0), implant="left", height_m=1.6, sex="F"))
    return write_dicom_series(
        phantom, input_dir, patient_id="TN-FP-1", patient_name="Test^Fingerprint", patient_sex="F",
        birth_date="19500101", height_m=1.6, study_uid=STUDY, series_uid=STUDY + ".2",
        frame_of_reference_uid=STUDY + ".3", study_date="20240301", accession="FP1",
    )


def _blank_times(ds: pydicom.Dataset) -> None:
    for elem in list(ds.iterall()):
        if elem.keyword in _TIME_KEYWORDS:
            elem.value = ""


def _dataset_hash(path: Path) -> str:
    ds = pydicom.dcmread(path)
    _blank_times(ds)
    if "EncapsulatedDocument" in ds:
        ds.EncapsulatedDocument = re.sub(rb"/CreationDate \(D:[^)]*\)", b"", bytes(ds.EncapsulatedDocument))
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return hashlib.sha256(buf.getvalue()).hexdigest()


def _labelmap_hash(path: Path) -> str:
    import highdicom as hd

    seg = hd.seg.segread(path)
    source_uids = [uid for _, _, uid in seg.get_source_image_uids()]
    labels = seg.get_pixels_by_source_instance(source_uids, combine_segments=True, relabel=False)
    return hashlib.sha256(np.ascontiguousarray(labels, dtype=np.uint16).tobytes()).hexdigest()


def hash_outputs(outputs: list[Path]) -> dict[str, str]:
    """SHA-256 per output kind (file names ``<kind>_<SOPInstanceUID>.dcm``), and of the SEG's label map."""
    result: dict[str, str] = {}
    for path in outputs:
        kind = path.name.split("_", 1)[0]
        result[kind] = _dataset_hash(path)
        if kind == "seg":
            result["labelmap"] = _labelmap_hash(path)
    return result


def fingerprint(input_dir: Path, work: Path, keep: Path | None = None) -> dict[str, str]:
    files = sorted(input_dir.glob("*.dcm")) or _generate(input_dir)
    os.environ["SOURCE_DATE_EPOCH"] = "1700000000"
    node = NodeProcess(work, load_model=True, quiet_period_s=1.0)
    with node:
        done = subprocess.run(
            ["storescu", "-aet", "FP_CT", "-aec", "THIGHNODE", "127.0.0.1", str(node.port), *map(str, files)],
            capture_output=True, text=True,
        )
        if done.returncode != 0:
            sys.exit(f"storescu failed: {done.stderr}")

        def ended(s: dict) -> bool:
            return any(j["study_uid"] == STUDY and j["state"] in ("done", "declined", "failed") for j in s["jobs"])

        status = node.wait_for(ended, timeout_s=1800, what="the fingerprint study")
    job = next(j for j in status["jobs"] if j["study_uid"] == STUDY)
    if job["state"] != "done":
        sys.exit(f"job ended {job['state']}: {job['reason']}")
    outputs = sorted((node.data_dir / "outputs" / STUDY).glob("*.dcm"))
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        for path in outputs:
            shutil.copy2(path, keep / path.name)
    return hash_outputs(outputs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, default=Path(tempfile.gettempdir()) / "thighnode_fp_study")
    parser.add_argument("--out", type=Path, help="write the fingerprint JSON here")
    parser.add_argument("--keep", type=Path, help="copy the output files here")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"), help="compare two fingerprint files")
    parser.add_argument("--files", type=Path, help="only hash the outputs already in this folder")
    args = parser.parse_args(argv)
    if args.files:
        print(json.dumps(hash_outputs(sorted(args.files.glob("*.dcm"))), indent=1, sort_keys=True))
        return 0
    if args.compare:
        a, b = (json.loads(p.read_text()) for p in args.compare)
        for key in sorted(set(a) | set(b)):
            same = "same" if a.get(key) == b.get(key) else "DIFFERENT"
            print(f"{key:9s} {a.get(key, '-')[:16]}  {b.get(key, '-')[:16]}  {same}")
        return 0 if a == b else 1
    args.input.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="thighnode_fp_"))
    try:
        result = fingerprint(args.input, work, args.keep)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=1, sort_keys=True)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
