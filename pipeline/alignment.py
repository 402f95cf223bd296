"""Per side, how the two scans of a comparison are placed on one z axis (pipeline.compare's module
docstring, "Alignment per side"): the femoral-head landmark when both scans have a reliable one, else
the model-free bone-profile registration of pipeline.boneshift, else why neither."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from pipeline.boneshift import METHOD as BONE_METHOD
from pipeline.boneshift import BoneRegistration, register_bone_profiles
from pipeline.profiles import SIDES
from pipeline.types import AnatomicalProfiles


@dataclass(frozen=True)
class Alignment:
    """How one side's two scans are placed on a common z axis (module docstring, "Alignment per side")."""

    by: str  # "landmark", BONE_METHOD, or "" (not aligned: ``reason`` says why)
    offset_mm: Mapping[str, float]  # study -> mm added to its stored z (profiles, fov, metal) on this side
    reason: str = ""
    registration: BoneRegistration | None = None

    @property
    def axis_text(self) -> str:
        if self.by == BONE_METHOD and self.registration is not None:
            return f"in the current scan's patient z, {self.registration.describe()}"
        return "from the landmark"


def align(current: AnatomicalProfiles, prior: AnatomicalProfiles) -> dict[str, Alignment]:
    """Per side, the landmark alignment, else the bone-profile registration, else why neither."""
    studies = (("prior", prior), ("current", current))
    out: dict[str, Alignment] = {}
    for side, _ in SIDES:
        missing = [
            name for name, prof in studies
            if prof.landmark_z_mm.get(side) is None or prof.fov_z_mm.get(side) is None
        ]
        unreliable = any(not prof.landmark_reliable.get(side, True) for _, prof in studies)
        landmark = Alignment("landmark", {"current": 0.0, "prior": 0.0})
        if not missing and not unreliable:
            out[side] = landmark
            continue
        reason = (
            "no landmark: femoral head not in the " + " or the ".join(f"{n} scan's" for n in missing)
            + f" field of view on the {side}"
        ) if missing else ""
        bones = {name: prof.bone.get(side) for name, prof in studies}
        if any(b is None for b in bones.values()) or any(prof.fov_z_mm.get(side) is None for _, prof in studies):
            out[side] = Alignment("", {"current": 0.0, "prior": 0.0}, reason) if missing else landmark
            continue
        reg = register_bone_profiles(bones["prior"], bones["current"])  # type: ignore[arg-type]
        if reg.accepted:
            assert reg.shift_mm is not None
            base = {name: prof.landmark_z_mm.get(side) or 0.0 for name, prof in studies}  # back to absolute z
            offset = {"current": base["current"], "prior": base["prior"] + reg.shift_mm}
            out[side] = Alignment(BONE_METHOD, offset, registration=reg)
        elif missing:
            out[side] = Alignment("", {"current": 0.0, "prior": 0.0}, f"{reason}; {reg.reason}", reg)
        else:
            out[side] = landmark  # an unreliable landmark and no registration: used as before
    return out


def aligned_profiles(
    current: AnatomicalProfiles, prior: AnatomicalProfiles, alignment: Mapping[str, Alignment] | None = None
) -> tuple[AnatomicalProfiles, AnatomicalProfiles]:
    """Both studies' profiles on the comparison's axis per side (:func:`_align`), as compare_studies uses them."""
    alignment = align(current, prior) if alignment is None else alignment
    return (on_axis(current, {s: a.offset_mm["current"] for s, a in alignment.items()}),
            on_axis(prior, {s: a.offset_mm["prior"] for s, a in alignment.items()}))



def on_axis(profiles: AnatomicalProfiles, offset_mm: Mapping[str, float]) -> AnatomicalProfiles:
    """The profiles with each side's z (structure profiles, field of view, metal) moved by ``offset_mm[side]``."""
    if not any(offset_mm.values()):
        return profiles

    def moved(rng: tuple[float, float] | None, side: str) -> tuple[float, float] | None:
        return None if rng is None else (rng[0] + offset_mm.get(side, 0.0), rng[1] + offset_mm.get(side, 0.0))

    return replace(
        profiles,
        fov_z_mm={side: moved(rng, side) for side, rng in profiles.fov_z_mm.items()},
        metal_z_mm={side: moved(rng, side) for side, rng in profiles.metal_z_mm.items()},
        profiles=tuple(
            replace(p, z_mm=tuple(z + offset_mm[p.side] for z in p.z_mm)) if offset_mm.get(p.side) else p
            for p in profiles.profiles
        ),
    )
