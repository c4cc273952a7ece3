"""`tumorseg evaluate`: per-patient scores of a model on labelled data, and a report.

Report folder:
    report.json              summary + one record per patient (shape in the README)
    per_patient.csv          the same records as a table
    dice_distribution.png    histogram and box plot of per-patient Dice
    examples.png             overlays of example slices (truth green, prediction red)
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tumorseg.config import NORM_PERCENTILES
from tumorseg.data.cache import Cache
from tumorseg.errors import TumorsegError
from tumorseg.inference import (
    binarize,
    load_for_inference,
    predict_volume,
    resolve_precision,
    select_device,
)
from tumorseg.metrics import PatientScores, hd95, nanmean, patient_scores, slice_scores

PATIENT_FIELDS = ["patient", "slices", "dice", "iou", "precision", "recall", "hd95",
                  "true_voxels", "pred_voxels"]


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


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
    checkpoint: str | Path | None = None,
    patients: list[str] | None = None,
    threshold: float | None = None,
    postprocess: str | None = None,
    tta: bool = False,
    precision: str = "auto",
    device: str = "auto",
    spacing: tuple[float, float, float] | None = None,
    show_progress: bool = True,
    plots: bool = True,
) -> dict[str, Any]:
    """Score `checkpoint` (default: the shipped model) on labelled patients of `cache`.

    threshold/postprocess default to the values stored in the checkpoint (0.5/"none" for
    the original unet.pt). HD95 is in pixels (slice index, row, column, unit steps);
    `spacing` (mm between slices, rows, columns) adds `hd95_mm`. Returns the report
    dictionary, also written to out_dir.
    """
    from tumorseg.plots import plot_dice_distribution, plot_examples

    dev = select_device(device)
    loaded = load_for_inference(checkpoint, dev)
    threshold = loaded.threshold if threshold is None else threshold
    postprocess = loaded.postprocess if postprocess is None else postprocess
    dtype = resolve_precision(precision, dev)
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

    scores: list[PatientScores] = []
    tumour_dices: list[float] = []
    fp_slices = empty_slices = 0
    examples: list[tuple[float, str, int, np.ndarray, np.ndarray, np.ndarray]] = []
    hd95_mm: dict[str, float] = {}
    for patient in tqdm(names, desc="evaluating", unit="patient", disable=not show_progress):
        rec = cache.records[patient]
        images = np.asarray(cache.images(patient))
        truth = np.asarray(cache.masks(patient)) > 0
        # The cache holds the statistics of NORM_PERCENTILES; other percentiles are recomputed.
        stats = (rec.low, rec.high) if tuple(loaded.percentiles) == NORM_PERCENTILES else (None, None)
        probs = predict_volume(loaded, images, low=stats[0], high=stats[1], device=dev, dtype=dtype, tta=tta)
        pred = binarize(probs, threshold, postprocess)
        s = patient_scores(patient, pred, truth)
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
        "checkpoint": str(loaded.path),
        "checkpoint_kind": loaded.kind,
        "threshold": float(threshold),
        "postprocess": postprocess,
        "tta": tta,
        "precision": "bf16" if dtype == torch.bfloat16 else ("fp16" if dtype == torch.float16 else "fp32"),
        "channels": list(loaded.channels),
        "empty_mask_rule": "both empty: Dice 1, HD95 0; one empty: Dice 0, HD95 NaN (left out of means)",
        "summary": {k: _finite(v) if isinstance(v, float) else v for k, v in summary.items()},
        "patients": [
            {k: (_finite(v) if isinstance(v, float) else v) for k, v in asdict(s).items()}
            | ({"hd95_mm": _finite(hd95_mm[s.patient])} if s.patient in hd95_mm else {})
            for s in scores
        ],
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    with (out / "per_patient.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=PATIENT_FIELDS + (["hd95_mm"] if hd95_mm else []))
        w.writeheader()
        w.writerows(report["patients"])
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
