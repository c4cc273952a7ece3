"""crossval: folds in their own run folders, out-of-fold report, resumption, and the
choice of threshold and post-processing on out-of-fold predictions."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from tumorseg import cli
from tumorseg.config import InferenceConfig, TrainConfig, replace_config
from tumorseg.crossval import METHODS, THRESHOLDS, choose_postprocessing, crossval

TINY = dict(n_features=4, depth=3, features=None, epochs=1, batch_size=4, folds=3, crop=16, samples_per_epoch=8,
            tumour_fraction=0.5, precision="fp32", channels_last=False, lr=1e-2)
PATIENTS = {"PAT_A_2001": 4, "PAT_B_2002": 3, "PAT_C_2003": 3, "PAT_D_2004": 3}


def tiny(**kw) -> TrainConfig:
    return replace_config(TrainConfig(), {**TINY, **kw})


def test_choice_on_out_of_fold_predictions_by_hand():
    """Two patients. P1: a true focus at 0.9 and a weak false positive of 2 voxels at 0.55;
    P2: two true foci (multifocal), 4 voxels at 0.9 and 2 voxels at 0.7."""
    p1 = np.zeros((2, 6, 6), np.float32)
    t1 = np.zeros((2, 6, 6), bool)
    p1[0, 0, :4] = 0.9
    t1[0, 0, :4] = True
    p1[1, 5, 4:6] = 0.55  # false positive
    p2 = np.zeros((2, 6, 6), np.float32)
    t2 = np.zeros((2, 6, 6), bool)
    p2[0, 0, :4] = 0.9
    t2[0, 0, :4] = True
    p2[1, 5, 4:6] = 0.7  # a second true focus
    t2[1, 5, 4:6] = True
    chosen, table = choose_postprocessing({"P1": p1, "P2": p2}, {"P1": t1, "P2": t2})
    rows = {(r["threshold"], r["postprocess"]): r for r in table}
    assert len(table) == len(THRESHOLDS) * len(METHODS)
    # At 0.5: none keeps P1's false positive (P1 2*4/(8+2) = 0.8, P2 1.0); lcc drops P2's second
    # focus (1.0 and 0.8); confident:0.8 drops both the false positive and that focus (peak 0.7).
    # At 0.6 without post-processing both patients are exact: the first candidate at 1.0 wins.
    assert rows[(0.5, "none")]["dice_mean"] == pytest.approx(0.9)
    assert rows[(0.5, "lcc")]["dice_mean"] == pytest.approx(0.9)
    assert rows[(0.5, "confident:0.8")]["dice_mean"] == pytest.approx(0.9)
    assert rows[(0.5, "min_size:10")]["dice_mean"] == 0.0  # every component is smaller
    assert rows[(0.6, "none")]["dice_mean"] == pytest.approx(1.0)
    assert rows[(0.6, "none")]["dice_median"] == pytest.approx(1.0)
    assert chosen == InferenceConfig(threshold=0.6, postprocess="none")
    assert max(r["dice_mean"] for r in table) == pytest.approx(1.0)


@pytest.mark.slow
def test_crossval_trains_every_fold_scores_out_of_fold_and_resumes(make_kaggle, tmp_path, monkeypatch):
    monkeypatch.setenv("TUMORSEG_CACHE", str(tmp_path / "cache"))
    data = make_kaggle(patients=PATIENTS, strays=False)
    run = tmp_path / "run"
    report = crossval(tiny(), data.root, run, precision="fp32", show_progress=False, plots=False)
    split = json.loads((run / "splits.json").read_text())
    assert len(split["folds"]) == 3 and sorted(p for f in split["folds"] for p in f) == sorted(PATIENTS)
    for k in range(3):
        assert (run / f"fold_{k}" / "last.pt").is_file()
        assert json.loads((run / f"fold_{k}" / "splits.json").read_text()) == split
    # every patient scored by the fold that held it out
    fold_of = {p: k for k, f in enumerate(split["folds"]) for p in f}
    assert {r["patient"]: r["fold"] for r in report["patients"]} == fold_of
    assert [f["fold"] for f in report["folds"]] == [0, 1, 2]
    assert sum(f["patients"] for f in report["folds"]) == len(PATIENTS) == report["summary"]["patients"]
    saved = json.loads((run / "crossval" / "report.json").read_text())
    assert saved["summary"] == report["summary"]
    pp = json.loads((run / "crossval" / "postprocessing.json").read_text())
    assert (pp["chosen"]["threshold"], pp["chosen"]["postprocess"]) == (report["threshold"], report["postprocess"])
    assert max(c["dice_mean"] for c in pp["candidates"]) == pytest.approx(report["summary"]["dice_mean"])
    rows = list(csv.DictReader((run / "crossval" / "per_patient.csv").open()))
    assert [r["fold"] for r in rows] == [str(fold_of[r["patient"]]) for r in rows]
    for p, n in PATIENTS.items():
        probs = np.load(run / "crossval" / "probabilities" / f"{p}.npy")
        assert probs.shape == (n, 32, 32) and probs.dtype == np.float16
    # run again: nothing is trained or predicted anew, the same report comes out
    def stamps():
        return {p.relative_to(run).as_posix(): p.stat().st_mtime_ns
                for p in [*run.glob("fold_*/last.pt"), *(run / "crossval" / "probabilities").glob("*.npy")]}

    before = stamps()
    again = crossval(tiny(), data.root, run, precision="fp32", show_progress=False, plots=False)
    assert stamps() == before and len(before) == 3 + len(PATIENTS)
    assert again["summary"] == report["summary"]
    # a retrained fold: its patients are predicted anew, the others are not
    import shutil

    shutil.rmtree(run / "fold_1")
    crossval(tiny(), data.root, run, precision="fp32", show_progress=False, plots=False)
    renewed = {name for name, t in stamps().items() if before.get(name) != t}
    assert renewed == {"fold_1/last.pt"} | {f"crossval/probabilities/{p}.npy" for p in split["folds"][1]}


def test_a_model_of_another_split_or_config_is_refused(make_kaggle, tmp_path, monkeypatch):
    """A fold folder filled by `tumorseg train` with another split must never score the
    run's patients (it may have trained on them)."""
    from tumorseg.errors import TumorsegError
    from tumorseg.training import fit

    monkeypatch.setenv("TUMORSEG_CACHE", str(tmp_path / "cache"))
    data = make_kaggle(patients=PATIENTS, strays=False)
    from tumorseg.data import open_data

    cache = open_data(data.root, progress=False)
    run = tmp_path / "run"
    # the run's config, but trained on a split of its own
    (tmp_path / "other.json").write_text(json.dumps({"seed": 5, "test": [], "folds": [
        ["PAT_A_2001"], ["PAT_B_2002"], ["PAT_C_2003", "PAT_D_2004"]]}))
    fit(tiny(fold=0), cache, run / "fold_0", split_file=tmp_path / "other.json", show_progress=False)
    with pytest.raises(TumorsegError, match="fold_0 was trained on other patients than fold 0 of the run's split"):
        crossval(tiny(), data.root, run, precision="fp32", show_progress=False, plots=False)
    (run / "splits.json").unlink()
    (run / "config.json").unlink()
    with pytest.raises(TumorsegError, match=r"fold_0 was trained with another config \(test_fraction differ\)"):
        crossval(tiny(test_fraction=0.25), data.root, run, precision="fp32", show_progress=False, plots=False)


def test_a_rerun_with_other_settings_is_refused_and_a_failed_start_leaves_nothing(make_kaggle, tmp_path,
                                                                                     monkeypatch):
    from tumorseg.errors import TumorsegError

    monkeypatch.setenv("TUMORSEG_CACHE", str(tmp_path / "cache"))
    data = make_kaggle(patients=PATIENTS, strays=False)
    run = tmp_path / "new" / "run"
    with pytest.raises(TumorsegError, match="crop 64 is larger than the 32x32 slices"):
        crossval(tiny(crop=64), data.root, run, precision="fp32", show_progress=False, plots=False)
    assert not (tmp_path / "new").exists()
    crossval(tiny(), data.root, run, precision="fp32", show_progress=False, plots=False)
    with pytest.raises(TumorsegError, match="config.json holds another config than this command's"):
        crossval(tiny(epochs=3), data.root, run, precision="fp32", show_progress=False, plots=False)


def test_ties_keep_the_simpler_candidate():
    probs = np.zeros((1, 4, 4), np.float32)
    probs[0, 0, :2] = 0.9
    truth = probs > 0.5
    chosen, table = choose_postprocessing({"P": probs}, {"P": truth})
    assert sum(r["dice_mean"] == 1.0 for r in table) > 10  # none, lcc, confident:0.8/0.9 at every threshold
    assert chosen == InferenceConfig(threshold=0.5, postprocess="none")
    # a gain below MIN_GAIN does not buy a more complex setting
    chosen, _ = choose_postprocessing({"P": probs}, {"P": truth}, min_gain=0.5)
    assert chosen == InferenceConfig(threshold=0.5, postprocess="none")


@pytest.mark.slow
def test_an_interrupted_fold_continues(make_kaggle, tmp_path, monkeypatch):
    from tumorseg.training import fit

    monkeypatch.setenv("TUMORSEG_CACHE", str(tmp_path / "cache"))
    data = make_kaggle(patients=PATIENTS, strays=False)
    run = tmp_path / "run"
    calls = []

    def stop_fold_1_early(cfg, cache, run_dir, **kw):
        calls.append((run_dir.name, kw.get("resume", False)))
        if run_dir.name == "fold_1" and not kw.get("resume"):
            kw["stop_after_steps"] = 1
        return fit(cfg, cache, run_dir, **kw)

    monkeypatch.setattr("tumorseg.crossval.fit", stop_fold_1_early)
    assert crossval(tiny(epochs=2), data.root, run, precision="fp32", show_progress=False, plots=False) is None
    assert calls == [("fold_0", False), ("fold_1", False)]
    calls.clear()
    assert crossval(tiny(epochs=2), data.root, run, precision="fp32", show_progress=False, plots=False)
    assert calls == [("fold_1", True), ("fold_2", False)]  # fold 0 was done


def test_crossval_cli(make_kaggle, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TUMORSEG_CACHE", str(tmp_path / "cache"))
    data = make_kaggle(patients=PATIENTS, strays=False)
    args = ["crossval", "--data", str(data.root), "--out", str(tmp_path / "run"), "--no-progress", "--precision",
            "fp32"]
    for k, v in TINY.items():
        if k != "precision":
            args += [f"--{k.replace('_', '-')}", "none" if v is None else str(v)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "4 patients out of fold: per-patient Dice mean" in out and "fold 2:" in out
    assert cli.main([*args, "--fold", "1"]) == 0  # one fold alone: already done here, so nothing to train
    assert "fold 1 trained" in capsys.readouterr().out
    assert cli.main([*args, "--fold", "3"]) == 2
    assert "--fold must be in 0..2, got 3" in capsys.readouterr().err


@pytest.mark.slow
def test_export_of_a_run_is_one_float16_ensemble_with_the_chosen_settings(make_kaggle, tmp_path, capsys,
                                                                          monkeypatch):
    import torch

    from tumorseg.checkpoint import load_checkpoint, load_members
    from tumorseg.errors import CheckpointError
    from tumorseg.inference import Predictor

    monkeypatch.setenv("TUMORSEG_CACHE", str(tmp_path / "cache"))
    data = make_kaggle(patients=PATIENTS, strays=False)
    run = tmp_path / "run"
    report = crossval(tiny(), data.root, run, precision="fp32", show_progress=False, plots=False)
    assert cli.main(["export", str(run), "--out", str(tmp_path / "ens.pt")]) == 0
    assert f"wrote {tmp_path / 'ens.pt'}" in capsys.readouterr().out
    members = load_members(tmp_path / "ens.pt")
    assert len(members) == 3
    assert members[0].inference == InferenceConfig(report["threshold"], report["postprocess"])
    folds = [load_checkpoint(run / f"fold_{k}" / "last.pt") for k in range(3)]
    for m, f in zip(members, folds, strict=True):
        for k, v in f.state_dict.items():
            assert m.state_dict[k].dtype == v.dtype
            assert torch.allclose(m.state_dict[k], v, rtol=1e-3, atol=1e-4), k  # float16 storage
    from tumorseg.checkpoint import read_payload

    raw = read_payload(tmp_path / "ens.pt")
    for m in raw["members"]:  # weights in float16, BatchNorm statistics in float32
        assert {v.dtype for k, v in m.items() if v.is_floating_point() and "running" not in k} == {torch.float16}
        assert {v.dtype for k, v in m.items() if "running" in k} == {torch.float32}
    assert raw["training"] is None and raw["metrics"]["out_of_fold"] == report["summary"]
    ens = Predictor.from_checkpoints(tmp_path / "ens.pt", device="cpu", precision="fp32")
    single = [Predictor.from_checkpoints(run / f"fold_{k}" / "last.pt", device="cpu", precision="fp32")
              for k in range(3)]
    x = torch.rand(2, 3, 16, 16)
    mean = sum(p.predict(x).probabilities for p in single) / 3
    assert torch.allclose(ens.predict(x).probabilities, mean, atol=2e-3)
    with pytest.raises(CheckpointError, match="is an ensemble of 3 models; load it with"):
        load_checkpoint(tmp_path / "ens.pt")
    from tumorseg.checkpoint import load_model

    model = load_model(tmp_path / "ens.pt")  # logits of the mean probability
    with torch.no_grad():
        assert torch.allclose(torch.sigmoid(model(x)), ens.predict(x).probabilities, atol=1e-5)
    # overrides, and a run that is not finished
    assert cli.main(["export", str(run), "--out", str(tmp_path / "e2.pt"), "--postprocess", "lcc"]) == 0
    assert load_members(tmp_path / "e2.pt")[0].inference.postprocess == "lcc"
    capsys.readouterr()
    assert cli.main(["export", str(tmp_path), "--out", str(tmp_path / "e3.pt")]) == 2
    assert "is not a finished cross-validation run" in capsys.readouterr().err
    assert not (tmp_path / "e3.pt").exists()

    # The quality flag of the ensemble, calibrated out of fold with the one command; the
    # rule it stores is the one its report gives, and predict then flags every patient.
    import json

    from tumorseg.calibration import read_qc_rule
    from tumorseg.prediction import predict

    assert read_qc_rule(tmp_path / "ens.pt") is None  # an export carries no rule
    assert cli.main(["calibrate-qc", str(tmp_path / "ens.pt"), "--data", str(data.root), "--out",
                     str(tmp_path / "qc"), "--engine", "torch", "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"out of fold ({len(PATIENTS)} patients" in out and f"rule stored in {tmp_path / 'ens.pt'}" in out
    calibration = json.loads((tmp_path / "qc" / "qc_calibration.json").read_text())
    assert sorted(p["patient"] for p in calibration["patients"]) == sorted(PATIENTS)
    rule = read_qc_rule(tmp_path / "ens.pt")
    assert rule is not None and rule.to_dict() == calibration["rule"]
    flagged = Predictor.from_checkpoints(tmp_path / "ens.pt", device="cpu", precision="fp32", engine="torch")
    assert flagged.qc_rule == rule and flagged.trained_on == frozenset(PATIENTS)
    summaries = predict([data.root], tmp_path / "pred", predictor=flagged, show_progress=False)
    assert {s.qc for s in summaries} <= {"ok", "review"} and all(s.qc for s in summaries)
    assert all(s.qc_reason for s in summaries) and all(0 <= s.qc_score <= 1 for s in summaries)


def _fold_ensemble(path, split, splits=None):
    """A file of one tiny model per fold, model k keeping `splits[k]` (default: fold k's)."""
    from tumorseg.checkpoint import Checkpoint, export_ensemble, save_checkpoint
    from tumorseg.model import UNet

    files = []
    for k in range(len(split.folds)):
        kept = splits[k] if splits is not None else {"fold": k, "train": split.train(k), "val": split.folds[k]}
        files.append(path.parent / f"m{k}.pt")
        save_checkpoint(files[-1], Checkpoint.of_model(UNet(n_features=4, depth=3).eval(), train_config=tiny(),
                                                       split=kept))
    export_ensemble(files, path)
    return files


def test_fine_tuning_a_fold_ensemble_starts_each_fold_from_the_model_that_never_saw_it(tmp_path):
    from tumorseg.checkpoint import Checkpoint, save_checkpoint
    from tumorseg.crossval import check_init, fold_config
    from tumorseg.data.splits import make_split
    from tumorseg.errors import TumorsegError
    from tumorseg.model import UNet

    split = make_split(list(PATIENTS), folds=3)
    ens = tmp_path / "ens.pt"
    files = _fold_ensemble(ens, split)
    cfg = tiny(init=str(ens))
    assert [fold_config(cfg, k).init for k in range(3)] == [f"{ens}@{k}" for k in range(3)]
    assert fold_config(cfg, 1).fold == 1
    check_init(cfg, split)  # each model k was trained on fold k's training patients only
    # model 1 named for every fold: it was trained on fold 0's patients
    with pytest.raises(TumorsegError, match=rf"--init {ens}@1 was trained on \d patient\(s\) of fold 0 \(e.g. PAT_"):
        check_init(tiny(init=f"{ens}@1"), split)
    # the same models in another order
    rotated = tmp_path / "rotated" / "ens.pt"
    rotated.parent.mkdir()
    _fold_ensemble(rotated, split, [{"fold": k, "train": split.train((k + 1) % 3)} for k in range(3)])
    with pytest.raises(TumorsegError, match="of fold 0"):
        check_init(tiny(init=str(rotated)), split)
    # one model (not a fold ensemble) trained on everybody, and one that keeps no split
    assert fold_config(tiny(init=str(files[0])), 2).init == str(files[0])
    save_checkpoint(tmp_path / "all.pt", Checkpoint.of_model(UNet(n_features=4, depth=3).eval(),
                                                            split={"fold": -1, "train": list(PATIENTS)}))
    with pytest.raises(TumorsegError, match="was trained on 2 patient"):
        check_init(tiny(init=str(tmp_path / "all.pt")), split)
    save_checkpoint(tmp_path / "nosplit.pt", Checkpoint.of_model(UNet(n_features=4, depth=3).eval()))
    with pytest.raises(TumorsegError, match="does not record the patients it was trained on"):
        check_init(tiny(init=str(tmp_path / "nosplit.pt")), split)
    check_init(tiny(), split)  # random weights: nothing to check
    # a run with a test set: starting models must not have seen it either
    held = make_split(list(PATIENTS), folds=3, test_fraction=0.25)
    (tmp_path / "held").mkdir()
    _fold_ensemble(tmp_path / "held" / "ens.pt", held,
                   [{"fold": k, "train": held.train(k) + held.test} for k in range(3)])
    with pytest.raises(TumorsegError, match=rf"trained on 1 patient\(s\) of the test set \(e.g. {held.test[0]}\)"):
        check_init(tiny(init=str(tmp_path / "held" / "ens.pt")), held)


@pytest.mark.slow
def test_crossval_fine_tunes_a_fold_ensemble_fold_by_fold(make_kaggle, tmp_path, monkeypatch):
    from tumorseg.checkpoint import load_checkpoint
    from tumorseg.data.splits import make_split

    monkeypatch.setenv("TUMORSEG_CACHE", str(tmp_path / "cache"))
    data = make_kaggle(patients=PATIENTS, strays=False)
    ens = tmp_path / "ens.pt"
    _fold_ensemble(ens, make_split(list(PATIENTS), folds=3))
    report = crossval(tiny(init=str(ens)), data.root, tmp_path / "run", precision="fp32", show_progress=False,
                      plots=False)
    assert report is not None and report["summary"]["patients"] == 4
    for k in range(3):
        assert load_checkpoint(tmp_path / "run" / f"fold_{k}" / "last.pt").train_config.init == f"{ens}@{k}"
    # resumed as it is: finished folds are recognised as this run's
    assert crossval(tiny(init=str(ens)), data.root, tmp_path / "run", precision="fp32", show_progress=False,
                    plots=False) is not None
