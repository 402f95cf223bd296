"""Errors raised by the DICOM ingress (``scp``).

Every class derives from :class:`node_errors.NodeError` through :class:`IngressError`;
each message says what was checked, the value seen and what is allowed.
"""

from __future__ import annotations

from node_errors import NodeError


class IngressError(NodeError):
    """Base of the ingress errors."""


class IngressConfigError(IngressError):
    """An :class:`scp.types.IngressConfig` field has a value that is not allowed."""


class InvalidUIDError(IngressError):
    """A UID received from the network is not a valid UI value (PS3.5 6.2, 9.1).

    Such a UID is never used to build a file name.
    """


class UnknownStudyError(IngressError):
    """The instance index holds no instance of the requested study."""


class RetrieveError(IngressError):
    """Base of the Query/Retrieve SCU errors."""


class QuerySourceError(RetrieveError):
    """A :class:`scp.pacs.QuerySource` field has a value that is not allowed."""


class QueryArgumentError(RetrieveError):
    """An argument of :func:`scp.query.find_studies` / :func:`scp.query.find_series` /
    :func:`scp.retrieve.retrieve_series` is not allowed."""


class QueryFailedError(RetrieveError):
    """A C-FIND could not be completed (no association, refused, failure status, no answer)."""


class TlsConfigError(IngressConfigError):
    """A TLS certificate, private key or trust store is missing, unreadable, expired or
    does not fit (:class:`scp.tls.TlsConfig`)."""


class DatabaseError(IngressError):
    """The node's database (SQLite file or PostgreSQL server) cannot be opened or used as asked."""
