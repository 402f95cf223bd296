"""Serve the prebuilt OHIF viewer and Orthanc's DICOMweb from one loopback origin (test support).

``ViewerServer`` is a small threaded HTTP server on a free 127.0.0.1 port that serves the static OHIF build
in ``tests/viewer/ohif-dist`` (any path that is not a file answers ``index.html``: OHIF routes in the
browser), answers ``/app-config.js`` with a configuration whose one data source is the Orthanc DICOMweb
root, and forwards ``/dicom-web/...`` to Orthanc. One origin means no CORS set-up in Orthanc::

    with OrthancServer(tmp_path, dicomweb=True) as orthanc, ViewerServer(OHIF_DIST, orthanc.url) as viewer:
        ...open f"{viewer.url}/viewer?StudyInstanceUIDs={study_uid}" in Chromium...
"""

from __future__ import annotations

import json
import mimetypes
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

VIEWER_DIR = Path(__file__).resolve().parents[1] / "viewer"
OHIF_DIST = VIEWER_DIR / "ohif-dist"
DICOMWEB_PREFIX = "/dicom-web"
_FORWARDED_REQUEST_HEADERS = ("Accept", "Range", "Host")  # Host: Orthanc builds BulkDataURIs from it
_FORWARDED_ANSWER_HEADERS = ("Content-Type", "Content-Range", "Accept-Ranges")


def ohif_config(dicomweb_root: str) -> str:
    """OHIF's ``app-config.js``: one DICOMweb data source (Orthanc's settings in OHIF's documentation),
    no study list confirmation prompts, no investigational-use dialog."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "orthanc",
        "configuration": {
            "friendlyName": "thighnode test Orthanc",
            "name": "orthanc",
            "wadoUriRoot": dicomweb_root,
            "qidoRoot": dicomweb_root,
            "wadoRoot": dicomweb_root,
            "qidoSupportsIncludeField": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "omitQuotationForMultipartRequest": True,
            "bulkDataURI": {"enabled": True},
        },
    }
    config = {
        "routerBasename": "/",
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showLoadingIndicator": False,
        "showCPUFallbackMessage": False,
        "showWarningMessageForCrossOrigin": False,
        "disableConfirmationPrompts": True,
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "orthanc",
        "extensions": [],
        "modes": [],
        "dataSources": [source],
    }
    return "window.config = " + json.dumps(config, indent=2) + ";\n"


def _handler(dist: Path, orthanc_url: str, config_js: bytes) -> type[BaseHTTPRequestHandler]:
    root = dist.resolve()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
            pass

        def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _proxy(self) -> None:
            request = urllib.request.Request(orthanc_url + self.path, method=self.command)
            for name in _FORWARDED_REQUEST_HEADERS:
                if self.headers.get(name):
                    request.add_header(name, self.headers[name])
            try:
                with urllib.request.urlopen(request, timeout=60) as answer:
                    status, body, headers = answer.status, answer.read(), answer.headers
            except urllib.error.HTTPError as exc:
                status, body, headers = exc.code, exc.read(), exc.headers
            self._answer(status, body, {n: headers[n] for n in _FORWARDED_ANSWER_HEADERS if headers.get(n)})

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?", 1)[0]
            if path.startswith(DICOMWEB_PREFIX + "/"):
                self._proxy()
                return
            if path == "/app-config.js":
                self._answer(200, config_js, {"Content-Type": "application/javascript"})
                return
            file = (root / path.lstrip("/")).resolve()
            if not file.is_relative_to(root) or not file.is_file():
                file = root / "index.html"
            kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
            if file.suffix == ".wasm":
                kind = "application/wasm"
            self._answer(200, file.read_bytes(), {"Content-Type": kind})

        do_HEAD = do_GET

    return Handler


class ViewerServer:
    """The OHIF build in ``dist`` and ``orthanc_url``'s DICOMweb behind one http://127.0.0.1:<port>."""

    def __init__(self, dist: Path, orthanc_url: str) -> None:
        if not (Path(dist) / "index.html").is_file():
            raise FileNotFoundError(f"{dist}/index.html is missing: `make viewer-check` fetches the OHIF build")
        self._server = ThreadingHTTPServer(
            ("127.0.0.1", 0), _handler(Path(dist), orthanc_url.rstrip("/"), b"")
        )
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        config_js = ohif_config(self.url + DICOMWEB_PREFIX).encode()
        self._server.RequestHandlerClass = _handler(Path(dist), orthanc_url.rstrip("/"), config_js)
        self._thread = threading.Thread(target=self._server.serve_forever, name="viewer-http", daemon=True)

    def __enter__(self) -> "ViewerServer":
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
