"""Self-describing checkpoints: atomic save, and one loader for tumorseg's own files and
the original implementation's published `unet.pt`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tumorseg.config import CHANNELS, NORM_PERCENTILES, ModelConfig
from tumorseg.errors import CheckpointError
from tumorseg.fileio import atomic_write
from tumorseg.model import UNet

FORMAT = "tumorseg-checkpoint"
FORMAT_VERSION = 1


@dataclass
class LoadedModel:
    """A model ready for inference with what is needed to feed it correctly."""

    model: UNet
    channels: tuple[str, ...] = CHANNELS  # input sequences in order
    percentiles: tuple[float, float] = NORM_PERCENTILES  # per-patient normalisation
    threshold: float = 0.5
    postprocess: str = "none"
    kind: str = "tumorseg"  # "tumorseg" or "original"
    path: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """Write `obj` to `path` via a temporary file in the same folder and os.replace, so a
    crash or Ctrl-C never leaves a truncated checkpoint."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(path: str | Path, model: UNet, **extra: Any) -> None:
    """Save `model` with its architecture and any `extra` entries (config, channels,
    normalisation, epoch, optimiser, scheduler, RNG states, metrics ...)."""
    from tumorseg import __version__

    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tumorseg_version": __version__,
        "model_config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    payload.update(extra)
    atomic_torch_save(payload, path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load with weights_only=True onto the CPU, with a clear error for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors all mean "not a checkpoint"
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {first_line[:200]}); "
            "pass a tumorseg checkpoint (best.pt/last.pt) or the original unet.pt"
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dictionary, got {type(obj).__name__}")
    return obj


def original_model_config(state_dict: dict[str, torch.Tensor]) -> ModelConfig:
    """Infer the architecture of an original-implementation state dict (`layers.<i>.…`)."""
    indices = {int(m.group(1)) for k in state_dict if (m := re.match(r"layers\.(\d+)\.", k))}
    if not indices:
        raise CheckpointError("state dict has no 'layers.<i>.' keys: not a U-Net of this layout")
    last = max(indices)
    if (last + 3) % 4:
        raise CheckpointError(f"state dict ends at layers.{last}: not a U-Net of this layout")
    depth = (last + 3) // 4
    try:
        widths = [int(state_dict[f"layers.{2 * i}.conv1.weight"].shape[0]) for i in range(depth)]
        in_channels = int(state_dict["layers.0.conv1.weight"].shape[1])
        out_channels = int(state_dict[f"layers.{last}.weight"].shape[0])
    except KeyError as e:
        raise CheckpointError(f"state dict lacks {e}: not a U-Net of this layout") from e
    same = len(set(widths)) == 1
    return ModelConfig(in_channels, out_channels, widths[0], depth, None if same else tuple(widths))


def load_checkpoint(path: str | Path) -> LoadedModel:
    """Load a tumorseg checkpoint or the original `unet.pt` into a `UNet` in eval mode.

    The original model applied a sigmoid inside forward; its weights are the same, and our
    UNet returns the logits before that sigmoid, so no conversion is needed.
    """
    obj = read_checkpoint(path)
    state = obj.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: no 'state_dict' entry; not a U-Net checkpoint")
    if obj.get("format") == FORMAT:
        if not isinstance(obj.get("model_config"), dict):
            raise CheckpointError(f"{path}: tumorseg checkpoint without 'model_config'; it is damaged")
        try:
            cfg = ModelConfig.from_dict(obj["model_config"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable model_config ({e})") from e
        kind = "tumorseg"
        channels = tuple(obj.get("channels", CHANNELS))
        percentiles = tuple(obj.get("normalization", {}).get("percentiles", NORM_PERCENTILES))
        threshold = float(obj.get("threshold", 0.5))
        postprocess = str(obj.get("postprocess", "none"))
    else:
        cfg = original_model_config(state)
        kind = "original"
        channels = CHANNELS[: cfg.in_channels] if cfg.in_channels != 1 else ("FLAIR",)
        percentiles, threshold, postprocess = NORM_PERCENTILES, 0.5, "none"
    model = UNet.from_config(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the U-Net they describe ({e})") from e
    model.eval()
    meta = {k: v for k, v in obj.items() if k not in ("state_dict", "optimizer", "scheduler", "rng")}
    return LoadedModel(
        model=model, channels=channels, percentiles=(float(percentiles[0]), float(percentiles[1])),
        threshold=threshold, postprocess=postprocess, kind=kind, path=str(path), meta=meta,
    )


def load_model(path: str | Path) -> UNet:
    """Load a tumorseg checkpoint or the original published `unet.pt`; returns the `UNet`
    in eval mode (its forward returns logits)."""
    return load_checkpoint(path).model


# Entries that only matter for resuming a run; a released model leaves them out.
TRAINING_STATE = ("optimizer", "scheduler", "rng", "progress", "data_path")


def export_weights(src: str | Path, dst: str | Path, **overrides: Any) -> None:
    """Write a release copy of a tumorseg checkpoint: the same self-describing entries
    without the optimiser/scheduler/RNG state (a third of the size), with `overrides`
    (e.g. postprocess="lcc") applied to the inference settings.

    Raises:
        CheckpointError: `src` is not a tumorseg checkpoint, or an unknown override.
    """
    obj = read_checkpoint(src)
    if obj.get("format") != FORMAT:
        raise CheckpointError(f"{src} is not a tumorseg checkpoint; only those can be exported")
    allowed = {"threshold", "postprocess", "notes"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise CheckpointError(f"cannot override {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    if "postprocess" in overrides and overrides["postprocess"] not in ("none", "lcc"):
        raise CheckpointError(f"postprocess must be none or lcc, got {overrides['postprocess']!r}")
    if "threshold" in overrides and not 0.0 < float(overrides["threshold"]) < 1.0:
        raise CheckpointError(f"threshold must be between 0 and 1, got {overrides['threshold']!r}")
    out = {k: v for k, v in obj.items() if k not in TRAINING_STATE}
    out.update(overrides)
    atomic_torch_save(out, dst)
