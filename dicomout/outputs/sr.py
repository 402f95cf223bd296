"""The SR output: the measurements as a TID 1500 Measurement Report (:mod:`dicomout.sr`),
referencing the SEG's segments."""

from __future__ import annotations

from collections.abc import Mapping

from pydicom.dataset import Dataset

from dicomout.context import StudyContext
from dicomout.sr import build_sr


class SrOutput:
    """Comprehensive 3D SR of the measurements and the comparison with the prior study."""

    name = "sr"
    needs: tuple[str, ...] = ("seg",)

    def build(self, context: StudyContext, built: Mapping[str, Dataset]) -> Dataset:
        return build_sr(
            context.measurements,
            built["seg"],
            context.selected.headers,
            volume=context.volume,
            labels=context.segmentation.labels,
            equipment=context.equipment,
            prior=context.comparison,
            prior_search=context.prior_search,
        )
