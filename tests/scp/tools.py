"""Helpers for the ingress tests: dcmtk programs and a bit-preserving storescp for reference."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.conftest import require_tool
from tests.support.ports import free_port, wait_for_port

AE_TITLE = "THIGHNODE"


def echo(port: int) -> bool:
    """One C-ECHO from AE ECHOSCU to the node on loopback; True when answered Success."""
    ae = AE("ECHOSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0x0000


def run_tool(*args: str | Path, timeout_s: float = 180.0) -> subprocess.CompletedProcess[str]:
    """Run a dcmtk program, capturing its output (never raises on a non-zero exit)."""
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout_s, check=False)


@contextmanager
def storescp_bit_preserving(out_dir: Path) -> Iterator[int]:
    """dcmtk storescp writing what it receives exactly as read (+B) into out_dir; yields its port."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(
        [require_tool("storescp"), "+B", "-od", str(out_dir), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_port(port, timeout_s=30.0)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
