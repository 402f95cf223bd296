"""Errors raised by the pipeline stages.

``DeclinedError`` means the study cannot be processed (no hip or thigh to measure) for a reason
that lies in the data (tilt, missing slices, not CT, no femur ...): the job is
recorded as *declined* with the message, its files are kept. Other subclasses
mean the node failed (job *failed*).
"""

from __future__ import annotations

from node_errors import NodeError


class PipelineError(NodeError):
    """Base of the pipeline's errors."""


class DeclinedError(PipelineError):
    """The input cannot be processed; the reason lies in the data, not the node."""


class SelectionError(DeclinedError):
    """No series of the study fits the rules for a thigh CT series."""


class VolumeError(DeclinedError):
    """The selected series does not form a regular volume (tilt, gaps, duplicates...)."""


class LabelTableError(PipelineError):
    """The label table (config/labels.toml) or a bundle's copy of it is invalid."""


class BundleError(PipelineError):
    """A model bundle is missing, malformed, or does not match the label table."""


class SegmentationError(PipelineError):
    """Inference failed."""
