"""The one base error of the node.

Every stage (ingress, pipeline, outputs, the composition root) raises a subclass
of :class:`NodeError`. Each carries the job id and the Study Instance UID it was
working on, when known, so that the job store can record the reason verbatim and
logs can carry identifiers (never patient names, IDs or birth dates).

This module has no dependencies so that ``scp``, ``pipeline`` and ``dicomout``
can share the base without importing ``thighnode``.
"""

from __future__ import annotations


class NodeError(Exception):
    """Base of every error the node raises on purpose.

    The message must say what was checked, the value seen and what is allowed.
    """

    def __init__(
        self,
        message: str,
        *,
        job_id: int | None = None,
        study_uid: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.job_id = job_id
        self.study_uid = study_uid

    def with_context(self, *, job_id: int | None = None, study_uid: str | None = None) -> "NodeError":
        """Fill in the job id / study UID when a caller knows them (returns self)."""
        if self.job_id is None:
            self.job_id = job_id
        if self.study_uid is None:
            self.study_uid = study_uid
        return self

    def __str__(self) -> str:
        context = []
        if self.job_id is not None:
            context.append(f"job {self.job_id}")
        if self.study_uid:
            context.append(f"study {self.study_uid}")
        return f"{self.message} [{', '.join(context)}]" if context else self.message
