"""`tumorseg evaluate`: per-patient scores of a model on labelled data, and a report.

Report folder:
    report.json              summary, one record per patient (with its quality flag and
                             features), and "qc": how the flag did on these patients
    per_patient.csv          the same records as a table
    dice_distribution.png    histogram and box plot of per-patient Dice
    examples.png             overlays of example slices (truth green, prediction red)
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from tumorseg.config import NORM_PERCENTILES
from tumorseg.data.cache import Cache, dicom_source, nifti_source, open_data, prepare
from tumorseg.data.nifti import NiftiFiles
from tumorseg.data.splits import held_out_patients
from tumorseg.errors import ConfigError, TumorsegError
from tumorseg.fileio import atomic_write_text, check_output_dir, prepare_output_dir
from tumorseg.inference import PatientResult, Predictor, check_model_arguments
from tumorseg.metrics import PatientScores, hd95, nanmean, score_patient, slice_scores
from tumorseg.qc import SHOWN_FEATURES, QCRule, assess, flag_performance

log = logging.getLogger("tumorseg")

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


def summarize(scored: list[ScoredPatient]) -> dict[str, Any]:
    """The summary of a report: means over patients (NaN left out), the Dice of tumour
    slices pooled over patients, and the rate of tumour-free slices with a prediction."""
    scores = [p.scores for p in scored]
    tumour_slice_dices = [d for p in scored for d in p.slice_dices]
    fp_slices, empty_slices = sum(p.fp_slices for p in scored), sum(p.empty_slices for p in scored)
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
        "hd95_mm_mean": nanmean([p.hd95_mm if p.hd95_mm is not None else math.nan for p in scored]),
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
    engine: str = "auto",
    spacing: Sequence[float] | None = None,
    show_progress: bool = True,
    plots: bool = True,
    predictor: Predictor | None = None,
) -> dict[str, Any]:
    """Score a model on labelled patients of `cache` and write the report to `out_dir`.

    The model is `predictor`, or `Predictor.from_checkpoints(checkpoint, ...)` (one
    checkpoint, several for an ensemble, or None for the shipped model) with
    threshold/postprocess/tta overriding the stored inference settings. HD95 is in pixels
    (slice index, row, column, unit steps), and also in mm (`hd95_mm`) where the spacing
    is known: `spacing` (mm between slices, rows, columns) for every patient, else each
    NIfTI patient's own from its header (kaggle_3m TIFFs carry none). Returns the report
    dictionary.

    Raises:
        TumorsegError: unknown or unlabelled patients, bad settings, an unusable out_dir.
    """
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
                                               tta=tta, device=device, precision=precision, engine=engine)

    scored: list[ScoredPatient] = []
    for patient in tqdm(names, desc="evaluating", unit="patient", disable=None if show_progress else True):
        images = np.asarray(cache.images(patient))
        seg = segment_cached(predictor, cache, patient, images)
        truth = np.asarray(cache.masks(patient)) > 0
        rec = cache.records[patient]
        where = spacing or patient_spacing(rec)
        quality = assess(seg.member_probabilities(), seg.mask, seg.inference, where, predictor.qc_rule)
        scored.append(score_volume(patient, seg.mask, truth, images, rec.slices, where, **qc_columns(quality)))
    header = {
        "checkpoint": predictor.source,
        "checkpoint_kind": "ensemble" if predictor.members > 1 else predictor.kind,
        "models": predictor.members,
        "engine": predictor.engine.name,
        "threshold": float(predictor.inference.threshold),
        "postprocess": predictor.inference.postprocess,
        "tta": predictor.inference.tta,
        "precision": predictor.precision,
        "channels": list(predictor.channels),
        "spacing": ("--spacing " + " ".join(f"{v:g}" for v in spacing) if spacing
                    else "NIfTI headers" if any(cache.records[p].spacing for p in names) else None),
    }
    return write_report(out_dir, header, scored, plots=plots,
                        sections={"qc": qc_section(scored, predictor.qc_rule, predictor.trained_on)})


def qc_columns(quality: dict[str, Any]) -> dict[str, Any]:
    """The per-patient columns of a quality record (`qc.assess`): flag, score, reason and
    the features a report shows."""
    features = quality.get("features", {})
    return {"qc": quality.get("qc", ""), "qc_score": quality.get("qc_score"), "qc_reason": quality.get("qc_reason", ""),
            **{k: features.get(k) for k in SHOWN_FEATURES}}


def qc_section(scored: list[ScoredPatient], rule: QCRule | None, trained_on: frozenset[str]) -> dict[str, Any]:
    """How the quality flag did on these labelled patients (`qc.flag_performance`), and
    which of them the model trained on: on those the figures mean little (a model is
    confident on what it has seen), which a warning says too."""
    seen = sorted(p.scores.patient for p in scored if p.scores.patient in trained_on)
    section: dict[str, Any] = {"rule": rule.to_dict() if rule else None, "trained_on": seen}
    if rule is None:
        section["note"] = "this model has no calibrated rule: features only (see `tumorseg calibrate-qc`)"
        return section
    section["performance"] = flag_performance([p.extra["qc"] for p in scored], [p.scores.dice for p in scored],
                                              rule.bad_below)
    if seen:
        section["note"] = (f"{len(seen)} of {len(scored)} patients were in the model's training data: the flag's "
                           "sensitivity and specificity on them mean little")
        log.warning(f"{len(seen)} of {len(scored)} evaluated patients were in the model's training data; its scores "
                    "and the quality flag's figures on them are optimistic")
    return section


def evaluate_data(
    out_dir: str | Path,
    *,
    data: str | Path | None = None,
    files: NiftiFiles | None = None,
    dicom: str | Path | None = None,
    label: str | Path | None = None,
    dicom_series: dict[str, str] | None = None,
    split: str | Path | None = None,
    fold: int | None = None,
    spacing: Sequence[float] | None = None,
    checkpoint: str | Path | Sequence[str | Path] | None = None,
    threshold: float | None = None,
    postprocess: str | None = None,
    tta: bool | None = None,
    device: str = "auto",
    precision: str = "auto",
    engine: str = "auto",
    show_progress: bool = True,
) -> dict[str, Any]:
    """`tumorseg evaluate`: the model on the labelled patients of `data` (a kaggle_3m
    folder, NIfTI patients or a cache), only the held-out patients of `split` (its test
    patients, or fold `fold`'s validation patients), the one NIfTI patient `files` (with
    its label), or the one DICOM study in the folder `dicom` with its `label` (a DICOM SEG
    or a NIfTI label on the FLAIR series' grid). The model is loaded before the data are
    decoded, so a bad checkpoint or setting fails first.

    Raises:
        TumorsegError: contradicting or missing options, and what `evaluate` raises.
    """
    if fold is not None and not split:
        raise TumorsegError("--fold needs --split (the splits.json of a run)")
    if (dicom is None) != (label is None):
        raise TumorsegError("--dicom DIR and --label SEG_OR_NIFTI go together: a DICOM study and its label")
    if dicom is not None and (files is not None or data or split):
        raise TumorsegError("--dicom names one study to evaluate; drop --data, --split and --flair")
    if files is not None and (data or split):
        raise TumorsegError("--flair names one patient to evaluate; drop --data and --split, or evaluate a "
                            "folder of NIfTI patients with --data")
    if files is None and dicom is None and not data:
        raise TumorsegError("--data is required (a kaggle_3m folder, a folder of NIfTI patients or a cache), or "
                            "name one NIfTI patient with --flair ... --mask ..., or one DICOM study with --dicom "
                            "DIR --label SEG")
    if files is not None and files.label is None:
        raise TumorsegError("--flair needs --mask, the label to score against (for no label use `tumorseg predict`)")
    check_spacing(spacing)
    check_output_dir(out_dir)
    patients = held_out_patients(split, fold) if split else None
    predictor = Predictor.from_checkpoints(checkpoint, threshold=threshold, postprocess=postprocess, tta=tta,
                                           device=device, precision=precision, engine=engine)
    with tempfile.TemporaryDirectory(prefix="tumorseg-evaluate-") as scratch:
        if files is not None:  # one patient, decoded into a throwaway cache
            cache = prepare(files.flair.parent, Path(scratch), sources=[nifti_source(files, require_masks=True)],
                            progress=False)
        elif dicom is not None and label is not None:
            cache = prepare(Path(dicom), Path(scratch), sources=[dicom_source(Path(dicom), Path(label), dicom_series)],
                            progress=False)
        else:
            assert data is not None
            cache = open_data(data, progress=show_progress)
        return evaluate(cache, out_dir, predictor=predictor, patients=patients, spacing=spacing,
                        show_progress=show_progress)


def patient_spacing(record: Any) -> tuple[float, float, float] | None:
    """The spacing a cache record knows (NIfTI patients), or None."""
    return tuple(record.spacing) if record.spacing else None  # type: ignore[return-value]


def segment_cached(predictor: Predictor, cache: Cache, patient: str, images: np.ndarray | None = None) -> PatientResult:
    """`predictor.segment` of a cached patient (its `images` when already read), normalised
    with the statistics the cache holds when they are the predictor's percentiles."""
    rec = cache.records[patient]
    images = np.asarray(cache.images(patient)) if images is None else images
    same = predictor.percentiles == NORM_PERCENTILES  # the cache holds these; others are recomputed
    return predictor.segment(images, rec.low if same else None, rec.high if same else None, spacing=rec.spacing)


@dataclass
class ScoredPatient:
    """Everything a report needs of one patient."""

    scores: PatientScores
    slice_dices: list[float]  # Dice of each slice with tumour in the truth
    fp_slices: int  # tumour-free slices with a predicted pixel
    empty_slices: int  # tumour-free slices
    hd95_mm: float | None  # with a known spacing
    example: tuple[float, str, int, np.ndarray, np.ndarray, np.ndarray]  # (dice, patient, slice, image, truth, pred)
    extra: dict[str, Any] = field(default_factory=dict)  # more per-patient fields of a report (e.g. the fold)


def score_volume(patient: str, pred: np.ndarray, truth: np.ndarray, images: np.ndarray, slice_numbers: list[int],
                 spacing: tuple[float, float, float] | None = None, **extra: Any) -> ScoredPatient:
    """Score a predicted volume bool (S, H, W) against the truth, keeping the slice with the
    most tumour (of images uint8 (S, H, W, 3)) as the report's example."""
    s = score_patient(patient, pred, truth)
    mm = None
    if spacing is not None:  # kaggle_3m TIFFs carry no spacing: the user supplies it
        mm = hd95(pred, truth, spacing) if not math.isnan(s.hd95) else math.nan
    d, fp, empty = slice_scores(pred, truth)
    k = int(truth.reshape(len(truth), -1).sum(1).argmax())
    return ScoredPatient(s, d, fp, empty, mm,
                         (s.dice, patient, slice_numbers[k], images[k].copy(), truth[k].copy(), pred[k].copy()),
                         dict(extra))


def write_report(out_dir: str | Path, header: dict[str, Any], scored: list[ScoredPatient], *,
                 plots: bool = True, sections: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write report.json (`header`, the summary, the per-patient records and `sections`),
    per_patient.csv and, with `plots`, dice_distribution.png and examples.png; returns the
    report dictionary."""
    from tumorseg.plots import plot_dice_distribution, plot_examples  # matplotlib: loaded when a plot is drawn

    scores = [p.scores for p in scored]
    summary = summarize(scored)
    with_mm = any(p.hd95_mm is not None for p in scored)
    records = [
        {k: (_finite(v) if isinstance(v, float) else v) for k, v in asdict(p.scores).items()}
        | ({"hd95_mm": _finite(p.hd95_mm)} if p.hd95_mm is not None else {})
        | {k: (_finite(v) if isinstance(v, float) else v) for k, v in p.extra.items()}
        for p in scored
    ]
    report = {
        **header,
        "empty_mask_rule": EMPTY_MASK_RULE,
        "summary": {k: _finite(v) if isinstance(v, float) else v for k, v in summary.items()},
        **(sections or {}),
        "patients": records,
    }
    out = prepare_output_dir(out_dir)
    atomic_write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
    buf = io.StringIO()
    extra_fields = [k for k in (scored[0].extra if scored else {})]
    w = csv.DictWriter(buf, fieldnames=PATIENT_FIELDS + (["hd95_mm"] if with_mm else []) + extra_fields,
                       lineterminator="\n")
    w.writeheader()
    w.writerows(records)
    atomic_write_text(out / "per_patient.csv", buf.getvalue())
    if plots:
        plot_dice_distribution({s.patient: s.dice for s in scores}, out / "dice_distribution.png",
                               title=f"Per-patient Dice ({len(scores)} patients)")
        examples = sorted((p.example for p in scored), key=lambda e: e[0])
        pick = sorted({round(q * (len(examples) - 1)) for q in np.linspace(0, 1, min(8, len(examples)))})
        plot_examples(
            [(f"{examples[i][1]} #{examples[i][2]}\nDice {examples[i][0]:.3f}", *examples[i][3:])
             for i in pick],
            out / "examples.png",
        )
    return report
