"""The run-folder layout (`tumorseg.runs`): one owner of every path, and what a finished
cross-validation run ships."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tumorseg.data.splits import make_split, save_split
from tumorseg.errors import TumorsegError
from tumorseg.runs import RunDir, TrainingDir, fold_identity, run_members


def test_the_layout_of_a_training_run_and_of_a_cross_validation_run(tmp_path):
    run = RunDir(tmp_path / "run")
    assert (run.config, run.splits) == (tmp_path / "run" / "config.json", tmp_path / "run" / "splits.json")
    fold = run.fold(2)
    assert isinstance(fold, TrainingDir) and fold.root == tmp_path / "run" / "fold_2"
    assert (fold.last.name, fold.best.name, fold.metrics.name, fold.curves.name, fold.inference.name) == (
        "last.pt", "best.pt", "metrics.csv", "training_curves.png", "inference.json")
    assert run.fold_models(3) == [tmp_path / "run" / f"fold_{k}" / "last.pt" for k in range(3)]
    assert run.probabilities == tmp_path / "run" / "crossval" / "probabilities"
    assert (run.postprocessing.name, run.report.name) == ("postprocessing.json", "report.json")
    assert RunDir(str(tmp_path)).root == tmp_path  # a string is taken as a path
    assert set(RunDir.SETUP_FILES) <= set(TrainingDir.SETUP_FILES)


def _finished_run(root: Path, folds: int = 2) -> RunDir:
    run = RunDir(root)
    save_split(make_split([f"P{i}" for i in range(6)], folds, 0.0, 0), run.splits)
    for k in range(folds):
        run.fold(k).root.mkdir(parents=True)
        run.fold(k).last.write_bytes(b"a model")
    run.crossval.mkdir()
    run.postprocessing.write_text(json.dumps({
        "chosen": {"threshold": 0.6, "postprocess": "lcc", "tta": False},
        "models": [fold_identity(p) for p in run.fold_models(folds)]}))
    run.report.write_text(json.dumps({"summary": {"dice_mean": 0.8}}))
    return run


def test_run_members_reads_the_out_of_fold_choice_and_refuses_what_changed(tmp_path):
    run = _finished_run(tmp_path / "run")
    members = run_members(run.root)
    assert members.models == run.fold_models(2)
    assert (members.inference.threshold, members.inference.postprocess) == (0.6, "lcc")
    assert members.metrics == {"out_of_fold": {"dice_mean": 0.8},
                               "out_of_fold_setting": {"threshold": 0.6, "postprocess": "lcc", "tta": False}}
    assert members.notes == "2-fold ensemble of run"
    overridden = run_members(run.root, postprocess="none")
    assert overridden.inference.postprocess == "none" and overridden.notes.endswith("overridden after the "
                                                                                   "out-of-fold choice)")
    run.fold(1).last.write_bytes(b"another model, retrained")
    with pytest.raises(TumorsegError, match="changed after their out-of-fold choice"):
        run_members(run.root)
    run.fold(1).last.unlink()
    with pytest.raises(TumorsegError, match="fold_1/last.pt is missing"):
        run_members(run.root)
    with pytest.raises(TumorsegError, match="is not a finished cross-validation run"):
        run_members(tmp_path)
