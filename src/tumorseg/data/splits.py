"""Patient-level splits: seeded k-fold with an optional held-out test set, saved as JSON.

A patient is in exactly one of: the test set, or one validation fold (and then in the
training set of every other fold). Slices are never split; patients are.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from tumorseg.errors import TumorsegError
from tumorseg.fileio import atomic_write_text


@dataclass(frozen=True)
class Split:
    """The folds of a patient-level k-fold split, plus held-out test patients."""

    folds: list[list[str]]  # validation patients of each fold
    test: list[str]  # never used for training or model selection
    seed: int

    def train(self, fold: int) -> list[str]:
        self._check(fold)
        return sorted(p for i, f in enumerate(self.folds) if i != fold for p in f)

    def train_all(self) -> list[str]:
        """Every patient outside the test set (the training set of a final model)."""
        return sorted(p for f in self.folds for p in f)

    def val(self, fold: int) -> list[str]:
        self._check(fold)
        return sorted(self.folds[fold])

    def _check(self, fold: int) -> None:
        if not 0 <= fold < len(self.folds):
            raise TumorsegError(f"fold {fold} does not exist; the split has folds 0..{len(self.folds) - 1}")

    def to_dict(self) -> dict:
        return {"seed": self.seed, "test": sorted(self.test), "folds": [sorted(f) for f in self.folds]}


def make_split(patients: list[str], folds: int = 5, test_fraction: float = 0.0, seed: int = 0) -> Split:
    """Shuffle patients with `seed`, hold out round(test_fraction * n) for test, and deal
    the rest into `folds` folds whose sizes differ by at most one.

    Raises:
        TumorsegError: duplicate patients, or too few patients for the folds asked for.
    """
    if len(set(patients)) != len(patients):
        raise TumorsegError("patient list has duplicates")
    if folds < 2:
        raise TumorsegError(f"folds must be >= 2, got {folds}")
    if not 0.0 <= test_fraction < 1.0:
        raise TumorsegError(f"test_fraction must be in [0, 1), got {test_fraction}")
    order = sorted(patients)
    random.Random(seed).shuffle(order)
    n_test = int(round(test_fraction * len(order)))
    test, rest = order[:n_test], order[n_test:]
    if len(rest) < folds:
        raise TumorsegError(f"{len(rest)} patients cannot fill {folds} folds; use fewer folds")
    return Split(folds=[sorted(rest[i::folds]) for i in range(folds)], test=sorted(test), seed=seed)


def save_split(split: Split, path: str | Path) -> None:
    atomic_write_text(path, json.dumps(split.to_dict(), indent=1) + "\n")


def load_split(path: str | Path) -> Split:
    """Read a split JSON and check that no patient appears twice.

    Raises:
        TumorsegError: unreadable file or overlapping parts.
    """
    path = Path(path)
    if not path.is_file():
        raise TumorsegError(f"split file {path} does not exist; pass the splits.json of a run")
    try:
        d = json.loads(path.read_text())
        split = Split(folds=[list(f) for f in d["folds"]], test=list(d.get("test", [])),
                      seed=int(d.get("seed", 0)))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise TumorsegError(f"{path}: not a readable split file ({e})") from e
    seen: dict[str, str] = {}
    parts = [("test", split.test)] + [(f"fold {i}", f) for i, f in enumerate(split.folds)]
    for name, members in parts:
        for p in members:
            if p in seen:
                raise TumorsegError(f"{path}: patient {p} is in both {seen[p]} and {name}")
            seen[p] = name
    return split


def held_out_patients(path: str | Path, fold: int | None = None) -> list[str]:
    """The patients a run never trained on: the validation patients of `fold`, or, when
    `fold` is None, the split's test patients.

    Raises:
        TumorsegError: unreadable split, unknown fold, or a split without test patients.
    """
    split = load_split(path)
    if fold is not None:
        return split.val(fold)
    if not split.test:
        raise TumorsegError(f"{path} has no test patients; pass --fold K to evaluate a validation fold")
    return sorted(split.test)
