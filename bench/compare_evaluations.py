"""Accuracy of inference settings against a baseline, from `thighnode evaluate --csv` tables.

Usage: .venv/bin/python bench/compare_evaluations.py BASELINE.csv NAME=OTHER.csv [NAME=OTHER.csv ...]
Each CSV may be a glob (quoted), e.g. 'out/fp32__*.csv' for one evaluation per case; only the cases every
table holds are compared.

Per structure (sides together, mean over the cases) Dice and volume error (RAVD) of each table beside the
baseline's, and the decision rule of the README (*Segment stage on CPU*): a setting may become the default
when, against the baseline on the same cases, the mean Dice drops by <= 0.002, the mean volume error rises by
<= 0.2 percentage points and no structure's mean Dice drops by more than 0.01. Figures only; exit 0.
"""

from __future__ import annotations

import csv
import glob
import math
import sys
from collections import defaultdict
from pathlib import Path

MAX_MEAN_DICE_DROP = 0.002
MAX_MEAN_RAVD_RISE_PP = 0.2
MAX_STRUCTURE_DICE_DROP = 0.01


def read_rows(pattern: str) -> list[dict[str, str]]:
    """The "both sides" rows of every CSV matching ``pattern`` (a path or a glob)."""
    paths = sorted(glob.glob(pattern)) or [pattern]
    rows = []
    for path in paths:
        with Path(path).open(newline="", encoding="utf-8") as fh:
            rows += [r for r in csv.DictReader(fh) if r["side"] == "both"]
    return rows


def table(rows: list[dict[str, str]], cases: set[str]) -> tuple[dict[str, tuple[float, float]], tuple[float, float]]:
    """key -> (mean Dice, mean RAVD) over ``cases``, NaN left out; and (mean Dice over cases and structures,
    as EvaluationReport.mean_dice; mean over structures of their mean RAVD, as its MEAN row)."""
    dice: dict[str, list[float]] = defaultdict(list)
    ravd: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if row["case"] in cases:
            d, r = float(row["dice"]), float(row["ravd"])
            dice[row["key"]] += [] if math.isnan(d) else [d]
            ravd[row["key"]] += [] if math.isnan(r) else [r]
    mean = lambda v: sum(v) / len(v) if v else math.nan  # noqa: E731
    per_key = {k: (mean(dice[k]), mean(ravd[k])) for k in dict.fromkeys([*dice, *ravd])}
    all_dice = [d for v in dice.values() for d in v]
    return per_key, (mean(all_dice), mean([r for _, r in per_key.values() if not math.isnan(r)]))


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
    base_rows = read_rows(argv[0])
    named = [(arg.partition("=")[0], read_rows(arg.partition("=")[2])) for arg in argv[1:]]
    base_cases = {r["case"] for r in base_rows}
    for _, rows in named:
        base_cases &= {r["case"] for r in rows}
    base, base_means = table(base_rows, base_cases)
    others = [(name, *table(rows, base_cases)) for name, rows in named]
    print("cases: " + ", ".join(sorted(base_cases)))
    print(f"{len(base_cases)} cases; Dice and RAVD % per structure (mean over cases), delta = setting - baseline")
    head = f"{'structure':<24}{'base Dice':>10}{'RAVD %':>8}"
    for name, _, _ in others:
        head += f"{name + ' dDice':>18}{'dRAVD pp':>10}"
    print(head)
    for key, (d0, r0) in base.items():
        line = f"{key:<24}{d0:>10.4f}{100 * r0:>8.2f}"
        for _, tab, _ in others:
            d1, r1 = tab.get(key, (math.nan, math.nan))
            line += f"{d1 - d0:>+18.4f}{100 * (r1 - r0):>+10.2f}"
        print(line)
    line = f"{'MEAN':<24}{base_means[0]:>10.4f}{100 * base_means[1]:>8.2f}"
    for _, _, means in others:
        line += f"{means[0] - base_means[0]:>+18.4f}{100 * (means[1] - base_means[1]):>+10.2f}"
    print(line)
    for name, tab, means in others:
        broken = verdict(base, tab, base_means, means)
        print(f"{name}: mean Dice {means[0]:.4f} (baseline {base_means[0]:.4f}), mean volume error "
              f"{100 * means[1]:.2f} % ({100 * base_means[1]:.2f} %): "
              + ("PASSES the rule" if not broken else "FAILS: " + "; ".join(broken)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
