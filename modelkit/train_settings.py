"""Settings of a training run (:class:`TrainSettings`), read from a TOML file with an optional ``base``
chain (config/train_demo*.toml), and the phantom sets a run generates when their folder is missing."""

from __future__ import annotations

import difflib
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modelkit.augment import TissueContrastSettings
from modelkit.calibration import DEFAULT_OBJECTIVE, OBJECTIVES
from pipeline.bundle import DEMO_INTENDED_USE
from pipeline.network import NetworkSettings
from pipeline.preprocess import PreprocessSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

logger = logging.getLogger(__name__)

#: Keys that name data folders (each a folder of NIfTI pairs or of DICOM case folders, modelkit.casefolders).
#: ``dicom_dirs`` is the deprecated name of DICOM folders in ``data_dirs``, still read.
FOLDER_KEYS = ("data_dirs", "val_dirs", "dicom_dirs", "calibration_dirs")
PATH_KEYS = ("output_bundle", "checkpoint_dir", "resume", "init_weights", "case_cache_dir", "node_data_dir")


@dataclass(frozen=True)
class PhantomDataSettings:
    """Phantoms to generate when a data folder does not exist yet (reproducible demo data)."""

    n_subjects: int
    seed: int
    spacing_mm: tuple[float, float, float] = (2.0, 2.0, 2.0)
    #: Share (0..1) of subjects with the metal of hip surgery (kind uniform over the five of
    #: modelkit.phantom_types.IMPLANT_KINDS; left 40 %, right 40 %, both 20 %), for models that
    #: must read post-operative CTs. Drawn from a stream of its own: other subjects stay the same.
    implant_fraction: float = 0.0
    #: Share (0..1) of subjects scanned with a limited field of view (modelkit.training.draw_fov):
    #: 60 % of them a hip CT (pelvis to the proximal femur), 40 % a thigh CT starting at or below
    #: the hip. Own random stream, as the implants.
    fov_cut_fraction: float = 0.0

    def __post_init__(self) -> None:
        for key in ("implant_fraction", "fov_cut_fraction"):
            value = getattr(self, key)
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"[[phantoms]] {key} is {value!r}; allowed: 0 .. 1")


_PHANTOM_KEYS = ("dir", "n_subjects", "seed", "spacing_mm", "implant_fraction", "fov_cut_fraction")


def _phantom_settings(entry: dict[str, Any], source: str) -> PhantomDataSettings:
    """One ``[[phantoms]]`` table."""
    unknown = sorted(set(entry) - set(_PHANTOM_KEYS))
    if unknown:
        raise ValueError(f"{source}: unknown [[phantoms]] keys {unknown}; allowed: {list(_PHANTOM_KEYS)}")
    return PhantomDataSettings(
        int(entry["n_subjects"]), int(entry["seed"]),
        tuple(float(s) for s in entry.get("spacing_mm", (2, 2, 2))),  # type: ignore[arg-type]
        float(entry.get("implant_fraction", 0.0)),
        float(entry.get("fov_cut_fraction", 0.0)),
    )


@dataclass(frozen=True)
class TrainSettings:
    """Everything a training run needs; see config/train_demo.toml."""

    data_dirs: tuple[Path, ...]
    output_bundle: Path
    checkpoint_dir: Path
    val_dirs: tuple[Path, ...] = ()
    val_fraction: float = 0.15
    #: Deprecated: DICOM case folders now go in data_dirs (any folder of it may hold NIfTI pairs or DICOM
    #: cases). Still read; its folders are appended to data_dirs.
    dicom_dirs: tuple[Path, ...] = ()
    #: The node's data directory ([node] data_dir): every case under <node_data_dir>/corrected/ (the
    #: radiologists' corrected SEGs, modelkit.sitecases) is used, split into training and held-out cases by
    #: patient (held_out_fraction, seed); the held-out StudyInstanceUIDs go into the bundle's metadata.
    node_data_dir: Path | None = None
    held_out_fraction: float = 0.2
    #: With init_weights a bundle: a [preprocess] that differs from the bundle's is refused unless this is
    #: true (e.g. a deliberate fine-tune on another model grid).
    allow_preprocess_change: bool = False
    iterations: int = 1000
    val_every: int = 100
    lr: float = 1e-3
    weight_decay: float = 1e-5
    warmup_iterations: int = 50
    batch_size: int = 1
    samples_per_volume: int = 2
    seed: int = 0
    num_threads: int = 2
    resume: Path | None = None
    #: Start from these weights instead of a random initialisation: a bundle folder (its
    #: models/model.pt) or a state-dict file. For fine-tuning a bundle on a finer model grid or on a
    #: site's own data; the network settings must describe the same architecture. A resumed run
    #: continues from its checkpoint and ignores this.
    init_weights: Path | None = None
    rotate_deg: float = 8.0
    scale_fraction: float = 0.1
    affine_prob: float = 0.3
    flip_prob: float = 0.5
    intensity_prob: float = 0.5
    noise_prob: float = 0.2
    #: Per-structure HU offsets, global contrast, an HU bias field and blur on each training patch
    #: (modelkit.augment.RandTissueContrastd, SynthSeg-style): probability per patch (0 = off) and
    #: its strengths. For transfer from phantoms to real CT.
    contrast_prob: float = 0.0
    contrast_structure_sd_hu: float = 12.0
    contrast_global_sd_hu: float = 10.0
    contrast_fraction: float = 0.15
    contrast_bias_hu: float = 20.0
    contrast_blur_max_vox: float = 0.8
    #: Share of the augmented patches that also get soft-tissue blobs in unlabelled tissue.
    contrast_clutter_prob: float = 0.0
    #: Share of the augmented patches whose structures get fat blobs (intramuscular fat infiltration),
    #: each structure up to ``contrast_fat_fraction_max`` of its soft-tissue voxels.
    contrast_fat_prob: float = 0.0
    contrast_fat_fraction_max: float = 0.2
    #: Elastic deformation (MONAI Rand3DElasticd) of image and labels on this share of the patches: muscle
    #: shapes beyond the phantoms' smooth ones. ``elastic_sigma_vox``: smoothing of the random field (voxels);
    #: ``elastic_magnitude``: MONAI's magnitude (the defaults move voxels by 0.4-1.1 voxel on average, up
    #: to 1.2-3.7 voxels at the 99th percentile: 4-11 mm on the demo's 3 mm grid).
    elastic_prob: float = 0.0
    elastic_sigma_vox: tuple[float, float] = (5.0, 8.0)
    elastic_magnitude: tuple[float, float] = (100.0, 300.0)
    network: NetworkSettings = field(default_factory=NetworkSettings)
    preprocess: PreprocessSettings = field(default_factory=PreprocessSettings)
    bundle_name: str = "thighnode_demo"
    bundle_version: str = "0.1.0"
    intended_use: str = DEMO_INTENDED_USE
    command: str = ""
    phantoms: dict[str, PhantomDataSettings] = field(default_factory=dict)  # data dir -> phantoms to make
    sw_overlap: float = 0.5
    #: The bundle's mirror test-time augmentation (SlidingWindowSettings.mirror): twice the
    #: inference time for a smoother, left-right consistent prediction. Validation runs without.
    sw_mirror: bool = False
    soft_labels: bool = True
    grad_clip_norm: float = 2.0
    #: "fp32", or "bf16": forward pass under torch.autocast (bfloat16) on CPU and CUDA; weights,
    #: optimizer and loss stay float32. On CPUs with AMX/AVX-512 BF16 this is ~1.7x faster.
    precision: str = "fp32"
    #: Dice over the whole batch of patches per class (nnU-Net's "batch Dice") instead of per
    #: patch: a class with a few voxels at a patch's edge no longer dominates its gradient.
    batch_dice: bool = False
    #: Weights of the loss's two terms (MONAI DiceCELoss ``lambda_dice`` and ``lambda_ce``). Soft
    #: Dice can bias volumes where a border is uncertain (Bertels et al., MICCAI 2019);
    #: cross-entropy is a proper scoring rule whose optimum is the true class fraction of every
    #: voxel (the soft labels). ``lambda_dice = 0`` trains on cross-entropy alone, e.g. to
    #: fine-tune a model whose volumes matter more than its Dice.
    lambda_dice: float = 1.0
    lambda_ce: float = 1.0
    #: After training, fit the bundle's per-class volume calibration on the validation folders
    #: (modelkit.calibration): removes systematic volume bias of thin/broad structures.
    calibrate_volumes: bool = False
    #: More labelled folders for that calibration, beside val_dirs (never the test set): the
    #: factors are per-class volume ratios pooled over the cases, so more subjects steady them.
    calibration_dirs: tuple[Path, ...] = ()
    #: What the calibration matches, per class (modelkit.calibration.OBJECTIVES): "pooled" volumes
    #: or the "median" case's volume ratio.
    calibration_objective: str = DEFAULT_OBJECTIVE
    #: Keep the preprocessed cases on disk and memory-map them (modelkit.casecache) instead of
    #: holding them in RAM: memory no longer grows with the number of cases, and a later run on
    #: the same data skips the preparation. ``false``: in memory, as before.
    case_cache: bool = True
    #: Where the case cache lives; default ``<checkpoint_dir>/case_cache``. Safe to delete.
    case_cache_dir: Path | None = None

    def __post_init__(self) -> None:
        self.tissue_contrast()  # validates the contrast_* keys
        if isinstance(self.elastic_prob, bool) or not isinstance(self.elastic_prob, (int, float)) or not (
            0.0 <= self.elastic_prob <= 1.0
        ):
            raise ValueError(f"TrainSettings.elastic_prob must be a number from 0 to 1; saw {self.elastic_prob!r}")
        for key in ("elastic_sigma_vox", "elastic_magnitude"):
            pair = tuple(getattr(self, key))
            if len(pair) != 2 or not all(isinstance(v, (int, float)) and v >= 0 for v in pair) or pair[0] > pair[1]:
                raise ValueError(f"TrainSettings.{key} must be [low, high] with 0 <= low <= high; saw {list(pair)!r}")
            object.__setattr__(self, key, tuple(float(v) for v in pair))
        if self.dicom_dirs:  # the deprecated key: its folders are data folders like any other
            object.__setattr__(self, "data_dirs", tuple(dict.fromkeys((*self.data_dirs, *self.dicom_dirs))))
            object.__setattr__(self, "dicom_dirs", ())
        fraction = self.held_out_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
            raise ValueError(f"TrainSettings.held_out_fraction must be a number, 0 <= value < 1; saw {fraction!r}")
        if not isinstance(self.allow_preprocess_change, bool):
            raise ValueError(f"TrainSettings.allow_preprocess_change must be true or false; "
                             f"saw {self.allow_preprocess_change!r}")
        if self.iterations < 0 or self.val_every < 1 or self.batch_size < 1 or self.samples_per_volume < 1:
            raise ValueError(
                f"TrainSettings: iterations ({self.iterations}) >= 0, val_every ({self.val_every}), batch_size "
                f"({self.batch_size}) and samples_per_volume ({self.samples_per_volume}) >= 1 are required"
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"TrainSettings.val_fraction must be in [0, 1); saw {self.val_fraction}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"TrainSettings.precision must be 'fp32' or 'bf16'; saw {self.precision!r}")
        if not isinstance(self.sw_mirror, bool):
            raise ValueError(f"TrainSettings.sw_mirror must be true or false; saw {self.sw_mirror!r}")
        if not isinstance(self.case_cache, bool):
            raise ValueError(f"TrainSettings.case_cache must be true or false; saw {self.case_cache!r}")
        for key in ("lambda_dice", "lambda_ce"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 100.0:
                raise ValueError(f"TrainSettings.{key} must be a number from 0 to 100; saw {value!r}")
        if self.lambda_dice + self.lambda_ce <= 0:
            raise ValueError("TrainSettings.lambda_dice and lambda_ce are both 0: the loss would be 0")
        if self.calibration_objective not in OBJECTIVES:
            raise ValueError(f"TrainSettings.calibration_objective must be one of {', '.join(OBJECTIVES)}; "
                             f"saw {self.calibration_objective!r}")

    def tissue_contrast(self) -> TissueContrastSettings:
        """The contrast_* keys as the augmentation's settings (raises ValueError naming the key)."""
        try:
            return TissueContrastSettings(
                prob=self.contrast_prob, structure_sd_hu=self.contrast_structure_sd_hu,
                global_sd_hu=self.contrast_global_sd_hu, contrast_fraction=self.contrast_fraction,
                bias_hu=self.contrast_bias_hu, blur_max_vox=self.contrast_blur_max_vox,
                clutter_prob=self.contrast_clutter_prob, fat_prob=self.contrast_fat_prob,
                fat_fraction_max=self.contrast_fat_fraction_max,
            )
        except ValueError as exc:
            raise ValueError(f"TrainSettings contrast_* keys: {exc}") from exc

    @classmethod
    def from_toml(cls, path: Path, **overrides: Any) -> "TrainSettings":
        """Read a TOML file: top-level keys of TrainSettings, ``[network]``, ``[preprocess]``,
        ``[[phantoms]]`` (dir, n_subjects, seed, spacing_mm, implant_fraction). Relative paths stay relative to the
        working directory (the repository root for the documented commands).

        ``base = "other.toml"`` (relative to this file's folder) reads that file first; this
        file then overrides it: top-level keys replace the base's, ``[network]`` and
        ``[preprocess]`` merge key by key, ``[[phantoms]]`` merge by ``dir`` (a folder named
        again replaces the base's entry, new folders are added). Bases may chain.

        With ``init_weights`` a bundle folder, ``[network]`` and ``[preprocess]`` default to the bundle's;
        a key given with another value is a ValueError naming it and both values (the preprocessing may
        differ with ``allow_preprocess_change = true``)."""
        return cls.from_dict(read_train_toml(Path(path)), source=str(path), **overrides)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "dict", **overrides: Any) -> "TrainSettings":
        data = dict(data)
        kwargs: dict[str, Any] = {}
        net = data.pop("network", {})
        pre = data.pop("preprocess", {})
        phantoms = data.pop("phantoms", [])
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            hints = [f"{k} -> {close[0]}" for k in unknown
                     if (close := difflib.get_close_matches(k, list(cls.__dataclass_fields__), n=1))]
            raise ValueError(f"{source}: unknown training settings {unknown}"
                             + (f" (did you mean {', '.join(hints)}?)" if hints else "")
                             + "; `thighnode train --init FILE` writes a file with the usual keys")
        if "dicom_dirs" in data:
            logger.warning("%s: dicom_dirs is deprecated: put DICOM case folders in data_dirs (read as such)", source)
        for key, value in data.items():
            if key in FOLDER_KEYS:
                if not isinstance(value, (str, list)) or not all(isinstance(v, str) for v in
                                                                 ([value] if isinstance(value, str) else value)):
                    raise ValueError(f"{source}: {key} must be a folder or a list of folders; saw {value!r}")
                value = tuple(Path(v) for v in ([value] if isinstance(value, str) else value))
            elif key in PATH_KEYS:
                if value and not isinstance(value, str):
                    raise ValueError(f"{source}: {key} must be a path (a string); saw {value!r}")
                value = Path(value) if value else None
            kwargs[key] = value
        for section, table, kind in (("network", net, NetworkSettings), ("preprocess", pre, PreprocessSettings)):
            if not isinstance(table, dict):
                raise ValueError(f"{source}: [{section}] must be a table; saw {table!r}")
            if extra := sorted(set(table) - set(kind.__dataclass_fields__)):
                raise ValueError(f"{source}: unknown [{section}] key(s) {', '.join(extra)}; "
                                 f"allowed: {', '.join(kind.__dataclass_fields__)}")
        init = overrides.get("init_weights") or kwargs.get("init_weights")
        if init is not None:
            net, pre = _architecture_from_bundle(Path(init), net, pre, source,
                                                 bool(kwargs.get("allow_preprocess_change", False)))
        try:
            kwargs["network"] = NetworkSettings.from_dict(net)
            kwargs["preprocess"] = PreprocessSettings.from_dict(pre)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: [network] / [preprocess]: {exc}") from None
        kwargs["phantoms"] = {
            str(Path(p["dir"])): _phantom_settings(p, source)
            for p in phantoms
        }
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        if "data_dirs" not in kwargs and (kwargs.get("node_data_dir") or kwargs.get("dicom_dirs")):
            kwargs["data_dirs"] = ()
        for key in ("data_dirs", "output_bundle", "checkpoint_dir"):
            if key not in kwargs:
                raise ValueError(f"{source}: training setting {key!r} is required"
                                 + (" (or node_data_dir)" if key == "data_dirs" else ""))
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ValueError(f"{source}: {exc}") from None

    def provenance(self) -> dict[str, Any]:
        d = asdict(self)
        d["network"] = self.network.to_dict()
        d["preprocess"] = self.preprocess.to_dict()
        return json.loads(json.dumps(d, default=str))


def read_bundle_settings(bundle: Path) -> dict[str, Any] | None:
    """``{"network", "preprocess", "name", "version"}`` of a bundle folder's configs/metadata.json, or None
    when ``bundle`` is not a bundle folder (a state-dict file, or not there yet)."""
    from pipeline.bundle import METADATA_PATH

    path = Path(bundle) / METADATA_PATH
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        return {"network": dict(meta["network_settings"]), "preprocess": dict(meta["preprocess_settings"]),
                "name": str(meta.get("name", "")), "version": str(meta.get("version", ""))}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"init_weights {bundle}: {path} is not a bundle's metadata ({exc!r})") from None


#: [network] keys that may differ from the init bundle's (they change no weight's shape or meaning).
_FREE_NETWORK_KEYS = ("dropout_rate",)


def _architecture_from_bundle(init: Path, net: dict[str, Any], pre: dict[str, Any], source: str,
                              allow_preprocess_change: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """[network] and [preprocess] of settings that start from the bundle ``init``: the bundle's, with the
    file's keys on top; a key the file gives with another value than the bundle's is refused (ValueError
    naming the key and both values), except the preprocessing when ``allow_preprocess_change``. Unchanged
    when ``init`` is no bundle folder (a .pt file, or a bundle an earlier stage has yet to write)."""
    bundle = read_bundle_settings(init)
    if bundle is None:
        return net, pre
    checks = [("network", NetworkSettings, net, bundle["network"], _FREE_NETWORK_KEYS)]
    if not allow_preprocess_change:
        checks.append(("preprocess", PreprocessSettings, pre, bundle["preprocess"], ()))
    for section, kind, given, theirs, free in checks:
        try:
            ours_n = kind.from_dict({**theirs, **given}).to_dict()
            theirs_n = kind.from_dict(theirs).to_dict()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: [{section}]: {exc}") from None
        for key in given:
            if key in ours_n and key not in free and ours_n[key] != theirs_n[key]:
                hint = " (or set allow_preprocess_change = true)" if section == "preprocess" else ""
                raise ValueError(
                    f"{source}: [{section}] {key} = {json.dumps(ours_n[key])} but the init_weights bundle {init} has "
                    f"{json.dumps(theirs_n[key])}: leave it out to take the bundle's{hint}")
    return {**bundle["network"], **net}, {**bundle["preprocess"], **pre}


def read_train_toml(path: Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A training TOML as a dict, its ``base`` chain resolved (see TrainSettings.from_toml)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ValueError(f"training config {path} does not exist"
                         + (f" (the base of {_chain[-1]})" if _chain else "")) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"training config {path} is not valid TOML: {exc}") from exc
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ValueError(f"{path}: base must be a file name (a TOML file relative to {path.parent}); saw {base!r}")
    base_path = path.parent / base
    chain = (*_chain, path.resolve())
    if base_path.resolve() in chain:
        names = " -> ".join(str(p) for p in (*chain, base_path.resolve()))
        raise ValueError(f"{path}: base {base} makes a loop ({names})")
    return merge_train_dicts(read_train_toml(base_path, chain), data, source=str(path))


def merge_train_dicts(base: dict[str, Any], over: dict[str, Any], source: str = "dict") -> dict[str, Any]:
    """``over`` on top of ``base``: keys replaced, [network]/[preprocess] merged by key,
    [[phantoms]] merged by their ``dir``."""
    out = dict(base)
    for key, value in over.items():
        if key in ("network", "preprocess") and isinstance(value, dict):
            out[key] = {**base.get(key, {}), **value}
        elif key == "phantoms":
            merged: dict[str, Any] = {}
            for entry in (*base.get("phantoms", []), *value):
                if not isinstance(entry, dict) or "dir" not in entry:
                    raise ValueError(f"{source}: every [[phantoms]] entry needs a dir; saw {entry!r}")
                merged[str(Path(entry["dir"]))] = entry
            out[key] = list(merged.values())
        else:
            out[key] = value
    return out
