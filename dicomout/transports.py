"""How an outbox item reaches its destination: one transport per kind, looked up per item.

The outbox stores each item's transport kind (column ``transport``); :func:`dicomout.outbox.
send_pending` hands the due items of one destination and kind to that kind's
:class:`Transport`. C-STORE (:mod:`dicomout.sender`) is the only transport today; a
non-DICOM destination (e.g. an HTTP upload) is one more :class:`Transport` in the
mapping given to ``send_pending``, without touching the C-STORE path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from dicomout.sender import SendResult, send_files

TRANSPORT_CSTORE = "cstore"
"""C-STORE over one association per batch (PS3.4 Annex B; :func:`dicomout.sender.send_files`)."""


class Transport(Protocol):
    """Sends files to one destination; returns one result per path, in order, and never raises
    for a failed object (the result says whether it failed and whether retrying can help)."""

    def send(self, paths: Sequence[Path], destination: Any) -> list[SendResult]: ...


class CStoreTransport:
    """The DICOM C-STORE transport; ``destination`` is a :class:`dicomout.sender.Destination`."""

    def send(self, paths: Sequence[Path], destination: Any) -> list[SendResult]:
        return send_files(paths, destination)


DEFAULT_TRANSPORTS: Mapping[str, Transport] = MappingProxyType({TRANSPORT_CSTORE: CStoreTransport()})
"""The transports the node has: kind -> transport (read-only)."""
