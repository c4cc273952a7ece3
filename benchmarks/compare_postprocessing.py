"""Two post-processing settings compared out of fold, paired per patient.

Each patient of DATA is predicted by the model of the fold ensemble MODEL that never saw
it (the probabilities are kept in OUT/probabilities and shared with `tumorseg
calibrate-qc --out OUT`); both settings are applied to the same probabilities and their
per-patient Dice compared: mean and median, the mean difference with a bootstrap 95%
interval, a sign test, and the patients below Dice 0.7 under each.

    python benchmarks/compare_postprocessing.py MODEL --data kaggle_3m --out DIR \\
        --baseline 0.5,lcc --candidate 0.5,top_mass [--json result.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tumorseg.calibration import compare_out_of_fold
from tumorseg.config import InferenceConfig


def setting(text: str) -> InferenceConfig:
    threshold, _, method = text.partition(",")
    return InferenceConfig(threshold=float(threshold), postprocess=method or "none")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a fold ensemble file (each model keeps its split)")
    parser.add_argument("--data", required=True, help="the labelled data it was cross-validated on")
    parser.add_argument("--out", required=True, help="folder of the out-of-fold probabilities (reused)")
    parser.add_argument("--baseline", type=setting, default=None, help="THRESHOLD,METHOD (default: the model's)")
    parser.add_argument("--candidate", type=setting, required=True, help="THRESHOLD,METHOD")
    parser.add_argument("--json", default=None, help="also write the whole comparison here")
    a = parser.parse_args()
    result = compare_out_of_fold(a.model, a.data, a.out, a.candidate, a.baseline, progress=True)
    print(f"{result['patients']} patients out of fold")
    print(f"{'setting':<24} {'Dice mean':>9} {'median':>7} {'below 0.7':>9}")
    for side in ("baseline", "candidate"):
        s = result[side]
        name = f"{s['threshold']:g}, {s['postprocess']}"
        print(f"{name:<24} {result['dice_mean'][side]:>9.4f} {result['dice_median'][side]:>7.4f} "
              f"{len(result['below'][side]):>9}")
    lo, hi = result["bootstrap_ci95"]
    print(f"candidate - baseline: {result['mean_difference']:+.4f} [{lo:+.4f}, {hi:+.4f}] (bootstrap 95%); "
          f"{result['better']} better, {result['worse']} worse, {result['same']} the same; sign test "
          f"p = {result['sign_test_p']:.3g}")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
