"""A reader's corrected segmentation against the model's: the difference per structure and side.

Pure computation on :class:`pipeline.types.Measurements`: the node measures the corrected
label map with the same :func:`pipeline.measure.measure` as the model's and hands both
here; the outputs (SR, PDF) and the job record show the result.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.types import Measurements


@dataclass(frozen=True)
class StructureDifference:
    """One structure and side ("right", "left", "both"): the model's and the corrected values.

    A structure present on one side only has 0 voxels (and 0 cm³) on the other.
    ``difference_ml`` is corrected - model.
    """

    key: str
    name: str
    side: str
    model_volume_ml: float
    corrected_volume_ml: float
    model_voxel_count: int
    corrected_voxel_count: int
    model_mass_g: float
    corrected_mass_g: float

    @property
    def difference_ml(self) -> float:
        return self.corrected_volume_ml - self.model_volume_ml

    @property
    def difference_voxels(self) -> int:
        return self.corrected_voxel_count - self.model_voxel_count

    @property
    def difference_pct(self) -> float | None:
        """Corrected - model in % of the model's volume; None when the model found none."""
        if self.model_volume_ml <= 0:
            return None
        return 100.0 * self.difference_ml / self.model_volume_ml

    def to_record(self) -> dict[str, object]:
        return {
            "key": self.key, "side": self.side,
            "model_volume_ml": round(self.model_volume_ml, 3), "corrected_volume_ml": round(self.corrected_volume_ml, 3),
            "difference_ml": round(self.difference_ml, 3), "model_voxels": self.model_voxel_count,
            "corrected_voxels": self.corrected_voxel_count, "model_mass_g": round(self.model_mass_g, 3),
            "corrected_mass_g": round(self.corrected_mass_g, 3),
        }


def compare_with_model(model: Measurements, corrected: Measurements) -> tuple[StructureDifference, ...]:
    """Every structure/side measured in either, in the corrected measurements' order then the model's."""
    before = {(s.key, s.side): s for s in model.structures}
    after = {(s.key, s.side): s for s in corrected.structures}
    keys = list(after) + [k for k in before if k not in after]
    out = []
    for key in keys:
        b, a = before.get(key), after.get(key)
        ref = a or b
        assert ref is not None
        out.append(StructureDifference(
            key=key[0], name=ref.name, side=key[1],
            model_volume_ml=b.volume_ml if b else 0.0, corrected_volume_ml=a.volume_ml if a else 0.0,
            model_voxel_count=b.voxel_count if b else 0, corrected_voxel_count=a.voxel_count if a else 0,
            model_mass_g=b.mass_g if b else 0.0, corrected_mass_g=a.mass_g if a else 0.0,
        ))
    return tuple(out)
