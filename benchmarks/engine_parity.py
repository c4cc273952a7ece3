"""Accuracy parity and cost of the inference engines on patients the int8 calibration never saw.

    python benchmarks/engine_parity.py --data kaggle_3m [--checkpoint PATH] [--int8 PATH.xml]
                                       [--patients N] [--json OUT]

Runs the model (default: the shipped model) through `Predictor.segment` on every
installed engine in fp32 (PyTorch, ONNX Runtime, OpenVINO) and, when given or shipped,
its int8 variant. The patients: a single model's validation patients (held out from its
training, and so from the int8 calibration, which draws from training patients only);
for an ensemble (every patient was trained on by some member), the patients of the data
that the int8 variant was not calibrated on. Prints, per engine: per-patient Dice
mean/median, the largest per-patient Dice difference from PyTorch fp32, the pixels
whose mask differs from PyTorch fp32, and the seconds per patient (normalise, predict,
post-process; one engine at a time, after a warm-up patient). Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tumorseg import Predictor
from tumorseg.checkpoint import load_members
from tumorseg.data.cache import open_data
from tumorseg.engines import engine_installed
from tumorseg.evaluation import segment_cached
from tumorseg.inference import default_checkpoint_path, default_int8_path
from tumorseg.metrics import score_patient


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="kaggle_3m folder or prepared cache")
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: the shipped model")
    ap.add_argument("--int8", type=Path, default=None, help="int8 OpenVINO IR (default: the shipped variant, "
                                                            "with the shipped model)")
    ap.add_argument("--patients", type=int, default=0, help="first N of those patients (default: all)")
    ap.add_argument("--json", type=Path, metavar="OUT", help="write the results as JSON to OUT")
    args = ap.parse_args(argv)

    ck_path = args.checkpoint or default_checkpoint_path()
    members = load_members(ck_path)
    int8 = args.int8 or (default_int8_path() if args.checkpoint is None and default_int8_path().is_file() else None)
    calibrated: set[str] = set()
    if int8 is not None:
        from tumorseg.graphs import read_graph_info

        calibrated = set((read_graph_info(int8).calibration or {}).get("patients", []))
        if not calibrated:
            raise SystemExit(f"{int8} records no calibration patients; parity needs patients it never saw")
    cache = open_data(args.data, progress=False)
    held_out = (members[0].split or {}).get("val") if len(members) == 1 else None
    if len(members) == 1 and not held_out:
        raise SystemExit(f"{ck_path} records no validation patients; parity needs patients it never saw")
    patients = [p for p in (held_out or cache.patients) if p not in calibrated][: args.patients or None]
    if not patients:
        raise SystemExit(f"{int8} was calibrated on every candidate patient; parity needs patients it never saw")
    where = ("validation patients of the model" if held_out else "not used for the int8 calibration" if calibrated
             else "of the data (trained on by some member of the ensemble: only the differences count)")
    print(f"{len(patients)} patients: {where}", file=sys.stderr)

    predictors = {}
    for engine in ("torch", "onnxruntime", "openvino"):
        if engine_installed(engine):
            predictors[f"{engine} fp32"] = Predictor.from_checkpoints(ck_path, engine=engine, precision="fp32",
                                                                      device="cpu")
    if int8 is not None:
        predictors["openvino int8"] = Predictor.from_checkpoints(int8)
    dice: dict[str, dict[str, float]] = {k: {} for k in predictors}
    seconds: dict[str, list[float]] = {k: [] for k in predictors}
    masks: dict[str, np.ndarray] = {}
    differing: dict[str, int] = dict.fromkeys(predictors, 0)
    for name, predictor in predictors.items():
        segment_cached(predictor, cache, patients[0])  # warm-up
        for p in patients:
            t0 = time.perf_counter()
            seg = segment_cached(predictor, cache, p)
            seconds[name].append(time.perf_counter() - t0)
            truth = np.asarray(cache.masks(p)) > 0
            dice[name][p] = score_patient(p, seg.mask, truth, surface=False).dice
            if name == "torch fp32":
                masks[p] = seg.mask
            elif p in masks:
                differing[name] += int((seg.mask != masks[p]).sum())
        print(f"{name}: done", file=sys.stderr, flush=True)

    ref = dice.get("torch fp32")
    rows = []
    for name in predictors:
        values = list(dice[name].values())
        row = {"engine": name, "dice_mean": statistics.mean(values), "dice_median": statistics.median(values),
               "seconds_per_patient": statistics.mean(seconds[name]),
               "max_abs_dice_difference": max(abs(dice[name][p] - ref[p]) for p in patients) if ref else None,
               "mean_dice_difference": statistics.mean(dice[name][p] - ref[p] for p in patients) if ref else None,
               "pixels_differing_from_torch_fp32": differing[name] if ref else None}
        rows.append(row)
    print(f"{len(patients)} patients of {ck_path.name} ({len(members)} model(s)); {torch.get_num_threads()} threads")
    print(f"{'engine':<18} {'Dice mean':>9} {'median':>7} {'mean diff':>9} {'max |diff|':>10} "
          f"{'pixels != torch':>15} {'s/patient':>9}")
    for r in rows:
        md = "-" if r["mean_dice_difference"] is None else f"{r['mean_dice_difference']:+.4f}"
        mx = "-" if r["max_abs_dice_difference"] is None else f"{r['max_abs_dice_difference']:.4f}"
        print(f"{r['engine']:<18} {r['dice_mean']:>9.4f} {r['dice_median']:>7.4f} {md:>9} {mx:>10} "
              f"{r['pixels_differing_from_torch_fp32']!s:>15} {r['seconds_per_patient']:>9.2f}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "patients": patients, "per_patient_dice": dice,
                                         "checkpoint": str(ck_path), "int8": str(int8) if int8 else None,
                                         "threads": torch.get_num_threads()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
