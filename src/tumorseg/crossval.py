"""Cross-validation: every fold of one patient split trained into its own run folder, every
patient scored by the fold model that never saw it, and the threshold and post-processing
chosen on those out-of-fold predictions (as nnU-Net's determine_postprocessing does).

    RUN/splits.json                            the split all folds share
    RUN/fold_<k>/                              a training run validating on fold k (engine.fit)
    RUN/crossval/probabilities/<patient>.npy   float16 (S, H, W): out-of-fold probabilities
    RUN/crossval/postprocessing.json           every candidate with its out-of-fold Dice, and the choice
    RUN/crossval/report.json, per_patient.csv, dice_distribution.png, examples.png
                                               the chosen setting, in evaluate's shape, plus the
                                               fold of each patient and a summary per fold

The fold models are the last epoch of each run (`last.pt`): `best.pt` was chosen on the
very patients it would be scored on. `crossval` resumes: finished folds are skipped, an
interrupted fold continues, probabilities already written are reused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from tumorseg.checkpoint import load_checkpoint
from tumorseg.config import NORM_PERCENTILES, InferenceConfig, TrainConfig
from tumorseg.data.cache import Cache, open_data
from tumorseg.data.splits import Split, load_split, make_split, save_split
from tumorseg.engine import fit
from tumorseg.errors import TumorsegError
from tumorseg.evaluation import ScoredPatient, score_volume, summarize, write_report
from tumorseg.fileio import atomic_write, atomic_write_text, check_output_dir
from tumorseg.inference import Predictor
from tumorseg.metrics import confusion_counts, dice_from_counts
from tumorseg.postprocess import binarize

log = logging.getLogger(__name__)

# The candidates, simplest first: a later one is chosen only when it scores higher.
THRESHOLDS: tuple[float, ...] = (0.5, 0.4, 0.6, 0.3, 0.7)
METHODS: tuple[str, ...] = ("none", "lcc", "min_size:10", "min_size:50", "min_size:200", "confident:0.8",
                            "confident:0.9", "confident:0.95")


def prepare_run(cfg: TrainConfig, cache: Cache, run_dir: Path) -> Split:
    """The split of the run: RUN/splits.json when it exists (checked against `cfg` and the
    data), else a new one by `cfg`'s folds, test fraction and seed."""
    path = run_dir / "splits.json"
    if path.is_file():
        split = load_split(path)
        if len(split.folds) != cfg.folds:
            raise TumorsegError(f"{path} has {len(split.folds)} folds, the config asks for {cfg.folds}; "
                                "choose another --out or the same --folds")
    else:
        split = make_split(cache.patients, cfg.folds, cfg.test_fraction, cfg.split_seed)
        save_split(split, path)
    missing = sorted({p for f in split.folds for p in f} - set(cache.patients))
    if missing:
        raise TumorsegError(f"{path} names patients absent from the data: {', '.join(missing[:5])}")
    return split


def train_folds(cfg: TrainConfig, cache: Cache, run_dir: Path, *, device: str = "auto",
                show_progress: bool = True, data_path: str | None = None) -> bool:
    """Train every fold of the run that is not finished; returns False when a fold was
    interrupted (Ctrl-C), True when all are done."""
    split = prepare_run(cfg, cache, run_dir)
    for k in range(len(split.folds)):
        fold_dir = run_dir / f"fold_{k}"
        last = fold_dir / "last.pt"
        if last.is_file():
            state = load_checkpoint(last)
            if state.epoch >= cfg.epochs and (state.training is None or not state.training.progress.get("step")):
                log.info(f"fold {k}: done ({state.epoch} epochs), skipped")
                continue
            result = fit(cfg, cache, fold_dir, resume=True, device=device, show_progress=show_progress,
                         data_path=data_path)
        else:
            result = fit(dataclasses.replace(cfg, fold=k), cache, fold_dir, split_file=run_dir / "splits.json",
                         device=device, show_progress=show_progress, data_path=data_path)
        if result.interrupted:
            return False
    return True


def out_of_fold(cache: Cache, run_dir: Path, split: Split, *, device: str = "auto", precision: str = "auto",
                show_progress: bool = True) -> dict[str, tuple[int, np.ndarray]]:
    """{patient: (fold, probabilities float32 (S, H, W))} of every fold patient, each from the
    last.pt of the fold that held it out; written to (and reused from)
    RUN/crossval/probabilities/<patient>.npy as float16."""
    folder = run_dir / "crossval" / "probabilities"
    out: dict[str, tuple[int, np.ndarray]] = {}
    todo = [(k, p) for k, fold in enumerate(split.folds) for p in sorted(fold)]
    predictors: dict[int, Predictor] = {}
    for k, patient in tqdm(todo, desc="out-of-fold predictions", unit="patient",
                           disable=None if show_progress else True):
        path = folder / f"{patient}.npy"
        if path.is_file():
            out[patient] = (k, np.load(path).astype(np.float32))
            continue
        if k not in predictors:  # raw probabilities: the choice of threshold and post-processing comes later
            predictors[k] = Predictor.from_checkpoints(run_dir / f"fold_{k}" / "last.pt", threshold=0.5,
                                                       postprocess="none", tta=False, device=device,
                                                       precision=precision)
        rec = cache.records[patient]
        same = predictors[k].percentiles == NORM_PERCENTILES
        probs = predictors[k].segment(np.asarray(cache.images(patient)), rec.low if same else None,
                                      rec.high if same else None).probabilities
        atomic_write(path, lambda f, a=probs: np.save(f, a.astype(np.float16)))
        out[patient] = (k, probs.astype(np.float16).astype(np.float32))  # as reused later: the same numbers
    return out


def choose_postprocessing(probs: dict[str, np.ndarray], truths: dict[str, np.ndarray],
                          thresholds: tuple[float, ...] = THRESHOLDS,
                          methods: tuple[str, ...] = METHODS) -> tuple[InferenceConfig, list[dict[str, Any]]]:
    """The threshold and post-processing with the highest mean per-patient Dice over the
    patients of `probs` (out-of-fold probabilities, (S, H, W) each) against `truths`;
    on a tie the earlier, simpler candidate stays. Returns (the choice, the table of every
    candidate with its mean and median Dice)."""
    table = []
    best: tuple[float, InferenceConfig] | None = None
    for t in thresholds:
        for m in methods:
            candidate = InferenceConfig(threshold=t, postprocess=m)
            dices = np.array([dice_from_counts(confusion_counts(binarize(probs[p], candidate), truths[p]))
                              for p in sorted(probs)])
            mean = float(dices.mean())
            table.append({"threshold": t, "postprocess": m, "dice_mean": mean, "dice_median": float(np.median(dices))})
            if best is None or mean > best[0]:
                best = (mean, candidate)
    if best is None:
        raise TumorsegError("no candidates to choose from")
    return best[1], table


def crossval(
    cfg: TrainConfig,
    data: str | Path,
    run_dir: str | Path,
    *,
    device: str = "auto",
    precision: str = "auto",
    show_progress: bool = True,
    plots: bool = True,
) -> dict[str, Any] | None:
    """Train every fold of `cfg`'s split on the data at `data` into `run_dir`, then score
    each fold patient out of fold with the threshold and post-processing chosen on those
    predictions. Returns the report (None when training was interrupted: run it again to
    continue).

    Raises:
        TumorsegError: bad data or config, an unusable run folder, or a split that does
            not fit the config.
    """
    run_dir = Path(run_dir)
    check_output_dir(run_dir)
    cache = open_data(data, progress=show_progress)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=1) + "\n")
    if not train_folds(cfg, cache, run_dir, device=device, show_progress=show_progress,
                       data_path=str(Path(data).resolve())):
        return None
    split = prepare_run(cfg, cache, run_dir)
    oof = out_of_fold(cache, run_dir, split, device=device, precision=precision, show_progress=show_progress)
    truths = {p: np.asarray(cache.masks(p)) > 0 for p in oof}
    chosen, table = choose_postprocessing({p: v[1] for p, v in oof.items()}, truths)
    atomic_write_text(run_dir / "crossval" / "postprocessing.json",
                      json.dumps({"chosen": chosen.to_dict(), "criterion": "mean per-patient Dice, out of fold",
                                  "candidates": table}, indent=1) + "\n")
    scored: list[ScoredPatient] = []
    for patient, (k, probs) in sorted(oof.items()):
        rec = cache.records[patient]
        scored.append(score_volume(patient, binarize(probs, chosen), truths[patient],
                                   np.asarray(cache.images(patient)), rec.slices, fold=k))
    folds = []
    for k in range(len(split.folds)):
        members = [p.scores for p in scored if p.extra["fold"] == k]
        s = summarize(members, [d for p in scored if p.extra["fold"] == k for d in p.slice_dices],
                      sum(p.fp_slices for p in scored if p.extra["fold"] == k),
                      sum(p.empty_slices for p in scored if p.extra["fold"] == k))
        folds.append({"fold": k, "patients": s["patients"], "dice_mean": s["dice_mean"],
                      "dice_median": s["dice_median"]})
    header = {"run": str(run_dir), "models": [str(run_dir / f"fold_{k}" / "last.pt") for k in range(len(folds))],
              "threshold": chosen.threshold, "postprocess": chosen.postprocess, "tta": False,
              "chosen_on": "these out-of-fold predictions (see postprocessing.json)",
              "test_patients": sorted(split.test)}
    return write_report(run_dir / "crossval", header, scored, plots=plots, sections={"folds": folds})


def export_run(run_dir: str | Path, dst: str | Path, *, threshold: float | None = None,
               postprocess: str | None = None) -> Path:
    """Write the fold models of a cross-validation run as one ensemble file (float16
    weights) with the threshold and post-processing chosen on its out-of-fold predictions
    (RUN/crossval/postprocessing.json), overridden where given, and its out-of-fold summary.

    Raises:
        TumorsegError: not a finished cross-validation run, or a bad setting.
    """
    from tumorseg.checkpoint import export_ensemble

    run_dir = Path(run_dir)
    split = run_dir / "splits.json"
    chosen_path = run_dir / "crossval" / "postprocessing.json"
    if not split.is_file() or not chosen_path.is_file():
        raise TumorsegError(f"{run_dir} is not a finished cross-validation run (no splits.json or "
                            "crossval/postprocessing.json); run `tumorseg crossval` first")
    folds = len(load_split(split).folds)
    sources = [run_dir / f"fold_{k}" / "last.pt" for k in range(folds)]
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        raise TumorsegError(f"{missing[0]} is missing; finish the run with `tumorseg crossval` first")
    chosen = InferenceConfig.from_dict(json.loads(chosen_path.read_text())["chosen"])
    inference = chosen.replace(threshold=threshold, postprocess=postprocess)
    report_path = run_dir / "crossval" / "report.json"
    summary = json.loads(report_path.read_text())["summary"] if report_path.is_file() else {}
    check_output_dir(Path(dst).parent)
    return export_ensemble(sources, dst, inference=inference, metrics={"out_of_fold": summary},
                           notes=f"{folds}-fold ensemble of {run_dir.name}")
