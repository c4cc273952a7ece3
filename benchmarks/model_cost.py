"""Inference cost of whole models (a single checkpoint against a fold ensemble, say) on
whole patients, on this machine.

    python benchmarks/model_cost.py --data kaggle_3m \
        --model single=runs/final-88/last.pt --model ensemble=ensemble.pt \
        [--split runs/cv-test/splits.json] [--patients 6] [--engine auto] [--json OUT]

Each model runs through `Predictor.segment` (normalise, predict, post-process with the
model's own stored inference settings, which may differ between the models), on the
split's test patients (or the first patients of the data). One warm-up patient per
model, then the patients round-robin over the models, so that a busy moment of the
machine hits every row alike. Prints seconds per patient (mean and median), slices per
second and the ratio to the first model. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from tumorseg import Predictor
from tumorseg.data.cache import open_data
from tumorseg.data.splits import load_split
from tumorseg.evaluation import segment_cached


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="kaggle_3m folder or prepared cache")
    ap.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                    help="a checkpoint or ensemble file, named for the table (repeat; the first is the baseline)")
    ap.add_argument("--split", type=Path, help="splits.json: time its test patients (default: the data's first)")
    ap.add_argument("--patients", type=int, default=6, help="patients timed (default: 6)")
    ap.add_argument("--engine", default="auto", help="torch, onnxruntime, openvino or auto (default: auto)")
    ap.add_argument("--json", type=Path, metavar="OUT", help="write the results as JSON to OUT")
    args = ap.parse_args(argv)

    models: dict[str, str] = {}
    for m in args.model:
        name, sep, path = m.partition("=")
        if not sep or not name or not path or name in models:
            raise SystemExit(f"--model {m!r}: give NAME=PATH, with a name not used before")
        models[name] = path
    cache = open_data(args.data, progress=False)
    pool = list(load_split(args.split).test) if args.split else cache.patients
    patients = pool[: args.patients]
    if not patients:
        raise SystemExit("no patients to time (a split without test patients?)")
    missing = [p for p in patients if p not in cache.records]
    if missing:
        raise SystemExit(f"{', '.join(missing)} not in {args.data}; pass the data the split was made of")
    predictors = {name: Predictor.from_checkpoints(path, engine=args.engine, device="cpu")
                  for name, path in models.items()}
    for predictor in predictors.values():
        segment_cached(predictor, cache, patients[0])  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in predictors}
    for p in patients:
        for name, predictor in predictors.items():
            t0 = time.perf_counter()
            segment_cached(predictor, cache, p)
            seconds[name].append(time.perf_counter() - t0)
    slices = sum(len(cache.records[p].slices) for p in patients)
    base = statistics.mean(seconds[next(iter(predictors))])
    rows = []
    for name, predictor in predictors.items():
        s = seconds[name]
        rows.append({"model": name, "path": models[name], "members": predictor.members,
                     "engine": predictor.engine.name, "precision": predictor.precision,
                     "seconds_per_patient": statistics.mean(s), "median_seconds": statistics.median(s),
                     "slices_per_second": slices / sum(s), "ratio_to_first": statistics.mean(s) / base})
    print(f"{len(patients)} patients, {slices} slices; {torch.get_num_threads()} threads")
    print(f"{'model':<14} {'members':>7} {'engine':<22} {'s/patient':>9} {'median':>7} {'slices/s':>8} {'ratio':>6}")
    for r in rows:
        print(f"{r['model']:<14} {r['members']:>7} {r['engine'] + ' ' + r['precision']:<22} "
              f"{r['seconds_per_patient']:>9.2f} {r['median_seconds']:>7.2f} {r['slices_per_second']:>8.1f} "
              f"{r['ratio_to_first']:>6.2f}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "patients": patients, "seconds": seconds,
                                         "threads": torch.get_num_threads()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
