"""Run dicom3tools' ``dciodvfy`` on a file and collect what it reports (test support).

``dciodvfy`` checks a DICOM file against the IOD of its SOP Class (PS3.3): missing or
empty required attributes, bad enumerated values, VR and VM violations. It prints one
finding per line on stderr, prefixed ``Error -`` or ``Warning -``. The installed build
(dicom3tools 2022) predates Label Map Segmentation Storage (PS3.4, 2024), so for that
SOP Class it can only say that it does not know the IOD (:data:`UNKNOWN_IOD`). It cannot
read a Deflated Explicit VR Little Endian file ("Dicom dataset read failed"): such a file is
first inflated by dcmtk's ``dcmconv +te`` (an independent reader: this also checks that dcmtk
can inflate it), and the inflated copy is checked; deflating changes the encoding, not the
attributes the IOD rules look at.
"""

from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian

from tests.conftest import require_tool

UNKNOWN_IOD = "Error - Information Object Not found"
"""What dciodvfy prints for a SOP Class it has no IOD definition for."""


@dataclass(frozen=True)
class DciodvfyReport:
    """Lines dciodvfy printed for one file."""

    errors: tuple[str, ...]
    warnings: tuple[str, ...]
    output: str


DEFAULT_TIMEOUT_S = 900.0
"""A guard against a hung ``dciodvfy``, not a speed limit. Its time grows with the number of frames:
the end-to-end test's SEG (4336 one-bit frames of 260x260, 58 segments, 38 MB) takes 98 s on the
development machine and took over 120 s (the old limit) on the 2-core CI machine."""


def run_dciodvfy(path: Path, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> DciodvfyReport:
    """Run ``dciodvfy`` on ``path`` (inflated first when deflated) and split its output into error and
    warning lines."""
    if dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian:
        dcmconv = require_tool("dcmconv")
        with tempfile.TemporaryDirectory() as tmp:
            inflated = Path(tmp) / "inflated.dcm"
            subprocess.run([dcmconv, "+te", str(path), str(inflated)], check=True, capture_output=True, timeout=timeout_s)
            return run_dciodvfy(inflated, timeout_s=timeout_s)
    exe = require_tool("dciodvfy")
    proc = subprocess.run(
        [exe, str(path)], capture_output=True, text=True, errors="replace", timeout=timeout_s
    )
    output = proc.stdout + proc.stderr
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = tuple(line for line in lines if line.startswith("Error"))
    warnings = tuple(line for line in lines if line.startswith("Warning"))
    return DciodvfyReport(errors=errors, warnings=warnings, output=output)


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines dciodvfy reports for ``path`` (empty when the file conforms)."""
    return list(run_dciodvfy(path).errors)
