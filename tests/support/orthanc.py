"""A throwaway Orthanc server for integration tests (test support).

``OrthancServer`` writes a temporary JSON configuration (storage and index in the
test's directory, loopback-only REST without authentication, no plugins unless
``dicomweb=True`` loads Debian's DICOMweb plugin at ``/dicom-web/``, free ports),
runs ``/usr/sbin/Orthanc <config>`` as a subprocess logging to a file, and talks to
its REST API with urllib. The process is always killed on exit, also when the test
fails::

    with OrthancServer(tmp_path, modalities={"NODE": ("THIGHNODE", "127.0.0.1", port)}) as orthanc:
        ...C-STORE to 127.0.0.1:orthanc.dicom_port, AE orthanc.aet...
        assert orthanc.count_instances() == 3
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from tests.support.ports import free_port, wait_for_port

ORTHANC_BINARY = "/usr/sbin/Orthanc"
_INSTALL_HINT = "Orthanc is not installed; .ci/run installs it (apt-get install orthanc)"
# Where Debian's orthanc-dicomweb package installs the plugin (dpkg -L orthanc-dicomweb).
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
DICOMWEB_ROOT = "/dicom-web/"


def orthanc_binary() -> str:
    """Path of the Orthanc program; fail (not skip) the test when it is missing."""
    if Path(ORTHANC_BINARY).is_file():
        return ORTHANC_BINARY
    found = shutil.which("Orthanc")
    if found is None:
        pytest.fail(_INSTALL_HINT)
    return found


class OrthancServer:
    """An Orthanc process on 127.0.0.1 with its storage under ``tmp_dir``.

    ``modalities`` maps a symbolic name to ``(aet, host, port)``: the DicomModalities
    Orthanc may C-MOVE / C-STORE to (for example the node under test).
    """

    def __init__(
        self,
        tmp_dir: Path,
        *,
        aet: str = "ORTHANC",
        dicom_port: int | None = None,
        http_port: int | None = None,
        modalities: dict[str, tuple[str, str, int]] | None = None,
        start_timeout_s: float = 60.0,
        dicom_tls: tuple[Path, Path, Path] | None = None,
        dicom_tls_client_required: bool = True,
        dicomweb: bool = False,
    ) -> None:
        """``dicom_tls`` = (certificate, private key, trusted CA certificates): Orthanc's
        DICOM port speaks TLS only (Orthanc 1.9+), requires a client certificate from those
        CAs unless ``dicom_tls_client_required`` is false, and reaches ``modalities`` over TLS."""
        self.root = Path(tmp_dir) / f"orthanc-{aet.lower()}"
        self.aet = aet
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.modalities = dict(modalities or {})
        self.start_timeout_s = start_timeout_s
        self.dicom_tls = dicom_tls
        self.dicom_tls_client_required = dicom_tls_client_required
        self.dicomweb = dicomweb
        if dicomweb and not Path(DICOMWEB_PLUGIN).is_file():
            pytest.fail(f"{DICOMWEB_PLUGIN} is missing: the DICOMweb plugin comes with apt-get install orthanc-dicomweb")
        self.config_path = self.root / "orthanc.json"
        self.log_path = self.root / "orthanc.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._write_config()

    # --- lifecycle ----------------------------------------------------------------
    def _write_config(self) -> None:
        storage = self.root / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(exist_ok=True)
        config: dict[str, Any] = {
            "Name": f"thighnode-test-{self.aet}",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "TemporaryDirectory": str(self.root / "tmp"),
            "StorageCompression": False,
            # thighnode re-sends an updated object with the same SOP Instance UID (reprocessing,
            # a prior that arrived later): the PACS must replace it.
            "OverwriteInstances": True,
            "Plugins": [DICOMWEB_PLUGIN] if self.dicomweb else [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {
                name: [aet, host, port] for name, (aet, host, port) in self.modalities.items()
            },
            "DicomModalitiesInDatabase": False,
            "OrthancPeers": {},
            "SaveJobs": False,
            "ExecuteLuaEnabled": False,
            "ConcurrentJobs": 1,
            "HttpThreadsCount": 4,
            "StableAge": 1,
        }
        if self.dicom_tls is not None:
            certificate, key, trusted = self.dicom_tls
            config.update(
                {
                    "DicomTlsEnabled": True,
                    "DicomTlsCertificate": str(certificate),
                    "DicomTlsPrivateKey": str(key),
                    "DicomTlsTrustedCertificates": str(trusted),
                    "DicomTlsRemoteCertificateRequired": self.dicom_tls_client_required,
                    "DicomModalities": {
                        name: {"AET": aet, "Host": host, "Port": port, "UseDicomTls": True}
                        for name, (aet, host, port) in self.modalities.items()
                    },
                }
            )
        if self.dicomweb:
            config["DicomWeb"] = {"Enable": True, "Root": DICOMWEB_ROOT, "EnableWado": True, "Ssl": False}
        self.config_path.write_text(json.dumps(config, indent=2))

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> "OrthancServer":
        """Start Orthanc (again, on the same storage and ports) and wait for both ports."""
        if self.running:
            return self
        binary = orthanc_binary()
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [binary, str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + self.start_timeout_s
            for port in (self.dicom_port, self.http_port):
                wait_for_port(port, timeout_s=max(deadline - time.monotonic(), 0.1))
                if not self.running:
                    raise RuntimeError("Orthanc exited during start-up")
            self._wait_for_rest(deadline)
        except (TimeoutError, RuntimeError) as exc:
            self.stop()
            pytest.fail(f"Orthanc did not start ({exc}); its log {self.log_path}:\n{self.log_tail()}")
        return self

    def _wait_for_rest(self, deadline: float) -> None:
        while True:
            try:
                self.get_json("/system")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    raise TimeoutError("REST API /system did not answer")
                time.sleep(0.1)

    def stop(self) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL after 15 s); the storage is kept."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)

    def __enter__(self) -> "OrthancServer":
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_tail(self, n_chars: int = 4000) -> str:
        """The end of Orthanc's log (for failure messages)."""
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return ""

    # --- REST -----------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _request(self, method: str, path: str, data: bytes | None = None, content_type: str = "") -> Any:
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if content_type:
            request.add_header("Content-Type", content_type)
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else None

    def get_json(self, path: str) -> Any:
        """GET ``path`` (e.g. ``/instances``) and decode the JSON answer."""
        return self._request("GET", path)

    def get_bytes(self, path: str) -> bytes:
        """GET ``path`` (e.g. ``/instances/{id}/file``) as raw bytes."""
        with urllib.request.urlopen(urllib.request.Request(self.url + path), timeout=60) as response:
            return response.read()

    def instances(self) -> list[str]:
        """Orthanc identifiers of all stored instances."""
        return list(self.get_json("/instances"))

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """The instance's main tags by keyword (``/instances/{id}/simplified-tags``)."""
        return dict(self.get_json(f"/instances/{instance_id}/simplified-tags"))

    def instance_metadata(self, instance_id: str, name: str) -> str:
        """One metadata item of an instance, e.g. ``TransferSyntax`` or ``RemoteAET``."""
        request = urllib.request.Request(f"{self.url}/instances/{instance_id}/metadata/{name}")
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read().decode()

    def sop_instance_uids(self) -> set[str]:
        """SOP Instance UIDs of all stored instances."""
        return {str(self.instance_tags(i)["SOPInstanceUID"]) for i in self.instances()}

    def count_instances(self) -> int:
        return len(self.instances())

    def studies(self) -> list[str]:
        """Orthanc identifiers of all stored studies."""
        return list(self.get_json("/studies"))

    def upload(self, path: Path) -> str:
        """POST a DICOM file to ``/instances``; returns its Orthanc identifier."""
        answer = self._request("POST", "/instances", Path(path).read_bytes(), "application/dicom")
        return str(answer["ID"])
