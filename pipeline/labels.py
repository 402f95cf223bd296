"""The label table: structures the model labels, read from config/labels.toml."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from pipeline.errors import LabelTableError

GROUPS = ("anterior", "medial", "posterior", "gluteal", "other", "bone")
FEMUR_KEY = "femur"
"""The femur's label key: the post-processing's side split, the comparison's landmark and the
gluteal group's coverage landmark all look it up."""
DEFAULT_LABELS_PATH = Path(__file__).resolve().parents[1] / "config" / "labels.toml"
#: Words a structure's name may carry that do not change which structure of the table it is
#: (labels carry no side: the side comes from the patient's midline).
_IGNORED_WORDS = {"muscle", "muscles", "left", "right", "l", "r", "m", "bone", "the", "of"}


def normalise_name(text: str) -> str:
    """A structure name for matching: lower case, words only, side/"muscle"/"bone" words dropped
    ("Gluteus_Maximus_Left" and "gluteus maximus muscle" both give "gluteus maximus")."""
    words = re.findall(r"[a-z0-9]+", text.lower().replace("_", " "))
    return " ".join(w for w in words if w not in _IGNORED_WORDS)


@dataclass(frozen=True)
class Label:
    """One structure. ``id`` is the value in label maps (0 is background)."""

    id: int
    key: str
    name: str
    snomed_code: str
    snomed_meaning: str
    group: str
    color: tuple[int, int, int]

    @property
    def is_bone(self) -> bool:
        return self.group == "bone"


@dataclass(frozen=True)
class LabelTable:
    """Ordered labels with ids 1..N (no gaps)."""

    labels: tuple[Label, ...]

    def __post_init__(self) -> None:
        ids = [label.id for label in self.labels]
        if ids != list(range(1, len(ids) + 1)):
            raise LabelTableError(f"label ids must run 1..N without gaps; saw {ids}")
        keys = [label.key for label in self.labels]
        if len(set(keys)) != len(keys):
            raise LabelTableError(f"label keys must be unique; saw {keys}")
        for label in self.labels:
            if label.group not in GROUPS:
                raise LabelTableError(
                    f"label {label.id} ({label.key}): group {label.group!r} is not one of {GROUPS}"
                )
            if len(label.color) != 3 or not all(0 <= c <= 255 for c in label.color):
                raise LabelTableError(
                    f"label {label.id} ({label.key}): color {label.color!r} must be three integers 0..255"
                )

    @property
    def num_classes(self) -> int:
        """Number of output channels of a model: structures + background."""
        return len(self.labels) + 1

    def by_id(self, label_id: int) -> Label:
        if not 1 <= label_id <= len(self.labels):
            raise LabelTableError(f"label id {label_id} is not in the table (1..{len(self.labels)})")
        return self.labels[label_id - 1]

    def by_key(self, key: str) -> Label:
        for label in self.labels:
            if label.key == key:
                return label
        raise LabelTableError(f"label key {key!r} is not in the table")

    def keys(self) -> tuple[str, ...]:
        return tuple(label.key for label in self.labels)

    def id_for_name(self, text: str) -> int | None:
        """The id of the structure whose key, name or SNOMED meaning is ``text`` (compared by
        :func:`normalise_name`), or None."""
        wanted = normalise_name(text)
        for label in self.labels:
            if wanted and any(normalise_name(t) == wanted for t in (label.key, label.name, label.snomed_meaning) if t):
                return label.id
        return None

    def to_records(self) -> list[dict]:
        """Plain records (for a bundle's metadata.json)."""
        return [
            {
                "id": l.id,
                "key": l.key,
                "name": l.name,
                "snomed_code": l.snomed_code,
                "snomed_meaning": l.snomed_meaning,
                "group": l.group,
                "color": list(l.color),
            }
            for l in self.labels
        ]

    @classmethod
    def from_records(cls, records: list[dict], source: str = "records") -> "LabelTable":
        labels = []
        for i, rec in enumerate(records):
            try:
                labels.append(
                    Label(
                        id=int(rec["id"]),
                        key=str(rec["key"]),
                        name=str(rec["name"]),
                        snomed_code=str(rec.get("snomed_code", "")),
                        snomed_meaning=str(rec.get("snomed_meaning", "")),
                        group=str(rec["group"]),
                        color=tuple(int(c) for c in rec["color"]),  # type: ignore[arg-type]
                    )
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise LabelTableError(f"{source}: entry {i} is malformed ({exc!r}); need id, key, name, group, color") from exc
        return cls(tuple(labels))


def load_label_table(path: Path | None = None) -> LabelTable:
    """Read the label table TOML (default: config/labels.toml)."""
    path = Path(path) if path is not None else DEFAULT_LABELS_PATH
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise LabelTableError(f"label table {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise LabelTableError(f"label table {path} is not valid TOML: {exc}") from exc
    return LabelTable.from_records(data.get("label", []), source=str(path))
