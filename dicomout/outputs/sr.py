"""The SR output: the measurements as a TID 1500 Measurement Report (:mod:`dicomout.sr`),
referencing the SEG's segments."""

from __future__ import annotations

from collections.abc import Mapping

from pydicom.dataset import Dataset

from dicomout.context import StudyContext
from dicomout.sr import build_sr
from dicomout.uids import SR_VERIFIED_SERIES


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
            **_correction_identity(context),
        )


def _correction_identity(context: StudyContext) -> dict[str, object]:
    """The verified SR of a reader's correction: its UIDs, series number and the verification."""
    if context.verification is None:
        return {}
    return {
        "series_uid": context.output_uid("sr.series"), "instance_uid": context.output_uid("sr.instance"),
        "series_number": SR_VERIFIED_SERIES.number, "verification": context.verification,
    }
