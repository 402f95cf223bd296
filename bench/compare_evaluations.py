"""Accuracy of inference settings against a baseline, from `thighnode evaluate --csv` tables.

Usage: .venv/bin/python bench/compare_evaluations.py BASELINE.csv NAME=OTHER.csv [NAME=OTHER.csv ...]

Per structure (sides together, mean over the cases) Dice and volume error (RAVD) of each table beside the
baseline's, and the decision rule of the README (*Segment stage on CPU*): a setting may become the default
when, against the baseline on the same cases, the mean Dice drops by <= 0.002, the mean volume error rises by
<= 0.2 percentage points and no structure's mean Dice drops by more than 0.01. Figures only; exit 0.
"""

from __future__ import annotations

import csv
import math
import sys
from collections import defaultdict
from pathlib import Path

MAX_MEAN_DICE_DROP = 0.002
MAX_MEAN_RAVD_RISE_PP = 0.2
MAX_STRUCTURE_DICE_DROP = 0.01


def read_table(path: Path) -> tuple[set[str], dict[str, tuple[float, float]]]:
    """(cases, key -> (mean Dice, mean RAVD)) over the cases, sides together, NaN left out."""
    dice: dict[str, list[float]] = defaultdict(list)
    ravd: dict[str, list[float]] = defaultdict(list)
    cases: set[str] = set()
    with Path(path).open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["side"] != "both":
                continue
            cases.add(row["case"])
            d, r = float(row["dice"]), float(row["ravd"])
            dice[row["key"]] += [] if math.isnan(d) else [d]
            ravd[row["key"]] += [] if math.isnan(r) else [r]
    keys = list(dict.fromkeys([*dice, *ravd]))
    mean = lambda v: sum(v) / len(v) if v else math.nan  # noqa: E731
    return cases, {k: (mean(dice[k]), mean(ravd[k])) for k in keys}


def summary(per_key: dict[str, tuple[float, float]], cases_dice: float) -> tuple[float, float]:
    ravd = [r for _, r in per_key.values() if not math.isnan(r)]
    return cases_dice, sum(ravd) / len(ravd)


def mean_dice(path: Path) -> float:
    """Mean over cases and structures of Dice (as EvaluationReport.mean_dice)."""
    with Path(path).open(newline="", encoding="utf-8") as fh:
        vals = [float(r["dice"]) for r in csv.DictReader(fh) if r["side"] == "both" and not math.isnan(float(r["dice"]))]
    return sum(vals) / len(vals)


def verdict(base: dict[str, tuple[float, float]], other: dict[str, tuple[float, float]],
            base_means: tuple[float, float], other_means: tuple[float, float]) -> list[str]:
    """What breaks the decision rule (empty: it passes)."""
    out = []
    if base_means[0] - other_means[0] > MAX_MEAN_DICE_DROP:
        out.append(f"mean Dice drops {base_means[0] - other_means[0]:.4f} > {MAX_MEAN_DICE_DROP}")
    if 100 * (other_means[1] - base_means[1]) > MAX_MEAN_RAVD_RISE_PP:
        out.append(f"mean volume error rises {100 * (other_means[1] - base_means[1]):.2f} pp > {MAX_MEAN_RAVD_RISE_PP} pp")
    for key, (d0, _) in base.items():
        d1 = other.get(key, (math.nan, math.nan))[0]
        if not math.isnan(d0) and (math.isnan(d1) or d0 - d1 > MAX_STRUCTURE_DICE_DROP):
            out.append(f"{key}: Dice drops {d0 - d1:.4f} > {MAX_STRUCTURE_DICE_DROP}")
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    base_path = Path(argv[0])
    base_cases, base = read_table(base_path)
    base_means = summary(base, mean_dice(base_path))
    others = []
    for arg in argv[1:]:
        name, _, path = arg.partition("=")
        cases, table = read_table(Path(path))
        if cases != base_cases:
            print(f"{name}: cases differ from the baseline's ({len(cases)} vs {len(base_cases)}); not compared")
            continue
        others.append((name, table, summary(table, mean_dice(Path(path)))))
    print(f"{len(base_cases)} cases; Dice and RAVD % per structure (mean over cases), delta = setting - baseline")
    head = f"{'structure':<24}{'base Dice':>10}{'RAVD %':>8}"
    for name, _, _ in others:
        head += f"{name + ' dDice':>18}{'dRAVD pp':>10}"
    print(head)
    for key, (d0, r0) in base.items():
        line = f"{key:<24}{d0:>10.4f}{100 * r0:>8.2f}"
        for _, table, _ in others:
            d1, r1 = table.get(key, (math.nan, math.nan))
            line += f"{d1 - d0:>+18.4f}{100 * (r1 - r0):>+10.2f}"
        print(line)
    line = f"{'MEAN':<24}{base_means[0]:>10.4f}{100 * base_means[1]:>8.2f}"
    for _, _, means in others:
        line += f"{means[0] - base_means[0]:>+18.4f}{100 * (means[1] - base_means[1]):>+10.2f}"
    print(line)
    for name, table, means in others:
        broken = verdict(base, table, base_means, means)
        print(f"{name}: mean Dice {means[0]:.4f} (baseline {base_means[0]:.4f}), mean volume error "
              f"{100 * means[1]:.2f} % ({100 * base_means[1]:.2f} %): "
              + ("PASSES the rule" if not broken else "FAILS: " + "; ".join(broken)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
