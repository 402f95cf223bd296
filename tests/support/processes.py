"""Stopping the servers and workers the tests start in their own process groups."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_process_group(proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """SIGTERM to ``proc``'s process group (started with ``start_new_session=True``), SIGKILL after
    ``timeout_s``; returns once ``proc`` has exited. Nothing to do when it already has."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
