"""Deterministic UIDs and series identity of the node's outputs (SEG, SR, PDF).

Reprocessing the same source series with the same model must *replace* the earlier
outputs in the PACS rather than add duplicates, so every output UID is derived, not
random: the inputs are hashed into a name-based (SHA-1, version 5) UUID (RFC 4122
4.3) written as a ``2.25.<integer>`` UID (PS3.5 B.2), at most 44 characters (PS3.5 9.1
allows 64). ``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)`` is not used: with
``prefix=None`` pydicom ignores the entropy sources and returns a random UUID.

What the UID depends on:

* series and instance UIDs of an output: the source SeriesInstanceUID, the model
  version and the output kind (:data:`OUTPUT_KINDS`);
* a segment's TrackingUID (PS3.3 C.8.20.2, Segment Description Macro): the SEG's
  SOPInstanceUID and the segment's structure key and side, so the SR (TID 1411) can
  quote the same value;
* outputs built from a reader's corrected SEG (:func:`correction_uid`): that SEG's
  SOPInstanceUID and the output kind;
* the device observer UID (TID 1004): the device name, manufacturer and serial number.

Series numbers and descriptions of the outputs are here too (:data:`OUTPUT_SERIES`),
so the SEG, SR and PDF builders and the PACS-facing documentation agree.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass
from types import MappingProxyType


logger = logging.getLogger(__name__)

UID_MAX_LENGTH = 64
"""PS3.5 9.1: a UID is at most 64 characters."""

OUTPUT_KINDS: tuple[str, ...] = (
    "seg.series",
    "seg.instance",
    "sr.series",
    "sr.instance",
    "pdf.series",
    "pdf.instance",
)
"""The built-in outputs' kinds; :func:`output_uid` accepts any ``<output name>.<series|instance>``
(:data:`OUTPUT_KIND_PATTERN`), so that a plug-in output (dicomout.outputs) derives its own UIDs."""
OUTPUT_KIND_PATTERN = re.compile(r"[a-z][a-z0-9_]*\.(series|instance)")

_NAMESPACE = "thighnode"
"""Mixed into every derived UID (the UUID namespace is uuid5(NAMESPACE_URL, this))."""


@dataclass(frozen=True)
class OutputSeries:
    """SeriesNumber and SeriesDescription (PS3.3 C.7.3.1) of one output series."""

    number: int
    title: str

    def description(self, model_name: str, model_version: str) -> str:
        """SeriesDescription, e.g. ``"Thigh muscles SEG (thighnode demo 0.1.0)"`` (LO: <= 64 chars)."""
        text = f"{self.title} ({model_name} {model_version})".strip()
        return text[:64]


SEG_SERIES = OutputSeries(number=901, title="Thigh muscles SEG")
SR_SERIES = OutputSeries(number=902, title="Thigh muscles SR")
PDF_SERIES = OutputSeries(number=903, title="Thigh muscles report")
SEG_VERIFIED_SERIES = OutputSeries(number=911, title="Thigh muscles SEG verified")
SR_VERIFIED_SERIES = OutputSeries(number=912, title="Thigh muscles SR verified")
PDF_VERIFIED_SERIES = OutputSeries(number=913, title="Thigh muscles report verified")
"""The outputs of a reader's correction (:func:`correction_uid`)."""

OUTPUT_SERIES: MappingProxyType[str, OutputSeries] = MappingProxyType(
    {"seg": SEG_SERIES, "sr": SR_SERIES, "pdf": PDF_SERIES}
)
"""Series identity per output (a read-only mapping of frozen values)."""


def _derived_uid(*parts: str) -> str:
    namespace = uuid.uuid5(uuid.NAMESPACE_URL, _NAMESPACE)
    uid = f"2.25.{uuid.uuid5(namespace, json.dumps(parts)).int}"
    if len(uid) > UID_MAX_LENGTH:  # pragma: no cover - 2.25. + at most 39 digits
        raise ValueError(f"derived UID {uid} is {len(uid)} characters; allowed: <= {UID_MAX_LENGTH}")
    return uid


def output_uid(source_series_uid: str, model_version: str, kind: str) -> str:
    """The SeriesInstanceUID or SOPInstanceUID of an output, derived from its inputs.

    Args:
        source_series_uid: SeriesInstanceUID of the CT series that was segmented.
        model_version: version of the segmentation model (a new model gives new objects).
        kind: ``"<output name>.<series|instance>"``, e.g. ``"seg.instance"`` (:data:`OUTPUT_KINDS`).

    Raises:
        ValueError: ``kind`` is not of that form, or the series UID is empty.
    """
    if not isinstance(kind, str) or not OUTPUT_KIND_PATTERN.fullmatch(kind):
        raise ValueError(
            f"output UID kind {kind!r} is not allowed; allowed: '<output name>.series' or '<output name>.instance' "
            f"(lower-case name), e.g. {', '.join(OUTPUT_KINDS)}"
        )
    if not source_series_uid:
        raise ValueError("source SeriesInstanceUID is empty; an output UID needs the source series")
    return _derived_uid("output", source_series_uid, model_version, kind)


def correction_uid(seg_sop_instance_uid: str, kind: str) -> str:
    """The SeriesInstanceUID or SOPInstanceUID of an output built from a reader's corrected SEG.

    Derived from the correction SEG's SOPInstanceUID (so a correction received twice gives the
    same objects, and they never collide with the model's outputs of :func:`output_uid`).
    """
    if not isinstance(kind, str) or not OUTPUT_KIND_PATTERN.fullmatch(kind):
        raise ValueError(
            f"correction UID kind {kind!r} is not allowed; allowed: '<output name>.series' or '<output name>.instance'"
        )
    if not seg_sop_instance_uid:
        raise ValueError("correction SEG SOPInstanceUID is empty; a correction UID needs it")
    return _derived_uid("correction", seg_sop_instance_uid, kind)


def tracking_uid(seg_instance_uid: str, structure_key: str, side: str) -> str:
    """TrackingUID (0062,0021) of the segment for one structure and side of a SEG instance."""
    return _derived_uid("tracking", seg_instance_uid, structure_key, side)


def device_observer_uid(name: str, manufacturer: str, serial_number: str) -> str:
    """Device Observer UID (DCM 121012, TID 1004) of this node."""
    return _derived_uid("device", name, manufacturer, serial_number)
