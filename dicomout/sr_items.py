"""Content items every group of the TID 1500 SR is built from (dicomout.sr, dicomout.sr_totals):
a TID 300 numeric measurement that is left out when its value is missing, and TEXT items
appended to a measurement group's container (PS3.16 TID 1501 / 1411 row "Comment" style)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import highdicom as hd
from pydicom.sr.coding import Code

logger = logging.getLogger(__name__)


def numeric(
    name: Code,
    value: float | None,
    unit: Code,
    *,
    what: str,
    derivation: Code | None = None,
    method: Code | None = None,
    finding_sites: Sequence[hd.sr.FindingSite] | None = None,
    algorithm: hd.sr.AlgorithmIdentification | None = None,
) -> list[hd.sr.Measurement]:
    """A TID 300 measurement, or nothing when the value is missing or not finite (logged)."""
    if value is None or not math.isfinite(float(value)):
        logger.warning("SR: %s %s is %r; measurement left out", what, name.meaning, value)
        return []
    return [
        hd.sr.Measurement(
            name=name,
            value=float(value),
            unit=unit,
            derivation=derivation,
            method=method,
            finding_sites=finding_sites,
            algorithm_id=algorithm,
        )
    ]


def add_texts(group: hd.sr.templates.Template, texts: Sequence[tuple[Code, str]]) -> None:
    """Append TEXT content items (CONTAINS) to a measurement group's container."""
    container = group[0]
    for name, value in texts:
        if value:
            container.ContentSequence.append(
                hd.sr.TextContentItem(name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
            )

