"""Typed configuration: the one place where defaults, choices and option help live.

- `ModelConfig`: the U-Net architecture (its defaults are the original's); stored in
  every checkpoint.
- `TrainConfig`: everything that defines a training run; its defaults are the
  `default` preset. `PRESETS` are named sets of overrides.
- `InferenceConfig`: how probabilities become a mask (threshold, post-processing, TTA).
  It is inference policy, not part of a training recipe: set when a model is shipped or
  exported, and by the user at the command line.
- `ServeConfig`: the local web app's address and its limits on uploads and jobs.

Every field carries its help text in `metadata["help"]`; the command line reads it from
there. `load_config_file` reads JSON, TOML or YAML overrides.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tumorseg.errors import ConfigError

# Channel order of the kaggle_3m TIFFs (a missing sequence was replaced by FLAIR upstream).
CHANNELS: tuple[str, ...] = ("pre-contrast", "FLAIR", "post-contrast")

# Per-patient, per-channel intensity normalisation of the original implementation:
# low/high = these percentiles over the patient volume, x = clip((x-low)/(high-low), 0, 1).
NORM_PERCENTILES: tuple[float, float] = (10.0, 99.0)

# Distance (mm) of a neighbouring-slice channel ("2.5-D" input, `FLAIR+1`) in NIfTI and
# DICOM volumes, whose slices may be much thinner than those the models learnt from. The
# kaggle_3m TIFFs carry no spacing, so there the neighbour is the adjacent slice; their
# 20 to 88 slices per head (median 35.5) over roughly 130-180 mm put the typical spacing
# near 4-7 mm, and 5 mm is the slice thickness most common in clinical 2-D FLAIR.
NEIGHBOUR_MM: float = 5.0

# The choices of the enumerated fields, checked in `check_*` below and offered by the CLI.
# Post-processing of a patient's thresholded volume: "none"; "lcc", the largest 3-D connected
# component; "top_mass", the component with the highest summed probability; "min_size:N",
# without the components of fewer than N voxels; "confident:P", the components whose
# highest probability reaches P (multifocal tumours survive).
POSTPROCESS_CHOICES: tuple[str, ...] = ("none", "lcc", "top_mass", "min_size:N", "confident:P")
PRECISION_CHOICES: tuple[str, ...] = ("auto", "bf16", "fp32")
ENGINE_CHOICES: tuple[str, ...] = ("auto", "torch", "onnxruntime", "openvino")
LOSS_CHOICES: tuple[str, ...] = ("dice", "dice_per_image", "bce_dice")
SCHEDULE_CHOICES: tuple[str, ...] = ("step", "cosine")


_INVALID = object()


def postprocess_parameter(method: Any) -> Any:
    """The parameter of a post-processing method: None for "none"/"lcc"/"top_mass", the N of
    "min_size:N", the P of "confident:P"; `_INVALID` for anything else."""
    if method in ("none", "lcc", "top_mass"):
        return None
    name, _, value = str(method).partition(":") if isinstance(method, str) else ("", "", "")
    try:
        if name == "min_size" and value.isdigit() and int(value) >= 1:
            return int(value)
        if name == "confident" and 0.0 < float(value) < 1.0:
            return float(value)
    except ValueError:
        pass
    return _INVALID


def _field(default: Any, help: str) -> Any:
    """A dataclass field with its command-line help."""
    return field(default=default, metadata={"help": help})


def field_help(cls: type, name: str) -> str:
    """The help text of field `name` of the config dataclass `cls`."""
    return {f.name: f.metadata.get("help", "") for f in fields(cls)}[name]


@dataclass(frozen=True)
class Channel:
    """One model input channel: a sequence of CHANNELS, of the slice itself (offset 0) or
    of a neighbouring slice (`FLAIR-1`: one neighbour step toward slice 1, the inferior
    end; `FLAIR+1`: one step superior)."""

    sequence: int  # index into CHANNELS
    offset: int = 0  # neighbour steps; the step in slices is `neighbour_step`


_CHANNEL_NAME = re.compile(r"^(.*?)([+-][0-9]+)?$")


def parse_channels(names: tuple[str, ...] | list[str]) -> list[Channel]:
    """Parse channel names, case-insensitively: a sequence (`pre-contrast`, `FLAIR`,
    `post-contrast`), optionally with a neighbour offset (`FLAIR-1`, `FLAIR+1`).

    Raises:
        ConfigError: unknown or repeated name, or no channel.
    """
    lookup = {c.lower(): i for i, c in enumerate(CHANNELS)}
    out: list[Channel] = []
    for name in names:
        base, offset = _CHANNEL_NAME.match(name.strip().lower()).groups()  # type: ignore[union-attr]
        if base not in lookup:
            raise ConfigError(f"unknown channel {name!r}; choose from {', '.join(CHANNELS)}, optionally with a "
                              "neighbouring-slice offset such as FLAIR-1 or FLAIR+1")
        channel = Channel(lookup[base], int(offset or 0))
        if channel in out:
            raise ConfigError(f"channel {name!r} given twice")
        out.append(channel)
    if not out:
        raise ConfigError("at least one channel is needed")
    return out


def channel_indices(names: tuple[str, ...] | list[str]) -> list[int]:
    """The sequence (index into CHANNELS, the TIFF's channel order) of each channel name;
    a neighbour channel (`FLAIR+1`) maps to its sequence (see `parse_channels`).

    Raises:
        ConfigError: unknown or repeated name.
    """
    return [c.sequence for c in parse_channels(names)]


def neighbour_step(slice_spacing: float | None) -> int:
    """Slices between a slice and its neighbour channel (`FLAIR+1`): the slice nearest
    NEIGHBOUR_MM away where the spacing between slices (mm) is known (NIfTI, DICOM), else
    the adjacent slice (kaggle_3m TIFFs carry no spacing)."""
    if slice_spacing is None or not math.isfinite(slice_spacing) or slice_spacing <= 0:
        return 1
    return max(1, round(NEIGHBOUR_MM / slice_spacing))


def _check(checks: list[tuple[bool, str]]) -> None:
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the U-Net; stored in every checkpoint. Defaults: the original's."""

    in_channels: int = _field(3, "input sequences")
    out_channels: int = _field(1, "output maps (1 for binary tumour segmentation)")
    n_features: int = _field(32, "U-Net width of every level (when --features is not given)")
    depth: int = _field(4, "U-Net levels including the bottleneck (>= 2)")
    features: tuple[int, ...] | None = _field(
        None, "per-level widths, comma-separated, e.g. 32,64,128,256; none = --n-features at every level")

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


# The architecture of the `default` preset (TrainConfig's defaults below read it).
DEFAULT_ARCHITECTURE = ModelConfig(depth=5, features=(16, 32, 64, 128, 128))


@dataclass(frozen=True)
class InferenceConfig:
    """How model probabilities become a mask. Checked on construction.

    Raises:
        ConfigError: a value out of range or an unknown choice.
    """

    threshold: float = _field(0.5, "probability threshold of the tumour mask, in (0, 1)")
    postprocess: str = _field(
        "none", "none; lcc (largest 3-D connected component); top_mass (the component with the highest summed "
                "probability); min_size:N (drop components under N voxels); "
                "confident:P (keep components whose highest probability reaches P)")
    tta: bool = _field(False, "average with the horizontally flipped image: true/false")

    def __post_init__(self) -> None:
        real = isinstance(self.threshold, numbers.Real) and not isinstance(self.threshold, bool)
        _check([
            (real and 0.0 < float(self.threshold) < 1.0,
             f"threshold must be between 0 and 1, got {self.threshold!r}"),
            (postprocess_parameter(self.postprocess) is not _INVALID,
             f"postprocess must be none, lcc, top_mass, min_size:N (N >= 1) or confident:P (0 < P < 1), "
             f"got {self.postprocess!r}"),
            (isinstance(self.tta, bool), f"tta must be true or false, got {self.tta!r}"),
        ])
        object.__setattr__(self, "threshold", float(self.threshold))  # a plain float, also from numpy

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InferenceConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def replace(self, **overrides: Any) -> InferenceConfig:
        """A copy with the overrides that are not None applied (and checked)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class ServeConfig:
    """`tumorseg serve`: where it listens and the limits it puts on uploads and jobs.
    Checked on construction.

    Raises:
        ConfigError: a value out of range.
    """

    host: str = _field("127.0.0.1", "address to listen on; anything but 127.0.0.1/localhost/::1 exposes the app "
                                    "to the network")
    port: int = _field(8000, "TCP port")
    max_upload_mb: int = _field(300, "largest upload in MB (the request body); larger ones get 413")
    max_unpacked_mb: int = _field(1024, "largest total size in MB of an upload once unpacked (zip) and decoded "
                                        "(images, from their headers)")
    max_files: int = _field(2000, "most files in one upload or zip")
    workers: int = _field(1, "worker threads for jobs; predictions take turns on the model (which uses every "
                             "core), so more workers only overlap reading and writing")
    max_queued: int = _field(8, "jobs waiting or running at once; more get 429")
    keep_minutes: float = _field(60.0, "minutes a finished job's results are kept before they are deleted")

    def __post_init__(self) -> None:
        _check([
            (isinstance(self.port, int) and 0 <= self.port <= 65535, f"port must be in 0-65535, got {self.port!r}"),
            *((isinstance(getattr(self, n), int) and getattr(self, n) >= 1, f"{n} must be an integer >= 1, got "
               f"{getattr(self, n)!r}") for n in ("max_upload_mb", "max_unpacked_mb", "max_files", "workers",
                                                  "max_queued")),
            (isinstance(self.keep_minutes, (int, float)) and self.keep_minutes > 0,
             f"keep_minutes must be > 0, got {self.keep_minutes!r}"),
        ])


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. Defaults are the `default` preset."""

    # --- data ---
    channels: tuple[str, ...] = _field(
        CHANNELS, "input sequences by name, comma-separated (pre-contrast,FLAIR,post-contrast); a 2.5-D "
                  "model adds neighbouring slices, e.g. ...,FLAIR-1,FLAIR+1 (the FLAIR about 5 mm below and above)")
    folds: int = _field(5, "number of patient-level folds")
    fold: int = _field(0, "validation fold of this run (0-based); -1 trains on every non-test patient "
                          "without validation")
    test_fraction: float = _field(0.0, "fraction of patients held out from all folds (0 = none)")
    split_seed: int = _field(0, "seed of the patient shuffle that makes the split")
    # --- model ---
    n_features: int = _field(DEFAULT_ARCHITECTURE.n_features, field_help(ModelConfig, "n_features"))
    depth: int = _field(DEFAULT_ARCHITECTURE.depth, field_help(ModelConfig, "depth"))
    features: tuple[int, ...] | None = _field(DEFAULT_ARCHITECTURE.features, field_help(ModelConfig, "features"))
    # --- optimisation ---
    epochs: int = _field(30, "training epochs")
    batch_size: int = _field(8, "slices per optimiser step")
    lr: float = _field(1e-3, "Adam learning rate")
    weight_decay: float = _field(0.0, "Adam weight decay")
    schedule: str = _field("cosine", "learning-rate schedule: step (x lr_gamma at lr_step) or cosine (to 0)")
    lr_step: int = _field(30, "epoch of the step decay (schedule step)")
    lr_gamma: float = _field(0.1, "factor of the step decay")
    loss: str = _field("bce_dice", "dice (batch-pooled, the original), dice_per_image, bce_dice, or "
                                   "bce_tversky:A,B (BCE + Tversky, A weighs false positives, B false negatives)")
    # --- sampling and augmentation ---
    augment: bool = _field(True, "flips, rotation, scaling, intensity jitter (image and mask together): true/false")
    sequence_dropout: float = _field(
        0.2, "share of training slices whose non-FLAIR sequences are replaced by FLAIR, as kaggle_3m "
             "does for missing sequences (with --augment)")
    tumour_fraction: float = _field(0.4, "share of slices drawn from tumour slices; negative = every slice "
                                         "once per epoch")
    samples_per_epoch: int = _field(4000, "slices per epoch; 0 = number of training slices")
    crop: int = _field(160, "train on crop x crop patches (tumour-centred half the time); 0 = whole slices")
    # --- run ---
    init: str = _field("", "start from the weights of this checkpoint (MODEL.pt, or MODEL.pt@K for model K of an "
                           "ensemble file, from 0) instead of random ones: fine-tuning; in crossval a fold "
                           "ensemble starts fold k from its model k; empty = random")
    seed: int = _field(0, "seed of weights, slice order and augmentation")
    precision: str = _field("auto", "auto (fp32 or bf16, whichever a short timing of the model on this device "
                                    "finds faster; cached), bf16 or fp32")
    channels_last: bool = _field(True, "channels-last memory layout: true/false")
    sync_bn: bool = _field(False, "under torchrun on CUDA: BatchNorm statistics over the global batch "
                                  "(SyncBatchNorm) instead of each process's own shard: true/false")

    def model_config(self) -> ModelConfig:
        return ModelConfig(in_channels=len(self.channels), n_features=self.n_features, depth=self.depth,
                           features=self.features)

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
        channels_last=False,
    ),
    "default": {},
}


def _coerce(name: str, value: Any, current: Any) -> Any:
    if name in ("channels", "features"):
        if name == "channels" and value is None:
            raise ConfigError("config field 'channels': list at least one sequence, e.g. FLAIR")
        if value is None or (name == "features" and isinstance(value, str)
                             and value.strip().lower() in ("", "none")):
            return None
        if isinstance(value, str):
            value = [v for v in value.replace(";", ",").split(",") if v.strip()]
        if name == "features":
            return tuple(int(v) for v in value)
        return tuple(str(v).strip() for v in value)
    if isinstance(current, bool):
        if isinstance(value, str):
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"config field {name!r}: expected true/false, got {value!r}")
        return bool(value)
    if isinstance(current, int):
        number = float(value) if isinstance(value, str) else value
        if isinstance(number, float) and not number.is_integer():
            raise ConfigError(f"config field {name!r}: expected an integer, got {value}")
        return int(number)
    if isinstance(current, float):
        return float(value)
    return str(value)


# Entries of older config files that are inference policy now (InferenceConfig); a
# training config read from such a file ignores them.
LEGACY_INFERENCE_FIELDS = ("threshold", "postprocess")


def replace_config(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """Return `cfg` with `overrides` applied, converting types and rejecting unknown keys.

    Raises:
        ConfigError: an unknown field, a value that cannot be converted, or out of range.
    """
    overrides = {k: v for k, v in overrides.items() if k not in LEGACY_INFERENCE_FIELDS}
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown config field(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    clean = {}
    for name, value in overrides.items():
        try:
            clean[name] = _coerce(name, value, getattr(cfg, name))
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config field {name!r}: cannot use {value!r} ({e})") from e
    out = dataclasses.replace(cfg, **clean)
    validate(out)
    return out


def _tversky_ok(name: str) -> bool:
    if not name.startswith("bce_tversky:"):
        return False
    try:
        alpha, beta = (float(v) for v in name.split(":", 1)[1].split(","))
    except ValueError:
        return False
    return 0 <= alpha <= 1 and 0 <= beta <= 1 and alpha + beta > 0


def validate(cfg: TrainConfig) -> None:
    """Raise ConfigError when a field is out of its range."""
    channel_indices(cfg.channels)
    _check([
        (cfg.depth >= 2, f"depth must be >= 2, got {cfg.depth}"),
        (cfg.n_features >= 1, f"n_features must be >= 1, got {cfg.n_features}"),
        (cfg.features is None or len(cfg.features) == cfg.depth,
         f"features must list one width per level ({cfg.depth}), got {cfg.features}"),
        (cfg.features is None or min(cfg.features) >= 1, f"features must be >= 1, got {cfg.features}"),
        (cfg.folds >= 2, f"folds must be >= 2, got {cfg.folds}"),
        (-1 <= cfg.fold < cfg.folds, f"fold must be in 0..{cfg.folds - 1}, or -1 for all, got {cfg.fold}"),
        (0.0 <= cfg.test_fraction < 1.0, f"test_fraction must be in [0, 1), got {cfg.test_fraction}"),
        (cfg.epochs >= 1, f"epochs must be >= 1, got {cfg.epochs}"),
        (cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}"),
        (math.isfinite(cfg.lr) and cfg.lr > 0, f"lr must be > 0, got {cfg.lr}"),
        (cfg.weight_decay >= 0, f"weight_decay must be >= 0, got {cfg.weight_decay}"),
        (cfg.lr_step >= 1, f"lr_step must be >= 1, got {cfg.lr_step}"),
        (cfg.lr_gamma > 0, f"lr_gamma must be > 0, got {cfg.lr_gamma}"),
        (cfg.samples_per_epoch >= 0, f"samples_per_epoch must be >= 0, got {cfg.samples_per_epoch}"),
        (cfg.schedule in SCHEDULE_CHOICES,
         f"schedule must be one of {', '.join(SCHEDULE_CHOICES)}, got {cfg.schedule!r}"),
        (cfg.loss in LOSS_CHOICES or _tversky_ok(cfg.loss),
         f"loss must be one of {', '.join(LOSS_CHOICES)} or bce_tversky:A,B (A, B in [0, 1]), got {cfg.loss!r}"),
        (cfg.crop == 0 or cfg.crop >= 2 ** (cfg.depth - 1),
         f"crop must be 0 or >= {2 ** (cfg.depth - 1)}, got {cfg.crop}"),
        (0.0 <= cfg.sequence_dropout <= 1.0, f"sequence_dropout must be in [0, 1], got {cfg.sequence_dropout}"),
        (cfg.tumour_fraction < 1.0, f"tumour_fraction must be < 1, got {cfg.tumour_fraction}"),
        (cfg.seed >= 0, f"seed must be >= 0, got {cfg.seed}"),
        (cfg.precision in PRECISION_CHOICES,
         f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {cfg.precision!r}"),
    ])


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return replace_config(TrainConfig(), PRESETS[name])


def merge_layers(preset_name: str | None, config_file: str | Path | None,
                 options: dict[str, Any]) -> TrainConfig:
    """Preset, then config file, then options; merged first and checked once, so that
    layers may change related fields together (e.g. depth in the file, features here)."""
    name = preset_name or "default"
    preset(name)  # rejects an unknown preset by name
    merged = dict(PRESETS[name])
    if config_file:
        merged.update(load_config_file(config_file))
    merged.update({k: v for k, v in options.items() if v is not None})
    return replace_config(TrainConfig(), merged)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read overrides from a .json, .toml or .yaml/.yml file (a flat mapping of fields)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read as UTF-8 text ({e})") from e
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: cannot parse ({_first_line(e)})") from e
        else:
            raise ConfigError(f"{path}: unknown config format {suffix!r}; use .json, .toml or .yaml")
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: cannot parse ({_first_line(e)})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields at the top level")
    return data


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines[:2]) if lines else type(error).__name__
