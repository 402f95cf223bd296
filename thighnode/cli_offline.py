"""The offline commands of the ``thighnode`` command line: model work (:mod:`modelkit`) and the
cohort analyses (:mod:`research`).

Each ``add_*`` function adds its commands to the CLI's subparsers; a command that wants logging sets
``log_level`` and :func:`thighnode.cli.main` configures it (logging is set up only there). The model
kit is imported inside the commands: the node's own commands never load it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Callable

#: The demonstration bundle as the node's default configuration names it (relative to the working directory).
DEMO_BUNDLE = Path("bundles/thighnode_demo")
#: The same bundle in this checkout, where the working directory has none.
REPO_DEMO_BUNDLE = Path(__file__).resolve().parents[1] / DEMO_BUNDLE

AddCommand = Callable[[str, str], argparse.ArgumentParser]


# -- phantom / train -----------------------------------------------------------------------


def cmd_phantom(args: argparse.Namespace) -> int:
    from modelkit.phantom_dataset import generate_dataset

    spacing = tuple(float(v) for v in args.spacing.split(","))
    if len(spacing) == 1:
        spacing = spacing * 3
    paths = generate_dataset(
        Path(args.out),
        n_subjects=args.subjects,
        seed=args.seed,
        spacing_mm=spacing,  # type: ignore[arg-type]
        nifti=not args.no_nifti,
        dicom=args.dicom,
        follow_up=args.follow_up,
    )
    print(f"wrote {len(paths)} phantom subject(s) under {args.out}")
    return 0


def _train_command(args: argparse.Namespace) -> str:
    """The command line recorded in the bundle's provenance."""
    parts = ["thighnode", "train", str(args.train_config)]
    for flag, value in (("--resume", args.resume), ("--init-weights", args.init_weights),
                        ("--iterations", args.iterations), ("--output", args.output),
                        ("--checkpoint-dir", args.checkpoint_dir), ("--export", args.export)):
        if value:
            parts += [flag, str(value)]
    return " ".join(parts)


def cmd_train(args: argparse.Namespace) -> int:
    """Train (or ``--init``: write a site's settings file). A settings or data error (the node's own errors,
    ValueError, which TOML decode errors are, and missing or unreadable files) is one line on stderr,
    ``thighnode train: ...``, and exit 2, never a traceback."""
    from node_errors import NodeError

    try:
        return _train(args)
    except (NodeError, ValueError, OSError) as exc:
        print(f"thighnode train: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    if args.init is not None:
        from modelkit.sitesettings import write_site_settings

        bundle = args.from_bundle or (DEMO_BUNDLE if DEMO_BUNDLE.is_dir() else REPO_DEMO_BUNDLE)
        path = write_site_settings(args.init, bundle)
        print(f"wrote {path}: replace its /path/to/... folders, then run: thighnode train {path}")
        return 0
    if args.train_config is None:
        raise ValueError("a settings file is required (thighnode train SETTINGS.toml), or --init FILE to write one")
    from modelkit.train_settings import TrainSettings
    from modelkit.training import export_checkpoint, train

    settings = TrainSettings.from_toml(
        args.train_config, iterations=args.iterations or None, resume=args.resume, init_weights=args.init_weights,
        output_bundle=args.output, checkpoint_dir=args.checkpoint_dir, command=_train_command(args),
    )
    if args.export is not None:
        print(export_checkpoint(settings, args.export, settings.output_bundle))
        return 0
    train(settings)
    return 0


def add_training_commands(add: AddCommand) -> None:
    p = add("phantom", "generate labelled thigh CT phantoms (NIfTI pairs, DICOM series, ground truth)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--subjects", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spacing", default="2.0", help="voxel size in mm: one value or dz,dy,dx")
    p.add_argument("--dicom", action="store_true", help="also write DICOM CT series")
    p.add_argument("--no-nifti", action="store_true", help="do not write NIfTI pairs")
    p.add_argument("--follow-up", action="store_true", help="also write a follow-up study with known atrophy")
    p.set_defaults(func=cmd_phantom, log_level="INFO")

    p = add("train", "train a model bundle from labelled CTs (NIfTI pairs or DICOM CT + DICOM-SEG)")
    p.add_argument("train_config", type=Path, nargs="?", default=None,
                   help="training settings (TOML), e.g. the file --init wrote or config/train_demo.toml")
    p.add_argument("--init", type=Path, default=None, metavar="FILE",
                   help="do not train: write a commented settings file for fine-tuning --from-bundle on a site's "
                        "cases (no phantoms), to edit and then pass to thighnode train")
    p.add_argument("--from-bundle", type=Path, default=None, metavar="BUNDLE",
                   help=f"with --init: the bundle to start from, its architecture and grid (default {DEMO_BUNDLE})")
    p.add_argument("--resume", type=Path, default=None, help="checkpoint to resume from")
    p.add_argument("--init-weights", type=Path, default=None,
                   help="start from this bundle's weights (fine-tuning; same architecture)")
    p.add_argument("--iterations", type=int, default=None, help="total iterations (overrides the settings)")
    p.add_argument("--output", type=Path, default=None, help="bundle folder (overrides output_bundle)")
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="checkpoint folder (overrides checkpoint_dir)")
    p.add_argument("--export", type=Path, default=None, metavar="CHECKPOINT",
                   help="do not train: write the bundle from this checkpoint's best model")
    p.set_defaults(func=cmd_train, log_level="INFO")


# -- evaluate / calibrate / side check / real CT check --------------------------------------


def cmd_evaluate(args: argparse.Namespace) -> int:
    from modelkit.evaluation import evaluate_bundle

    data = [Path(d) for d in args.data] if args.data else None
    if data is not None and args.generate_from:
        from modelkit.train_settings import TrainSettings
        from modelkit.training import ensure_phantoms

        ensure_phantoms(TrainSettings.from_toml(args.generate_from), only=tuple(data))
    if data is None:
        from modelkit.phantom_dataset import generate_dataset

        tmp = Path(tempfile.mkdtemp(prefix="thighnode-eval-"))
        generate_dataset(tmp, n_subjects=args.phantoms, seed=args.seed, spacing_mm=(2.0, 2.0, 2.0))
        data = tmp
    report = evaluate_bundle(Path(args.bundle), data, csv_path=Path(args.csv) if args.csv else None,
                             device=args.device, uncertainty_samples=args.uncertainty, overlap=args.overlap,
                             precision=args.precision)
    print(report.format_table())
    if args.uncertainty:
        from modelkit.uncertainty_eval import format_uncertainty_report

        print()
        print(format_uncertainty_report(report.scores, Path(args.bundle)))
    if args.real is not None:
        from modelkit.realcheck import DEFAULT_DATA_DIR, format_beside, run

        _, scores = run(Path(args.bundle), Path(args.real) if args.real else DEFAULT_DATA_DIR)
        print()
        print(format_beside(report, scores))
    if args.side_check:
        from modelkit.sidecheck import run_sidecheck

        result = run_sidecheck(Path(args.bundle))
        print("\nside check: one phantom leg atrophied (thighnode sidecheck)")
        print(result.format_table())
        if not result.passed:
            return 1
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from modelkit.calibration import calibrate_bundle, format_result

    iterations = {} if args.iterations is None else {"iterations": args.iterations}
    result = calibrate_bundle(Path(args.bundle), [Path(d) for d in args.data], write=not args.dry_run,
                              device=args.device, objective=args.objective, **iterations)
    print(format_result(result))
    return 0


def cmd_sidecheck(args: argparse.Namespace) -> int:
    from modelkit.sidecheck import run_sidecheck

    result = run_sidecheck(Path(args.bundle), spacing_mm=args.spacing, tolerance=args.tolerance,
                           side_tolerance=args.side_tolerance)
    print(result.format_table())
    return 0 if result.passed else 1


def cmd_realcheck(args: argparse.Namespace) -> int:
    from modelkit.realcheck import DEFAULT_DATA_DIR, REPO_BUNDLE, format_scores, run

    _, scores = run(args.bundle or REPO_BUNDLE, args.data or DEFAULT_DATA_DIR)
    print(format_scores(scores))
    return 0


def cmd_evaluate_implants(args: argparse.Namespace) -> int:
    """Implant phantom pairs: every muscle's change within 5 pp of the truth or withheld (an evaluation: exit 0)."""
    from modelkit.implant_pairs import evaluate_implants
    from thighnode.settings import load_settings

    prior = load_settings(args.config).prior
    threshold = prior.metal_withhold_near_pct if args.threshold is None else args.threshold
    slices = prior.metal_withhold_slices_pct if args.slices_threshold is None else args.slices_threshold
    result = evaluate_implants(args.bundle, pairs=args.pairs, seed=args.seed, spacing_mm=args.spacing,
                               threshold_pct=threshold, slices_threshold_pct=slices,
                               uncertainty_samples=args.uncertainty_samples,
                               withhold_partial=prior.withhold_partial and not args.keep_partial)
    print(result.format_table())
    if args.json is not None:
        print(f"wrote {result.write_json(args.json)}")
    return 0


def add_evaluation_commands(add: AddCommand) -> None:
    p = add("calibrate", "fit a bundle's per-class volume calibration on labelled cases (a validation set)")
    p.add_argument("--bundle", required=True)
    p.add_argument("--data", required=True, nargs="+",
                   help="folder(s) of NIfTI pairs or of DICOM case folders; never the test set")
    p.add_argument("--iterations", type=int, default=None,
                   help="at most this many rounds (default modelkit.calibration.MAX_ITERATIONS); the fit stops "
                        "when every class is within modelkit.calibration.TOLERANCE or after PATIENCE rounds "
                        "without improvement, keeping the best round")
    p.add_argument("--objective", choices=("pooled", "median"), default="pooled",
                   help="match per class the volumes pooled over the cases, or the median case's ratio "
                        "(each subject counts once; default %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print the fit without writing the bundle")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default %(default)s)")
    p.set_defaults(func=cmd_calibrate, log_level="INFO")

    p = add("evaluate", "per-structure Dice and volume difference of a bundle on a labelled set")
    p.add_argument("--bundle", required=True)
    p.add_argument("--data", default=None, nargs="+",
                   help="labelled folders (NIfTI pairs, DICOM case folders, or one DICOM case), pooled in one table; "
                        "default: fresh phantoms")
    p.add_argument("--phantoms", type=int, default=4, help="number of held-out phantoms when --data is not given")
    p.add_argument("--seed", type=int, default=9000, help="seed of the held-out phantoms")
    p.add_argument("--generate-from", default=None, metavar="TRAIN_CONFIG",
                   help="generate the --data folders that this training config defines as [[phantoms]] and that "
                        "do not exist yet (e.g. the demo's held-out sets)")
    p.add_argument("--csv", default=None, help="write the table as CSV")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default %(default)s)")
    p.add_argument("--overlap", type=float, default=None,
                   help="sliding-window overlap instead of the bundle's (e.g. 0.25 against its 0.5)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="network arithmetic instead of the bundle's (bf16: bfloat16 autocast where the device has it)")
    p.add_argument("--real", nargs="?", const="", default=None, metavar="DIR",
                   help="also segment the real hip CT (default: ../shared/data/totalseg-hip-ct) and print its Dice "
                        "beside the phantoms', per structure and side")
    p.add_argument("--side-check", action="store_true",
                   help="also segment a phantom pair with one leg atrophied: is the loss on that side only? (exit 1 if not)")
    p.add_argument("--uncertainty", type=int, nargs="?", const=2, default=0, metavar="N",
                   help="also draw N test-time augmentations (default 2: identity + mirror) and report how the "
                        "per-structure uncertainty predicts the errors: rank correlations, the low-confidence "
                        "flag's sensitivity/specificity at the bundle's threshold, and the threshold fitted on "
                        "these cases")
    p.set_defaults(func=cmd_evaluate, log_level="INFO")

    p = add("sidecheck", "one phantom leg atrophied: does the bundle show the loss on that side only? (exit 1 if not)")
    p.add_argument("--bundle", type=Path, default=DEMO_BUNDLE, help="default %(default)s")
    p.add_argument("--spacing", type=float, default=2.0, help="phantom voxel size in mm (default %(default)s)")
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="allowed error of an atrophied muscle's change ratio (0.05 = 5 pp; reported)")
    p.add_argument("--side-tolerance", type=float, default=0.02,
                   help="allowed total change of the unaffected muscles of each leg (0.02 = 2 %%)")
    p.set_defaults(func=cmd_sidecheck, log_level="INFO")

    _add_evaluate_implants(add)

    p = add("realcheck", "Dice and volumes of a bundle on the real TotalSegmentator hip CT against its reference labels")
    p.add_argument("--bundle", type=Path, default=None, help="default: the repository's demonstration bundle")
    p.add_argument("--data", type=Path, default=None,
                   help="folder with example_ct.nii.gz and its reference labels (default: "
                        "shared/data/totalseg-hip-ct beside the repository)")
    p.set_defaults(func=cmd_realcheck, log_level="INFO")


# -- cohort ----------------------------------------------------------------------------------


def cmd_cohort(args: argparse.Namespace) -> int:
    from research.cohort import run_cohort
    from thighnode.settings import load_settings

    settings = load_settings(args.config)
    group_by = None if args.group_by is None else tuple(c.strip() for c in args.group_by.split(",") if c.strip())
    run_cohort(
        settings, out_dir=Path(args.out), site_csv=args.site_csv, group_by=group_by,
        write_thresholds=args.write_thresholds,
    )
    return 0


def add_research_commands(add: AddCommand) -> None:
    p = add("cohort", "research tables and figures over every measured study, joined with a site CSV")
    p.add_argument("--out", type=Path, required=True, help="output directory (CSV tables, PNG figures)")
    p.add_argument("--site-csv", type=Path, default=None,
                   help="clinical data: patient_id [, issuer] [, study_uid | study_date], fracture_type, sex, dxa_* ...")
    p.add_argument("--group-by", default=None,
                   help="comma-separated grouping columns (default: fracture_type,sex where available)")
    p.add_argument("--write-thresholds", type=Path, default=None,
                   help="TOML file whose [sarcopenia] section receives the calibrated CT SMI cut-offs")
    p.set_defaults(func=cmd_cohort)


def add_offline_commands(add: AddCommand) -> None:
    """The model-work and research commands, added with ``add(name, help)`` (which adds ``--config``)."""
    add_training_commands(add)
    add_research_commands(add)
    add_evaluation_commands(add)


def _add_evaluate_implants(add: AddCommand) -> None:
    p = add("evaluate-implants", "phantom pairs with an implant at follow-up: each muscle's change within 5 pp of the "
            "truth, or withheld near metal with its reason (with and without the withholding rule)")
    p.add_argument("--bundle", type=Path, default=DEMO_BUNDLE, help="default %(default)s")
    p.add_argument("--pairs", type=int, default=6, help="number of pairs (default %(default)s)")
    p.add_argument("--seed", type=int, default=18,
                   help="subject set (default %(default)s, the test pairs; 17: the pairs the withholding thresholds "
                        "were chosen on; no demo training or calibration set uses either)")
    p.add_argument("--spacing", type=float, default=3.0, help="phantom voxel size in mm (default %(default)s)")
    p.add_argument("--threshold", type=float, default=None, metavar="PCT",
                   help="withhold from this share of voxels near metal (default: the node configuration's "
                        "prior.metal_withhold_near_pct)")
    p.add_argument("--slices-threshold", type=float, default=None, metavar="PCT",
                   help="withhold from this share of voxels in slices holding metal (default: the node "
                        "configuration's prior.metal_withhold_slices_pct)")
    p.add_argument("--keep-partial", action="store_true",
                   help="compare structures the field of view cuts over the common range (default: the node "
                        "configuration's prior.withhold_partial, which withholds them)")
    p.add_argument("--uncertainty-samples", type=int, default=2, choices=(0, 2, 3, 4), metavar="N",
                   help="test-time augmentations per scan, as the node's [model] uncertainty_samples (default "
                        "%(default)s; 0: off); each row records the largest volume CV and entropy of either scan")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write every row and the summaries as JSON")
    p.set_defaults(func=cmd_evaluate_implants, log_level="INFO")
