"""Shared fixtures: paths to ../shared/data and free loopback ports."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support.ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout (real DICOM for tests)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} is missing: the tests need ../shared/data beside the checkout")
    return SHARED_DATA


@pytest.fixture
def port() -> int:
    return free_port()


def require_tool(name: str) -> str:
    """Path of an external program the test needs; fail (not skip) when it is missing,
    because .ci/run installs it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; .ci/run installs it (dcmtk, orthanc, dicom3tools)")
    return path


@pytest.fixture(scope="session")
def postgres_server():  # noqa: ANN201 - tests.support.postgres.PostgresServer
    """One real PostgreSQL 15 for the session (tests.support.postgres); each test takes its own database."""
    from tests.support.postgres import PostgresServer

    with PostgresServer() as server:
        yield server


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def database(request: pytest.FixtureRequest, tmp_path: Path):  # noqa: ANN201 - Path | str
    """The node's database, once per backend: a SQLite file in tmp_path, or a fresh PostgreSQL database's URL."""
    if request.param == "sqlite":
        yield tmp_path / "node.db"
        return
    server = request.getfixturevalue("postgres_server")
    url = server.create_database()
    yield url
    server.drop_database(url)
