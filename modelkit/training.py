"""Training of the UNETR segmentation model, writing a MONAI bundle.

``thighnode train config/train_demo.toml`` (:func:`train` with :class:`TrainSettings`).

Data: every folder of ``data_dirs`` / ``val_dirs`` holds NIfTI pairs (:mod:`modelkit.nifti`) or DICOM
cases (one folder per case holding a CT series and a DICOM-SEG ground truth, :mod:`modelkit.segimport`),
told apart by :mod:`modelkit.casefolders`; ``node_data_dir`` adds the node's corrected cases, split by
patient into training and held-out cases (:mod:`modelkit.sitecases`; the held-out StudyInstanceUIDs go
into the bundle's metadata, ``training.held_out``). Every case goes
through the same :func:`pipeline.preprocess.prepare` as inference (canonical
orientation, foreground crop, resampling to the model spacing, window + gamma) once, and
is kept in the case cache (:mod:`modelkit.casecache`: on disk, memory-mapped, reused by the
next run on the same data; ``case_cache = false`` holds the cases in memory instead).
Training then draws random patches from it.

Augmentation (MONAI dictionary transforms on the cached model-grid arrays):

* patches of ``img_size`` by label class (``RandCropByLabelClassesd``: every class, the
  small ones included, is the centre of as many patches as the big ones);
* small affine: rotation up to ``rotate_deg``, scale up to ``scale_fraction`` (bilinear for
  the image, nearest for labels);
* intensity scale/shift and Gaussian noise on the windowed image;
* left-right flips (canonical axis 2, x). This is safe: structures carry no side in the
  label map (the side comes from the midline afterwards) and the thigh anatomy is mirror
  symmetric, so a flipped left thigh is a plausible right thigh with the same labels.
  No flips along z or y (no patient is upside down after canonical orientation).

Determinism: the randomness of step ``n`` is drawn from ``seed`` and ``n`` alone, so a run
resumed from a checkpoint continues exactly where it stopped.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelkit.casecache import CaseCache
from modelkit.evaluation import dice_per_structure
from modelkit.train_settings import PhantomDataSettings, TrainSettings
from pipeline.bundle import MODEL_PATH, SlidingWindowSettings, write_bundle
from pipeline.labels import LabelTable, load_label_table
from pipeline.network import build_network
from pipeline.preprocess import PreprocessSettings, apply_to_labels, prepare

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class PreparedCase:
    """A case on the model grid: image (1, D, H, W) float32 in [0,1], label (1, D, H, W) uint8."""

    name: str
    image: np.ndarray
    label: np.ndarray
    class_indices: tuple[np.ndarray, ...] = field(default=(), repr=False)  # flat voxel indices per class
    soft: np.ndarray | None = field(default=None, repr=False)  # (C, D, H, W) uint8 class fractions x 255


def ensure_phantoms(settings: TrainSettings, only: tuple[Path, ...] | None = None) -> None:
    """Generate the configured phantom data sets whose folder does not exist yet (``only``: just
    these of the configured folders)."""
    wanted = None if only is None else {Path(d) for d in only}
    for dir_name, spec in settings.phantoms.items():
        out = Path(dir_name)
        if wanted is not None and out not in wanted:
            continue
        if out.is_dir() and any(out.glob("*_ct.nii.gz")):
            continue
        write_phantom_set(out, spec)


def _training_atrophy(rng: np.random.Generator, muscles: list[str]) -> dict[str, float]:
    if rng.random() >= 0.75:
        return {}
    atrophy: dict[str, float] = {}
    for i in rng.choice(len(muscles), size=int(rng.integers(1, 5)), replace=False):
        side = ("", ":left", ":right")[int(rng.integers(3))]
        atrophy[muscles[int(i)] + side] = float(rng.uniform(0.6, 0.95))
    return atrophy


def draw_implant(rng: np.random.Generator, implant_fraction: float) -> tuple[str | None, str]:
    """(side or None, kind) of a subject's implant: present with probability ``implant_fraction``,
    kind uniform over IMPLANT_KINDS, side left 40 %, right 40 %, both 20 %. Always draws three
    numbers, so what follows on ``rng`` does not depend on the outcome."""
    from modelkit.phantom_types import IMPLANT_KINDS, IMPLANT_SIDES

    present, kind_u, side_u = rng.random(3)
    kind = IMPLANT_KINDS[min(int(kind_u * len(IMPLANT_KINDS)), len(IMPLANT_KINDS) - 1)]
    side = IMPLANT_SIDES[0 if side_u < 0.4 else 1 if side_u < 0.8 else 2]
    return (side if present < implant_fraction else None), kind


def draw_fov(rng: np.random.Generator, fov_cut_fraction: float) -> tuple[float | None, float | None]:
    """(fov_top_mm, fov_bottom_mm) relative to the iliac crest, or (None, None) for the full scan.

    With probability ``fov_cut_fraction`` the field of view is limited: 60 % a hip CT whose lowest
    slice lies between the femoral head (-110 mm) and the lesser trochanter's foot (-200 mm), 40 % a
    thigh CT whose first slice lies between the acetabulum (-70 mm) and the lesser trochanter
    (-150 mm). Always draws three numbers."""
    cut, which, where = rng.random(3)
    if cut >= fov_cut_fraction:
        return None, None
    if which < 0.6:
        return None, float(-110.0 - 90.0 * where)
    return float(-70.0 - 80.0 * where), None


def phantom_params(spec: PhantomDataSettings, index: int):  # -> modelkit.phantom.PhantomParams
    """Subject ``index`` of a phantom set: varied sex, height, girth, fat, noise and atrophy,
    all drawn from (spec.seed, index) only.

    About 75 % of subjects have one to four atrophied muscles (each kept at 0.6-0.95 of its
    normal volume, on one side or both): with only occasional, mild atrophy a model learns a
    muscle's usual outline and underestimates a real loss. The atrophy has its own random
    stream: the subject (sex, height, size, ...) does not depend on it. So does the implant
    (``spec.implant_fraction``, :func:`draw_implant`) and the field of view (``spec.fov_cut_fraction``,
    :func:`draw_fov`): subjects without them stay the same.
    """
    from modelkit.phantom import PhantomParams
    from pipeline.labels import load_label_table

    atrophy = _training_atrophy(np.random.default_rng([spec.seed, index, 1]), [
        l.key for l in load_label_table().labels if not l.is_bone
    ])
    rng = np.random.default_rng([spec.seed, index])
    rng.random()  # the draw that once decided the atrophy: subjects drawn without it stay the same
    implant, kind = draw_implant(np.random.default_rng([spec.seed, index, 3]), spec.implant_fraction)
    fov_top, fov_bottom = draw_fov(np.random.default_rng([spec.seed, index, 5]), spec.fov_cut_fraction)
    return PhantomParams(
        seed=int(spec.seed * 1000 + index),
        sex=("F", "M")[int(rng.integers(2))],
        height_m=float(rng.uniform(1.5, 1.9)),
        size=float(rng.uniform(0.85, 1.2)),
        fat_fraction=float(rng.uniform(0.1, 0.45)),
        atrophy=atrophy,
        implant=implant,
        implant_kind=kind,
        fov_top_mm=fov_top,
        fov_bottom_mm=fov_bottom,
        spacing_mm=spec.spacing_mm,
        noise_hu=float(rng.uniform(8.0, 20.0)),
    )


def write_phantom_set(out: Path, spec: PhantomDataSettings) -> list[Path]:
    """Write ``spec.n_subjects`` phantoms as NIfTI pairs ``phantom_<seed>_<i>_ct/_label.nii.gz``
    (NIfTI affine = diag(-1,-1,1,1) @ affine_lps, array as generated)."""
    import nibabel as nib

    from modelkit.nifti import RAS_TO_LPS
    from modelkit.phantom import generate_phantom

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(spec.n_subjects):
        started = time.monotonic()
        phantom = generate_phantom(phantom_params(spec, i))
        name = f"phantom_{spec.seed}_{i:03d}"
        affine_ras = RAS_TO_LPS @ np.asarray(phantom.affine_lps, dtype=np.float64)
        ct = nib.Nifti1Image(np.asarray(phantom.hu, dtype=np.float32), affine_ras)
        lab = nib.Nifti1Image(np.asarray(phantom.labels, dtype=np.uint8), affine_ras)
        nib.save(ct, str(out / f"{name}_ct.nii.gz"))
        nib.save(lab, str(out / f"{name}_label.nii.gz"))
        written.append(out / f"{name}_ct.nii.gz")
        logger.info("phantom %s written in %.1f s", name, time.monotonic() - started)
    return written


def load_cases(
    data_dirs: tuple[Path, ...],
    dicom_dirs: tuple[Path, ...],
    labels: LabelTable,
    preprocess: PreprocessSettings,
    soft_labels: bool = False,
    cache: CaseCache | None = None,
    indices: bool = False,
    case_dirs: tuple[Path, ...] = (),
    key: str = "data_dirs",
) -> list[PreparedCase]:
    """Load and preprocess every case of the folders (each a folder of NIfTI pairs or of DICOM CT + SEG case
    folders, :mod:`modelkit.casefolders`; ``dicom_dirs``, deprecated, is read the same way) and the single
    DICOM case folders ``case_dirs`` (the node's corrected cases). ``key`` names the folders in errors.

    ``indices``: with the per-class voxel indices for patch sampling (training cases). With a
    ``cache`` (modelkit.casecache) each case is prepared once and its arrays come back
    memory-mapped from disk; without, they are held in memory."""
    from modelkit.casefolders import dicom_case, list_folders, load_labelled_case

    listed = list_folders((*data_dirs, *dicom_dirs), key) + [dicom_case(d) for d in case_dirs]
    soft_classes = labels.num_classes if soft_labels else 0
    recipe = {"preprocess": preprocess.to_dict(), "soft_classes": soft_classes, "num_classes": labels.num_classes,
              "indices": indices}
    cases: list[PreparedCase] = []
    before = cache.counts() if cache is not None else (0, 0, 0)
    for source in listed:
        def build(source=source) -> PreparedCase:
            hu, lab, affine = load_labelled_case(source, labels)
            case = _prepare_case(source.name, hu, lab, affine, preprocess, soft_classes)
            return with_class_indices(case, labels.num_classes) if indices else case

        if cache is None:
            cases.append(build())
        else:
            arrays = cache.fetch(source.name, list(source.files), recipe, lambda build=build: _case_arrays(build()))
            cases.append(_case_from_arrays(source.name, arrays))
    if cache is not None:
        logger.info("%s", cache.summary(since=before))
    return cases


def _case_arrays(case: PreparedCase) -> dict[str, np.ndarray]:
    arrays = {"image": case.image, "label": case.label}
    if case.soft is not None:
        arrays["soft"] = case.soft
    if case.class_indices:
        arrays["indices"] = np.concatenate(case.class_indices)
        arrays["offsets"] = np.cumsum([0, *(len(i) for i in case.class_indices)]).astype(np.int64)
    return arrays


def _case_from_arrays(name: str, arrays: dict[str, np.ndarray]) -> PreparedCase:
    class_indices: tuple[np.ndarray, ...] = ()
    if "indices" in arrays:
        idx, off = arrays["indices"], np.asarray(arrays["offsets"])
        class_indices = tuple(idx[off[i]:off[i + 1]] for i in range(len(off) - 1))
    return PreparedCase(name, arrays["image"], arrays["label"], class_indices=class_indices, soft=arrays.get("soft"))


def _prepare_case(
    name: str, hu: np.ndarray, lab: np.ndarray, affine: np.ndarray, pre: PreprocessSettings, soft_classes: int = 0
) -> PreparedCase:
    image, plan = prepare(hu, affine, pre)
    label = apply_to_labels(lab, plan)[None]
    soft = soft_label_fractions(lab, plan, soft_classes) if soft_classes else None
    return PreparedCase(name, image, label, soft=soft)


def soft_label_fractions(lab: np.ndarray, plan, num_classes: int) -> np.ndarray:
    """Fraction of each model-grid voxel covered by each class (area averaging of the
    original-resolution masks), as uint8 0..255, shape (C, *model_shape).

    Training on these partial-volume targets teaches the network calibrated boundary
    probabilities, which the linear restore to the original grid turns into boundaries
    finer than the model grid (a hard nearest-resampled target caps the Dice of small
    structures at the model grid's staircase)."""
    import torch.nn.functional as F

    cropped = plan.canonical.apply(np.asarray(lab))[plan.crop_slices()]
    out = np.zeros((num_classes,) + tuple(plan.model_shape), dtype=np.uint8)
    for c in range(num_classes):
        mask = torch.from_numpy((cropped == c).astype(np.float32))[None, None]
        if not bool(mask.any()):
            continue
        frac = F.interpolate(mask, size=tuple(plan.model_shape), mode="area")[0, 0]
        out[c] = torch.round(frac * 255).to(torch.uint8).numpy()
    return out


def with_class_indices(case: PreparedCase, num_classes: int) -> PreparedCase:
    """The case with its per-class voxel indices precomputed (for label-class patch sampling)."""
    from monai.transforms.utils import map_classes_to_indices

    indices = map_classes_to_indices(case.label, num_classes=num_classes)
    dtype = np.int32 if case.label.size < 2**31 else np.int64  # half the memory of MONAI's int64
    return replace(case, class_indices=tuple(np.asarray(i, dtype=dtype) for i in indices))


def split_cases(cases: list[PreparedCase], val_fraction: float, seed: int) -> tuple[list[PreparedCase], list[PreparedCase]]:
    """Deterministic split (by seed) into training and validation cases."""
    if val_fraction <= 0 or len(cases) < 2:
        return cases, []
    order = np.random.default_rng(seed).permutation(len(cases))
    n_val = max(1, int(round(val_fraction * len(cases))))
    val = [cases[i] for i in sorted(order[:n_val])]
    train = [cases[i] for i in sorted(order[n_val:])]
    return train, val


def build_transforms(settings: TrainSettings, num_classes: int):  # -> monai.transforms.Compose
    from monai.transforms import (
        Compose,
        RandAffined,
        RandCropByLabelClassesd,
        RandFlipd,
        RandGaussianNoised,
        RandScaleIntensityd,
        RandShiftIntensityd,
        SpatialPadd,
    )

    from modelkit.augment import RandTissueContrastd, elastic_deformation

    size = settings.network.img_size
    rot = math.radians(settings.rotate_deg)
    target = "soft" if settings.soft_labels else "label"
    target_mode = "bilinear" if settings.soft_labels else "nearest"
    pre = settings.preprocess
    contrast = []
    if settings.contrast_prob > 0:
        if not settings.soft_labels:
            raise ValueError("TrainSettings.contrast_prob > 0 needs soft_labels = true (the structures' weights)")
        contrast = [RandTissueContrastd("image", "soft", settings.tissue_contrast(),
                                        (pre.window_lo_hu, pre.window_hi_hu), pre.gamma)]
    elastic = elastic_deformation(("image", target), ("bilinear", target_mode), settings.elastic_prob,
                                  settings.elastic_sigma_vox, settings.elastic_magnitude)
    return Compose(
        [
            SpatialPadd(keys=("image", target), spatial_size=size, mode="constant"),
            RandCropByLabelClassesd(
                keys=("image", target), label_key="label", spatial_size=size, num_classes=num_classes,
                num_samples=settings.samples_per_volume, allow_smaller=True, indices_key="class_indices",
            ),
            RandAffined(
                keys=("image", target), prob=settings.affine_prob, rotate_range=(rot, rot, rot),
                scale_range=(settings.scale_fraction,) * 3, mode=("bilinear", target_mode), padding_mode="zeros",
            ),
            *elastic,
            RandFlipd(keys=("image", target), prob=settings.flip_prob, spatial_axis=2),
            *contrast,
            RandScaleIntensityd(keys="image", factors=0.1, prob=settings.intensity_prob),
            RandShiftIntensityd(keys="image", offsets=0.05, prob=settings.intensity_prob),
            RandGaussianNoised(keys="image", prob=settings.noise_prob, std=0.02),
        ]
    )


def _batch_for_step(cases: list[PreparedCase], transforms, settings: TrainSettings, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training batch of ``step``: depends only on (seed, step)."""
    rng = np.random.default_rng([settings.seed, step])
    transforms.set_random_state(seed=int(rng.integers(2**31 - 1)))
    images, labels = [], []
    for index in rng.choice(len(cases), size=settings.batch_size, replace=len(cases) < settings.batch_size):
        case = cases[int(index)]
        with warnings.catch_warnings():  # classes absent from a case get ratio 0 (MONAI warns each time)
            warnings.filterwarnings("ignore", message="no available indices of class")
            # memory-mapped (read-only) cases: MONAI wraps them in tensors it never writes to
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            item = {"image": case.image, "label": case.label, "class_indices": list(case.class_indices)}
            if settings.soft_labels:
                if case.soft is None:
                    raise ValueError(f"case {case.name} has no soft labels; load it with soft_labels=True")
                item["soft"] = case.soft  # uint8: crop first, scale the patch only
            samples = transforms(item)
        for s in samples if isinstance(samples, list) else [samples]:
            images.append(torch.as_tensor(np.asarray(s["image"]), dtype=torch.float32))
            if settings.soft_labels:
                soft = torch.as_tensor(np.asarray(s["soft"]), dtype=torch.float32) / 255.0
                background = (1.0 - soft[1:].sum(0, keepdim=True)).clamp_min(0.0)  # padding/affine fill: background
                soft = torch.cat([torch.maximum(soft[:1], background), soft[1:]])
                labels.append(soft / soft.sum(0, keepdim=True).clamp_min(1e-6))
            else:
                labels.append(torch.as_tensor(np.asarray(s["label"])).long())
    return torch.stack(images), torch.stack(labels)


# --------------------------------------------------------------------------- validation


def validate(network: torch.nn.Module, cases: list[PreparedCase], settings: TrainSettings, labels: LabelTable,
             device: torch.device) -> dict[str, Any]:
    """Sliding-window Dice per structure on the model grid, averaged over cases."""
    from pipeline.inference import predict_scores

    network.eval()
    ids = [l.id for l in labels.labels]
    per: dict[int, list[float]] = {i: [] for i in ids}
    for case in cases:
        probs = predict_scores(network, np.array(case.image), settings.network.img_size, device, sw_batch_size=2,
                               overlap=settings.sw_overlap, mode="gaussian")
        pred = probs.argmax(0).numpy().astype(np.uint8)
        for i, d in dice_per_structure(pred, case.label[0], ids).items():
            if not math.isnan(d):
                per[i].append(d)
    network.train()
    dice = {labels.by_id(i).key: float(np.mean(v)) for i, v in per.items() if v}
    return {"mean_dice": float(np.mean(list(dice.values()))) if dice else 0.0, "dice": dice}


# --------------------------------------------------------------------------- training


def _lr_at(step: int, settings: TrainSettings) -> float:
    """Linear warm-up then cosine decay to 5 % of ``lr``."""
    if step < settings.warmup_iterations:
        return settings.lr * (step + 1) / settings.warmup_iterations
    span = max(1, settings.iterations - settings.warmup_iterations)
    t = min(1.0, (step - settings.warmup_iterations) / span)
    return settings.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def train(settings: TrainSettings, labels: LabelTable | None = None) -> Path:
    """Train; write the bundle with the best model (by validation mean Dice) and return its path."""
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism

    started = time.monotonic()
    labels = labels or load_label_table()
    torch.set_num_threads(settings.num_threads)
    set_determinism(seed=settings.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _check_inputs(settings)
    site = _site_split(settings)
    train_cases, val_cases = _load_training_cases(settings, labels, site)
    logger.info("training on %d cases, validating on %d (loaded in %.1f s)", len(train_cases), len(val_cases),
                time.monotonic() - started)

    network = build_network(settings.network, labels.num_classes).to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    loss_fn = DiceCELoss(to_onehot_y=not settings.soft_labels, softmax=True, batch=settings.batch_dice,
                         lambda_dice=float(settings.lambda_dice), lambda_ce=float(settings.lambda_ce))
    autocast_bf16 = settings.precision == "bf16"
    transforms = build_transforms(settings, labels.num_classes)
    checkpoint_dir = Path(settings.checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    progress, init_sha256 = _start(settings, network, optimizer)

    network.train()
    losses: list[float] = []
    t_last = time.monotonic()
    while progress.step < settings.iterations:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(progress.step, settings)
        x, y = _batch_for_step(train_cases, transforms, settings, progress.step)
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
            logits = network(x)
        loss = loss_fn(logits.float(), y)
        loss.backward()
        if settings.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(network.parameters(), settings.grad_clip_norm)
        optimizer.step()
        losses.append(float(loss.item()))
        progress.step += 1
        step = progress.step
        if step % 50 == 0:
            logger.info("step %d loss %.4f (mean of last 50) lr %.2e", step, float(np.mean(losses[-50:])),
                        optimizer.param_groups[0]["lr"])
        if step % settings.val_every == 0 or step == settings.iterations:
            _record_round(progress, network, val_cases, settings, labels, device, losses, t_last)
            _save_checkpoint(checkpoint_dir / CHECKPOINT_NAME, network, optimizer, step, progress.best,
                             progress.best_state, progress.history)
            t_last = time.monotonic()

    if progress.best_state is None:  # iterations == 0 or no validation happened
        progress.best_state = _cpu_state(network)
    out = _write_trained_bundle(settings, labels, progress.best_state, progress.best, progress.history, progress.step,
                                [c.name for c in train_cases], [c.name for c in val_cases], time.monotonic() - started,
                                init_sha256=init_sha256, extra=_held_out_record(settings, site))
    if settings.calibrate_volumes and (settings.val_dirs or settings.calibration_dirs):
        _calibrate(out, settings, labels, device)
    logger.info("training finished in %.0f s; bundle %s (best mean Dice %.4f at step %d)",
                time.monotonic() - started, out, progress.best["mean_dice"], progress.best["step"])
    return out


@dataclass
class _Progress:
    """Where a run stands: steps done, the best validation round and its weights, one record per round."""

    step: int = 0
    best: dict[str, Any] = field(default_factory=lambda: {"mean_dice": -1.0, "dice": {}, "step": 0})
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def _check_inputs(settings: TrainSettings) -> None:
    """Fail on a wrong path now, not after loading the data or training; generate missing phantom sets."""
    from modelkit.casefolders import folder_kind

    if settings.resume is None and settings.init_weights is not None:
        _init_weights_file(Path(settings.init_weights))
    ensure_phantoms(settings)
    folders = [("data_dirs", settings.data_dirs), ("val_dirs", settings.val_dirs)]
    if settings.calibrate_volumes:
        folders.append(("calibration_dirs", settings.calibration_dirs))
    for key, dirs in folders:
        for folder in dirs:
            folder_kind(Path(folder), key)
    if not settings.data_dirs and settings.node_data_dir is None:
        raise ValueError("training settings: data_dirs is empty and node_data_dir is not set: no training cases")


def _site_split(settings: TrainSettings):  # -> modelkit.sitecases.SiteSplit | None
    """The node's corrected cases split by patient (node_data_dir), or None when not configured."""
    if settings.node_data_dir is None:
        return None
    from modelkit.sitecases import split_corrected_cases

    split = split_corrected_cases(Path(settings.node_data_dir), settings.seed, settings.held_out_fraction)
    logger.info("node_data_dir %s: %s", settings.node_data_dir, split.note)
    return split


def _load_training_cases(settings: TrainSettings, labels: LabelTable,
                         site=None) -> tuple[list[PreparedCase], list[PreparedCase]]:
    """The training and validation cases (validation folders, or a seeded split of the training data);
    ``site``: the node's corrected cases (:func:`_site_split`), whose training side joins the data folders'."""
    cache = CaseCache(settings.case_cache_dir or Path(settings.checkpoint_dir) / "case_cache") \
        if settings.case_cache else None
    site_dirs = tuple(c.folder for c in site.train) if site is not None else ()
    cases = load_cases(settings.data_dirs, settings.dicom_dirs, labels, settings.preprocess, settings.soft_labels,
                       cache=cache, indices=True, case_dirs=site_dirs)
    if settings.val_dirs:
        train_cases = cases
        val_cases = load_cases(settings.val_dirs, (), labels, settings.preprocess, cache=cache, key="val_dirs")
    else:
        train_cases, val_cases = split_cases(cases, settings.val_fraction, settings.seed)
    if not train_cases:
        where = [str(d) for d in settings.data_dirs] + ([f"{settings.node_data_dir}/corrected"] if site else [])
        raise ValueError(f"no training cases found in {', '.join(where) or 'no folder'}")
    return train_cases, val_cases


def _held_out_record(settings: TrainSettings, site) -> dict[str, Any]:
    """What the bundle's metadata says of the node's held-out cases (StudyInstanceUIDs only)."""
    if site is None:
        return {}
    return {"held_out": {"node_data_dir": str(settings.node_data_dir), "seed": settings.seed,
                         "held_out_fraction": settings.held_out_fraction, "patients": site.patients,
                         "train_study_uids": [c.study_uid for c in site.train],
                         "study_uids": [c.study_uid for c in site.held_out]}}


def _start(settings: TrainSettings, network: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[_Progress, str | None]:
    """The progress to start from (a resumed checkpoint's, or none) and the sha256 of the initial weights
    when the run starts from a bundle's (``init_weights``)."""
    if settings.resume is not None:
        step, best, best_state, history = _load_checkpoint(Path(settings.resume), network, optimizer)
        logger.info("resumed from %s at step %d (best mean Dice %.4f)", settings.resume, step, best["mean_dice"])
        return _Progress(step, best, best_state, history), None
    if settings.init_weights is not None:
        init_sha256 = load_init_weights(network, Path(settings.init_weights))
        logger.info("starting from the weights of %s (sha256 %s)", settings.init_weights, init_sha256[:12])
        return _Progress(), init_sha256
    return _Progress(), None


def _cpu_state(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}


def _record_round(progress: _Progress, network: torch.nn.Module, val_cases: list[PreparedCase],
                  settings: TrainSettings, labels: LabelTable, device: torch.device, losses: list[float],
                  t_last: float) -> None:
    """Validate at the end of a round: append its record and keep the weights when they are the best so far
    (every round's when there is nothing to validate on)."""
    step = progress.step
    record: dict[str, Any] = {"step": step, "loss": float(np.mean(losses[-settings.val_every:])),
                              "seconds": time.monotonic() - t_last}
    if val_cases:
        metrics = validate(network, val_cases, settings, labels, device)
        record["val_mean_dice"] = metrics["mean_dice"]
        if metrics["mean_dice"] > progress.best["mean_dice"]:
            progress.best = {**metrics, "step": step}
            progress.best_state = _cpu_state(network)
    else:
        progress.best = {"mean_dice": math.nan, "dice": {}, "step": step}
        progress.best_state = _cpu_state(network)
    progress.history.append(record)
    logger.info("step %d/%d loss %.4f val mean Dice %s (best %.4f at %d) %.0f s", step, settings.iterations,
                record["loss"], f"{record.get('val_mean_dice', math.nan):.4f}", progress.best["mean_dice"],
                progress.best["step"], record["seconds"])


def _calibrate(bundle: Path, settings: TrainSettings, labels: LabelTable, device: torch.device) -> None:
    """Fit the trained bundle's volume calibration on the validation and calibration folders."""
    from modelkit.calibration import calibrate_bundle, format_result

    result = calibrate_bundle(bundle, (*settings.val_dirs, *settings.calibration_dirs), device=device.type,
                              objective=settings.calibration_objective)
    logger.info("volume calibration on %d cases (validation%s):\n%s", len(result.cases),
                " and calibration sets" if settings.calibration_dirs else " set", format_result(result, labels))


def _write_trained_bundle(settings: TrainSettings, labels: LabelTable, state: dict, best: dict, history: list,
                          step: int, train_names: list[str], val_names: list[str], seconds: float,
                          output: Path | None = None, init_sha256: str | None = None,
                          extra: dict[str, Any] | None = None) -> Path:
    network = build_network(settings.network, labels.num_classes)
    network.load_state_dict(state)
    metadata = {
        "name": settings.bundle_name,
        "version": settings.bundle_version,
        "intended_use": settings.intended_use,
        "description": "UNETR (MONAI) for thigh/hip muscle segmentation on CT; see intended_use.",
        "training": {
            "seed": settings.seed,
            "command": settings.command or " ".join(sys.argv),
            "settings": settings.provenance(),
            "train_cases": train_names,
            "val_cases": val_names,
            "iterations": step,
            "best_step": best["step"],
            "history": history,
            "seconds": seconds,
            **({"init_weights_sha256": init_sha256} if init_sha256 else {}),
            **(extra or {}),
        },
        "metrics": {"validation_mean_dice_model_grid": best["mean_dice"], "validation_dice_model_grid": best["dice"]},
        **_inherited_uncertainty(settings.init_weights),
    }
    return write_bundle(output or settings.output_bundle, network, settings.network, settings.preprocess, labels,
                        metadata, SlidingWindowSettings(overlap=settings.sw_overlap, mirror=settings.sw_mirror))


def _inherited_uncertainty(init_weights: Path | str | None) -> dict[str, Any]:
    """The init bundle's low-confidence thresholds (metadata "uncertainty"), carried into a fine-tuned bundle
    and marked as inherited, so a promoted site model keeps flagging; refit them on the site's labelled cases
    with ``thighnode evaluate --uncertainty``. Empty when the init weights are not a bundle with thresholds."""
    meta_path = Path(init_weights) / "configs" / "metadata.json" if init_weights else None
    if meta_path is None or not meta_path.is_file():
        return {}
    u = json.loads(meta_path.read_text(encoding="utf-8")).get("uncertainty")
    if not isinstance(u, dict) or "mean_entropy_threshold" not in u:
        return {}
    how = f"inherited from the init bundle {Path(init_weights).name} (refit on this model's labelled cases: " \
          f"thighnode evaluate --uncertainty); there: {u.get('how_chosen', '')}"
    return {"uncertainty": {**u, "how_chosen": how, "inherited": True}}


def export_checkpoint(settings: TrainSettings, checkpoint: Path, output: Path, labels: LabelTable | None = None) -> Path:
    """Write a bundle from a checkpoint's best model (e.g. to evaluate a run still in progress)."""
    labels = labels or load_label_table()
    ckpt = torch.load(Path(checkpoint), map_location="cpu", weights_only=True)
    best = json.loads(ckpt["best_json"])
    state = _best_state(ckpt)
    return _write_trained_bundle(settings, labels, state, best, json.loads(ckpt["history_json"]), int(ckpt["step"]),
                                 [], [], math.nan, output)


def _best_state(ckpt: dict) -> dict:
    """A training checkpoint's best model (by validation Dice), or its last one when none was validated."""
    return ckpt.get("best_model") or ckpt["model"]


def _init_weights_file(path: Path) -> Path:
    file = path / MODEL_PATH if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"init_weights {path} does not exist (a bundle folder with {MODEL_PATH} or a .pt file)")
    return file


def load_init_weights(network: torch.nn.Module, path: Path) -> str:
    """Load the state dict at ``path`` (a bundle folder or a .pt file) into ``network``
    (weights_only, strict); return the file's sha256. ValueError names the file and the mismatch."""
    file = _init_weights_file(path)
    data = file.read_bytes()
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"init_weights {file} cannot be read as a state dict: {exc}") from exc
    if isinstance(state, dict) and "model" in state and "optimizer" in state:  # a training checkpoint
        state = _best_state(state)
    try:
        network.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()
        raise ValueError(f"init_weights {file} do not fit the network of these settings "
                         f"(same architecture required): {' '.join(first[:3])[:400]}") from exc
    return hashlib.sha256(data).hexdigest()


def _save_checkpoint(path: Path, network, optimizer, step: int, best: dict, best_state, history: list) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": network.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "best_json": json.dumps(best), "best_model": best_state, "history_json": json.dumps(history)}, tmp)
    tmp.replace(path)


def _load_checkpoint(path: Path, network, optimizer) -> tuple[int, dict, dict | None, list]:
    if not path.is_file():
        raise ValueError(f"resume checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    network.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    return int(ckpt["step"]), json.loads(ckpt["best_json"]), ckpt.get("best_model"), json.loads(ckpt["history_json"])
