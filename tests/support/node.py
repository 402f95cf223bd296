"""Run a real `thighnode serve` process for integration tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from tests.support.ports import free_port, wait_for_port

REPO_ROOT = Path(__file__).resolve().parents[2]


def write_config(path: Path, *, port: int, data_dir: Path, quiet_period_s: float = 1.0, extra: str = "") -> Path:
    path.write_text(
        f"""
[node]
ae_title = "THIGHNODE"
host = "127.0.0.1"
port = {port}
data_dir = "{data_dir}"
quiet_period_s = {quiet_period_s}
min_free_disk_mb = 1
log_level = "INFO"

[outbox]
send_interval_s = 0.5
base_delay_s = 0.5
max_delay_s = 2

{extra}
""",
        encoding="utf-8",
    )
    return path


class NodeProcess:
    """`python -m thighnode serve` on a free loopback port, its log in the tmp dir."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        quiet_period_s: float = 1.0,
        extra_config: str = "",
        load_model: bool = False,
        port: int | None = None,
        module: str = "thighnode",
        extra_env: dict[str, str] | None = None,
    ) -> None:
        """``module`` is run with ``python -m`` (tests.support.crashing_node for a node that crashes);
        ``extra_env`` is added to its environment."""
        self.tmp_path = tmp_path
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.data_dir = tmp_path / "var"
        self.config = write_config(
            tmp_path / "node.toml",
            port=self.port,
            data_dir=self.data_dir,
            quiet_period_s=quiet_period_s,
            extra=extra_config,
        )
        self.load_model = load_model
        self.module = module
        self.extra_env = dict(extra_env or {})
        self.log_path = tmp_path / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("THIGHNODE_")}
        env["THIGHNODE_HOME"] = str(self.tmp_path)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        return env

    def start(self, timeout_s: float = 120.0) -> "NodeProcess":
        cmd = [sys.executable, "-m", self.module, "serve", "--config", str(self.config)]
        if not self.load_model:
            cmd.append("--no-model")
        log = open(self.log_path, "ab")
        log.write(f"\n=== start {self.starts} ===\n".encode())
        log.flush()
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=self.env(), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.starts += 1
        try:
            wait_for_port(self.port, timeout_s=timeout_s)
        except TimeoutError:
            self.kill9()
            raise AssertionError(f"node did not listen on {self.port}; log:\n{self.log()}") from None
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        rc = self.proc.returncode
        self.proc = None
        return rc

    def status(self) -> dict[str, Any]:
        out = self.cli("status", "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`thighnode ARGS --config <this node's config>` as a separate process (as an operator runs it)."""
        return subprocess.run(
            [sys.executable, "-m", "thighnode", *args, "--config", str(self.config)],
            cwd=REPO_ROOT, env=self.env(), capture_output=True, text=True, timeout=60,
        )

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 120.0, what: str = "") -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = self.status()
            if predicate(status):
                return status
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode}; log:\n{self.log()[-5000:]}")
            time.sleep(0.3)
        raise AssertionError(
            f"timed out waiting for {what or 'condition'}; last status:\n{json.dumps(status, indent=1)[-4000:]}\n"
            f"log:\n{self.log()[-5000:]}"
        )

    def __enter__(self) -> "NodeProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
