"""Beyond one process: `torchrun` data-parallel training on this CPU (gloo) gives the
weights of one process training on the global batch, stops every rank on SIGTERM and
resumes; `predict --shard K/N` parts are disjoint and complete, and `tumorseg merge`
joins their summaries without losing a row."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_prediction import flair_predictor

import tumorseg.training as training
from tumorseg.checkpoint import load_checkpoint, load_model
from tumorseg.cli import main
from tumorseg.data.inputs import InputRef
from tumorseg.distributed import World, shard_of
from tumorseg.errors import ConfigError
from tumorseg.losses import soft_dice_loss
from tumorseg.prediction import parse_shard, predict, shard_volumes
from tumorseg.runtime import graceful_stop
from tumorseg.training import global_batches, resumed_step, stop_agreed
from tumorseg.writers import SUMMARY_FIELDS

HELPER = Path(__file__).resolve().parent / "helpers" / "ddp_train.py"
TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))


# --------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_shards_are_disjoint_and_complete_in_any_input_order(n):
    names = [f"P{i:03d}" for i in range(23)]
    volumes = [InputRef(name, "slices") for name in reversed(names)]
    parts = [[v.name for v in shard_volumes(volumes, k, n)] for k in range(n)]
    assert sorted(sum(parts, [])) == names
    assert len(set(sum(parts, []))) == len(names)  # disjoint
    shuffled = [InputRef(name, "slices") for name in names[::2] + names[1::2]]
    assert [[v.name for v in shard_volumes(shuffled, k, n)] for k in range(n)] == parts


@pytest.mark.parametrize("text", ["3/3", "-1/2", "1", "a/b", "1/0", ""])
def test_parse_shard_refuses(text):
    with pytest.raises(ConfigError, match="--shard must be K/N"):
        parse_shard(text)


def test_each_rank_trains_its_shard_of_the_single_process_global_batch():
    order = torch.arange(105)
    single = global_batches(order, 6)
    two = global_batches(order, 3, world_size=2)
    assert [b.tolist() for b in two] == [b.tolist() for b in single[: len(two)]]  # 17 full batches of 6
    assert len(two) == 17 and len(single) == 18  # the incomplete last global batch is dropped
    batch = torch.arange(6)
    shards = [batch[shard_of(batch, World(rank=r, size=2))].tolist() for r in range(2)]
    assert shards == [[0, 1, 2], [3, 4, 5]]


def test_resumed_step_keeps_the_position_in_the_epoch():
    assert resumed_step(10, 4, 2, 2) == 10
    assert resumed_step(10, 4, 2, 1) == 20  # 80 slices done: 20 batches of 4
    assert resumed_step(10, 4, 1, 4) == 2  # 40 slices: 2 whole batches of 16, 8 slices again


def test_pooled_dice_with_the_sums_of_a_larger_batch():
    p, g = torch.tensor([[0.9, 0.1]]), torch.tensor([[1.0, 0.0]])
    both = soft_dice_loss(torch.cat([p, p]), torch.cat([g, g]), logits=False)
    doubled = soft_dice_loss(p, g, logits=False, pool=lambda sums: 2 * sums)
    assert torch.allclose(both, doubled)


# --------------------------------------------------------------------------- sharded predict


def test_sharded_predict_and_merge_lose_no_row(kaggle, tmp_path, capsys):
    predictor = flair_predictor()
    whole = predict([kaggle.root], tmp_path / "whole", predictor=predictor, show_progress=False)
    for k in range(2):
        predict([kaggle.root], tmp_path / "parts", predictor=predictor, show_progress=False, shard=(k, 2))
    assert sorted(p.name for p in (tmp_path / "parts").glob("summary*")) == [
        "summary.shard-0-of-2.csv", "summary.shard-1-of-2.csv"]
    assert main(["merge", str(tmp_path / "parts")]) == 0
    assert "summary.csv: 3 volumes" in capsys.readouterr().out

    def rows(path):
        return list(csv.DictReader(path.open()))

    assert rows(tmp_path / "parts" / "summary.csv") == rows(tmp_path / "whole" / "summary.csv")
    assert len(whole) == 3
    (tmp_path / "parts" / "summary.shard-1-of-2.csv").unlink()
    (tmp_path / "parts" / "summary.csv").unlink()
    assert main(["merge", str(tmp_path / "parts")]) == 1
    assert "shard(s) 1/2 have no summary yet" in capsys.readouterr().err


def test_an_empty_shard_still_writes_its_table(kaggle, tmp_path, capsys):
    code = main(["predict", str(kaggle.root), "--out", str(tmp_path / "parts"), "--shard", "4/5",
                 "--checkpoint", str(_tiny_checkpoint(tmp_path)), "--engine", "torch", "--precision", "fp32"])
    assert code == 0 and "nothing in this shard (4/5)" in capsys.readouterr().out
    assert (tmp_path / "parts" / "summary.shard-4-of-5.csv").read_text() == ",".join(SUMMARY_FIELDS) + "\n"


def _tiny_checkpoint(tmp_path: Path) -> Path:
    from test_nifti import _checkpoint

    return _checkpoint(tmp_path)


def test_merge_without_shards_is_an_error(tmp_path, capsys):
    assert main(["merge", str(tmp_path)]) == 2
    assert "holds no summary.shard-K-of-N.csv" in capsys.readouterr().err


def test_a_signal_handled_during_the_stop_all_reduce_is_not_lost(monkeypatch):
    """The signal lands while the collective runs (its handler runs when the call
    returns): this check goes by the ranks' answer, the next one stops."""
    calls = []

    def all_reduce_meanwhile_signalled(flag, device):
        calls.append(flag)
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)  # as Python runs the handler when the call returns
        return flag  # every rank said False before the signal

    monkeypatch.setattr(training, "any_rank", all_reduce_meanwhile_signalled)
    two = World(rank=0, size=2)
    with graceful_stop() as stop:
        assert stop_agreed(stop, two, torch.device("cpu")) is False
        assert stop.requested
        assert stop_agreed(stop, two, torch.device("cpu")) is True
    assert calls == [False, True]
    with graceful_stop() as stop:  # one process: the flag itself
        assert stop_agreed(stop, World(rank=0, size=1), torch.device("cpu")) is False
        stop.requested = True
        assert stop_agreed(stop, World(rank=0, size=1), torch.device("cpu")) is True


# --------------------------------------------------------------------------- torchrun


def _train_args(data: Path, out: Path, batch: int, epochs: int = 1, samples: int = 16) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--epochs", str(epochs), "--depth", "3", "--features", "4,8,8",
            "--batch-size", str(batch), "--crop", "16", "--samples-per-epoch", str(samples), "--lr", "0.01",
            "--precision", "fp32", "--channels-last", "false", "--folds", "3", "--threads", "1", "--no-progress"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HELPER.parents[1] / "src")}


def _torchrun(nproc: int, *args: str) -> list[str]:
    return [TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", str(HELPER), *args]


@pytest.mark.slow
def test_two_gloo_processes_give_the_weights_of_one_process_with_the_global_batch(kaggle, tmp_path):
    """BatchNorm-free U-Net (each process would normalise its own shard), the default
    BCE + batch-pooled Dice loss, augmentation and crops on: 2 processes of batch 2 for
    4 steps give the weights and validation scores of 1 process of batch 4."""
    one = subprocess.run([sys.executable, str(HELPER), "--no-batchnorm", *_train_args(kaggle.root, tmp_path / "one",
                                                                                       4)],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stdout + one.stderr
    two = subprocess.run(_torchrun(2, "--no-batchnorm", *_train_args(kaggle.root, tmp_path / "two", 2)),
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout + two.stderr
    assert "2 processes (global batch 4)" in two.stdout
    assert two.stdout.count("epoch 1/1:") == 1  # rank 0 prints, rank 1 does not
    a, b = load_checkpoint(tmp_path / "one" / "last.pt"), load_checkpoint(tmp_path / "two" / "last.pt")
    assert a.state_dict.keys() == b.state_dict.keys() and not any("bn" in k for k in a.state_dict)
    for k in a.state_dict:
        assert torch.allclose(a.state_dict[k], b.state_dict[k], atol=1e-5, rtol=1e-4), k
    assert a.history[0]["train_loss"] > 0 and b.history[0]["train_loss"] > 0
    assert b.training.world_size == 2 and a.training.world_size == 1
    va, vb = a.metrics["val_per_patient"], b.metrics["val_per_patient"]
    assert va.keys() == vb.keys() and len(va) == 1  # fold 0 of 3: one validation patient, gathered
    assert all(abs(va[p] - vb[p]) < 1e-4 for p in va)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


@pytest.mark.slow
def test_sigterm_under_torchrun_stops_every_rank_and_the_run_resumes(kaggle, tmp_path):
    run = tmp_path / "run"
    args = _train_args(kaggle.root, run, 2, epochs=3, samples=800)
    proc = subprocess.Popen(_torchrun(2, *args), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while not (run / "metrics.csv").is_file():  # the first epoch is done and saved
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.2)
    saved_at_epoch_end = (run / "last.pt").stat().st_mtime_ns
    time.sleep(0.5)  # into epoch 2 (an epoch takes seconds)
    # As a scheduler stops a job: torchrun gets SIGTERM and sends one to each worker.
    os.killpg(proc.pid, signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert "interrupted: saved" in out, out  # every rank stopped at one step, and rank 0 saved there
    assert (run / "last.pt").stat().st_mtime_ns > saved_at_epoch_end
    state = load_checkpoint(run / "last.pt")
    assert state.training is not None and state.training.world_size == 2
    assert state.epoch < 3, out
    resumed = subprocess.run(_torchrun(2, "--resume", str(run), "--threads", "1", "--no-progress"), env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    final = load_checkpoint(run / "last.pt")
    assert final.epoch == 3 and not final.training.progress.get("step")
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    model = load_model(run / "last.pt")
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 1, 32, 32)


@pytest.mark.slow
def test_sync_bn_on_the_cpu_is_refused_with_a_reason(kaggle, tmp_path):
    r = subprocess.run(_torchrun(2, *_train_args(kaggle.root, tmp_path / "r", 2), "--sync-bn", "true"), env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "sync_bn needs CUDA (PyTorch's SyncBatchNorm has no CPU version)" in r.stdout + r.stderr


def test_crossval_refuses_torchrun_and_trains_one_fold_with_fold(kaggle, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["crossval", "--data", str(kaggle.root), "--out", str(tmp_path / "cv")]) == 2
    assert "crossval runs one process per fold, not under torchrun" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    args = _train_args(kaggle.root, tmp_path / "cv", 2)
    assert main(["crossval", *args, "--fold", "1"]) == 0
    assert "fold 1 trained" in capsys.readouterr().out
    assert (tmp_path / "cv" / "fold_1" / "last.pt").is_file() and not (tmp_path / "cv" / "fold_0").exists()
    assert not (tmp_path / "cv" / "crossval").exists()
