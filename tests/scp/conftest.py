"""Fixtures for the ingress tests: a running ingress server on a free loopback port."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from scp.ae import IngressServer, start_ingress
from scp.index import InstanceIndex
from scp.refusals import RefusalLog
from scp.types import IngressConfig
from tests.scp.tools import AE_TITLE
from tests.support.ports import free_port


@dataclass
class RunningIngress:
    config: IngressConfig
    index: InstanceIndex
    server: IngressServer
    refusals: RefusalLog

    @property
    def port(self) -> int:
        return self.config.port


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., RunningIngress]]:
    """Factory: start an ingress server (config overrides as keywords); all are stopped at teardown."""
    running: list[RunningIngress] = []

    def start(observer: object = None, **overrides: object) -> RunningIngress:
        n = len(running)
        values: dict[str, object] = {
            "ae_title": AE_TITLE,
            "host": "127.0.0.1",
            "port": free_port(),
            "spool_dir": tmp_path / f"spool{n}",
            "db_path": tmp_path / f"node{n}.sqlite",
            "min_free_disk_mb": 1,
            "acse_timeout_s": 10.0,
            "dimse_timeout_s": 30.0,
            "network_timeout_s": 30.0,
        }
        values.update(overrides)
        config = IngressConfig(**values)  # type: ignore[arg-type]
        index = InstanceIndex(config.db_path)
        refusals = RefusalLog(config.db_path)
        try:
            server = start_ingress(config, index, observer, refusals)  # type: ignore[arg-type]
        except BaseException:
            index.close()
            refusals.close()
            raise
        item = RunningIngress(config, index, server, refusals)
        running.append(item)
        return item

    try:
        yield start
    finally:
        for item in running:
            item.server.stop()
            item.index.close()
            item.refusals.close()
