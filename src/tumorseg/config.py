"""Typed configuration: the one place where defaults live.

`TrainConfig` holds everything `tumorseg train` needs; presets are named sets of
overrides; `load_config_file` reads JSON, TOML or YAML overrides.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from tumorseg.errors import TumorsegError

# Channel order of the kaggle_3m TIFFs (a missing sequence was replaced by FLAIR upstream).
CHANNELS: tuple[str, ...] = ("pre-contrast", "FLAIR", "post-contrast")

# Per-patient, per-channel intensity normalisation of the original implementation:
# low/high = these percentiles over the patient volume, x = clip((x-low)/(high-low), 0, 1).
NORM_PERCENTILES: tuple[float, float] = (10.0, 99.0)


def channel_indices(names: tuple[str, ...] | list[str]) -> list[int]:
    """Map channel names to indices in the TIFF, case-insensitively.

    Raises:
        TumorsegError: unknown or repeated name.
    """
    lookup = {c.lower(): i for i, c in enumerate(CHANNELS)}
    out = []
    for name in names:
        key = name.strip().lower()
        if key not in lookup:
            raise TumorsegError(f"unknown channel {name!r}; choose from {', '.join(CHANNELS)}")
        if lookup[key] in out:
            raise TumorsegError(f"channel {name!r} given twice")
        out.append(lookup[key])
    if not out:
        raise TumorsegError("at least one channel is needed")
    return out


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the U-Net; stored in every checkpoint."""

    in_channels: int = 3
    out_channels: int = 1
    n_features: int = 32  # width of every level when `features` is None (the original)
    depth: int = 4  # number of resolution levels, bottleneck included (>= 2)
    features: tuple[int, ...] | None = None  # per-level widths, e.g. (32, 64, 128, 256)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["features"] = list(self.features) if self.features is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        if d.get("features") is not None:
            d["features"] = tuple(int(f) for f in d["features"])
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in fields(cls)}})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. Defaults are the `default` preset."""

    # --- data ---
    channels: tuple[str, ...] = CHANNELS  # input sequences, by name, in this order
    folds: int = 5  # k of the patient-level k-fold split
    fold: int = 0  # which fold is the validation fold; -1 = train on every non-test patient, no validation
    test_fraction: float = 0.0  # patients held out from all folds (0 = none)
    split_seed: int = 0  # seed of the patient shuffle that makes the split
    # --- model ---
    n_features: int = 32
    depth: int = 5
    features: tuple[int, ...] | None = (16, 32, 64, 128, 128)  # None = n_features at every level
    # --- optimisation ---
    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"  # "step" (x lr_gamma at lr_step) or "cosine" (to 0 over epochs)
    lr_step: int = 30  # epoch of the step decay (schedule="step")
    lr_gamma: float = 0.1  # factor of the step decay
    loss: str = "bce_dice"  # "dice" (batch-pooled, the original), "dice_per_image", "bce_dice"
    # --- sampling and augmentation ---
    augment: bool = True  # flips, small rotation/scale, intensity jitter (image+mask together)
    sequence_dropout: float = 0.2  # share of slices whose other sequences are replaced by FLAIR
    tumour_fraction: float = 0.4  # share of slices drawn from tumour slices; <0 = plain epoch
    samples_per_epoch: int = 4000  # slices seen per epoch; 0 = number of training slices
    crop: int = 160  # train on random crop x crop patches (tumour-centred half the time); 0 = whole slices
    # --- run ---
    seed: int = 0
    precision: str = "auto"  # "auto" (bf16 where the CPU/GPU has it), "bf16", "fp32"
    channels_last: bool = True
    threshold: float = 0.5  # probability threshold for validation Dice
    postprocess: str = "lcc"  # "none" or "lcc" (largest 3-D connected component)

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            in_channels=len(self.channels),
            n_features=self.n_features,
            depth=self.depth,
            features=self.features,
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channels"] = list(self.channels)
        d["features"] = list(self.features) if self.features is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return replace_config(cls(), d)


PRESETS: dict[str, dict[str, Any]] = {
    # The original recipe: depth 4, 32 features, all channels, Adam 1e-4, batch 8,
    # 150 epochs, lr x0.1 at epoch 30, batch-pooled Dice loss, no augmentation,
    # every slice once per epoch, fp32.
    "seed": dict(
        channels=CHANNELS, n_features=32, depth=4, features=None, epochs=150, batch_size=8,
        lr=1e-4, weight_decay=0.0, schedule="step", lr_step=30, lr_gamma=0.1, loss="dice",
        augment=False, sequence_dropout=0.0, tumour_fraction=-1.0, samples_per_epoch=0, crop=0, precision="fp32",
        channels_last=False, postprocess="none",
    ),
    "default": {},
}


def _coerce(name: str, value: Any, current: Any, annotation: str) -> Any:
    if name in ("channels", "features"):
        if value is None or (name == "features" and isinstance(value, str)
                             and value.strip().lower() in ("", "none")):
            return None
        if isinstance(value, str):
            value = [v for v in value.replace(";", ",").split(",") if v.strip()]
        if name == "features":
            return tuple(int(v) for v in value)
        return tuple(str(v).strip() for v in value)
    if annotation == "bool" or isinstance(current, bool):
        if isinstance(value, str):
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise TumorsegError(f"config field {name!r}: expected true/false, got {value!r}")
        return bool(value)
    if isinstance(current, int) and not isinstance(current, bool):
        if isinstance(value, float) and not value.is_integer():
            raise TumorsegError(f"config field {name!r}: expected an integer, got {value!r}")
        return int(value)
    if isinstance(current, float):
        return float(value)
    return str(value)


def replace_config(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """Return `cfg` with `overrides` applied, converting types and rejecting unknown keys."""
    known = {f.name: f for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise TumorsegError(
            f"unknown config field(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    clean = {}
    for name, value in overrides.items():
        try:
            clean[name] = _coerce(name, value, getattr(cfg, name), str(known[name].type))
        except (TypeError, ValueError) as e:
            raise TumorsegError(f"config field {name!r}: cannot use {value!r} ({e})") from e
    out = dataclasses.replace(cfg, **clean)
    validate(out)
    return out


def validate(cfg: TrainConfig) -> None:
    """Raise TumorsegError when a field is out of its range."""
    channel_indices(cfg.channels)
    checks = [
        (cfg.depth >= 2, f"depth must be >= 2, got {cfg.depth}"),
        (cfg.n_features >= 1, f"n_features must be >= 1, got {cfg.n_features}"),
        (cfg.features is None or len(cfg.features) == cfg.depth,
         f"features must list one width per level ({cfg.depth}), got {cfg.features}"),
        (cfg.folds >= 2, f"folds must be >= 2, got {cfg.folds}"),
        (-1 <= cfg.fold < cfg.folds, f"fold must be in 0..{cfg.folds - 1}, or -1 for all, got {cfg.fold}"),
        (0.0 <= cfg.test_fraction < 1.0, f"test_fraction must be in [0, 1), got {cfg.test_fraction}"),
        (cfg.epochs >= 1, f"epochs must be >= 1, got {cfg.epochs}"),
        (cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}"),
        (cfg.lr > 0, f"lr must be > 0, got {cfg.lr}"),
        (cfg.weight_decay >= 0, f"weight_decay must be >= 0, got {cfg.weight_decay}"),
        (cfg.lr_step >= 1, f"lr_step must be >= 1, got {cfg.lr_step}"),
        (cfg.lr_gamma > 0, f"lr_gamma must be > 0, got {cfg.lr_gamma}"),
        (cfg.samples_per_epoch >= 0, f"samples_per_epoch must be >= 0, got {cfg.samples_per_epoch}"),
        (cfg.schedule in ("step", "cosine"), f"schedule must be step or cosine, got {cfg.schedule!r}"),
        (cfg.loss in ("dice", "dice_per_image", "bce_dice"),
         f"loss must be dice, dice_per_image or bce_dice, got {cfg.loss!r}"),
        (cfg.crop == 0 or cfg.crop >= 2 ** (cfg.depth - 1),
         f"crop must be 0 or >= {2 ** (cfg.depth - 1)}, got {cfg.crop}"),
        (0.0 <= cfg.sequence_dropout <= 1.0, f"sequence_dropout must be in [0, 1], got {cfg.sequence_dropout}"),
        (cfg.tumour_fraction < 1.0, f"tumour_fraction must be < 1, got {cfg.tumour_fraction}"),
        (cfg.precision in ("auto", "bf16", "fp32"),
         f"precision must be auto, bf16 or fp32, got {cfg.precision!r}"),
        (0.0 < cfg.threshold < 1.0, f"threshold must be in (0, 1), got {cfg.threshold}"),
        (cfg.postprocess in ("none", "lcc"), f"postprocess must be none or lcc, got {cfg.postprocess!r}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise TumorsegError(msg)


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise TumorsegError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return replace_config(TrainConfig(), PRESETS[name])


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read overrides from a .json, .toml or .yaml/.yml file (a flat mapping of fields)."""
    path = Path(path)
    if not path.is_file():
        raise TumorsegError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TumorsegError(f"{path}: cannot read as UTF-8 text ({e})") from e
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml  # type: ignore[import-untyped]
            except ImportError as e:
                raise TumorsegError(
                    f"{path}: reading YAML needs PyYAML (pip install pyyaml); or use JSON/TOML"
                ) from e
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise TumorsegError(f"{path}: cannot parse ({e})") from e
        else:
            raise TumorsegError(f"{path}: unknown config format {suffix!r}; use .json, .toml or .yaml")
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise TumorsegError(f"{path}: cannot parse ({e})") from e
    if not isinstance(data, dict):
        raise TumorsegError(f"{path}: expected a mapping of config fields at the top level")
    return data


