"""Models compared on the same patients, paired per patient, from their `tumorseg evaluate`
reports.

The first report is the baseline; each other report is compared with it patient by patient:
Dice mean and median, the mean difference with a bootstrap 95% interval, a sign test, the
patients below Dice 0.7, and the mean precision and recall (which failure kind a change
moves: recall up with precision down is more over-segmentation).

    python benchmarks/compare_reports.py BASE/eval CAND1/eval [CAND2/eval ...] \\
        [--names base,cand1,cand2] [--json result.json]

Several folds of each model can be pooled by giving comma-joined folders in the same order:
`shipped-0/eval,shipped-1/eval fold0/eval,fold1/eval`.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from tumorseg.errors import TumorsegError
from tumorseg.metrics import paired_comparison


def read_reports(folders: str) -> dict[str, dict[str, float]]:
    """{patient: {"dice", "precision", "recall"}} of the per_patient.csv of each folder
    (comma-separated)."""
    rows: dict[str, dict[str, float]] = {}
    for folder in folders.split(","):
        path = Path(folder) / "per_patient.csv"
        if not path.is_file():
            raise TumorsegError(f"{path}: not found; give the --out folder of a `tumorseg evaluate` run")
        with path.open(newline="") as f:
            for r in csv.DictReader(f):
                if r["patient"] in rows:
                    raise TumorsegError(f"{path}: patient {r['patient']} is in two of the reports pooled")
                rows[r["patient"]] = {k: float(r[k]) for k in ("dice", "precision", "recall")}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", help="evaluate --out folders (comma-joined to pool folds); first "
                                                   "the baseline")
    parser.add_argument("--names", default=None, help="comma-separated names of the reports")
    parser.add_argument("--json", default=None, help="also write the comparisons here")
    a = parser.parse_args()
    if len(a.reports) < 2:
        parser.error("give a baseline and at least one candidate")
    names = a.names.split(",") if a.names else [r.split(",")[0] for r in a.reports]
    if len(names) != len(a.reports):
        parser.error(f"--names has {len(names)} names for {len(a.reports)} reports")
    try:
        reports = [read_reports(r) for r in a.reports]
    except TumorsegError as e:
        parser.exit(1, f"error: {e}\n")
    base = reports[0]
    out = []
    print(f"{len(base)} patients; baseline {names[0]}")
    print(f"{'model':<22} {'Dice mean':>9} {'median':>7} {'difference [95% CI]':>28} {'+/-/=':>9} {'sign p':>7} "
          f"{'<0.7':>5} {'precision':>9} {'recall':>7}")
    for name, folders, rep in zip(names, a.reports, reports, strict=True):
        try:
            paired = paired_comparison({p: v["dice"] for p, v in base.items()},
                                       {p: v["dice"] for p, v in rep.items()})
        except TumorsegError as e:
            parser.exit(1, f"error: {name}: {e}\n")
        precision = float(np.mean([v["precision"] for v in rep.values()]))
        recall = float(np.mean([v["recall"] for v in rep.values()]))
        lo, hi = paired["bootstrap_ci95"]
        diff = f"{paired['mean_difference']:+.4f} [{lo:+.4f}, {hi:+.4f}]" if rep is not base else "baseline"
        counts = f"{paired['better']}/{paired['worse']}/{paired['same']}" if rep is not base else ""
        p = f"{paired['sign_test_p']:.3g}" if rep is not base else ""
        print(f"{name:<22} {paired['mean']['candidate']:>9.4f} {paired['median']['candidate']:>7.4f} {diff:>28} "
              f"{counts:>9} {p:>7} {len(paired['below']['candidate']):>5} {precision:>9.4f} {recall:>7.4f}")
        out.append({"name": name, "report": folders, "precision_mean": precision,
                    "recall_mean": recall, **paired})
    if a.json:
        Path(a.json).write_text(json.dumps({"baseline": names[0], "comparisons": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
