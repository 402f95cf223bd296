"""The container image (deploy/Containerfile): built and run where a container runtime works, else its
build steps (deploy/build_image_steps.sh) run on the host into a prefix and the node run from there.

Either way the checks are the same: the node runs as uid 10001, the entry point (`thighnode serve
--config <the image's node.toml>`) starts and loads the model, the health check (deploy/healthcheck.py,
a C-ECHO to the node) passes, nothing is written outside the data directory and /tmp, and SIGTERM stops
it cleanly. Building takes minutes (torch), so CI runs one of the two: the image when `podman run` works
on the machine, the host steps otherwise (THIGHNODE_TEST_HOST_STEPS=1 runs the host steps as well).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.ports import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
UID = 10001
BASE_IMAGE = "localhost/thighnode-base:bookworm"
IMAGE = "localhost/thighnode:test"
HEALTHY_WITHIN_S = 600.0
#: What some sandboxes need for `podman run` (crun cannot set rlimits or run on hybrid cgroups there).
SANDBOX_RUN_FLAGS = ("--runtime", "runc", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")


def _run(cmd: list[str], timeout_s: float = 120.0, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, **kwargs)  # type: ignore[call-overload]


def podman_run_flags() -> tuple[str, ...] | None:
    """The flags with which `podman run` works here (`()` or :data:`SANDBOX_RUN_FLAGS`); None where it does not."""
    podman = shutil.which("podman")
    if podman is None or os.geteuid() != 0:
        return None
    if _run([podman, "image", "exists", BASE_IMAGE]).returncode != 0:
        made = _run([str(REPO / "deploy" / "make_base_image.sh"), BASE_IMAGE], timeout_s=1200)
        if made.returncode != 0:
            return None
    for flags in ((), SANDBOX_RUN_FLAGS):
        if _run([podman, "run", "--rm", *flags, BASE_IMAGE, "true"]).returncode == 0:
            return flags
    return None


@pytest.fixture(scope="module")
def run_flags() -> tuple[str, ...] | None:
    return podman_run_flags()


def _world_writable_entries_of(uid: int, roots: tuple[str, ...], allowed: tuple[Path, ...]) -> list[str]:
    """Files or directories owned by ``uid`` under ``roots`` but outside ``allowed``."""
    found = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                try:
                    owner = path.lstat().st_uid
                except OSError:
                    continue
                if owner == uid and not any(path == a or a in path.parents for a in allowed):
                    found.append(str(path))
    return found


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under ``root``: to show nothing there changed."""
    return {str(p): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*") if not p.is_dir()}


@pytest.fixture(scope="module")
def prefix(run_flags: tuple[str, ...] | None) -> Iterator[Path]:
    """deploy/build_image_steps.sh run on the host into a fresh, root-owned prefix (world-readable)."""
    if run_flags is not None and os.environ.get("THIGHNODE_TEST_HOST_STEPS") != "1":
        pytest.skip("the container image test runs the same build steps inside the image build")
    work = Path(tempfile.mkdtemp(prefix="thighnode-prefix-", dir="/var/tmp"))
    work.chmod(0o755)
    try:
        target = work / "opt-thighnode"
        built = _run(
            [str(REPO / "deploy" / "build_image_steps.sh"), str(REPO), str(target)],
            timeout_s=1800, env={**os.environ, "PYTHON": sys._base_executable},  # type: ignore[attr-defined]
        )
        assert built.returncode == 0, f"build_image_steps.sh failed:\n{built.stdout[-3000:]}\n{built.stderr[-3000:]}"
        assert "thighnode installed in" in built.stdout
        yield target
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture()
def scratch() -> Iterator[Path]:
    """A world-readable directory outside the tester's 0700 temporary directories (uid 10001 must reach it)."""
    path = Path(tempfile.mkdtemp(prefix="thighnode-run-", dir="/var/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_the_image_steps_install_a_node_that_runs_unprivileged_with_only_its_data_dir_writable(
    prefix: Path, scratch: Path, tmp_path: Path
) -> None:
    as_root = os.geteuid() == 0
    data, tmp = scratch / "data", scratch / "tmp"
    data.mkdir()
    tmp.mkdir(mode=0o1777)
    tmp.chmod(0o1777)
    if as_root:
        os.chown(data, UID, UID)
    port = free_port()
    env = {  # the image's ENV, with the port moved to a free one on loopback
        "PATH": f"{prefix}/.venv/bin:/usr/bin:/bin", "THIGHNODE_HOME": str(data), "HOME": str(data),
        # MONAI asks getpass.getuser() at import: without USER/LOGNAME a uid with no passwd entry
        # (here 10001; in the image it has one, but `--user <any uid>` has not) stops the node.
        "USER": "thighnode", "LOGNAME": "thighnode",
        "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", "MPLCONFIGDIR": f"{tmp}/matplotlib",
        "XDG_CACHE_HOME": f"{tmp}/cache", "TMPDIR": str(tmp),
        "THIGHNODE_NODE__DATA_DIR": str(data), "THIGHNODE_NODE__HOST": "127.0.0.1", "THIGHNODE_NODE__PORT": str(port),
    }
    as_user = ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups"] if as_root else []
    config = prefix / "deploy" / "node.container.toml"
    before = _snapshot(prefix)
    log = (tmp_path / "node.log").open("w")
    node = subprocess.Popen(
        [*as_user, f"{prefix}/.venv/bin/thighnode", "serve", "--config", str(config)],
        env=env, cwd=data, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        health = [*as_user, f"{prefix}/.venv/bin/python", f"{prefix}/deploy/healthcheck.py", "--config", str(config)]
        deadline = time.monotonic() + HEALTHY_WITHIN_S
        while True:
            assert node.poll() is None, f"the node exited with {node.returncode}:\n{(tmp_path / 'node.log').read_text()[-4000:]}"
            check = _run(health, env=env, cwd=data, timeout_s=60)
            if check.returncode == 0:
                break
            assert time.monotonic() < deadline, f"not healthy within {HEALTHY_WITHIN_S} s: {check.stderr}"
            time.sleep(2)
        assert f"THIGHNODE@127.0.0.1:{port} answered C-ECHO: success" in check.stdout
        status_line = next(line for line in Path(f"/proc/{node.pid}/status").read_text().splitlines()
                           if line.startswith("Uid:"))
        uids = {int(u) for u in status_line.split()[1:]}
        assert uids == ({UID} if as_root else {os.geteuid()}) and 0 not in uids
        status = _run([*as_user, f"{prefix}/.venv/bin/thighnode", "status", "--config", str(config)], env=env, cwd=data)
        assert status.returncode == 0, status.stderr
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            code = node.wait(timeout=120)
        except subprocess.TimeoutExpired:
            node.kill()
            code = node.wait()
        log.close()
    assert code == 0, (tmp_path / "node.log").read_text()[-4000:]
    assert _snapshot(prefix) == before, "the node wrote into its installation"
    assert (data / "thighnode.db").is_file() and (data / "spool").is_dir()
    if as_root:
        assert _world_writable_entries_of(UID, ("/tmp", "/var/tmp", "/dev/shm"), (data, tmp, scratch)) == []


def _podman_pip_args() -> list[str]:
    """Build arguments and read-only mounts that let the image build use this host's pip set-up
    (find-links, local indexes, CA bundle), so CI installs from the same local wheels."""
    listing = _run([sys.executable, "-m", "pip", "config", "list"]).stdout
    values: dict[str, str] = {}
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        name = key.split(".", 1)[-1].replace("-", "_").upper()
        values.setdefault(name, value.strip().strip("'\""))
    for name in ("FIND_LINKS", "INDEX_URL", "EXTRA_INDEX_URL", "CERT"):
        if os.environ.get(f"PIP_{name}"):
            values[name] = os.environ[f"PIP_{name}"]
    args: list[str] = []
    mounts: set[str] = set()
    for name in ("FIND_LINKS", "EXTRA_INDEX_URL", "INDEX_URL", "CERT"):
        if name not in values:
            continue
        args += ["--build-arg", f"PIP_{name}={values[name]}"]
        for item in values[name].split():
            path = item.removeprefix("file://")
            if path.startswith("/") and Path(path).exists():
                mounts.add(str(Path(path).parent if path.endswith("/simple") else path))
    for mount in sorted(mounts):
        args += ["-v", f"{mount}:{mount}:ro"]
    return args


@pytest.fixture(scope="module")
def image(run_flags: tuple[str, ...] | None) -> str:
    if run_flags is None:
        pytest.skip("no working container runtime here (podman missing, not root, or `podman run` fails); "
                    "the host-steps test covers the build steps")
    built = _run(
        ["podman", "build", *run_flags, "--format", "docker", "--network", "host", *_podman_pip_args(),
         "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-f", "deploy/Containerfile", "-t", IMAGE, "."],
        timeout_s=2400, cwd=REPO,
    )
    assert built.returncode == 0, f"podman build failed:\n{built.stdout[-3000:]}\n{built.stderr[-3000:]}"
    return IMAGE


def test_the_image_runs_unprivileged_read_only_and_becomes_healthy(
    image: str, run_flags: tuple[str, ...], scratch: Path
) -> None:
    data = scratch / "volume"
    data.mkdir()
    os.chown(data, UID, UID)
    port = free_port()
    name = f"thighnode-test-{port}"
    started = _run(
        ["podman", "run", "-d", "--name", name, *run_flags, "--network", "host",
         "--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp:rw,nosuid,size=512m",
         "-v", f"{data}:/var/lib/thighnode", "-e", "THIGHNODE_NODE__HOST=127.0.0.1",
         "-e", f"THIGHNODE_NODE__PORT={port}", image]
    )
    assert started.returncode == 0, started.stderr
    try:
        deadline = time.monotonic() + HEALTHY_WITHIN_S
        while True:
            state = _run(["podman", "inspect", "-f", "{{.State.Running}}", name]).stdout.strip()
            assert state == "true", "the container stopped:\n" + _run(["podman", "logs", name]).stderr[-4000:]
            health = _run(["podman", "healthcheck", "run", name], timeout_s=60)
            if health.returncode == 0:
                break
            assert time.monotonic() < deadline, f"not healthy within {HEALTHY_WITHIN_S} s: {health.stdout}{health.stderr}"
            time.sleep(3)
        assert _run(["podman", "exec", name, "id", "-u"]).stdout.strip() == str(UID)
        node_uid = _run(["podman", "exec", name, "sh", "-c", "awk '/^Uid:/{print $2}' /proc/1/status"]).stdout.strip()
        assert node_uid == str(UID)
        writable = _run(["podman", "exec", name, "sh", "-c",
                         "find / -path /proc -prune -o -path /sys -prune -o -path /dev -prune -o "
                         "-writable -type d -print 2>/dev/null"]).stdout.split()
        outside = [p for p in writable if not (p.startswith("/var/lib/thighnode") or p.startswith("/tmp"))]
        assert outside == [] and "/var/lib/thighnode" in writable
        assert _run(["podman", "exec", name, "touch", "/opt/thighnode/probe"]).returncode != 0
        assert (data / "thighnode.db").is_file()
    finally:
        _run(["podman", "stop", "-t", "120", name], timeout_s=180)
        exit_code = _run(["podman", "inspect", "-f", "{{.State.ExitCode}}", name]).stdout.strip()
        logs = _run(["podman", "logs", name]).stderr
        _run(["podman", "rm", "-f", name])
    assert exit_code == "0", logs[-4000:]
    assert "node stopped" in logs
