"""Self-describing, versioned checkpoints: the typed `Checkpoint` is the only thing that
is saved or loaded, and this module is the only place that knows the file layout.

File layout (format_version 2), a dict readable with `torch.load(weights_only=True)`:

    format            "tumorseg-checkpoint"
    format_version    2; a newer one is refused with "upgrade tumorseg", older ones are migrated
    tumorseg_version  the package version that wrote it
    model_config      ModelConfig.to_dict()
    state_dict        the U-Net weights (CPU tensors)
    channels          input sequences by name, in order
    normalization     {"method", "percentiles"}
    inference         InferenceConfig.to_dict(): threshold, postprocess, tta
    config            TrainConfig.to_dict() of the run (None for a model not trained here)
    epoch, history, best, metrics, split, notes
    training          optimiser/scheduler/RNG state, progress inside the epoch, data path;
                      None in a released model
    qc_rule           optional: the calibrated quality-control rule of this model
                      ({"rule": qc.QCRule.to_dict(), "calibration": a summary}), written by
                      `store_qc_entry`; absent in older files. It belongs to these weights:
                      exporting a new model does not carry it over.

The original implementation's `unet.pt` (`{"epoch", "state_dict", ...}` with
`layers.<i>.` keys) loads through the same `load_checkpoint`.

A fold ensemble (`export_ensemble`) is one file of the same layout whose `state_dict` is
replaced by `members`, a list of state dicts stored in float16 (half the size; the
weights are used in float32), and `sources`, the members' files relative to their common
folder (e.g. `fold_0/last.pt`): `load_members` gives one Checkpoint per member. Its
`config` is the first member's (the run's recipe), `split` holds the union of the
members' training patients, `member_splits` each member's own split (which patients it
never saw), and `history` and `best` are empty.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tumorseg.config import CHANNELS, NORM_PERCENTILES, InferenceConfig, ModelConfig, TrainConfig
from tumorseg.errors import CheckpointError, TumorsegError
from tumorseg.fileio import atomic_write
from tumorseg.model import Ensemble, UNet
from tumorseg.version import __version__

FORMAT = "tumorseg-checkpoint"
FORMAT_VERSION = 2
QC_KEY = "qc_rule"
NORMALIZATION_METHOD = "per-patient volume percentiles, clipped to [0, 1]"


@dataclass
class TrainingState:
    """What only resuming a run needs; a released model has none."""

    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    progress: dict[str, Any]  # engine.EpochProgress as a dict
    data_path: str | None = None
    sampler: str = ""  # data.sampling.SAMPLER of the run ("" before format 2)
    precision: str = ""  # the precision the run trains in ("auto" resolved; "" in older files)
    world_size: int = 1  # training processes (torchrun); progress.step counts batches of batch_size x this


@dataclass
class Checkpoint:
    """A U-Net with everything needed to use it correctly or to resume its training."""

    model_config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    channels: tuple[str, ...] = CHANNELS
    percentiles: tuple[float, float] = NORM_PERCENTILES
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    train_config: TrainConfig | None = None
    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    split: dict[str, Any] | None = None  # {"fold", "train", "val"} patients of the run
    training: TrainingState | None = None
    notes: str = ""
    tumorseg_version: str = ""
    kind: str = "tumorseg"  # "original" for the original implementation's unet.pt (not saved)
    path: str = ""  # the file it was loaded from (not saved)
    # The quality-control entry of the file it was loaded from as stored (`store_qc_entry`;
    # checked by `qc_entry_of`), not saved: a rule belongs to the file's weights, all of them
    qc_entry: Any = None

    @classmethod
    def of_model(cls, model: UNet, **fields: Any) -> Checkpoint:
        """A checkpoint of `model`'s current weights (copied to the CPU)."""
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return cls(model_config=model.config, state_dict=state, **fields)

    def build_model(self) -> UNet:
        """The U-Net with these weights, in eval mode.

        Raises:
            CheckpointError: the weights do not fit the architecture the file describes.
        """
        model = UNet.from_config(self.model_config)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            detail = first[1].strip() if len(first) > 1 else (first[0] if first else "")
            raise CheckpointError(f"{self.path or 'checkpoint'}: weights do not fit the U-Net it describes "
                                  f"({detail[:200]}); the file is damaged or was edited") from e
        return model.eval()

    def released(self, **inference: Any) -> Checkpoint:
        """A copy without training state, with inference settings overridden (None = keep)."""
        try:
            inf = self.inference.replace(**inference)
        except TypeError as e:
            raise CheckpointError(f"cannot override {e}; allowed: "
                                  f"{', '.join(f.name for f in dataclasses.fields(InferenceConfig))}") from e
        except TumorsegError as e:
            raise CheckpointError(str(e)) from e
        return dataclasses.replace(self, training=None, inference=inf)

    def to_payload(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tumorseg_version": __version__,
            "model_config": self.model_config.to_dict(),
            "state_dict": self.state_dict,
            "channels": list(self.channels),
            "normalization": {"method": NORMALIZATION_METHOD, "percentiles": list(self.percentiles)},
            "inference": self.inference.to_dict(),
            "config": self.train_config.to_dict() if self.train_config is not None else None,
            "epoch": self.epoch,
            "history": self.history,
            "best": self.best,
            "metrics": self.metrics,
            "split": self.split,
            "notes": self.notes,
            "training": dataclasses.asdict(self.training) if self.training is not None else None,
        }


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> None:
    """Write `checkpoint` to `path` through a temporary file and os.replace, so a crash or
    Ctrl-C never leaves a truncated file."""
    payload = checkpoint.to_payload()
    atomic_write(path, lambda f: torch.save(payload, f))


def read_payload(path: str | Path) -> dict[str, Any]:
    """The raw dictionary of a checkpoint file (torch.load, weights_only, onto the CPU).

    Raises:
        CheckpointError: missing, a folder, unreadable, or not a dictionary.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; pass a checkpoint file inside it (best.pt or last.pt)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors all mean "not a checkpoint"
        lines = str(e).strip().splitlines()
        first = lines[0] if lines else ""
        if len(first) > 160:
            first = first[:157] + "..."
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {first}); "
            "pass a tumorseg checkpoint (best.pt/last.pt) or the original unet.pt"
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dictionary, got {type(obj).__name__}")
    return obj


def _migrate(obj: dict[str, Any], path: Path) -> dict[str, Any]:
    """Bring a tumorseg payload of an older format_version to the current layout."""
    version = obj.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path}: unreadable format_version {version!r}; the file is damaged")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version}, newer than the {FORMAT_VERSION} this "
            "tumorseg reads; upgrade tumorseg (pip install -U tumorseg)")
    obj = dict(obj)
    if version == 1:
        # v1 kept threshold/postprocess at the top level (and in the training config) and
        # the resume state as loose top-level entries.
        obj["inference"] = {"threshold": obj.pop("threshold", 0.5), "postprocess": obj.pop("postprocess", "none")}
        if isinstance(obj.get("config"), dict):
            obj["config"] = {k: v for k, v in obj["config"].items() if k not in ("threshold", "postprocess")}
        loose = {k: obj.pop(k, None) for k in ("optimizer", "scheduler", "rng", "progress", "data_path")}
        has_state = loose["optimizer"] is not None
        obj["training"] = loose if has_state else None
        obj["format_version"] = 2
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


def _train_config(d: Any) -> TrainConfig | None:
    """The stored training config, or None when it is missing or no longer valid: it is
    needed to resume a run, never to use the model."""
    if not isinstance(d, dict):
        return None
    try:
        return TrainConfig.from_dict(d)
    except TumorsegError:
        return None


def _training_state(d: Any) -> TrainingState | None:
    needed = ("optimizer", "scheduler", "rng", "progress")
    if not isinstance(d, dict) or not all(isinstance(d.get(k), dict) for k in needed):
        return None
    return TrainingState(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(TrainingState)}})


def _tumorseg_checkpoint(obj: dict[str, Any], path: Path) -> Checkpoint:
    obj = _migrate(obj, path)
    try:
        cfg = ModelConfig.from_dict(obj["model_config"])
        norm = obj.get("normalization") or {}
        if not isinstance(norm, dict):
            raise TypeError(f"normalization is a {type(norm).__name__}, not a mapping")
        percentiles = tuple(float(p) for p in norm.get("percentiles", NORM_PERCENTILES))
        channels = obj.get("channels", CHANNELS)
        if not isinstance(channels, (list, tuple)) or not all(isinstance(c, str) for c in channels):
            raise TypeError(f"channels must be a list of names, got {channels!r}")
        return Checkpoint(
            model_config=cfg, state_dict=obj["state_dict"], channels=tuple(channels),
            percentiles=(percentiles[0], percentiles[1]),
            inference=InferenceConfig.from_dict(obj.get("inference") or {}),
            train_config=_train_config(obj.get("config")),
            epoch=int(obj.get("epoch", 0)), history=list(obj.get("history") or []),
            best=dict(obj.get("best") or {}), metrics=dict(obj.get("metrics") or {}), split=obj.get("split"),
            training=_training_state(obj.get("training")), notes=str(obj.get("notes", "")),
            tumorseg_version=str(obj.get("tumorseg_version", "")), kind="tumorseg", path=str(path),
            qc_entry=obj.get(QC_KEY),
        )
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        # TumorsegError is a ValueError: a bad stored inference setting lands here too.
        raise CheckpointError(f"{path}: damaged tumorseg checkpoint ({type(e).__name__}: {e})") from e


def load_members(path: str | Path) -> list[Checkpoint]:
    """The models in a file: one for a checkpoint or unet.pt, several for an ensemble.

    Raises:
        CheckpointError: as `load_checkpoint`.
    """
    path = Path(path)
    obj = read_payload(path)
    members = obj.get("members")
    if obj.get("format") != FORMAT or members is None:
        return [_checkpoint(obj, path)]
    if not isinstance(members, list) or not members or not all(isinstance(m, dict) for m in members):
        raise CheckpointError(f"{path}: damaged ensemble (no list of member weights)")
    splits = obj.get("member_splits")  # absent in files written before it was kept
    if splits is None:
        splits = [copy.deepcopy(obj.get("split")) for _ in members]
    elif not (isinstance(splits, list) and len(splits) == len(members)):
        raise CheckpointError(f"{path}: damaged ensemble ({len(members)} members, member_splits does not match)")
    out = []
    for i, (state, split) in enumerate(zip(members, splits, strict=True)):
        ck = _tumorseg_checkpoint({**obj, "state_dict": _float32(state), "split": split}, path)
        ck.notes = f"{ck.notes} (member {i + 1} of {len(members)})".strip()
        out.append(ck)
    return out


def _float16(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Weights in float16; BatchNorm statistics stay float32 (running variances reach the
    thousands, where float16 is coarse)."""
    out = {}
    for k, v in state.items():
        if v.is_floating_point() and not k.endswith(("running_mean", "running_var")):
            half = v.half()
            if not torch.isfinite(half).all():
                raise CheckpointError(f"{source}: {k} does not fit in float16; export it in float32")
            v = half
        out[k] = v
    return out


def _float32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def weights_digest(checkpoints: Sequence[Checkpoint]) -> str:
    """A SHA-256 of the models' weights in float32 (parameters and BatchNorm statistics, by
    name, model after model): what an exported graph records of the models it was made
    from, so that a graph beside a checkpoint is known to be that checkpoint's."""
    h = hashlib.sha256()
    for ck in checkpoints:
        for name in sorted(ck.state_dict):
            v = ck.state_dict[name].detach().cpu()
            v = v.float() if v.is_floating_point() else v
            h.update(f"{name}:{v.dtype}:{tuple(v.shape)}\n".encode())
            h.update(v.contiguous().numpy().tobytes())
    return h.hexdigest()


def export_ensemble(sources: list[str | Path], dst: str | Path, *, inference: InferenceConfig | None = None,
                    notes: str = "", metrics: dict[str, Any] | None = None) -> Path:
    """Write the tumorseg checkpoints `sources` (e.g. the fold models of a cross-validation)
    as one ensemble file, weights in float16, with `inference` (default: the first
    source's) as its settings. They must share architecture, channels and normalisation.

    Raises:
        CheckpointError: unreadable or disagreeing sources.
    """
    checkpoints = [load_checkpoint(p) for p in sources]
    if not checkpoints:
        raise CheckpointError("no checkpoints to put in an ensemble")
    first = checkpoints[0]
    for ck in checkpoints:
        if ck.kind != "tumorseg":
            raise CheckpointError(f"{ck.path} is not a tumorseg checkpoint; only those make an ensemble")
        if (ck.model_config, ck.channels, ck.percentiles) != (first.model_config, first.channels, first.percentiles):
            raise CheckpointError(f"{ck.path} differs from {first.path} in architecture, channels or "
                                  "normalisation; an ensemble needs one of each")
    # The union of the members' training patients: what int8 calibration may draw from.
    trained = sorted({p for ck in checkpoints for p in ((ck.split or {}).get("train") or [])})
    # What is one member's alone (fold 0's best validation epoch, its history) is left out;
    # the epoch stays where every member trained as long.
    epochs = {ck.epoch for ck in checkpoints}
    payload = dataclasses.replace(first.released(), inference=inference or first.inference, notes=notes,
                                  metrics=metrics or {}, history=[], best={},
                                  epoch=epochs.pop() if len(epochs) == 1 else 0,
                                  split={"train": trained} if trained else None).to_payload()
    del payload["state_dict"]
    payload["members"] = [_float16(ck.state_dict, ck.path) for ck in checkpoints]
    payload["member_splits"] = [ck.split for ck in checkpoints]
    # Where the members came from, relative to their common folder (no paths of this machine).
    paths = [Path(ck.path).resolve() for ck in checkpoints]
    root = Path(os.path.commonpath([p.parent for p in paths]))
    payload["sources"] = [p.relative_to(root).as_posix() for p in paths]
    atomic_write(dst, lambda f: torch.save(payload, f))
    return Path(dst)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a tumorseg checkpoint (any format version up to FORMAT_VERSION) or the
    original implementation's `unet.pt`.

    The original model applied a sigmoid inside forward; its weights are the same, and our
    UNet returns the logits before that sigmoid, so no conversion is needed.

    Raises:
        CheckpointError: missing, unreadable, damaged or too new a file.
    """
    path = Path(path)
    return _checkpoint(read_payload(path), path)


def _checkpoint(obj: dict[str, Any], path: Path) -> Checkpoint:
    """`load_checkpoint` of a file's payload, read already."""
    state = obj.get("state_dict")
    if obj.get("format") == FORMAT and "members" in obj:
        raise CheckpointError(f"{path} is an ensemble of {len(obj['members'])} models; load it with "
                              "tumorseg.Predictor.from_checkpoints (or checkpoint.load_members)")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: no 'state_dict' entry; not a U-Net checkpoint")
    if obj.get("format") == FORMAT:
        return _tumorseg_checkpoint(obj, path)
    cfg = original_model_config(state)
    channels = CHANNELS[: cfg.in_channels] if cfg.in_channels != 1 else ("FLAIR",)
    return Checkpoint(model_config=cfg, state_dict=state, channels=channels,
                      epoch=int(obj.get("epoch", 0) or 0), kind="original", path=str(path))


def load_member(reference: str) -> Checkpoint:
    """The model that `MODEL.pt` (a single model) or `MODEL.pt@K` (model K of an ensemble
    file, from 0) names.

    Raises:
        CheckpointError: as `load_members`; an ensemble named without @K; K out of range.
    """
    path, sep, member = reference.rpartition("@")
    if not (sep and member.isdigit()):
        path, member = reference, ""
    members = load_members(path)
    if not member:
        if len(members) > 1:
            raise CheckpointError(f"{reference} is an ensemble of {len(members)} models; name one as {path}@K")
        return members[0]
    if int(member) >= len(members):
        raise CheckpointError(f"{reference}: {path} holds models 0..{len(members) - 1}")
    return members[int(member)]


def load_model(path: str | Path) -> UNet | Ensemble:
    """Load a tumorseg checkpoint or the original published `unet.pt` as the `UNet`, or an
    ensemble file as an `Ensemble` of them, in eval mode (forward returns logits; an
    ensemble's are the logits of its mean probability)."""
    members = load_members(path)
    if len(members) == 1:
        return members[0].build_model()
    return Ensemble([m.build_model() for m in members]).eval()


def export_weights(src: str | Path, dst: str | Path, *, notes: str | None = None, **inference: Any) -> None:
    """Write a release copy of a tumorseg checkpoint: the same self-describing entries
    without the optimiser/scheduler/RNG state (a third of the size), with inference
    settings (threshold, postprocess, tta) overridden where given.

    Raises:
        CheckpointError: `src` is not a tumorseg checkpoint, or a bad override.
    """
    ck = load_checkpoint(src)
    if ck.kind != "tumorseg":
        raise CheckpointError(f"{src} is not a tumorseg checkpoint; only those can be exported")
    out = ck.released(**inference)
    if notes is not None:
        out.notes = notes
    save_checkpoint(dst, out)


def read_qc_entry(path: str | Path) -> dict[str, Any] | None:
    """The quality-control entry stored in a checkpoint file (`store_qc_entry`), or None
    for a file without one.

    Raises:
        CheckpointError: an unreadable file, or an entry that is not a dictionary.
    """
    return qc_entry_of(read_payload(path).get(QC_KEY), Path(path))


def qc_entry_of(entry: Any, path: str | Path) -> dict[str, Any] | None:
    """A stored quality-control entry, checked: a mapping, or None.

    Raises:
        CheckpointError: an entry that is not a dictionary.
    """
    if entry is not None and not isinstance(entry, dict):
        raise CheckpointError(f"{path}: damaged {QC_KEY} entry ({type(entry).__name__}, not a mapping)")
    return entry


def store_qc_entry(path: str | Path, entry: dict[str, Any] | None) -> None:
    """Write the quality-control entry (JSON-safe) into a tumorseg checkpoint file in
    place, or remove it with None; the weights and every other entry stay as they are.
    The file is replaced atomically.

    Raises:
        CheckpointError: not a tumorseg checkpoint.
    """
    obj = read_payload(path)
    if obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a tumorseg checkpoint; only those hold a QC rule")
    obj = dict(obj)
    if entry is None:
        obj.pop(QC_KEY, None)
    else:
        obj[QC_KEY] = entry
    atomic_write(path, lambda f: torch.save(obj, f))
