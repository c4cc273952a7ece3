"""Checkpoints: round trip, atomic save, clear errors, and the original unet.pt."""

from __future__ import annotations

import os

import pytest
import torch

from tumorseg.checkpoint import (
    FORMAT,
    load_checkpoint,
    load_model,
    original_model_config,
    save_checkpoint,
)
from tumorseg.config import CHANNELS, ModelConfig
from tumorseg.errors import CheckpointError
from tumorseg.model import UNet


def trained_like(model: UNet) -> UNet:
    """Give BN running statistics and weights non-default values, as training would."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.train()
    model(torch.rand(4, model.config.in_channels, 16, 16, generator=gen))
    return model.eval()


@pytest.mark.parametrize(
    "kwargs",
    [dict(in_channels=3, n_features=4, depth=3),
     dict(in_channels=1, n_features=5, depth=2),
     dict(in_channels=2, n_features=8, depth=4, features=(4, 6, 8, 10))],
)
def test_round_trip_gives_identical_outputs(tmp_path, kwargs):
    torch.manual_seed(0)
    model = trained_like(UNet(**kwargs))
    path = tmp_path / "run" / "best.pt"
    save_checkpoint(path, model, epoch=7, channels=["FLAIR", "pre-contrast"][: kwargs["in_channels"]],
                    normalization={"percentiles": [5.0, 95.0]}, threshold=0.4, postprocess="lcc",
                    metrics={"dice": 0.81})
    loaded = load_checkpoint(path)
    assert loaded.kind == "tumorseg"
    assert loaded.model.config == model.config
    assert loaded.model.config.features == kwargs.get("features")
    assert not loaded.model.training
    assert loaded.percentiles == (5.0, 95.0) and loaded.threshold == 0.4
    assert loaded.postprocess == "lcc"
    assert loaded.channels == tuple(["FLAIR", "pre-contrast"][: kwargs["in_channels"]])
    assert loaded.meta["epoch"] == 7 and loaded.meta["metrics"] == {"dice": 0.81}
    assert loaded.meta["format"] == FORMAT and "state_dict" not in loaded.meta
    assert loaded.path == str(path)
    x = torch.rand(2, kwargs["in_channels"], 20, 12)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k


def test_defaults_when_extras_absent(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, UNet(n_features=4, depth=2))
    loaded = load_checkpoint(path)
    assert loaded.channels == CHANNELS
    assert (loaded.percentiles, loaded.threshold, loaded.postprocess) == ((10.0, 99.0), 0.5, "none")
    assert loaded.meta["model_config"] == ModelConfig(3, 1, 4, 2, None).to_dict()


def test_optimizer_and_rng_are_saved_but_not_in_meta(tmp_path):
    model = UNet(n_features=4, depth=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    path = tmp_path / "ck.pt"
    save_checkpoint(path, model, optimizer=opt.state_dict(), rng=torch.get_rng_state())
    raw = torch.load(path, weights_only=True)
    assert raw["optimizer"]["param_groups"][0]["lr"] == 1e-3
    assert torch.equal(raw["rng"], torch.get_rng_state())
    assert "optimizer" not in load_checkpoint(path).meta


def test_load_model_returns_eval_unet(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, UNet(n_features=4, depth=3).train())
    model = load_model(path)
    assert isinstance(model, UNet) and not model.training


def test_save_replaces_an_existing_file(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, UNet(n_features=4, depth=2), epoch=1)
    save_checkpoint(path, UNet(n_features=4, depth=2), epoch=2)
    assert load_checkpoint(path).meta["epoch"] == 2
    assert os.listdir(tmp_path) == ["ck.pt"]


def test_failed_save_keeps_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    save_checkpoint(path, UNet(n_features=4, depth=2), epoch=1)
    before = path.read_bytes()

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, UNet(n_features=4, depth=2), epoch=2)
    assert os.listdir(tmp_path) == ["best.pt"]
    assert path.read_bytes() == before
    monkeypatch.undo()
    assert load_checkpoint(path).meta["epoch"] == 1


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "new" / "ck.pt", UNet(n_features=4, depth=2))
    assert os.listdir(tmp_path / "new") == []


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"\x00not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value).startswith(f"{path} is not a readable PyTorch checkpoint")


def test_missing_file(tmp_path):
    path = tmp_path / "absent.pt"
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value) == f"checkpoint {path} does not exist"


def test_dict_without_state_dict(tmp_path):
    path = tmp_path / "nostate.pt"
    torch.save({"epoch": 3, "weights": {}}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value) == f"{path}: no 'state_dict' entry; not a U-Net checkpoint"


def test_not_a_dict(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value) == f"{path}: expected a checkpoint dictionary, got Tensor"


def test_weights_that_do_not_fit(tmp_path):
    path = tmp_path / "mismatch.pt"
    save_checkpoint(path, UNet(n_features=4, depth=2))
    obj = torch.load(path, weights_only=True)
    obj["model_config"]["n_features"] = 6
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="weights do not fit"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "kwargs",
    [dict(in_channels=3, n_features=4, depth=4), dict(in_channels=1, n_features=3, depth=2),
     dict(in_channels=3, n_features=2, depth=3, features=(2, 3, 5))],
)
def test_original_layout_is_inferred_from_state_dict(tmp_path, kwargs):
    model = UNet(**kwargs)
    expected = model.config
    assert original_model_config(model.state_dict()) == expected
    path = tmp_path / "orig.pt"
    torch.save({"epoch": 1, "state_dict": model.state_dict(), "val_loss": 0.5}, path)
    loaded = load_checkpoint(path)
    assert loaded.kind == "original" and loaded.model.config == expected
    assert loaded.meta == {"epoch": 1, "val_loss": 0.5}
    assert loaded.channels == (("FLAIR",) if kwargs["in_channels"] == 1 else CHANNELS)


def test_state_dict_of_another_layout(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match="no 'layers.<i>.' keys"):
        load_checkpoint(path)


def test_original_checkpoint(seed_checkpoint):
    loaded = load_checkpoint(seed_checkpoint)
    assert loaded.kind == "original"
    assert loaded.model.config == ModelConfig(3, 1, 32, 4, None)
    assert not loaded.model.training
    assert loaded.channels == CHANNELS and loaded.percentiles == (10.0, 99.0)
    assert loaded.meta["epoch"] == 142
    assert loaded.meta["val_loss"] == pytest.approx(0.129, abs=5e-4)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        logits = loaded.model(x)
    assert logits.shape == (2, 1, 64, 64)
    assert (logits < 0).any()  # logits: the original's sigmoid is not inside forward
    probs = torch.sigmoid(logits)
    assert probs.min() >= 0 and probs.max() <= 1
    assert not loaded.model.training  # inference did not switch modes


def test_export_weights_strips_training_state_and_applies_overrides(tmp_path):
    from tumorseg.checkpoint import export_weights, load_checkpoint, read_checkpoint, save_checkpoint
    from tumorseg.errors import CheckpointError
    from tumorseg.model import UNet

    model = UNet(n_features=4, depth=3).eval()
    opt = torch.optim.Adam(model.parameters())
    save_checkpoint(tmp_path / "last.pt", model, optimizer=opt.state_dict(), scheduler={}, rng={"torch": 1},
                    progress={"epoch": 3}, channels=["FLAIR", "pre-contrast", "post-contrast"], threshold=0.5,
                    postprocess="none", metrics={"val_dice_mean": 0.5})
    export_weights(tmp_path / "last.pt", tmp_path / "release.pt", postprocess="lcc")
    raw = read_checkpoint(tmp_path / "release.pt")
    assert not {"optimizer", "scheduler", "rng", "progress"} & set(raw)
    assert raw["metrics"] == {"val_dice_mean": 0.5}
    loaded = load_checkpoint(tmp_path / "release.pt")
    assert loaded.postprocess == "lcc" and loaded.channels == ("FLAIR", "pre-contrast", "post-contrast")
    x = torch.rand(1, 3, 16, 16)
    assert torch.equal(loaded.model(x), model(x))
    with pytest.raises(CheckpointError, match="cannot override"):
        export_weights(tmp_path / "last.pt", tmp_path / "x.pt", lr=1)
