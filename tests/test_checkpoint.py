"""Checkpoints: round trip, atomic save, clear errors, and the original unet.pt."""

from __future__ import annotations

import os

import pytest
import torch

from tumorseg.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    Checkpoint,
    TrainingState,
    export_weights,
    load_checkpoint,
    load_model,
    original_model_config,
    read_payload,
    save_checkpoint,
)
from tumorseg.config import CHANNELS, InferenceConfig, ModelConfig, TrainConfig
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


def save(path, model: UNet, **fields) -> None:
    save_checkpoint(path, Checkpoint.of_model(model, **fields))


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
    channels = ("FLAIR", "pre-contrast")[: kwargs["in_channels"]]
    save(path, model, epoch=7, channels=channels, percentiles=(5.0, 95.0),
         inference=InferenceConfig(threshold=0.4, postprocess="lcc"), metrics={"dice": 0.81})
    loaded = load_checkpoint(path)
    assert loaded.kind == "tumorseg" and loaded.path == str(path)
    assert loaded.model_config == model.config and loaded.model_config.features == kwargs.get("features")
    assert loaded.percentiles == (5.0, 95.0) and loaded.inference == InferenceConfig(0.4, "lcc")
    assert loaded.channels == channels and loaded.epoch == 7 and loaded.metrics == {"dice": 0.81}
    assert loaded.training is None and loaded.train_config is None
    rebuilt = loaded.build_model()
    assert not rebuilt.training
    x = torch.rand(2, kwargs["in_channels"], 20, 12)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    for k, v in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v), k


def test_defaults_when_extras_absent(tmp_path):
    path = tmp_path / "last.pt"
    save(path, UNet(n_features=4, depth=2))
    loaded = load_checkpoint(path)
    assert loaded.channels == CHANNELS
    assert (loaded.percentiles, loaded.inference) == ((10.0, 99.0), InferenceConfig(0.5, "none", False))
    raw = read_payload(path)
    assert raw["format"] == FORMAT and raw["format_version"] == FORMAT_VERSION
    assert raw["model_config"] == ModelConfig(3, 1, 4, 2, None).to_dict()


def test_training_state_and_config_round_trip(tmp_path):
    model = UNet(n_features=4, depth=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    path = tmp_path / "ck.pt"
    cfg = TrainConfig(depth=2, features=None, n_features=4, epochs=3)
    state = TrainingState(optimizer=opt.state_dict(), scheduler={"last_epoch": 1},
                          rng={"torch": torch.get_rng_state()}, progress={"epoch": 1, "step": 2}, data_path="/d")
    save(path, model, train_config=cfg, training=state)
    loaded = load_checkpoint(path)
    assert loaded.train_config == cfg
    assert loaded.training.optimizer["param_groups"][0]["lr"] == 1e-3
    assert torch.equal(loaded.training.rng["torch"], torch.get_rng_state())
    assert (loaded.training.progress, loaded.training.data_path) == ({"epoch": 1, "step": 2}, "/d")
    assert loaded.released().training is None


def test_load_model_returns_eval_unet(tmp_path):
    path = tmp_path / "ck.pt"
    save(path, UNet(n_features=4, depth=3).train())
    model = load_model(path)
    assert isinstance(model, UNet) and not model.training


def test_a_newer_format_version_asks_for_an_upgrade(tmp_path):
    path = tmp_path / "future.pt"
    save(path, UNet(n_features=4, depth=2))
    raw = read_payload(path)
    raw["format_version"] = FORMAT_VERSION + 1
    torch.save(raw, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert msg == (f"{path} has checkpoint format version {FORMAT_VERSION + 1}, newer than the "
                   f"{FORMAT_VERSION} this tumorseg reads; upgrade tumorseg (pip install -U tumorseg)")


def test_format_version_1_is_migrated(tmp_path):
    """The layout of version 1: inference settings and resume state at the top level, and
    threshold/postprocess inside the training config."""
    model = trained_like(UNet(n_features=4, depth=3))
    opt = torch.optim.Adam(model.parameters())
    cfg = TrainConfig(n_features=4, depth=3, features=None).to_dict() | {"threshold": 0.5, "postprocess": "lcc"}
    v1 = {"format": FORMAT, "format_version": 1, "tumorseg_version": "0.1.0",
          "model_config": model.config.to_dict(), "state_dict": model.state_dict(),
          "config": cfg, "channels": list(CHANNELS),
          "normalization": {"method": "x", "percentiles": [10.0, 99.0]},
          "threshold": 0.45, "postprocess": "lcc", "epoch": 4, "progress": {"epoch": 4, "step": 0},
          "optimizer": opt.state_dict(), "scheduler": {}, "rng": {"torch": torch.get_rng_state()},
          "history": [{"epoch": 1}], "best": {"epoch": 1, "dice": 0.5}, "metrics": {},
          "split": {"fold": 0, "train": ["a"], "val": ["b"]}, "data_path": "/data"}
    path = tmp_path / "v1.pt"
    torch.save(v1, path)
    ck = load_checkpoint(path)
    assert ck.inference == InferenceConfig(0.45, "lcc")
    assert ck.train_config == TrainConfig(n_features=4, depth=3, features=None)
    assert ck.training.data_path == "/data" and ck.training.progress == {"epoch": 4, "step": 0}
    assert ck.split["val"] == ["b"] and ck.best["dice"] == 0.5 and ck.epoch == 4
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(ck.build_model()(x), model(x))
    # a v1 release copy had no resume state
    for k in ("optimizer", "scheduler", "rng", "progress", "data_path"):
        v1.pop(k)
    torch.save(v1, path)
    assert load_checkpoint(path).training is None


def test_save_replaces_an_existing_file(tmp_path):
    path = tmp_path / "ck.pt"
    save(path, UNet(n_features=4, depth=2), epoch=1)
    save(path, UNet(n_features=4, depth=2), epoch=2)
    assert load_checkpoint(path).epoch == 2
    assert os.listdir(tmp_path) == ["ck.pt"]


def test_failed_save_keeps_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    save(path, UNet(n_features=4, depth=2), epoch=1)
    before = path.read_bytes()

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save(path, UNet(n_features=4, depth=2), epoch=2)
    assert os.listdir(tmp_path) == ["best.pt"]
    assert path.read_bytes() == before
    monkeypatch.undo()
    assert load_checkpoint(path).epoch == 1


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path / "new" / "ck.pt", UNet(n_features=4, depth=2))
    assert os.listdir(tmp_path / "new") == []


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"\x00not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert msg.startswith(f"{path} is not a readable PyTorch checkpoint")
    assert msg.endswith("pass a tumorseg checkpoint (best.pt/last.pt) or the original unet.pt")
    assert "\n" not in msg


def test_truncated_checkpoint_gets_a_whole_one_line_message(tmp_path):
    path = tmp_path / "cut.pt"
    save(path, UNet(n_features=4, depth=2))
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert "\n" not in msg and msg.endswith("or the original unet.pt")


def test_a_folder_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path)
    assert str(info.value) == f"{tmp_path} is a folder; pass a checkpoint file inside it (best.pt or last.pt)"


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
    save(path, UNet(n_features=4, depth=2))
    obj = torch.load(path, weights_only=True)
    obj["model_config"]["n_features"] = 6
    torch.save(obj, path)
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: weights do not fit the U-Net it describes (size mismatch for layers.0")
    assert "\n" not in msg and msg.endswith("the file is damaged or was edited")


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
    assert loaded.kind == "original" and loaded.build_model().config == expected
    assert loaded.epoch == 1 and loaded.inference == InferenceConfig()
    assert loaded.channels == (("FLAIR",) if kwargs["in_channels"] == 1 else CHANNELS)


def test_state_dict_of_another_layout(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match="no 'layers.<i>.' keys"):
        load_checkpoint(path)


def test_original_checkpoint(seed_checkpoint):
    loaded = load_checkpoint(seed_checkpoint)
    assert loaded.kind == "original"
    assert loaded.model_config == ModelConfig(3, 1, 32, 4, None)
    model = loaded.build_model()
    assert not model.training
    assert loaded.channels == CHANNELS and loaded.percentiles == (10.0, 99.0)
    assert loaded.epoch == 142
    raw = torch.load(seed_checkpoint, map_location="cpu", weights_only=True)
    assert float(raw["val_loss"]) == pytest.approx(0.129, abs=5e-4)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 1, 64, 64)
    assert (logits < 0).any()  # logits: the original's sigmoid is not inside forward
    probs = torch.sigmoid(logits)
    assert probs.min() >= 0 and probs.max() <= 1
    assert not model.training  # inference did not switch modes


def test_export_weights_strips_training_state_and_applies_overrides(tmp_path):
    model = UNet(n_features=4, depth=3).eval()
    opt = torch.optim.Adam(model.parameters())
    state = TrainingState(optimizer=opt.state_dict(), scheduler={}, rng={"torch": torch.get_rng_state()},
                          progress={"epoch": 3})
    save(tmp_path / "last.pt", model, training=state, channels=("FLAIR", "pre-contrast", "post-contrast"),
         metrics={"val_dice_mean": 0.5})
    export_weights(tmp_path / "last.pt", tmp_path / "release.pt", postprocess="lcc", notes="fold 0")
    assert read_payload(tmp_path / "release.pt")["training"] is None
    loaded = load_checkpoint(tmp_path / "release.pt")
    assert loaded.metrics == {"val_dice_mean": 0.5} and loaded.notes == "fold 0"
    assert loaded.inference.postprocess == "lcc" and loaded.channels == ("FLAIR", "pre-contrast", "post-contrast")
    x = torch.rand(1, 3, 16, 16)
    assert torch.equal(loaded.build_model()(x), model(x))
    with pytest.raises(CheckpointError, match="cannot override"):
        export_weights(tmp_path / "last.pt", tmp_path / "x.pt", lr=1)
    with pytest.raises(CheckpointError, match="threshold must be between 0 and 1"):
        export_weights(tmp_path / "last.pt", tmp_path / "x.pt", threshold=2.0)


def test_a_stored_training_config_that_is_no_longer_valid_does_not_stop_inference(tmp_path):
    path = tmp_path / "old.pt"
    save(path, UNet(n_features=4, depth=2))
    raw = read_payload(path)
    raw["config"] = TrainConfig().to_dict() | {"seed": -1}  # valid once, refused today
    torch.save(raw, path)
    ck = load_checkpoint(path)
    assert ck.train_config is None
    assert isinstance(ck.build_model(), UNet)


@pytest.mark.parametrize(("field", "value", "detail"), [
    ("normalization", [10, 99], "normalization is a list, not a mapping"),
    ("channels", "FLAIR", "channels must be a list of names, got 'FLAIR'"),
    ("inference", {"threshold": 7}, "threshold must be between 0 and 1, got 7"),
])
def test_damaged_entries_are_one_line_errors(tmp_path, field, value, detail):
    path = tmp_path / "bad.pt"
    save(path, UNet(n_features=4, depth=2))
    raw = read_payload(path)
    raw[field] = value
    torch.save(raw, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value).startswith(f"{path}: damaged tumorseg checkpoint (")
    assert detail in str(info.value) and "\n" not in str(info.value)


def test_training_state_without_its_parts_is_not_resumable(tmp_path):
    path = tmp_path / "partial.pt"
    save(path, UNet(n_features=4, depth=2))
    raw = read_payload(path)
    raw["training"] = {"optimizer": {}, "progress": {}}  # no scheduler, no RNG state
    torch.save(raw, path)
    assert load_checkpoint(path).training is None
