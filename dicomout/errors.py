"""Errors raised by the output stage (builders, outbox, C-STORE sender).

:class:`SendError` says whether a failure is *permanent* for the object
(retrying cannot help: the peer refused its SOP Class, the file is unreadable)
or *transient* (connection refused, association rejected or aborted, a busy
peer): the outbox fails permanent errors at once and retries transient ones
with backoff.
"""

from __future__ import annotations

from node_errors import NodeError


class OutputError(NodeError):
    """Base of the output stage's errors."""


class DestinationError(OutputError):
    """A configured destination (AE title, host, port, timeout...) is invalid."""


class SendError(OutputError):
    """Sending one object (or opening the association for a batch) failed.

    Attributes:
        destination: name of the configured destination.
        status: DIMSE status returned by the peer (PS3.7 Annex C), ``None`` when
            no response was received (no association, timeout, refused context).
        permanent: ``True`` when retrying the same object to the same
            destination cannot succeed.
    """

    def __init__(
        self,
        message: str,
        *,
        destination: str,
        status: int | None = None,
        permanent: bool = False,
        job_id: int | None = None,
        study_uid: str | None = None,
    ) -> None:
        super().__init__(message, job_id=job_id, study_uid=study_uid)
        self.destination = destination
        self.status = status
        self.permanent = permanent


class ReportError(OutputError):
    """The report cannot be drawn from the given inputs (shapes, geometry, values)."""


class OutputPluginError(OutputError):
    """An ``[outputs] enabled`` entry cannot be loaded as an output builder, or the builders'
    dependencies cannot be ordered; the message names the entry."""
