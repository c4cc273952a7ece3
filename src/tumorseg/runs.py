"""The layout of run folders, in one place.

A training run (`tumorseg train --out RUN`, or one fold of a cross-validation):

    RUN/config.json          the resolved training config
    RUN/inference.json       threshold and post-processing used for validation
    RUN/splits.json          the patient split (folds, test patients)
    RUN/last.pt              the latest state (every epoch, and on interruption)
    RUN/best.pt              the epoch with the best validation Dice
    RUN/metrics.csv          one row per epoch
    RUN/training_curves.png  loss and Dice per epoch

A cross-validation run (`tumorseg crossval --out RUN`):

    RUN/config.json, RUN/splits.json        as above, shared by the folds
    RUN/fold_<k>/                           a training run per fold
    RUN/crossval/probabilities/<patient>.npy   out-of-fold probabilities (float16),
                                               sources.json: the fold models they came from
    RUN/crossval/postprocessing.json        every candidate setting with its out-of-fold Dice
    RUN/crossval/report.json, ...           the out-of-fold report

`run_members` reads what a finished cross-validation run ships: its fold models and the
setting chosen on their out-of-fold predictions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tumorseg.config import InferenceConfig
from tumorseg.data.splits import load_split
from tumorseg.errors import TumorsegError


@dataclass(frozen=True)
class TrainingDir:
    """The files of one training run (a `tumorseg train` run or one fold)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def inference(self) -> Path:
        return self.root / "inference.json"

    @property
    def splits(self) -> Path:
        return self.root / "splits.json"

    @property
    def last(self) -> Path:
        return self.root / "last.pt"

    @property
    def best(self) -> Path:
        return self.root / "best.pt"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def curves(self) -> Path:
        return self.root / "training_curves.png"

    # Written before the first checkpoint: removed again if a new run fails before it.
    SETUP_FILES = ("config.json", "inference.json", "splits.json")


@dataclass(frozen=True)
class RunDir:
    """The files of a cross-validation run."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def splits(self) -> Path:
        return self.root / "splits.json"

    def fold(self, k: int) -> TrainingDir:
        return TrainingDir(self.root / f"fold_{k}")

    def fold_models(self, folds: int) -> list[Path]:
        """The last.pt of each fold, in fold order."""
        return [self.fold(k).last for k in range(folds)]

    @property
    def crossval(self) -> Path:
        return self.root / "crossval"

    @property
    def probabilities(self) -> Path:
        return self.crossval / "probabilities"

    @property
    def postprocessing(self) -> Path:
        return self.crossval / "postprocessing.json"

    @property
    def report(self) -> Path:
        return self.crossval / "report.json"

    # Written before the first fold's checkpoint: removed again if a new run fails before it.
    SETUP_FILES = ("config.json", "splits.json")


def fold_identity(path: Path) -> dict[str, Any]:
    """What tells a fold model from a retrained one: its path, size and modification time."""
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


@dataclass(frozen=True)
class RunMembers:
    """What a finished cross-validation run ships (see `run_members`)."""

    models: list[Path]  # fold models in fold order
    inference: InferenceConfig  # the out-of-fold choice, with any overrides
    metrics: dict[str, Any]  # {"out_of_fold": summary, "out_of_fold_setting": the choice}
    notes: str  # names the run


def run_members(run_dir: str | Path, *, threshold: float | None = None,
                postprocess: str | None = None) -> RunMembers:
    """The fold models of a finished cross-validation run, the threshold and
    post-processing chosen on its out-of-fold predictions overridden where given, its
    out-of-fold summary and a note naming the run.

    Raises:
        TumorsegError: not a finished cross-validation run, fold models changed after the
            choice, or a bad setting.
    """
    run = RunDir(Path(run_dir))
    if not run.splits.is_file() or not run.postprocessing.is_file():
        raise TumorsegError(f"{run.root} is not a finished cross-validation run (no splits.json or "
                            "crossval/postprocessing.json); run `tumorseg crossval` first")
    folds = len(load_split(run.splits).folds)
    sources = run.fold_models(folds)
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        raise TumorsegError(f"{missing[0]} is missing; finish the run with `tumorseg crossval` first")
    try:
        record = json.loads(run.postprocessing.read_text())
        chosen = InferenceConfig.from_dict(record["chosen"])
        recorded = record.get("models", [])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TumorsegError(f"{run.postprocessing} is damaged ({type(e).__name__}); run `tumorseg crossval` "
                            "again") from e
    if recorded != [fold_identity(p) for p in sources]:
        raise TumorsegError(f"the fold models of {run.root} changed after their out-of-fold choice; run "
                            "`tumorseg crossval` again to choose on their predictions")
    inference = chosen.replace(threshold=threshold, postprocess=postprocess)
    try:
        summary = json.loads(run.report.read_text())["summary"] if run.report.is_file() else {}
    except (OSError, ValueError, KeyError, TypeError):
        summary = {}
    metrics = {"out_of_fold": summary, "out_of_fold_setting": chosen.to_dict()}
    overridden = "" if inference == chosen else " (settings overridden after the out-of-fold choice)"
    return RunMembers(sources, inference, metrics, f"{folds}-fold ensemble of {run.root.name}{overridden}")
