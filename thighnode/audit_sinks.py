"""Where the audit trail's messages go: a local file, and optionally syslog (RFC 5424).

:class:`AuditFile` appends one message per line, fsyncs each, creates the file with mode 0600 (its
folder 0700) and rotates it by size (``audit.log`` -> ``audit.log.1`` ... ``audit.log.<keep>``).

:class:`SyslogSender` sends each message as an RFC 5424 syslog message
``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG`` (facility 10 authpriv, severity 5 notice:
PRI 85; MSGID ``IHE+RFC-3881`` as the IHE ATNA profile writes it; MSG is UTF-8 with a BOM), over UDP
(RFC 5426: one datagram per message) or TCP (RFC 6587 / RFC 5425 octet counting: ``LEN SP MSG``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

SYSLOG_FACILITY_AUTHPRIV = 10
SYSLOG_SEVERITY_NOTICE = 5
SYSLOG_APP_NAME = "thighnode"
SYSLOG_MSGID = "IHE+RFC-3881"
_BOM = "\ufeff".encode("utf-8")
_RECONNECT_AFTER_S = 10.0


class AuditFile:
    """Appends messages to ``path``, one per line, each fsync'ed; thread-safe.

    When writing a message would take the file past ``max_bytes`` it is rotated first: ``path`` becomes
    ``path.1``, ``path.1`` becomes ``path.2`` ... and ``path.<keep>`` is dropped. ``keep`` = 0 keeps none.
    """

    def __init__(self, path: Path, *, max_bytes: int = 50 * 1024 * 1024, keep: int = 10) -> None:
        if max_bytes < 1 or keep < 0:
            raise ValueError(f"AuditFile: max_bytes {max_bytes} (allowed >= 1), keep {keep} (allowed >= 0)")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self._lock = threading.Lock()
        self._fd: int | None = None

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.fchmod(fd, 0o600)
            self._fd = fd
        return self._fd

    def open(self) -> None:
        """Create or open the file now (the node checks at start that its audit trail can be written)."""
        with self._lock:
            self._open()

    def _rotate(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.keep == 0:
            self.path.unlink(missing_ok=True)
            return
        for n in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def emit(self, message: str) -> None:
        data = message.encode("utf-8") + b"\n"
        with self._lock:
            fd = self._open()
            size = os.fstat(fd).st_size
            if size > 0 and size + len(data) > self.max_bytes:
                self._rotate()
                fd = self._open()
            os.write(fd, data)
            os.fsync(fd)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def syslog_frame(message: str, *, host_name: str, at: float, pid: int) -> bytes:
    """One RFC 5424 syslog message (the header, no structured data, the UTF-8 MSG with its BOM)."""
    pri = SYSLOG_FACILITY_AUTHPRIV * 8 + SYSLOG_SEVERITY_NOTICE
    moment = datetime.fromtimestamp(at, tz=timezone.utc)
    timestamp = moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond:06d}Z"
    host = "".join(ch for ch in host_name if 33 <= ord(ch) <= 126)[:255] or "-"
    header = f"<{pri}>1 {timestamp} {host} {SYSLOG_APP_NAME} {pid} {SYSLOG_MSGID} - "
    return header.encode("ascii") + _BOM + message.encode("utf-8")


class SyslogSender:
    """Sends audit messages to a syslog collector over UDP or TCP; thread-safe.

    A TCP connection is kept open and re-made when it breaks; after a failure no new connection is
    tried for 10 s (the message is then only in the file), so an unreachable collector costs the
    caller at most ``timeout_s`` once every 10 s. Failures raise OSError to the caller
    (:class:`thighnode.audit.AuditTrail` logs them, without the message).
    """

    def __init__(self, host: str, port: int, protocol: str = "udp", *, host_name: str | None = None,
                 timeout_s: float = 2.0) -> None:
        if protocol not in ("udp", "tcp"):
            raise ValueError(f"SyslogSender: protocol {protocol!r} (allowed: udp, tcp)")
        self.host = host
        self.port = port
        self.protocol = protocol
        self.host_name = host_name or socket.gethostname()
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._failed_at = -1e18

    def emit(self, message: str) -> None:
        frame = syslog_frame(message, host_name=self.host_name, at=time.time(), pid=os.getpid())
        with self._lock:
            if self.protocol == "udp":
                self._send_udp(frame)
            else:
                self._send_tcp(str(len(frame)).encode("ascii") + b" " + frame)

    def _send_udp(self, frame: bytes) -> None:
        if self._sock is None:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            self._sock = socket.socket(family, socket.SOCK_DGRAM)
        self._sock.sendto(frame, (self.host, self.port))

    def _send_tcp(self, data: bytes) -> None:
        if self._sock is None:
            if time.monotonic() - self._failed_at < _RECONNECT_AFTER_S:
                raise ConnectionError(f"syslog {self.host}:{self.port} failed less than {_RECONNECT_AFTER_S:g} s ago")
            try:
                self._sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
            except OSError:
                self._failed_at = time.monotonic()
                raise
        try:
            self._sock.sendall(data)
        except OSError:
            self._sock.close()
            self._sock = None
            self._failed_at = time.monotonic()
            raise

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
