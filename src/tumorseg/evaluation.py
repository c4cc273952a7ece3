"""`tumorseg evaluate`: per-patient scores of a model on labelled data, and a report.

Report folder:
    report.json              summary + one record per patient (shape in the README)
    per_patient.csv          the same records as a table
    dice_distribution.png    histogram and box plot of per-patient Dice
    examples.png             overlays of example slices (truth green, prediction red)
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from tumorseg.config import NORM_PERCENTILES
from tumorseg.data.cache import Cache
from tumorseg.errors import ConfigError, TumorsegError
from tumorseg.fileio import atomic_write_text, check_output_dir, prepare_output_dir
from tumorseg.inference import Predictor, check_model_arguments
from tumorseg.metrics import PatientScores, hd95, nanmean, score_patient, slice_scores

PATIENT_FIELDS = ["patient", "slices", "dice", "iou", "precision", "recall", "hd95",
                  "true_voxels", "pred_voxels"]
EMPTY_MASK_RULE = "both empty: Dice 1, HD95 0; one empty: Dice 0, HD95 NaN (left out of means)"


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def check_spacing(spacing: Sequence[float] | None) -> tuple[float, float, float] | None:
    """The voxel spacing (slices, rows, columns) in mm, or None.

    Raises:
        ConfigError: not three finite positive numbers.
    """
    if spacing is None:
        return None
    shown = list(spacing) if isinstance(spacing, (list, tuple)) else repr(spacing)
    message = f"spacing must be three positive numbers (mm between slices, rows, columns), got {shown}"
    try:
        values = tuple(float(v) for v in spacing)
    except (TypeError, ValueError) as e:
        raise ConfigError(message) from e
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ConfigError(message)
    return values  # type: ignore[return-value]


def summarize(scores: list[PatientScores], tumour_slice_dices: list[float], fp_slices: int,
              empty_slices: int) -> dict[str, Any]:
    d = np.array([s.dice for s in scores])
    return {
        "patients": len(scores),
        "dice_mean": float(d.mean()),
        "dice_median": float(np.median(d)),
        "dice_std": float(d.std()),
        "iou_mean": nanmean([s.iou for s in scores]),
        "precision_mean": nanmean([s.precision for s in scores]),
        "recall_mean": nanmean([s.recall for s in scores]),
        "hd95_mean": nanmean([s.hd95 for s in scores]),
        "tumor_slice_dice_mean": nanmean(tumour_slice_dices),
        "empty_slice_fp_rate": fp_slices / empty_slices if empty_slices else 0.0,
    }


def evaluate(
    cache: Cache,
    out_dir: str | Path,
    *,
    checkpoint: str | Path | Sequence[str | Path] | None = None,
    patients: list[str] | None = None,
    threshold: float | None = None,
    postprocess: str | None = None,
    tta: bool | None = None,
    precision: str = "auto",
    device: str = "auto",
    spacing: Sequence[float] | None = None,
    show_progress: bool = True,
    plots: bool = True,
    predictor: Predictor | None = None,
) -> dict[str, Any]:
    """Score a model on labelled patients of `cache` and write the report to `out_dir`.

    The model is `predictor`, or `Predictor.from_checkpoints(checkpoint, ...)` (one
    checkpoint, several for an ensemble, or None for the shipped model) with
    threshold/postprocess/tta overriding the stored inference settings. HD95 is in pixels
    (slice index, row, column, unit steps); `spacing` (mm between slices, rows, columns)
    adds `hd95_mm`. Returns the report dictionary.

    Raises:
        TumorsegError: unknown or unlabelled patients, bad settings, an unusable out_dir.
    """
    from tumorseg.plots import plot_dice_distribution, plot_examples

    spacing = check_spacing(spacing)
    names = list(patients) if patients is not None else cache.patients
    unknown = [p for p in names if p not in cache.records]
    if unknown:
        raise TumorsegError(f"patient(s) not in the data: {', '.join(unknown[:5])}")
    unlabelled = [p for p in names if not cache.records[p].has_masks]
    if unlabelled:
        raise TumorsegError(f"patient(s) without masks cannot be evaluated: {', '.join(unlabelled[:5])}; "
                            "use `tumorseg predict` for unlabelled data")
    if not names:
        raise TumorsegError("no patients to evaluate")
    repeated = sorted({p for p in names if names.count(p) > 1})
    if repeated:
        raise TumorsegError(f"patient(s) listed twice: {', '.join(repeated[:5])}")
    check_model_arguments(predictor, checkpoint=checkpoint, threshold=threshold, postprocess=postprocess, tta=tta)
    check_output_dir(out_dir)
    if predictor is None:
        predictor = Predictor.from_checkpoints(checkpoint, threshold=threshold, postprocess=postprocess,
                                               tta=tta, device=device, precision=precision)

    scores: list[PatientScores] = []
    tumour_dices: list[float] = []
    fp_slices = empty_slices = 0
    examples: list[tuple[float, str, int, np.ndarray, np.ndarray, np.ndarray]] = []
    hd95_mm: dict[str, float] = {}
    for patient in tqdm(names, desc="evaluating", unit="patient", disable=None if show_progress else True):
        rec = cache.records[patient]
        images = np.asarray(cache.images(patient))
        truth = np.asarray(cache.masks(patient)) > 0
        # The cache holds the statistics of NORM_PERCENTILES; other percentiles are recomputed.
        same = predictor.percentiles == NORM_PERCENTILES
        seg = predictor.segment(images, rec.low if same else None, rec.high if same else None)
        pred = seg.mask
        s = score_patient(patient, pred, truth)
        scores.append(s)
        if spacing is not None:  # kaggle_3m TIFFs carry no spacing: the user supplies it
            hd95_mm[patient] = hd95(pred, truth, spacing) if not math.isnan(s.hd95) else math.nan
        d, fp, empty = slice_scores(pred, truth)
        tumour_dices += d
        fp_slices += fp
        empty_slices += empty
        k = int(truth.reshape(len(truth), -1).sum(1).argmax())
        examples.append((s.dice, patient, rec.slices[k], images[k], truth[k], pred[k]))

    summary = summarize(scores, tumour_dices, fp_slices, empty_slices)
    report = {
        "checkpoint": predictor.source,
        "checkpoint_kind": "ensemble" if len(predictor.models) > 1 else predictor.kind,
        "models": len(predictor.models),
        "threshold": float(predictor.inference.threshold),
        "postprocess": predictor.inference.postprocess,
        "tta": predictor.inference.tta,
        "precision": predictor.precision,
        "channels": list(predictor.channels),
        "empty_mask_rule": EMPTY_MASK_RULE,
        "summary": {k: _finite(v) if isinstance(v, float) else v for k, v in summary.items()},
        "patients": [
            {k: (_finite(v) if isinstance(v, float) else v) for k, v in asdict(s).items()}
            | ({"hd95_mm": _finite(hd95_mm[s.patient])} if s.patient in hd95_mm else {})
            for s in scores
        ],
    }
    out = prepare_output_dir(out_dir)
    atomic_write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=PATIENT_FIELDS + (["hd95_mm"] if hd95_mm else []), lineterminator="\n")
    w.writeheader()
    w.writerows(report["patients"])
    atomic_write_text(out / "per_patient.csv", buf.getvalue())
    if plots:
        plot_dice_distribution({s.patient: s.dice for s in scores}, out / "dice_distribution.png",
                               title=f"Per-patient Dice ({len(scores)} patients)")
        examples.sort(key=lambda e: e[0])
        pick = sorted({round(q * (len(examples) - 1)) for q in np.linspace(0, 1, min(8, len(examples)))})
        plot_examples(
            [(f"{examples[i][1]} #{examples[i][2]}\nDice {examples[i][0]:.3f}", *examples[i][3:])
             for i in pick],
            out / "examples.png",
        )
    return report
