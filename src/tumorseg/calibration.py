"""Calibrating the quality-control flag of a fold ensemble on its out-of-fold predictions.

Each model of a fold ensemble never saw the patients of its own fold (its split's "val"
list); predicting each patient with that one model gives honest, out-of-fold
probabilities. From them `calibrate_qc` computes each patient's QC features and Dice,
fits the rule (`qc.calibrate`) and writes:

    OUT/probabilities/<patient>.npy   float16 (S, H, W): the out-of-fold probabilities,
                                      reused while the model is the same (sources.json)
    OUT/qc_calibration.json           the rule, the report (out-of-fold sensitivity and
                                      specificity with Wilson intervals, AUC, per patient)
    OUT/qc_features.csv               one row per patient: fold, Dice, the features

`store_rule` writes the rule into the model file, where `read_qc_rule` (and a Predictor's
caller) finds it. `compare_postprocessing` compares two post-processing settings on the
same out-of-fold probabilities (paired per patient).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from tumorseg.checkpoint import Checkpoint, load_members, read_qc_entry, store_qc_entry, weights_digest
from tumorseg.config import InferenceConfig
from tumorseg.data.cache import Cache, open_data
from tumorseg.engines import choose_engine
from tumorseg.errors import TumorsegError
from tumorseg.evaluation import patient_spacing, segment_cached
from tumorseg.fileio import atomic_write, atomic_write_text, prepare_output_dir
from tumorseg.inference import Predictor
from tumorseg.metrics import confusion_counts, dice_from_counts, paired_comparison
from tumorseg.postprocess import binarize
from tumorseg.qc import BAD_BELOW, MIN_SPECIFICITY, QCRule, calibrate, patient_features

log = logging.getLogger(__name__)


def fold_patients(members: list[Checkpoint], patients: Iterable[str]) -> dict[str, int]:
    """{patient: index of the model that never saw it} for the `patients` in some model's
    own split's "val" list (the first such model when several hold one out).

    Raises:
        TumorsegError: a model without its own split (not a fold ensemble).
    """
    held: dict[str, int] = {}
    for k, ck in enumerate(members):
        val = (ck.split or {}).get("val")
        if not isinstance(val, list):
            raise TumorsegError(f"{ck.path}: model {k + 1} keeps no split of its own; calibrating the QC flag "
                                "needs a fold ensemble (`tumorseg export RUN` of a cross-validation run)")
        for p in val:
            held.setdefault(p, k)
    wanted = set(patients)
    return {p: k for p, k in sorted(held.items()) if p in wanted}


def _predictor(ck: Checkpoint, *, device: str, engine: str) -> Predictor:
    # Raw probabilities of one model, in fp32 (with its own TTA setting): threshold and
    # post-processing are applied here.
    chosen = choose_engine(engine, [ck], None, device=device, precision="fp32")
    return Predictor(engine=chosen, channels=ck.channels, percentiles=ck.percentiles,
                     inference=InferenceConfig(threshold=0.5, postprocess="none", tta=ck.inference.tta), source=ck.path)


def out_of_fold_probabilities(members: list[Checkpoint], cache: Cache, folder: Path, *, device: str = "cpu",
                              engine: str = "auto", progress: bool = True) -> Iterator[tuple[str, int, np.ndarray]]:
    """(patient, model index, probabilities float32 (S, H, W)) of every patient of `cache`
    that a model of `members` held out, predicted by that model; saved to
    folder/<patient>.npy as float16 and reused while the model's weights are the same
    (folder/sources.json). The probabilities given are the float16 ones, as reused later."""
    folder.mkdir(parents=True, exist_ok=True)
    sources_path = folder / "sources.json"
    try:
        saved = json.loads(sources_path.read_text()) if sources_path.is_file() else {}
    except (OSError, ValueError):
        saved = {}
    digests = [weights_digest([ck]) for ck in members]
    held = fold_patients(members, cache.patients)
    predictors: dict[int, Predictor] = {}
    for patient, k in tqdm(held.items(), desc="out-of-fold probabilities", unit="patient",
                           disable=None if progress else True):
        path = folder / f"{patient}.npy"
        source = {"member": k, "weights": digests[k]}
        if path.is_file() and saved.get(patient) == source:
            yield patient, k, np.load(path).astype(np.float32)
            continue
        if k not in predictors:
            predictors[k] = _predictor(members[k], device=device, engine=engine)
        predictor = predictors[k]
        probs = segment_cached(predictor, cache, patient).probabilities
        half = probs.astype(np.float16)
        atomic_write(path, lambda f, a=half: np.save(f, a))
        saved[patient] = source
        atomic_write_text(sources_path, json.dumps(saved, indent=1) + "\n")
        yield patient, k, half.astype(np.float32)


def calibrate_qc(model_path: str | Path, data: str | Path, out_dir: str | Path, *, device: str = "cpu",
                 engine: str = "auto", progress: bool = True, bad_below: float = BAD_BELOW,
                 min_specificity: float = MIN_SPECIFICITY) -> dict[str, Any]:
    """Calibrate the QC flag of the fold ensemble `model_path` on the labelled data at
    `data` (kaggle_3m or NIfTI folder, or a cache): each patient that a model held out is
    predicted by that model alone; its features (`qc.patient_features` of one model) and
    the Dice of its mask (the ensemble's threshold and post-processing) feed
    `qc.calibrate`, with the model as the fold. Writes OUT/qc_calibration.json and
    OUT/qc_features.csv (see the module docstring). Returns the report, with "rule".

    Raises:
        TumorsegError: not a fold ensemble, no held-out patient in the data, unlabelled
            patients, or an unusable out_dir.
    """
    out = prepare_output_dir(out_dir)
    members = load_members(model_path)
    cache = open_data(data, progress=progress)
    inference = members[0].inference
    names, folds, dices, features = [], [], [], []
    for patient, k, probs in out_of_fold_probabilities(members, cache, out / "probabilities", device=device,
                                                       engine=engine, progress=progress):
        rec = cache.records[patient]
        if not rec.has_masks:
            raise TumorsegError(f"patient {patient} has no masks; calibrating the QC flag needs labelled data")
        mask = binarize(probs, inference)
        truth = np.asarray(cache.masks(patient)) > 0
        names.append(patient)
        folds.append(k)
        dices.append(dice_from_counts(confusion_counts(mask, truth)))
        spacing = patient_spacing(cache.records[patient])
        features.append(patient_features(probs[None], mask, inference, spacing).to_dict())
    if not names:
        raise TumorsegError(f"no patient of {data} was held out by a model of {model_path}; calibrate on the data "
                            "the ensemble was cross-validated on")
    notes = (f"calibrated out of fold on {len(names)} patients of {Path(data).name} "
             f"({inference.threshold:g}, {inference.postprocess})")
    rule, report = calibrate(features, dices, folds, bad_below=bad_below, min_specificity=min_specificity,
                             patients=names, notes=notes)
    report = {"model": str(model_path), "model_weights": weights_digest(members), "data": str(data),
              "inference": inference.to_dict(), "dice_mean": float(np.mean(dices)),
              "dice_median": float(np.median(dices)), **report}
    atomic_write_text(out / "qc_calibration.json", json.dumps(report, indent=1) + "\n")
    buf = io.StringIO()
    keys = list(features[0])
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["patient", "fold", "dice", *keys])
    for name, k, d, f in zip(names, folds, dices, features, strict=True):
        w.writerow([name, k, f"{d:.6f}", *(("" if isinstance(f[c], float) and math.isnan(f[c]) else f"{f[c]:.6g}")
                                           for c in keys)])
    atomic_write_text(out / "qc_features.csv", buf.getvalue())
    return report


def calibration_summary(report: dict[str, Any]) -> dict[str, Any]:
    """What the model file keeps of a calibration report: the out-of-fold performance
    without the per-patient table."""
    oof = {k: v for k, v in report.get("out_of_fold", {}).items() if k != "folds"}
    keep = ("dice_mean", "dice_median", "bad_below", "min_specificity", "inference")
    data = {"data": Path(str(report["data"])).name} if report.get("data") else {}  # no paths of this machine
    return {**data, **{k: report[k] for k in keep if k in report}, "patients": len(report.get("patients", [])),
            "out_of_fold": oof}


def store_rule(model_path: str | Path, rule: QCRule, report: dict[str, Any] | None = None) -> None:
    """Write `rule` (and the summary of its calibration `report`) into the model file, in
    place and atomically; the weights stay as they are. `read_qc_rule` reads it back.

    Raises:
        CheckpointError: not a tumorseg checkpoint file.
    """
    store_qc_entry(model_path, {"rule": rule.to_dict(),
                                "calibration": calibration_summary(report) if report else None})


def read_qc_rule(model_path: str | Path) -> QCRule | None:
    """The QC rule stored in a model file, or None for a file without one (older files).

    Raises:
        CheckpointError: an unreadable file or a damaged entry.
        ConfigError: a rule of a newer version or a damaged one.
    """
    entry = read_qc_entry(model_path)
    return None if entry is None else QCRule.from_dict(entry.get("rule") or {})


def compare_postprocessing(patients: Iterable[tuple[str, np.ndarray, np.ndarray]], baseline: InferenceConfig,
                           candidate: InferenceConfig, *, bad_below: float = BAD_BELOW, resamples: int = 10000,
                           seed: int = 0) -> dict[str, Any]:
    """Per-patient Dice of two inference settings on the same probabilities, paired.

    Args:
        patients: (name, probabilities float (S, H, W), truth bool (S, H, W)) per patient.
        baseline: the setting compared against.
        candidate: the setting compared (differences are candidate - baseline).
        resamples: bootstrap resamples of the patients for the interval of the mean
            difference (percentile interval, generator seeded with `seed`).

    Returns:
        {"baseline", "candidate", "patients", "dice_mean"/"dice_median" of each, "mean_difference",
        "bootstrap_ci95", "better"/"worse"/"same" (patients), "sign_test_p" (two-sided
        binomial test on the patients that differ), "below" (patients under bad_below
        for each), "per_patient"}.
    """
    a, b = {}, {}
    for name, probs, truth in patients:
        a[name] = dice_from_counts(confusion_counts(binarize(probs, baseline), truth))
        b[name] = dice_from_counts(confusion_counts(binarize(probs, candidate), truth))
    if not a:
        raise TumorsegError("no patients to compare the post-processing on")
    paired = paired_comparison(a, b, bad_below=bad_below, resamples=resamples, seed=seed)
    return {"baseline": baseline.to_dict(), "candidate": candidate.to_dict(),
            **{("dice_" + k if k in ("mean", "median") else k): v for k, v in paired.items()}}


def compare_out_of_fold(model_path: str | Path, data: str | Path, out_dir: str | Path, candidate: InferenceConfig,
                        baseline: InferenceConfig | None = None, *, device: str = "cpu", engine: str = "auto",
                        progress: bool = True) -> dict[str, Any]:
    """`compare_postprocessing` of `candidate` against `baseline` (default: the model's own
    setting) on the out-of-fold probabilities of the fold ensemble `model_path` (those of
    `calibrate_qc`, kept in OUT/probabilities and reused)."""
    out = prepare_output_dir(out_dir)
    members = load_members(model_path)
    cache = open_data(data, progress=progress)
    pairs = ((p, probs, np.asarray(cache.masks(p)) > 0)
             for p, _, probs in out_of_fold_probabilities(members, cache, out / "probabilities", device=device,
                                                          engine=engine, progress=progress))
    return compare_postprocessing(pairs, baseline or members[0].inference, candidate)
