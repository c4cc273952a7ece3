"""Segmentation metrics: counts first, then explicit reductions.

Empty-mask rule (used everywhere in tumorseg): when the truth and the prediction are
both empty, Dice, IoU, precision and recall are 1.0 (nothing to find, nothing found)
and HD95 is 0; when exactly one of them is empty, Dice and IoU are 0 and HD95 is NaN
(undefined, left out of means). Precision with no predicted pixel is 1.0 if the truth
is empty too, else 0; recall with no true pixel is 1.0 if nothing was predicted, else 0.

Per-patient Dice (the convention of this data set's literature) is one Dice over all
slices of a patient: counts are summed over the slices, then the ratio is taken.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from tumorseg.errors import TumorsegError


@dataclass(frozen=True)
class Counts:
    tp: int
    fp: int
    fn: int
    tn: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)


def confusion_counts(pred: np.ndarray, truth: np.ndarray) -> Counts:
    """TP/FP/FN/TN of two binary arrays of the same shape."""
    if pred.shape != truth.shape:
        raise ValueError(f"pred and truth shapes differ: {pred.shape} vs {truth.shape}")
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p)) - tp
    fn = int(np.count_nonzero(t)) - tp
    return Counts(tp, fp, fn, p.size - tp - fp - fn)


def dice_from_counts(c: Counts) -> float:
    denom = 2 * c.tp + c.fp + c.fn
    return 1.0 if denom == 0 else 2 * c.tp / denom


def iou_from_counts(c: Counts) -> float:
    denom = c.tp + c.fp + c.fn
    return 1.0 if denom == 0 else c.tp / denom


def precision_from_counts(c: Counts) -> float:
    if c.tp + c.fp == 0:
        return 1.0 if c.fn == 0 else 0.0
    return c.tp / (c.tp + c.fp)


def recall_from_counts(c: Counts) -> float:
    if c.tp + c.fn == 0:
        return 1.0 if c.fp == 0 else 0.0
    return c.tp / (c.tp + c.fn)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels/voxels of a binary mask (the mask minus its erosion)."""
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1),
                                    border_value=0)
    return mask & ~eroded


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...] | None = None) -> float:
    """95th percentile of the symmetric surface distance between two binary masks.

    Works on 2-D slices or 3-D volumes (S, H, W); `spacing` gives the physical size of a
    step along each axis (default 1 = pixels). Both empty: 0. One empty: NaN.
    """
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    if p.shape != t.shape:
        raise ValueError(f"pred and truth shapes differ: {p.shape} vs {t.shape}")
    if spacing is not None and (len(spacing) != p.ndim or not all(math.isfinite(v) and v > 0 for v in spacing)):
        raise ValueError(f"spacing must give one positive step per axis ({p.ndim}), got {spacing}")
    if not p.any() and not t.any():
        return 0.0
    if not p.any() or not t.any():
        return math.nan
    sampling = tuple(spacing) if spacing is not None else (1.0,) * p.ndim
    sp, st = _surface(p), _surface(t)
    dt_t = ndimage.distance_transform_edt(~st, sampling=sampling)
    dt_p = ndimage.distance_transform_edt(~sp, sampling=sampling)
    dists = np.concatenate([dt_t[sp], dt_p[st]])
    return float(np.percentile(dists, 95))


@dataclass(frozen=True)
class PatientScores:
    patient: str
    slices: int
    dice: float
    iou: float
    precision: float
    recall: float
    hd95: float
    true_voxels: int
    pred_voxels: int


def score_patient(patient: str, pred: np.ndarray, truth: np.ndarray, *,
                  spacing: tuple[float, ...] | None = None, surface: bool = True) -> PatientScores:
    """The per-patient scores of tumorseg: one pooled confusion count over all slices of
    the volume, pred and truth binary (S, H, W); used by training validation, `evaluate`
    and the real-data tests alike.

    `spacing` (per axis) gives HD95 in those units; `surface=False` skips the surface
    distance (HD95 NaN), which validation does to stay fast.
    """
    c = confusion_counts(pred, truth)
    return PatientScores(
        patient=patient, slices=int(pred.shape[0]), dice=dice_from_counts(c), iou=iou_from_counts(c),
        precision=precision_from_counts(c), recall=recall_from_counts(c),
        hd95=hd95(pred, truth, spacing) if surface else math.nan,
        true_voxels=c.tp + c.fn, pred_voxels=c.tp + c.fp,
    )


def slice_scores(pred: np.ndarray, truth: np.ndarray) -> tuple[list[float], int, int]:
    """Per-slice view of a volume (S, H, W).

    Returns:
        (Dice of each slice that has tumour in the truth, number of tumour-free true
        slices with any predicted pixel (false-positive slices), number of tumour-free
        true slices).
    """
    dices, fp_slices, empty = [], 0, 0
    for p, t in zip(np.asarray(pred, bool), np.asarray(truth, bool), strict=True):
        if t.any():
            dices.append(dice_from_counts(confusion_counts(p, t)))
        else:
            empty += 1
            fp_slices += int(p.any())
    return dices, fp_slices, empty


def nanmean(values: list[float]) -> float:
    arr = np.asarray(values, dtype=float)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else math.nan


def paired_comparison(baseline: Mapping[str, float], candidate: Mapping[str, float], *, bad_below: float = 0.7,
                      resamples: int = 10000, seed: int = 0) -> dict[str, Any]:
    """Two sets of per-patient scores (e.g. Dice) on the same patients, compared patient by
    patient (candidate - baseline).

    Returns:
        {"patients", "mean"/"median" {"baseline", "candidate"}, "mean_difference",
        "bootstrap_ci95" (percentile interval of the mean difference over `resamples`
        resamples of the patients, generator seeded with `seed`), "better"/"worse"/"same"
        (patients), "sign_test_p" (two-sided binomial test on the patients that differ),
        "below" {"baseline", "candidate"} (patients under `bad_below`), "per_patient"}.

    Raises:
        TumorsegError: the two sets name different patients, or none.
    """
    from scipy.stats import binomtest

    if set(baseline) != set(candidate):
        only = sorted(set(baseline) ^ set(candidate))
        raise TumorsegError(f"the scores to compare are of different patients ({len(only)} in one only, e.g. "
                            f"{', '.join(only[:3])}): compare results on the same patients")
    names = sorted(baseline)
    if not names:
        raise TumorsegError("no patients to compare")
    a = np.array([baseline[p] for p in names], dtype=np.float64)
    b = np.array([candidate[p] for p in names], dtype=np.float64)
    diff = b - a
    rng = np.random.default_rng(seed)
    boot = diff[rng.integers(0, diff.size, size=(resamples, diff.size))].mean(axis=1)
    better, worse = int((diff > 0).sum()), int((diff < 0).sum())
    return {
        "patients": len(names),
        "mean": {"baseline": float(a.mean()), "candidate": float(b.mean())},
        "median": {"baseline": float(np.median(a)), "candidate": float(np.median(b))},
        "mean_difference": float(diff.mean()),
        "bootstrap_ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        "bootstrap_resamples": resamples,
        "better": better, "worse": worse, "same": int(diff.size - better - worse),
        "sign_test_p": float(binomtest(better, better + worse).pvalue) if better + worse else 1.0,
        "bad_below": bad_below,
        "below": {"baseline": [p for p, v in zip(names, a, strict=True) if v < bad_below],
                  "candidate": [p for p, v in zip(names, b, strict=True) if v < bad_below]},
        "per_patient": [{"patient": p, "baseline": float(x), "candidate": float(y), "difference": float(y - x)}
                        for p, x, y in zip(names, a, b, strict=True)],
    }
