"""Training engine: run folders, interruption and exact resume, checkpoints, final models."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging

import pytest
import torch

from tumorseg.checkpoint import load_checkpoint
from tumorseg.config import TrainConfig, preset, replace_config
from tumorseg.data import prepare
from tumorseg.errors import TumorsegError
from tumorseg.training import fit, run_training

TINY = dict(
    n_features=4, depth=3, features=None, epochs=2, batch_size=4, folds=2, crop=16,
    samples_per_epoch=12, tumour_fraction=0.5, augment=True, precision="fp32", channels_last=False,
    lr=1e-2, schedule="cosine", loss="bce_dice",
)


def tiny_config(**kw) -> TrainConfig:
    return replace_config(TrainConfig(), {**TINY, **kw})


@pytest.fixture
def cache(kaggle, tmp_path):
    return prepare(kaggle.root, tmp_path / "cache", progress=False)


def test_seed_preset_is_the_original_recipe():
    c = preset("seed")
    assert (c.depth, c.n_features, c.features, c.channels) == (4, 32, None, ("pre-contrast", "FLAIR", "post-contrast"))
    assert (c.lr, c.batch_size, c.epochs, c.schedule, c.lr_step, c.lr_gamma) == (1e-4, 8, 150, "step", 30, 0.1)
    assert (c.loss, c.augment, c.tumour_fraction, c.crop, c.precision) == ("dice", False, -1.0, 0, "fp32")


def test_step_schedule_drops_lr_at_epoch_30():
    from tumorseg.training import make_scheduler

    cfg = preset("seed")
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = make_scheduler(cfg, opt)
    lrs = []
    for _ in range(32):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[29] == pytest.approx(1e-4) and lrs[30] == pytest.approx(1e-5) and lrs[31] == pytest.approx(1e-5)


def test_fit_writes_run_folder(cache, tmp_path):
    run = tmp_path / "run"
    result = fit(tiny_config(), cache, run, show_progress=False)
    assert result.epochs_done == 2 and not result.interrupted
    for name in ["config.json", "splits.json", "metrics.csv", "training_curves.png", "last.pt", "best.pt"]:
        assert (run / name).is_file(), name
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert set(rows[0]) >= {"train_loss", "val_loss", "val_dice_mean", "val_dice_median", "lr"}
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["crop"] == 16 and cfg["n_features"] == 4
    split = json.loads((run / "splits.json").read_text())
    train, val = set(split["folds"][1]), set(split["folds"][0])
    assert not train & val and train | val == set(cache.patients)

    ck = load_checkpoint(run / "last.pt")
    assert ck.kind == "tumorseg" and ck.train_config == tiny_config() and ck.model_config.n_features == 4
    assert ck.epoch == 2 and ck.percentiles == (10.0, 99.0) and ck.channels == tiny_config().channels
    assert ck.training is not None and set(ck.training.optimizer) == {"state", "param_groups"}
    assert ck.inference.postprocess == "none" and ck.inference.threshold == 0.5
    assert [h["epoch"] for h in ck.history] == [1, 2] and ck.metrics["epoch"] == 2
    assert ck.split["val"] == sorted(val)
    assert json.loads((run / "inference.json").read_text()) == {"threshold": 0.5, "postprocess": "none", "tta": False}
    model = load_checkpoint(run / "best.pt").build_model()
    assert model.config.n_features == 4 and not model.training


def test_validation_uses_the_inference_settings_asked_for(cache, tmp_path):
    from tumorseg.config import InferenceConfig

    inf = InferenceConfig(threshold=0.3, postprocess="lcc")
    fit(tiny_config(epochs=1), cache, tmp_path / "run", inference=inf, show_progress=False)
    assert load_checkpoint(tmp_path / "run" / "last.pt").inference == inf
    # and a resume keeps them
    fit(tiny_config(epochs=1), cache, tmp_path / "run2", inference=inf, show_progress=False, stop_after_steps=1)
    fit(tiny_config(), cache, tmp_path / "run2", resume=True, show_progress=False)
    assert load_checkpoint(tmp_path / "run2" / "last.pt").inference == inf


def _state(path):
    return load_checkpoint(path).state_dict


# 3 steps per epoch: stop mid-epoch 1, after its last step (before validation), mid-epoch 2.
@pytest.mark.slow
@pytest.mark.parametrize(("stop_after", "epoch", "step"), [(2, 0, 2), (3, 0, 3), (5, 1, 2)])
def test_interrupted_and_resumed_run_equals_uninterrupted(cache, tmp_path, stop_after, epoch, step):
    cfg = tiny_config()
    full = fit(cfg, cache, tmp_path / "full", show_progress=False)
    part = fit(cfg, cache, tmp_path / "part", show_progress=False, stop_after_steps=stop_after)
    assert part.interrupted
    progress = load_checkpoint(tmp_path / "part" / "last.pt").training.progress
    assert (progress["epoch"], progress["step"]) == (epoch, step)
    resumed = fit(cfg, cache, tmp_path / "part", resume=True, show_progress=False)
    assert resumed.epochs_done == full.epochs_done == 2
    a, b = _state(tmp_path / "full" / "last.pt"), _state(tmp_path / "part" / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows_full = list(csv.DictReader((tmp_path / "full" / "metrics.csv").open()))
    rows_part = list(csv.DictReader((tmp_path / "part" / "metrics.csv").open()))
    assert [r["val_dice_mean"] for r in rows_full] == [r["val_dice_mean"] for r in rows_part]


def test_a_second_ctrl_c_stops_at_once_and_says_nothing_was_saved(cache, tmp_path, monkeypatch):
    """Two SIGINTs in epoch 2 (3 steps per epoch): no save at the stop, last.pt stays the
    end of epoch 1, and the result says so; a finished run is never reported interrupted."""
    import os
    import signal

    original_step = torch.optim.Adam.step
    calls = {"n": 0}

    def step_with_two_signals(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # raises KeyboardInterrupt here
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step_with_two_signals)
    part = fit(tiny_config(), cache, tmp_path / "part", show_progress=False)
    assert part.interrupted and part.at_once and part.epochs_done == 1
    progress = load_checkpoint(tmp_path / "part" / "last.pt").training.progress
    assert (progress["epoch"], progress["step"]) == (1, 0)
    done = fit(tiny_config(), cache, tmp_path / "part", resume=True, show_progress=False)
    assert not done.interrupted and not done.at_once and done.epochs_done == 2


@pytest.mark.slow
def test_ctrl_c_inside_an_optimiser_step_stops_after_it_and_resumes_exactly(cache, tmp_path, monkeypatch):
    """SIGINT arriving in the middle of optimizer.step() must not tear the saved state."""
    import os
    import signal

    cfg = tiny_config()
    fit(cfg, cache, tmp_path / "full", show_progress=False)
    original_step = torch.optim.Adam.step
    calls = {"n": 0}

    def step_with_signal(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # handled while the step is still running
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step_with_signal)
    part = fit(cfg, cache, tmp_path / "part", show_progress=False)
    assert part.interrupted
    assert load_checkpoint(tmp_path / "part" / "last.pt").training.progress["step"] == 2
    monkeypatch.setattr(torch.optim.Adam, "step", original_step)
    fit(cfg, cache, tmp_path / "part", resume=True, show_progress=False)
    a, b = _state(tmp_path / "full" / "last.pt"), _state(tmp_path / "part" / "last.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_new_run_does_not_reuse_a_stale_split(cache, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "splits.json").write_text('{"seed": 9, "test": [], "folds": [["PAT_A_2001"], ["x"]]}')
    fit(tiny_config(epochs=1), cache, run, show_progress=False)
    split = json.loads((run / "splits.json").read_text())
    assert split["seed"] == 0 and sorted(p for f in split["folds"] for p in f) == cache.patients


def test_resume_without_checkpoint_is_an_error(cache, tmp_path):
    with pytest.raises(TumorsegError, match="last.pt does not exist"):
        fit(tiny_config(), cache, tmp_path / "none", resume=True, show_progress=False)


def test_a_new_run_never_overwrites_an_existing_one(cache, tmp_path):
    fit(tiny_config(epochs=1), cache, tmp_path / "run", show_progress=False)
    with pytest.raises(TumorsegError, match="already holds a run; continue it with --resume"):
        fit(tiny_config(epochs=1), cache, tmp_path / "run", show_progress=False)


def test_run_training_resumes_with_the_remembered_data_path(kaggle, tmp_path, monkeypatch):
    monkeypatch.setenv("TUMORSEG_CACHE", str(tmp_path / "caches"))
    run = tmp_path / "run"
    part = run_training(run, data=kaggle.root, cfg=tiny_config(), show_progress=False)
    assert part.epochs_done == 2
    ck = load_checkpoint(run / "last.pt")
    assert ck.training.data_path == str(kaggle.root.resolve())
    with pytest.raises(TumorsegError, match="--data is required"):
        run_training(tmp_path / "other", cfg=tiny_config(), show_progress=False)
    with pytest.raises(TumorsegError, match="cannot resume"):
        run_training(tmp_path / "other", resume=True, show_progress=False)


@pytest.mark.slow
def test_training_reduces_loss(cache, tmp_path):
    cfg = tiny_config(epochs=6, crop=0, augment=False, tumour_fraction=-1.0, samples_per_epoch=0, lr=3e-2)
    result = fit(cfg, cache, tmp_path / "run", show_progress=False)
    losses = [r["train_loss"] for r in result.history]
    assert losses[-1] < losses[0]


def test_fold_minus_one_trains_on_every_patient_without_validation(cache, tmp_path, caplog):
    run = tmp_path / "all"
    cfg = dataclasses.replace(tiny_config(), fold=-1)
    with caplog.at_level(logging.INFO, logger="tumorseg"):
        result = fit(cfg, cache, run, show_progress=False)
    epoch_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(epoch_lines) == 2 and all("no validation (fold -1)" in m and "nan" not in m for m in epoch_lines)
    assert result.epochs_done == 2 and not (run / "best.pt").exists()
    ck = load_checkpoint(run / "last.pt")
    assert ck.split["train"] == sorted(cache.patients) and ck.split["val"] == []
    assert result.best_epoch == 0
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["val_dice_mean"] for r in rows] == ["nan", "nan"]


def test_validate_weights_the_chunk_losses_by_chunk_size_and_scores_each_patient():
    """A constant model (p = 0.5 everywhere) on two patients, chunks of 16 slices: the loss
    is worked out by hand from the batch-pooled soft Dice of each chunk."""
    from torch import nn

    from tumorseg.data.dataset import SliceArrays
    from tumorseg.inference import Predictor
    from tumorseg.losses import DiceLoss
    from tumorseg.training import validate

    class Half(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return torch.zeros((x.shape[0], 1, *x.shape[-2:])) + 0 * self.w

    n_a, n_b, hw = 17, 2, 16  # patient A: chunks of 16 and 1 slices; B: one chunk of 2
    masks = torch.zeros(n_a + n_b, 1, 4, 4, dtype=torch.uint8)
    masks[0, 0, :2, :2] = 1  # A: 4 true pixels in its first chunk
    masks[16, 0, 0, :3] = 1  # A: 3 in its second chunk; B has none
    arrays = SliceArrays(images=torch.zeros(n_a + n_b, 3, 4, 4, dtype=torch.uint8), masks=masks,
                         low=torch.zeros(n_a + n_b, 3), high=torch.full((n_a + n_b, 3), 255.0),
                         patient_index=torch.tensor([0] * n_a + [1] * n_b), slice_numbers=torch.arange(n_a + n_b),
                         patients=["A", "B"])
    predictor = Predictor([Half()], fuse=False, device="cpu", precision="fp32", channels_last=False)
    out = validate(predictor, arrays, DiceLoss(logits=True))

    def soft_dice_loss(pixels: int, true: int) -> float:  # p = 0.5 on every pixel
        return 1 - (2 * 0.5 * true + 1) / (0.5 * pixels + true + 1)

    expected = (16 * soft_dice_loss(16 * hw, 4) + 1 * soft_dice_loss(hw, 3) + 2 * soft_dice_loss(2 * hw, 0)) / 19
    assert out["val_loss"] == pytest.approx(expected, rel=1e-6)
    # Nothing is above 0.5: A (tumour) scores 0, B (no tumour, nothing found) scores 1.
    assert out["per_patient"] == {"A": 0.0, "B": 1.0}
    assert (out["val_dice_mean"], out["val_dice_median"]) == (0.5, 0.5)


def test_resuming_a_run_of_an_older_sampler_warns(cache, tmp_path):
    from tumorseg.checkpoint import read_payload

    run = tmp_path / "run"
    fit(tiny_config(), cache, run, show_progress=False, stop_after_steps=2)
    raw = read_payload(run / "last.pt")
    raw["training"]["sampler"] = ""  # as a run started by tumorseg 0.1 (format 1) reads
    torch.save(raw, run / "last.pt")
    with pytest.warns(UserWarning, match="drew its batches differently"):
        result = fit(tiny_config(), cache, run, resume=True, show_progress=False)
    assert result.epochs_done == 2


def test_a_failed_new_run_removes_only_what_it_made(cache, tmp_path):
    run = tmp_path / "new" / "deeper" / "run"
    with pytest.raises(TumorsegError, match="crop 64 is larger than the 32x32 slices"):
        fit(tiny_config(crop=64), cache, run, show_progress=False)
    assert not (tmp_path / "new").exists()
    # a folder of the user's, with a splits.json of their own, keeps both
    mine = tmp_path / "mine"
    mine.mkdir()
    split = '{"seed": 0, "test": [], "folds": [["PAT_A_2001"], ["PAT_B_2002", "PAT_C_2003"]]}'
    (mine / "splits.json").write_text(split)
    with pytest.raises(TumorsegError, match="crop 64"):
        fit(tiny_config(crop=64), cache, mine, split_file=mine / "splits.json", show_progress=False)
    assert sorted(p.name for p in mine.iterdir()) == ["splits.json"]


def test_auto_precision_is_recorded_and_kept_on_resume(cache, tmp_path, monkeypatch):
    import tumorseg.runtime as runtime

    monkeypatch.setenv("TUMORSEG_CACHE_DIR", str(tmp_path / "measured"))
    calls = []

    def bf16_wins(candidates, **kw):
        calls.append(sorted(candidates))
        return {name: (0.001 if name == "bf16" else 0.01) for name in candidates}

    monkeypatch.setattr(runtime, "time_candidates", bf16_wins)
    run = tmp_path / "run"
    part = fit(tiny_config(precision="auto", epochs=2), cache, run, show_progress=False, stop_after_steps=2)
    assert part.interrupted and calls == [["bf16", "fp32"]]
    assert load_checkpoint(run / "last.pt").training.precision == "bf16"
    # The cache is gone and fp32 would now win: the resumed run still trains in bf16.
    monkeypatch.setenv("TUMORSEG_CACHE_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setattr(runtime, "time_candidates", lambda *a, **k: pytest.fail("a resumed run re-measured"))
    done = fit(tiny_config(precision="auto", epochs=2), cache, run, resume=True, show_progress=False)
    assert done.epochs_done == 2
    assert load_checkpoint(run / "last.pt").training.precision == "bf16"


def test_validation_scores_each_patient_at_its_own_size(make_kaggle, tmp_path):
    """Patients padded to a common size for batching are scored without the padding: the
    same Dice and loss as when validated alone."""
    from test_nifti import unet_predictor

    from tumorseg.data.dataset import load_arrays
    from tumorseg.losses import make_loss
    from tumorseg.training import merge_validations, validate

    a = make_kaggle(name="a", patients={"PAT_A_1": 4}, size=(32, 32), strays=False)
    b = make_kaggle(name="b", patients={"PAT_B_1": 4}, size=(24, 16), strays=False, seed=1)
    (b.root / "PAT_B_1").rename(a.root / "PAT_B_1")
    cache = prepare(a.root, tmp_path / "cache", progress=False)
    predictor, loss = unet_predictor(), make_loss("bce_dice")
    both = validate(predictor, load_arrays(cache, ["PAT_A_1", "PAT_B_1"]), loss)
    alone = merge_validations([validate(predictor, load_arrays(cache, [p]), loss) for p in ("PAT_A_1", "PAT_B_1")])
    assert both["per_patient"] == alone["per_patient"]
    assert both["val_loss"] == pytest.approx(alone["val_loss"], rel=1e-6)


def test_init_starts_from_a_checkpoints_weights_and_names_what_is_wrong(tmp_path):
    from tumorseg.checkpoint import Checkpoint, export_ensemble, save_checkpoint
    from tumorseg.model import UNet
    from tumorseg.training import build_training, initial_weights

    cfg = tiny_config()
    torch.manual_seed(3)
    a, b = UNet.from_config(cfg.model_config()).eval(), UNet.from_config(cfg.model_config()).eval()
    for name, model in (("a.pt", a), ("b.pt", b)):
        save_checkpoint(tmp_path / name, Checkpoint.of_model(model, train_config=cfg))
    export_ensemble([tmp_path / "a.pt", tmp_path / "b.pt"], tmp_path / "ens.pt")
    model, *_ = build_training(dataclasses.replace(cfg, init=str(tmp_path / "a.pt")), torch.device("cpu"))
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in model.state_dict().items())
    member = initial_weights(dataclasses.replace(cfg, init=f"{tmp_path / 'ens.pt'}@1"))
    assert all(torch.allclose(v, b.state_dict()[k].float(), atol=1e-3) for k, v in member.items())  # float16 file
    with pytest.raises(TumorsegError, match="is an ensemble of 2 models; name one as"):
        initial_weights(dataclasses.replace(cfg, init=str(tmp_path / "ens.pt")))
    with pytest.raises(TumorsegError, match="holds models 0..1"):
        initial_weights(dataclasses.replace(cfg, init=f"{tmp_path / 'ens.pt'}@2"))
    with pytest.raises(TumorsegError, match="the run's config asks for"):
        initial_weights(dataclasses.replace(cfg, init=str(tmp_path / "a.pt"), n_features=8))
