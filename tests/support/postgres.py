"""A real PostgreSQL 15 server for tests (Debian ``postgresql``), on a free loopback port.

The cluster (``initdb``), its socket directory and its log live in a fresh directory under the system
temp dir that the server's user owns: ``initdb`` and ``postgres`` refuse to run as root, so as root they
run as the ``postgres`` user the package creates. Authentication is ``trust`` on 127.0.0.1 for the
superuser ``thighnode``; ``fsync`` is off unless ``durable`` (a test cluster is thrown away). :meth:`PostgresServer.create_database`
gives each test its own database (``LC_COLLATE`` C), dropped with ``WITH (FORCE)`` afterwards.
"""

from __future__ import annotations

import grp
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.support.ports import free_port, wait_for_port
from tests.support.processes import stop_process_group

POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")
SUPERUSER = "thighnode"


class PostgresServer:
    """``with PostgresServer() as pg: url = pg.create_database()`` -> ``postgresql://thighnode@127.0.0.1:<port>/t1``."""

    def __init__(self, *, durable: bool = False) -> None:
        """``durable``: fsync each commit as a production server does (benchmarks); tests leave it off."""
        if not (POSTGRES_BIN / "postgres").exists():
            pytest.fail(f"{POSTGRES_BIN}/postgres is missing: .ci/run installs postgresql (apt-get install -y postgresql)")
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="thighnode-pg-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self._names = itertools.count(1)
        self.durable = durable
        self._as: dict[str, Any] = {}
        if os.geteuid() == 0:  # initdb / postgres refuse root
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as = {"user": user.pw_uid, "group": grp.getgrgid(user.pw_gid).gr_gid, "extra_groups": []}

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def _run(self, *args: str) -> None:
        out = subprocess.run(args, cwd=self.root, capture_output=True, text=True, timeout=120, **self._as)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {out.returncode}: {out.stdout}{out.stderr}")

    def start(self) -> PostgresServer:
        data = self.root / "data"
        try:
            self._run(str(POSTGRES_BIN / "initdb"), "-D", str(data), "--auth=trust", f"--username={SUPERUSER}",
                      "--encoding=UTF8", "--locale=C")
        except BaseException:
            self.stop()
            raise
        log = open(self.root / "postgres.log", "ab")
        self.proc = subprocess.Popen(
            [str(POSTGRES_BIN / "postgres"), "-D", str(data), "-p", str(self.port), "-k", str(self.root),
             "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=300",
             *(() if self.durable else ("-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"))],
            cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **self._as,
        )
        log.close()
        try:
            wait_for_port(self.port, timeout_s=60.0)
            self._admin("SELECT 1")
        except BaseException:
            self.stop()
            raise
        return self

    def _admin(self, sql: str) -> None:
        import psycopg

        for attempt in range(50):
            try:
                with psycopg.connect(self.url(), autocommit=True, connect_timeout=5) as conn:
                    conn.execute(sql)
                return
            except psycopg.OperationalError:  # the server is still starting
                if attempt == 49:
                    raise
                import time

                time.sleep(0.2)

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        name = f"t{next(self._names)}"
        self._admin(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' LOCALE 'C'")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        self._admin(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")

    def log_text(self) -> str:
        path = self.root / "postgres.log"
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGINT)  # "fast" shutdown: clients still connected are cut off
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            stop_process_group(self.proc, timeout_s=10.0)
            self.proc = None
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
