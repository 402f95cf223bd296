"""Errors of the cohort analyses (``thighnode cohort``)."""

from __future__ import annotations

from node_errors import NodeError

class CohortError(NodeError):
    """The cohort analysis cannot run as asked (no database, unknown grouping column ...)."""


class SiteCsvError(CohortError):
    """The site CSV is malformed; the message names the file, line, column, value and what is allowed."""
