"""Cross-validation: every fold of one patient split trained into its own run folder, every
patient scored by the fold model that never saw it, and the threshold and post-processing
chosen on those out-of-fold predictions (as nnU-Net's determine_postprocessing does).

    RUN/splits.json                            the split all folds share
    RUN/fold_<k>/                              a training run validating on fold k (training.fit)
    RUN/crossval/probabilities/<patient>.npy   float16 (S, H, W): out-of-fold probabilities
    RUN/crossval/postprocessing.json           every candidate with its out-of-fold Dice, and the choice
    RUN/crossval/report.json, per_patient.csv, dice_distribution.png, examples.png
                                               the chosen setting, in evaluate's shape, plus the
                                               fold of each patient and a summary per fold

(`tumorseg.runs` owns this layout.)

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

from tumorseg.checkpoint import Checkpoint, load_checkpoint, load_member, load_members
from tumorseg.config import InferenceConfig, TrainConfig
from tumorseg.data.cache import Cache, open_data
from tumorseg.data.splits import Split, load_split, make_split, save_split
from tumorseg.errors import TumorsegError
from tumorseg.evaluation import (
    ScoredPatient,
    patient_spacing,
    score_volume,
    segment_cached,
    summarize,
    write_report,
)
from tumorseg.fileio import atomic_write, atomic_write_text, check_output_dir, undo_on_failure
from tumorseg.inference import Predictor
from tumorseg.metrics import confusion_counts, dice_from_counts
from tumorseg.postprocess import binarize
from tumorseg.runs import RunDir, fold_identity
from tumorseg.training import fit

log = logging.getLogger(__name__)

# The candidates, simplest first (every threshold without post-processing, then each
# method): a later one is chosen only when its mean Dice is higher by at least MIN_GAIN.
THRESHOLDS: tuple[float, ...] = (0.5, 0.4, 0.6, 0.3, 0.7)
METHODS: tuple[str, ...] = ("none", "lcc", "min_size:10", "min_size:50", "min_size:200", "confident:0.8",
                            "confident:0.9", "confident:0.95")
MIN_GAIN = 1e-3


def prepare_run(cfg: TrainConfig, cache: Cache, run_dir: Path) -> Split:
    """The split of the run: the one `cfg` makes of these patients (folds, test fraction,
    seed); RUN/splits.json is written, or, when it exists, must be that split.

    Raises:
        TumorsegError: RUN/splits.json holds another split.
    """
    path = RunDir(run_dir).splits
    split = make_split(cache.patients, cfg.folds, cfg.test_fraction, cfg.split_seed)
    if path.is_file():
        if load_split(path).to_dict() != split.to_dict():
            raise TumorsegError(f"{path} holds another split than --folds {cfg.folds} --test-fraction "
                                f"{cfg.test_fraction} --split-seed {cfg.split_seed} make of these patients; "
                                "choose another --out or the run's own settings")
    else:
        save_split(split, path)
    return split


def fold_config(cfg: TrainConfig, k: int) -> TrainConfig:
    """The training config of fold k: `cfg` with fold k; where `cfg.init` names a file of
    `cfg.folds` models without `@K` (a fold ensemble, such as the shipped model), fold k
    starts from its model k (`MODEL.pt@k`, see `check_init`)."""
    cfg_k = dataclasses.replace(cfg, fold=k)
    if cfg.init and _models_in(cfg.init) == cfg.folds:
        return dataclasses.replace(cfg_k, init=f"{cfg.init}@{k}")
    return cfg_k


def _models_in(path: str) -> int:
    """How many models the file `path` holds (0 when there is no such file, e.g. for
    `MODEL.pt@K`: `training.initial_weights` names what is wrong)."""
    return len(load_members(path)) if Path(path).is_file() else 0


def check_init(cfg: TrainConfig, split: Split) -> None:
    """Fold models started from other weights (`--init`) are scored on patients those
    weights never saw: each fold's starting model was trained on none of the fold's
    patients nor of the test set (by the split it carries).

    Raises:
        TumorsegError: a starting model trained on patients of the fold it would be scored
            on or of the test set, or one that does not say which patients it was trained on.
    """
    if not cfg.init:
        return
    for k in range(len(split.folds)):
        init = fold_config(cfg, k).init
        trained = load_member(init).split
        if trained is None:
            raise TumorsegError(f"--init {init} does not record the patients it was trained on, so its fine-tuned "
                                "fold models could be scored on patients it saw; start from a tumorseg model "
                                "(or a fold ensemble) that keeps its split")
        seen = set(trained.get("train", []))
        for where, patients in ((f"fold {k}", split.folds[k]), ("the test set", split.test)):
            overlap = sorted(seen & set(patients))
            if overlap:
                raise TumorsegError(
                    f"--init {init} was trained on {len(overlap)} patient(s) of {where} (e.g. {overlap[0]}), which "
                    f"its fold model would be scored on; start from a fold ensemble of this split ({cfg.folds} "
                    "models, one per fold) or from random weights")


def check_fold(state: Checkpoint, cfg: TrainConfig, split: Split, k: int) -> None:
    """A fold model belongs to this run: the run's config with fold k, and trained on
    exactly split.train(k), so that it never saw the patients it scores.

    Raises:
        TumorsegError: a model of another config or split (e.g. a `tumorseg train` run).
    """
    where = Path(state.path).parent
    expected = fold_config(cfg, k)
    if state.train_config != expected:
        diff = [f.name for f in dataclasses.fields(TrainConfig)
                if state.train_config is None or getattr(state.train_config, f.name) != getattr(expected, f.name)]
        raise TumorsegError(f"{where} was trained with another config ({', '.join(diff[:4])} differ); "
                            "delete it or choose another --out")
    trained = set((state.split or {}).get("train", []))
    if trained != set(split.train(k)):
        raise TumorsegError(f"{where} was trained on other patients than fold {k} of the run's split; "
                            "delete it or choose another --out")


def train_folds(cfg: TrainConfig, cache: Cache, run_dir: Path, *, device: str = "auto",
                show_progress: bool = True, data_path: str | None = None, only: int | None = None) -> bool:
    """Train every fold of the run that is not finished (or fold `only`); returns False
    when a fold was interrupted (Ctrl-C), True when all are done.

    Raises:
        TumorsegError: a fold folder holds a model of another config or split.
    """
    split = prepare_run(cfg, cache, run_dir)
    check_init(cfg, split)
    run = RunDir(run_dir)
    for k in range(len(split.folds)) if only is None else [only]:
        fold_dir = run.fold(k).root
        last = run.fold(k).last
        if last.is_file():
            state = load_checkpoint(last)
            check_fold(state, cfg, split, k)
            if state.epoch >= cfg.epochs and (state.training is None or not state.training.progress.get("step")):
                log.info(f"fold {k}: done ({state.epoch} epochs), skipped")
                continue
            result = fit(cfg, cache, fold_dir, resume=True, device=device, show_progress=show_progress,
                         data_path=data_path)
        else:
            result = fit(fold_config(cfg, k), cache, fold_dir, split_file=run.splits,
                         device=device, show_progress=show_progress, data_path=data_path)
        if result.interrupted:
            return False
    return True


def out_of_fold(cache: Cache, run_dir: Path, split: Split, *, device: str = "auto", precision: str = "auto",
                show_progress: bool = True) -> dict[str, tuple[int, np.ndarray]]:
    """{patient: (fold, probabilities float32 (S, H, W))} of every fold patient, each from the
    last.pt of the fold that held it out; written to RUN/crossval/probabilities/<patient>.npy
    as float16, and reused while the fold model is the same file (sources.json)."""
    run = RunDir(run_dir)
    folder = run.probabilities
    sources_path = folder / "sources.json"
    try:
        saved = json.loads(sources_path.read_text()) if sources_path.is_file() else {}
    except (OSError, ValueError):
        saved = {}
    current = {str(k): fold_identity(run.fold(k).last) for k in range(len(split.folds))}
    out: dict[str, tuple[int, np.ndarray]] = {}
    todo = [(k, p) for k, fold in enumerate(split.folds) for p in sorted(fold)]
    predictors: dict[int, Predictor] = {}
    for k, patient in tqdm(todo, desc="out-of-fold predictions", unit="patient",
                           disable=None if show_progress else True):
        path = folder / f"{patient}.npy"
        if path.is_file() and saved.get(str(k)) == current[str(k)]:
            out[patient] = (k, np.load(path).astype(np.float32))
            continue
        if k not in predictors:  # raw probabilities: the choice of threshold and post-processing comes later
            predictors[k] = Predictor.from_checkpoints(run.fold(k).last, threshold=0.5,
                                                       postprocess="none", tta=False, device=device,
                                                       precision=precision)
        probs = segment_cached(predictors[k], cache, patient).probabilities
        atomic_write(path, lambda f, a=probs: np.save(f, a.astype(np.float16)))
        out[patient] = (k, probs.astype(np.float16).astype(np.float32))  # as reused later: the same numbers
    atomic_write_text(sources_path, json.dumps(current, indent=1) + "\n")
    return out


def choose_postprocessing(probs: dict[str, np.ndarray], truths: dict[str, np.ndarray],
                          thresholds: tuple[float, ...] = THRESHOLDS, methods: tuple[str, ...] = METHODS,
                          min_gain: float = MIN_GAIN) -> tuple[InferenceConfig, list[dict[str, Any]]]:
    """The threshold and post-processing with the highest mean per-patient Dice over the
    patients of `probs` (out-of-fold probabilities, (S, H, W) each) against `truths`. The
    candidates are tried simplest first (each method in turn over all thresholds); a later
    one replaces the choice only if it is better by at least `min_gain`. Returns (the
    choice, the table of every candidate with its mean and median Dice)."""
    table = []
    best: tuple[float, InferenceConfig] | None = None
    for m in methods:
        for t in thresholds:
            candidate = InferenceConfig(threshold=t, postprocess=m)
            dices = np.array([dice_from_counts(confusion_counts(binarize(probs[p], candidate), truths[p]))
                              for p in sorted(probs)])
            mean = float(dices.mean())
            table.append({"threshold": t, "postprocess": m, "dice_mean": mean, "dice_median": float(np.median(dices))})
            if best is None or mean >= best[0] + min_gain:
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
    only_fold: int | None = None,
) -> dict[str, Any] | None:
    """Train every fold of `cfg`'s split on the data at `data` into `run_dir`, then score
    each fold patient out of fold with the threshold and post-processing chosen on those
    predictions. Returns the report (None when training was interrupted: run it again to
    continue).

    With `only_fold`, trains that fold alone and returns {"fold": only_fold}: several
    processes (one per GPU) can train the folds of one run at once; a last call without
    it then writes the report.

    Raises:
        TumorsegError: bad data or config, an unusable run folder, or a split that does
            not fit the config.
    """
    if only_fold is not None and not 0 <= only_fold < cfg.folds:
        raise TumorsegError(f"--fold must be in 0..{cfg.folds - 1}, got {only_fold}")
    run_dir = Path(run_dir)
    run = RunDir(run_dir)
    check_output_dir(run_dir)
    cache = open_data(data, progress=show_progress)
    config_path = run.config
    if config_path.is_file():
        try:
            same = TrainConfig.from_dict(json.loads(config_path.read_text())) == cfg
        except (OSError, ValueError):  # ValueError: unreadable JSON, or a config that is no longer valid
            same = False
        if not same:
            raise TumorsegError(f"{config_path} holds another config than this command's; continue the run with "
                                "its own settings (see that file) or choose another --out")
    # A failure before any fold saved a checkpoint leaves nothing behind.
    # (With only_fold, other processes share these files: they are never undone.)
    with undo_on_failure(run_dir, RunDir.SETUP_FILES,
                         kept=lambda: only_fold is not None or any(run_dir.glob("fold_*/last.pt"))):
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(config_path, json.dumps(cfg.to_dict(), indent=1) + "\n")
        finished = train_folds(cfg, cache, run_dir, device=device, show_progress=show_progress,
                               data_path=str(Path(data).resolve()), only=only_fold)
    if not finished:
        return None
    if only_fold is not None:
        return {"fold": only_fold}
    split = prepare_run(cfg, cache, run_dir)
    oof = out_of_fold(cache, run_dir, split, device=device, precision=precision, show_progress=show_progress)
    truths = {p: np.asarray(cache.masks(p)) > 0 for p in oof}
    chosen, table = choose_postprocessing({p: v[1] for p, v in oof.items()}, truths)
    models = run.fold_models(len(split.folds))
    atomic_write_text(run.postprocessing,
                      json.dumps({"chosen": chosen.to_dict(), "criterion": "mean per-patient Dice, out of fold",
                                  "min_gain": MIN_GAIN, "models": [fold_identity(m) for m in models],
                                  "candidates": table}, indent=1) + "\n")
    scored: list[ScoredPatient] = []
    for patient, (k, probs) in sorted(oof.items()):
        rec = cache.records[patient]
        scored.append(score_volume(patient, binarize(probs, chosen), truths[patient],
                                   np.asarray(cache.images(patient)), rec.slices, patient_spacing(rec), fold=k))
    folds = []
    for k in range(len(split.folds)):
        members = [p for p in scored if p.extra["fold"] == k]
        s = summarize(members)
        folds.append({"fold": k, "patients": s["patients"], "dice_mean": s["dice_mean"],
                      "dice_median": s["dice_median"]})
    header = {"checkpoint": ", ".join(str(m) for m in models), "checkpoint_kind": "out-of-fold fold models",
              "models": len(models), "model_paths": [str(m) for m in models],
              "threshold": chosen.threshold, "postprocess": chosen.postprocess, "tta": False,
              "precision": precision,
              "channels": list(cfg.channels),
              "chosen_on": "these out-of-fold predictions (see postprocessing.json)",
              "test_patients": sorted(split.test)}
    return write_report(run.crossval, header, scored, plots=plots, sections={"folds": folds})
