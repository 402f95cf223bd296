"""The PACS the node queries and retrieves from, and the association with it.

:class:`QuerySource` names a PACS and how to reach it (validated when created);
:func:`associate` opens an association with it through :mod:`scp.association` and says,
naming the PACS, why none came; :func:`release` closes one. The readers
(:func:`read_text`, :func:`read_multi`, :func:`read_int`) take values out of the
identifiers a PACS answers with, which are never trusted to be well formed.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import AE, evt
from pynetdicom.events import EventHandlerType

from scp.association import AssociationSettings, RemoteAE, request_association
from scp.errors import QuerySourceError
from scp.tls import TlsConfig, client_context
from scp.validate import validate_ae_title

if TYPE_CHECKING:  # pragma: no cover
    from pynetdicom.association import Association
    from pynetdicom.events import Event
    from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation

RetrieveMethod = Literal["move", "get"]
RETRIEVE_METHODS: tuple[str, ...] = ("move", "get")


@dataclass(frozen=True)
class QuerySource:
    """A PACS to query and retrieve from, validated when created.

    ``calling_ae_title`` is the AE title we call with. ``method`` is ``"move"``
    (C-MOVE, PS3.4 C.4.2: the PACS opens an association to ``move_destination_ae``,
    which it must know by host and port - our ingress SCP) or ``"get"`` (C-GET,
    PS3.4 C.4.3: the instances come back on our own association). ``timeout_s``
    bounds connecting, each association step and the wait for each DIMSE message.
    With ``tls`` the associations are DICOM TLS (PS3.15 Annex B), the PACS's certificate
    verified against ``tls``'s trust store for ``host``.
    """

    name: str
    ae_title: str
    host: str
    port: int
    calling_ae_title: str
    method: RetrieveMethod = "move"
    move_destination_ae: str = ""
    timeout_s: float = 60.0
    tls: TlsConfig | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.tls is not None and not isinstance(self.tls, TlsConfig):
            raise QuerySourceError(f"tls must be a TlsConfig or None; got {type(self.tls).__name__}")
        if not isinstance(self.name, str) or not self.name.strip():
            raise QuerySourceError(f"name must be a non-empty string (used in messages); got {self.name!r}")
        set_(self, "ae_title", validate_ae_title(self.ae_title, "ae_title", QuerySourceError))
        calling = validate_ae_title(self.calling_ae_title, "calling_ae_title", QuerySourceError)
        set_(self, "calling_ae_title", calling)
        if not isinstance(self.host, str) or not self.host.strip() or any(c.isspace() for c in self.host.strip()):
            raise QuerySourceError(f"host must be a host name or IP address without spaces; got {self.host!r}")
        set_(self, "host", self.host.strip())
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise QuerySourceError(f"port is {self.port!r}; allowed: an integer 1..65535")
        if self.method not in RETRIEVE_METHODS:
            raise QuerySourceError(f"method is {self.method!r}; allowed: {', '.join(map(repr, RETRIEVE_METHODS))}")
        if self.method == "move" and self.move_destination_ae == "":
            raise QuerySourceError(
                "move_destination_ae is empty; method 'move' needs it: the AE title of this node's "
                "ingress SCP, known to the PACS (1 to 16 printable ASCII characters)"
            )
        if self.move_destination_ae != "":
            destination = validate_ae_title(self.move_destination_ae, "move_destination_ae", QuerySourceError)
            set_(self, "move_destination_ae", destination)
        timeout = self.timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout):
            raise QuerySourceError(f"timeout_s must be a finite number of seconds > 0; got {timeout!r}")
        if timeout <= 0:
            raise QuerySourceError(f"timeout_s is {timeout!r}; allowed: a finite number of seconds > 0")
        set_(self, "timeout_s", float(timeout))

    @property
    def label(self) -> str:
        """``name (AE@host:port)``, how messages and logs name the PACS."""
        return f"{self.name} ({self.ae_title}@{self.host}:{self.port})"

    @property
    def association(self) -> AssociationSettings:
        """Our side of an association with this PACS: ``timeout_s`` bounds every wait."""
        return AssociationSettings.with_timeout(self.calling_ae_title, self.timeout_s)

    @property
    def peer(self) -> RemoteAE:
        tls_context = None if self.tls is None else client_context(self.tls)
        return RemoteAE(self.ae_title, self.host, self.port, tls_context)


def associate(
    source: QuerySource,
    ae: AE,
    *,
    ext_neg: list[SCP_SCU_RoleSelectionNegotiation] | None = None,
    evt_handlers: list[EventHandlerType] | None = None,
) -> tuple[Association | None, str]:
    """Open an association to ``source``; returns ``(assoc, "")`` or ``(None, reason)``.

    pynetdicom reports a refused TCP connection as an aborted association; an
    EVT_CONN_OPEN handler tells the two apart.
    """
    connected = threading.Event()
    handlers: list[EventHandlerType] = [(evt.EVT_CONN_OPEN, handle_conn_open, [connected]), *(evt_handlers or [])]
    try:
        assoc = request_association(ae, source.peer, ext_neg=ext_neg, evt_handlers=handlers)
    except Exception as exc:  # noqa: BLE001 - e.g. an unresolvable host name
        return None, f"{source.label}: could not connect ({type(exc).__name__}: {exc})"
    if assoc.is_established:
        return assoc, ""
    if not connected.is_set():
        return None, (
            f"{source.label}: could not connect (connection refused, host unreachable, "
            f"or no TCP connection within {source.timeout_s:g} s)"
        )
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        detail = ""
        if rj is not None:
            detail = (
                f" ({_safe(lambda: rj.result_str)}, {_safe(lambda: rj.source_str)}: {_safe(lambda: rj.reason_str)})"
            )
        return None, (
            f"{source.label} rejected the association from {source.calling_ae_title}{detail}; "
            f"check that it knows the calling AE title {source.calling_ae_title} and is called {source.ae_title}"
        )
    if assoc.is_aborted:
        return None, (
            f"{source.label} aborted the association request or closed the connection "
            f"(or sent no answer within {source.timeout_s:g} s)"
        )
    return None, f"{source.label}: no association (no answer within {source.timeout_s:g} s)"


def handle_conn_open(event: Event, connected: threading.Event) -> None:
    """EVT_CONN_OPEN on our requesting association: the TCP connection is up."""
    connected.set()


def _safe(get: Callable[[], object]) -> str:
    try:
        return str(get())
    except Exception:  # noqa: BLE001 - only used to describe a rejection
        return "?"


def release(assoc: Association) -> None:
    """Release ``assoc`` if it is still established; abort it when the release fails."""
    try:
        if assoc.is_established:
            assoc.release()
    except Exception:  # noqa: BLE001 - the peer may already be gone
        assoc.abort()


def error_comment(status_ds: Dataset) -> str:
    """`` (text)`` of a response's Error Comment (0000,0902), ``""`` when it has none."""
    comment = status_ds.get("ErrorComment")
    return f" ({str(comment).strip()})" if comment else ""


def read_text(ds: Dataset, keyword: str) -> str:
    """The value as text without padding (spaces, NUL); ``""`` when absent."""
    value = ds.get(keyword)
    if value is None:
        return ""
    return str(value).strip(" \x00")


def read_multi(ds: Dataset, keyword: str) -> tuple[str, ...]:
    """Every non-empty value of a multi-valued element, as text."""
    value = ds.get(keyword)
    if value is None or value == "":
        return ()
    values = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    return tuple(v for v in (str(x).strip(" \x00") for x in values) if v)


def read_int(ds: Dataset, keyword: str) -> int | None:
    """An IS value as an int, ``None`` when absent or not a number."""
    text = read_text(ds, keyword)
    if not text:
        return None
    try:
        return int(float(text))
    except ValueError:
        return None

