"""A real RabbitMQ broker for integration tests (Debian ``rabbitmq-server``), on free loopback ports.

Everything the broker writes (database, logs, config, Erlang cookie via ``HOME``) goes under a tmp dir; it runs
the package's own scripts in ``/usr/lib/rabbitmq/bin`` (the ``/usr/sbin`` wrappers switch to the ``rabbitmq``
user and its ``/var/lib/rabbitmq``). It gets its own epmd port (``ERL_EPMD_PORT``), and the epmd started for it
is stopped on teardown. Skips the test when the package is not installed.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.ports import free_port, wait_for_port
from tests.support.processes import stop_process_group

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")


class RabbitMQServer:
    """``with RabbitMQServer(tmp) as mq: mq.url`` -> ``amqp://guest:guest@127.0.0.1:<port>//``."""

    def __init__(self, root: Path, *, consumer_timeout_ms: int = 3_600_000) -> None:
        if not (RABBITMQ_BIN / "rabbitmq-server").exists():
            pytest.skip("rabbitmq-server is not installed (apt-get install -y rabbitmq-server)")
        self.root = root
        self.port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.node_name = f"thighnode-test-{self.port}@localhost"
        self.consumer_timeout_ms = consumer_timeout_ms
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = root / "rabbitmq.out"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            HOME=str(self.root),  # the Erlang cookie is written here
            RABBITMQ_NODENAME=self.node_name,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_MNESIA_BASE=str(self.root / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.root / "log"),
            RABBITMQ_CONFIG_FILE=str(self.root / "rabbitmq.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.root / "enabled_plugins"),
            RABBITMQ_ENABLED_PLUGINS="",
            RABBITMQ_PID_FILE=str(self.root / "rabbitmq.pid"),
        )
        return env

    def start(self, timeout_s: float = 120.0) -> "RabbitMQServer":
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "rabbitmq.conf").write_text(
            "listeners.tcp.default = 127.0.0.1:%d\n"
            "loopback_users = none\n"
            "consumer_timeout = %d\n"
            "log.console = true\nlog.console.level = warning\n" % (self.port, self.consumer_timeout_ms),
            encoding="utf-8",
        )
        (self.root / "enabled_plugins").write_text("[].\n", encoding="utf-8")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(RABBITMQ_BIN / "rabbitmq-server")], cwd=self.root, env=self.env(), stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        try:
            wait_for_port(self.port, timeout_s=timeout_s)
            self._wait_running(timeout_s)
        except (TimeoutError, AssertionError):
            self.stop()
            raise AssertionError(f"RabbitMQ did not start on {self.port}; log:\n{self.log()[-4000:]}") from None
        return self

    def _wait_running(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            done = subprocess.run(
                [str(RABBITMQ_BIN / "rabbitmq-diagnostics"), "-q", "-n", self.node_name, "check_port_connectivity"],
                env=self.env(), capture_output=True, text=True, timeout=60,
            )
            if done.returncode == 0:
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"rabbitmq-server exited with {self.proc.returncode}")
            time.sleep(0.5)
        raise TimeoutError("RabbitMQ listeners not ready")

    def ctl(self, *args: str) -> str:
        done = subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmqctl"), "-q", "-n", self.node_name, *args],
            env=self.env(), capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """Stop the broker (its whole process group) and the epmd it started on its own port."""
        if self.proc is not None:
            stop_process_group(self.proc)
            self.proc = None
        # epmd daemonises out of the broker's process group; ask the one on our port to stop.
        subprocess.run(["epmd", "-port", str(self.epmd_port), "-kill"], env=self.env(), capture_output=True,
                       timeout=30, check=False)

    def __enter__(self) -> "RabbitMQServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
