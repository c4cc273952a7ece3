"""The command line: every command end to end on synthetic data, and one-line errors."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import fields

import numpy as np
import pytest
from PIL import Image

from tumorseg import cli
from tumorseg.config import TrainConfig, merge_layers

TINY_TRAIN = ["--n-features", "4", "--depth", "3", "--features", "none", "--epochs", "2", "--batch-size", "4",
              "--folds", "2", "--crop", "16", "--samples-per-epoch", "8", "--precision", "fp32",
              "--no-progress"]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def trained(kaggle, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TUMORSEG_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    code, out, err = run_cli(["train", "--data", kaggle.root, "--out", run, *TINY_TRAIN], capsys)
    assert code == 0, err
    assert "done: 2 epochs" in out
    return run


def test_help_documents_every_option_with_default(capsys):
    for command in ["prepare", "train", "evaluate", "predict"]:
        with pytest.raises(SystemExit) as e:
            cli.main([command, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        options = [w.split("=")[0] for w in text.split() if w.startswith("--") and w != "--help"]
        assert options, command
        for block in text.split("\n  --")[1:]:
            name = block.split()[0]
            if name in ("help", "version"):
                continue
            assert "default" in block or "required" in block, f"{command} --{name}: no default in its help"


@pytest.mark.slow
def test_train_evaluate_predict(trained, kaggle, tmp_path, capsys):
    for name in ["config.json", "splits.json", "metrics.csv", "training_curves.png", "last.pt", "best.pt"]:
        assert (trained / name).is_file()

    report_dir = tmp_path / "report"
    code, out, err = run_cli(["evaluate", "--data", kaggle.root, "--checkpoint", trained / "best.pt",
                              "--out", report_dir, "--no-progress"], capsys)
    assert code == 0, err
    report = json.loads((report_dir / "report.json").read_text())
    assert set(report) >= {"checkpoint", "threshold", "postprocess", "summary", "patients"}
    assert set(report["summary"]) >= {"patients", "dice_mean", "dice_median", "dice_std", "iou_mean",
                                      "precision_mean", "recall_mean", "hd95_mean", "tumor_slice_dice_mean",
                                      "empty_slice_fp_rate"}
    assert report["summary"]["patients"] == 3 and report["threshold"] == 0.5
    assert [p["patient"] for p in report["patients"]] == kaggle.patients
    first = report["patients"][0]
    assert set(first) >= {"patient", "slices", "dice", "iou", "precision", "recall", "hd95", "true_voxels",
                          "pred_voxels"}
    assert first["slices"] == 12 and first["true_voxels"] == int(kaggle.masks["PAT_A_2001"].sum())
    dices = [p["dice"] for p in report["patients"]]
    assert report["summary"]["dice_mean"] == pytest.approx(np.mean(dices))
    rows = list(csv.DictReader((report_dir / "per_patient.csv").open()))
    assert [r["patient"] for r in rows] == kaggle.patients
    for png in ["dice_distribution.png", "examples.png"]:
        assert Image.open(report_dir / png).size[0] > 100
    assert "per-patient Dice mean" in out

    # Validation fold only, through the run's split.
    split = json.loads((trained / "splits.json").read_text())
    code, out, err = run_cli(["evaluate", "--data", kaggle.root, "--checkpoint", trained / "best.pt",
                              "--split", trained / "splits.json", "--fold", "0", "--out", tmp_path / "r0",
                              "--no-progress"], capsys)
    assert code == 0, err
    got = [p["patient"] for p in json.loads((tmp_path / "r0" / "report.json").read_text())["patients"]]
    assert got == split["folds"][0]

    pred_dir = tmp_path / "pred"
    patient = kaggle.root / "PAT_B_2002"
    code, out, err = run_cli(["predict", patient, kaggle.image_path("PAT_A_2001", 3), "--checkpoint",
                              trained / "best.pt", "--out", pred_dir, "--overlay", "--no-progress"], capsys)
    assert code == 0, err
    for n in range(1, 6):
        mask = np.asarray(Image.open(pred_dir / "PAT_B_2002" / f"PAT_B_2002_{n}_pred.png"))
        assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 255}
        assert (pred_dir / "PAT_B_2002" / f"PAT_B_2002_{n}_overlay.png").is_file()
    assert (pred_dir / "PAT_A_2001_3" / "PAT_A_2001_3_pred.png").is_file()
    assert not list(pred_dir.rglob("*_mask_pred.png"))  # masks in the input are ignored
    summary = list(csv.DictReader((pred_dir / "summary.csv").open()))
    assert [r["volume"] for r in summary] == ["PAT_A_2001_3", "PAT_B_2002"]  # sorted by volume
    assert [r["slices"] for r in summary] == ["1", "5"]
    assert "PAT_B_2002" in out


def test_predict_without_masks(trained, kaggle, tmp_path, capsys):
    folder = tmp_path / "new_patient"
    folder.mkdir()
    for n in (1, 2, 10):  # arbitrary names, numeric order
        Image.fromarray(kaggle.images["PAT_A_2001"][n - 1]).save(folder / f"scan_{n}.png")
    code, out, err = run_cli(["predict", folder, "--checkpoint", trained / "best.pt", "--out",
                              tmp_path / "p", "--no-progress"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "p" / "new_patient").iterdir()) == [
        "scan_10_pred.png", "scan_1_pred.png", "scan_2_pred.png"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["evaluate", "--data", "{tmp}/missing", "--checkpoint", "{tmp}/x.pt"], "does not exist"),
        (["evaluate", "--data", "{root}", "--checkpoint", "{tmp}/garbage.pt"], "not a readable PyTorch checkpoint"),
        (["predict", "{tmp}/missing.tif", "--checkpoint", "{tmp}/garbage.pt"], "does not exist"),
        (["predict", "{tmp}/empty", "--checkpoint", "{seed}"], "no .tif/.png slices"),
        (["train", "--data", "{tmp}/empty"], "no patient folder"),
        (["train", "--data", "{root}", "--depth", "1"], "depth must be >= 2"),
        (["train", "--data", "{root}", "--channels", "T2"], "unknown channel"),
        (["train", "--resume", "{tmp}/nothing"], "cannot resume"),
        (["evaluate", "--data", "{root}", "--fold", "1", "--checkpoint", "{seed}"], "--fold needs --split"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message, kaggle, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TUMORSEG_CACHE", str(tmp_path / "cache"))
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "empty").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "grey.png")
    # A tiny valid tumorseg checkpoint stands in where the error is not about the checkpoint.
    from tumorseg.checkpoint import Checkpoint, save_checkpoint
    from tumorseg.model import UNet

    save_checkpoint(tmp_path / "ok.pt", Checkpoint.of_model(UNet(n_features=2, depth=2)))
    subst = {"{tmp}": str(tmp_path), "{root}": str(kaggle.root), "{seed}": str(tmp_path / "ok.pt")}
    argv = []
    for a in args:
        for k, v in subst.items():
            a = a.replace(k, v)
        argv.append(a)
    code, out, err = run_cli(argv, capsys)
    assert code == 2
    # Progress bars may precede it; the error itself is exactly one line, the last one.
    lines = [line for line in err.splitlines() if line.startswith("tumorseg ")]
    assert len(lines) == 1 and message in lines[0], err
    assert err.rstrip().endswith(lines[0])
    assert "Traceback" not in err


@pytest.mark.slow
def test_predict_uses_the_shipped_model_by_default(kaggle, tmp_path, capsys):
    from tumorseg.checkpoint import load_members
    from tumorseg.inference import default_checkpoint_path

    members = load_members(default_checkpoint_path())  # the five fold models of a cross-validation
    assert len(members) == 5 and {m.kind for m in members} == {"tumorseg"}
    assert {m.inference.postprocess for m in members} == {"lcc"}  # chosen out of fold
    assert default_checkpoint_path().stat().st_size < 14_000_000  # five models in float16 inside the wheel
    code, out, err = run_cli(["predict", kaggle.root / "PAT_B_2002", "--out", tmp_path / "p", "--no-progress"],
                             capsys)
    assert code == 0, err
    assert len(list((tmp_path / "p" / "PAT_B_2002").glob("*_pred.png"))) == 5


def test_default_checkpoint_missing_is_a_clear_error(kaggle, tmp_path, capsys, monkeypatch):
    import tumorseg.inference as inference

    monkeypatch.setattr(inference, "default_checkpoint_path", lambda: tmp_path / "none.pt")
    monkeypatch.setenv("TUMORSEG_CACHE", str(tmp_path / "cache"))
    code, out, err = run_cli(["evaluate", "--data", kaggle.root], capsys)
    assert code == 2 and "no model is shipped" in err and "--checkpoint" in err


def test_config_file_and_flags_override_preset(kaggle, tmp_path, capsys):
    args = cli.build_parser().parse_args(["train", "--data", "x", "--preset", "seed", "--config",
                                          str(tmp_path / "c.toml"), "--epochs", "3"])
    (tmp_path / "c.toml").write_text('lr = 0.002\nepochs = 7\nchannels = ["FLAIR"]\n')
    cfg = merge_layers(args.preset, args.config, {f.name: getattr(args, f"cfg_{f.name}") for f in fields(TrainConfig)})
    assert (cfg.lr, cfg.epochs, cfg.channels, cfg.batch_size) == (0.002, 3, ("FLAIR",), 8)
    (tmp_path / "c.json").write_text(json.dumps({"learning_rate": 1}))
    args.config = str(tmp_path / "c.json")
    from tumorseg.errors import TumorsegError

    with pytest.raises(TumorsegError, match="unknown config field"):
        merge_layers(args.preset, args.config, {})


@pytest.mark.slow
def test_ctrl_c_saves_and_resume_finishes(kaggle, tmp_path):
    """A real process: SIGINT during training exits 130 with last.pt saved; --resume completes."""
    env = {**os.environ, "TUMORSEG_CACHE": str(tmp_path / "cache")}
    run = tmp_path / "run"
    args = [sys.executable, "-m", "tumorseg", "train", "--data", str(kaggle.root), "--out", str(run), *TINY_TRAIN]
    args[args.index("--epochs") + 1] = "6"
    args[args.index("--samples-per-epoch") + 1] = "200"
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.csv").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"--resume {run}" in err and (run / "last.pt").is_file()
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    from tumorseg.checkpoint import load_checkpoint

    saved = load_checkpoint(run / "last.pt")
    assert (saved.epoch, saved.training.progress["step"]) < (6, 0)
    resumed = subprocess.run([sys.executable, "-m", "tumorseg", "train", "--resume", str(run), "--no-progress"],
                             env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(run / "last.pt").epoch == 6
    assert len(list(csv.DictReader((run / "metrics.csv").open()))) == 6


def test_resume_rejects_config_options(tmp_path, capsys):
    code, out, err = run_cli(["train", "--resume", tmp_path, "--epochs", "3"], capsys)
    assert code == 2 and "--resume continues the saved config" in err
