"""The one prediction path: `Predictor` holds one model or an ensemble, the channels and
normalisation it expects, an `InferenceConfig`, and an engine (`tumorseg.engines`).

Training validation, `evaluate`, `predict` and the web app all go through it:
- `Predictor.predict(x)`: probabilities (and logits) for normalised slices, in chunks;
- `Predictor.segment(volume)`: a raw patient volume in, a `PatientResult` out;
- `Predictor.predict_volume(input)`: an `InputVolume` (any input format) in, a
  `PatientResult` on the input's own grid out.

An ensemble averages the probabilities of its models; TTA averages each model's
probabilities with those of the horizontally flipped slices. The result keeps each
member's probabilities too (float16), for the quality features of `tumorseg.qc`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tumorseg.checkpoint import Checkpoint, load_members, qc_entry_of
from tumorseg.config import CHANNELS, ENGINE_CHOICES, NORM_PERCENTILES, InferenceConfig, channel_indices
from tumorseg.data.channels import select_channels, slice_spacing
from tumorseg.data.inputs import InputVolume
from tumorseg.data.nifti import resample_slices
from tumorseg.data.normalization import normalize, volume_percentiles
from tumorseg.engines import Engine, choose_engine, torch_engine
from tumorseg.errors import CheckpointError, ConfigError
from tumorseg.graphs import format_of, read_graph_info
from tumorseg.postprocess import binarize, components
from tumorseg.qc import QCRule

log = logging.getLogger("tumorseg")

BATCH_SIZE = 16  # slices per forward pass, unless the caller says otherwise
Progress = Callable[[int, int], None]  # progress(slices done, slices in all)


def default_checkpoint_path() -> Path:
    """The model shipped inside the package."""
    return Path(__file__).resolve().parent / "weights" / "tumorseg_lgg.pt"


def default_int8_path() -> Path:
    """The shipped model's int8 variant (OpenVINO IR), used where it is measured faster."""
    return default_checkpoint_path().with_name("tumorseg_lgg_int8.xml")


@dataclass
class Prediction:
    """Per-slice model outputs, float32 on the CPU."""

    probabilities: torch.Tensor  # (N, 1, H, W)
    logits: torch.Tensor | None = None  # (N, 1, H, W); an ensemble's: the logit of the mean probability
    spread: torch.Tensor | None = None  # (N, 1, H, W): std of the models' probabilities (ensembles only)
    members: torch.Tensor | None = None  # (N, M, H, W): each model's probabilities (ensembles only)


@dataclass
class PatientResult:
    """The prediction of one patient: what every writer, report and the web app use.

    Arrays are in the model's orientation (slice, row, column) on the input's own grid
    (`InputVolume.grid`; slice images: their pixels)."""

    mask: np.ndarray  # bool (S, H, W), after threshold and post-processing
    probabilities: np.ndarray  # float32 (S, H, W): the mean over the models
    inference: InferenceConfig  # the threshold and post-processing that made `mask`
    removed_voxels: int  # voxels above the threshold that post-processing removed
    removed_components: int  # connected regions above the threshold that post-processing removed
    spread: np.ndarray | None = None  # float32 (S, H, W): std across an ensemble's models
    members: np.ndarray | None = None  # float16 (M, S, H, W): each model's probabilities (ensembles)
    name: str = ""
    qc: dict[str, Any] = field(default_factory=dict)  # quality features and flag (`tumorseg.qc`)

    @property
    def tumour_voxels(self) -> int:
        return int(np.count_nonzero(self.mask))

    @property
    def tumour_slices(self) -> int:
        return int(self.mask.reshape(len(self.mask), -1).any(1).sum())

    def member_probabilities(self) -> np.ndarray:
        """(M, S, H, W): each model's probabilities, float16 for an ensemble (no copy), the
        result's own float32 ones (a view) for one model."""
        if self.members is None:
            return self.probabilities[None]
        return self.members


Segmentation = PatientResult  # the name of earlier versions


def check_model_arguments(predictor: Predictor | None, **settings: object) -> None:
    """Refuse model settings (checkpoint, threshold, ...) next to a ready `predictor`,
    which already holds its own; silently ignoring them would be worse.

    Raises:
        ConfigError: a setting given together with `predictor`.
    """
    given = [k for k, v in settings.items() if v is not None]
    if predictor is not None and given:
        raise ConfigError(f"pass either a predictor or {', '.join(given)}, not both; "
                          "set them on the Predictor (Predictor.from_checkpoints)")


class Predictor:
    """One model or an ensemble, ready to predict, on any engine (`tumorseg.engines`).

    Args:
        models: U-Nets returning logits, run by PyTorch; an ensemble averages their
            probabilities. Not given when `engine` is a ready engine.
        engine: a ready engine (e.g. of an exported graph) instead of `models`.
        channels: the input sequences the models expect, by name (subset of CHANNELS).
        percentiles: per-patient normalisation percentiles (low, high).
        inference: threshold, post-processing and TTA.
        device: where PyTorch runs ("auto": CUDA, then MPS, then the CPU).
        precision: the autocast dtype of PyTorch; "auto" times the model in fp32 and bf16
            on this device once and keeps the faster (cached, see
            `runtime.resolve_precision`).
        batch_size: slices per forward pass.
        channels_last: feed channels-last tensors.
        fuse: fold BatchNorm into the convolutions (a copy of each model; for models that
            are only used for inference). Without it the models are used as they are, and
            switched to eval mode only while predicting (training validation).
        source: where the models came from (for reports).
        kind: "tumorseg" or "original" (the original implementation's unet.pt).
        qc_rule: the calibrated quality-control rule of these models (`tumorseg.qc`), or
            None: results then carry quality features without a flag.
        trained_on: the patients any of the models trained on (their stored splits), so
            that scores on them can be called what they are.

    Raises:
        ConfigError: no models, models with different inputs, or a bad batch size.
    """

    def __init__(
        self,
        models: Sequence[nn.Module] = (),
        *,
        engine: Engine | None = None,
        channels: Sequence[str] = CHANNELS,
        percentiles: tuple[float, float] = NORM_PERCENTILES,
        inference: InferenceConfig | None = None,
        device: str | torch.device = "auto",
        precision: str = "auto",
        batch_size: int = BATCH_SIZE,
        channels_last: bool = True,
        fuse: bool = True,
        source: str = "",
        kind: str = "tumorseg",
        qc_rule: QCRule | None = None,
        trained_on: frozenset[str] = frozenset(),
    ):
        if engine is None and not models:
            raise ConfigError("a Predictor needs at least one model")
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        self.channels = tuple(channels)
        self._channel_index = channel_indices(self.channels)
        self.percentiles = (float(percentiles[0]), float(percentiles[1]))
        self.inference = inference or InferenceConfig()
        self.batch_size = batch_size
        self.source = source
        self.kind = kind
        self.qc_rule = qc_rule
        self.trained_on = frozenset(trained_on)
        self.engine = engine or torch_engine(models, device=device, precision=precision,
                                             channels_last=channels_last, fuse=fuse)

    @classmethod
    def from_checkpoints(
        cls,
        paths: str | Path | Sequence[str | Path] | None = None,
        *,
        threshold: float | None = None,
        postprocess: str | None = None,
        tta: bool | None = None,
        device: str | torch.device = "auto",
        precision: str = "auto",
        engine: str = "auto",
        batch_size: int = BATCH_SIZE,
    ) -> Predictor:
        """A Predictor of one checkpoint, of several (an ensemble) or of an ensemble file
        (they must agree on channels and normalisation; the first one's inference settings
        apply), of an exported .onnx/.xml graph, or of the model shipped with the package
        when `paths` is None. threshold/postprocess/tta override the stored inference
        settings where given.

        `engine` is "torch", "onnxruntime", "openvino", or "auto": the fastest installed
        engine for this model on this machine, timed once and cached (CPU only; other
        devices run PyTorch). With `precision` "auto", the shipped model's int8 variant
        takes part in that choice.

        Raises:
            CheckpointError: unreadable checkpoints, checkpoints that disagree, or no
                shipped model in this install.
            ConfigError: an override out of range, or an engine that cannot run this model.
        """
        if engine not in ENGINE_CHOICES:
            raise ConfigError(f"engine must be one of {', '.join(ENGINE_CHOICES)}, got {engine!r}")
        variants: list[Path] = []
        if paths is None:
            path = default_checkpoint_path()
            if not path.is_file():
                raise CheckpointError(
                    f"no model is shipped with this installation ({path} is missing); "
                    "pass --checkpoint PATH (a tumorseg best.pt or the original unet.pt)")
            paths = [path]
            if precision == "auto" and default_int8_path().is_file():
                variants.append(default_int8_path())
        elif isinstance(paths, (str, Path)):
            paths = [paths]
        paths = [Path(p) for p in paths]
        if not paths:
            raise CheckpointError("no checkpoint given")
        graphs = [p for p in paths if format_of(p) != "pt"]
        if graphs:
            if len(paths) > 1:
                raise ConfigError(f"{graphs[0]} is an exported model; pass it alone (export an ensemble as one "
                                  "file with `tumorseg export`)")
            info = read_graph_info(graphs[0])
            inference = info.inference.replace(threshold=threshold, postprocess=postprocess, tta=tta)
            chosen = choose_engine(engine, graphs[0], info, device=device, precision=precision)
            return cls(engine=chosen, channels=info.channels, percentiles=info.percentiles, inference=inference,
                       batch_size=batch_size, source=str(graphs[0]))
        checkpoints: list[Checkpoint] = [ck for p in paths for ck in load_members(p)]
        first = checkpoints[0]
        for ck in checkpoints[1:]:
            if (ck.channels, ck.percentiles) != (first.channels, first.percentiles):
                raise CheckpointError(f"{ck.path} expects channels {list(ck.channels)} and percentiles "
                                      f"{ck.percentiles}, unlike {first.path}; an ensemble needs one input")
        inference = first.inference.replace(threshold=threshold, postprocess=postprocess, tta=tta)
        chosen = choose_engine(engine, checkpoints, None, device=device, precision=precision, variants=variants)
        rule = _qc_rule(paths, first, inference)
        trained = frozenset(p for ck in checkpoints for p in (ck.split or {}).get("train", []))
        return cls(engine=chosen, channels=first.channels, percentiles=first.percentiles, inference=inference,
                   batch_size=batch_size, source=", ".join(dict.fromkeys(ck.path for ck in checkpoints)),
                   kind=first.kind, qc_rule=rule, trained_on=trained)

    @property
    def precision(self) -> str:
        return self.engine.precision

    @property
    def members(self) -> int:
        """Models averaged (1 for a single model)."""
        return self.engine.members

    @property
    def device(self) -> torch.device:
        return self.engine.device

    # ------------------------------------------------------------------ normalised slices

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, *, logits: bool = False, progress: Progress | None = None) -> Prediction:
        """Probabilities (and, with `logits`, logits) float32 (N, 1, H, W) for normalised
        images float32 (N, C, H, W), in chunks of `batch_size`; `progress(done, total)` is
        called after each chunk."""
        if images.dim() != 4 or images.shape[1] != len(self.channels):
            raise ConfigError(f"expected images (N, {len(self.channels)}, H, W), got {tuple(images.shape)}")
        n = images.shape[0]
        probs = torch.empty((n, 1, *images.shape[-2:]), dtype=torch.float32)
        raw = torch.empty_like(probs) if logits else None
        ensemble = self.members > 1
        spread = torch.empty_like(probs) if ensemble else None
        members = torch.empty((n, self.members, *images.shape[-2:]), dtype=torch.float32) if ensemble else None
        for start in range(0, n, self.batch_size):
            s = slice(start, min(start + self.batch_size, n))
            p, z = self._forward(images[s])
            mean = p.mean(dim=1, keepdim=True)
            probs[s] = mean.cpu()
            if raw is not None:
                # One model without TTA keeps its own logits; otherwise the logit of the mean.
                raw[s] = (z if z.shape[1] == 1 and not self.inference.tta else torch.logit(mean, eps=1e-6)).cpu()
            if spread is not None and members is not None:
                spread[s] = p.std(dim=1, unbiased=False, keepdim=True).cpu()
                members[s] = p.cpu()
            if progress is not None:
                progress(s.stop, n)
        return Prediction(probs, raw, spread, members)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities, logits) of each model, (N, M, H, W), for one chunk; with TTA the
        probabilities are averaged with those of the flipped slices."""
        z = self.engine(x).float()  # (N, M, H, W)
        p = torch.sigmoid(z)
        if self.inference.tta:
            p = 0.5 * (p + torch.sigmoid(self.engine(x.flip(-1)).float()).flip(-1))
        return p, z

    # ------------------------------------------------------------------ raw volumes

    def normalize_volume(self, volume: np.ndarray, low: Sequence[float] | None = None,
                         high: Sequence[float] | None = None, spacing: Sequence[float] | None = None) -> torch.Tensor:
        """Model input float32 (S, C, H, W) for a raw volume (S, H, W, 3): uint8 slices or
        the float intensities of a NIfTI volume.

        The channels are normalised with `low`/`high` (statistics of all three channels,
        e.g. from the cache) or, when not given, with the percentiles of this volume. A
        2.5-D model's neighbour channels are chosen with the volume's `spacing` (mm between
        slices, rows, columns; unknown: the adjacent slices), see `channels.select_channels`.
        """
        volume = np.asarray(volume)
        if volume.ndim != 4 or volume.shape[-1] != len(CHANNELS):
            raise ConfigError(f"expected a volume (S, H, W, {len(CHANNELS)}), got {volume.shape}")
        if low is None or high is None:
            low, high = volume_percentiles(volume, self.percentiles)
        ch = self._channel_index
        x = torch.from_numpy(np.ascontiguousarray(select_channels(volume, self.channels, slice_spacing(spacing))))
        return normalize(x.permute(0, 3, 1, 2), torch.tensor([low[c] for c in ch]), torch.tensor([high[c] for c in ch]))

    def segment(self, volume: np.ndarray, low: Sequence[float] | None = None,
                high: Sequence[float] | None = None, progress: Progress | None = None,
                spacing: Sequence[float] | None = None) -> PatientResult:
        """Segment one patient volume (S, H, W, 3): normalise (see `normalize_volume`),
        predict, threshold and post-process as configured."""
        pred = self.predict(self.normalize_volume(volume, low, high, spacing), progress=progress)
        return self.finish(*_arrays(pred))

    def predict_volume(self, volume: InputVolume, progress: Progress | None = None) -> PatientResult:
        """Segment one patient of any input format: predict at the model's scale, bring
        the probabilities back to the input's grid (`volume.native_shape`), then threshold
        and post-process there."""
        pred = self.predict(self.normalize_volume(volume.images, spacing=volume.spacing), progress=progress)
        probs, spread, members = _arrays(pred)
        if volume.native_shape is not None:
            shape = volume.native_shape
            probs = resample_slices(probs, shape)
            spread = resample_slices(spread, shape) if spread is not None else None
            if members is not None:  # one model at a time: a single float32 copy in flight
                native = np.empty((len(members), len(probs), *shape), dtype=np.float16)
                for m, member in enumerate(members):
                    native[m] = resample_slices(member.astype(np.float32), shape)
                members = native
        result = self.finish(probs, spread, members)
        result.name = volume.name
        return result

    def finish(self, probabilities: np.ndarray, spread: np.ndarray | None = None,
               members: np.ndarray | None = None) -> PatientResult:
        """Threshold and post-process probabilities float32 (S, H, W) as configured."""
        return finish(probabilities, self.inference, spread, members)


def _qc_rule(paths: list[Path], first: Checkpoint, inference: InferenceConfig) -> QCRule | None:
    """The quality rule stored with these weights, if it was calibrated for `inference`.
    A rule belongs to the weights of its file (several files make an ensemble without
    one) and to the threshold, post-processing and TTA it was calibrated with: under
    other settings the results carry the features without a flag, and a warning says so."""
    entry = qc_entry_of(first.qc_entry, paths[0]) if len(paths) == 1 and first.kind == "tumorseg" else None
    if not entry or not entry.get("rule"):
        return None
    calibrated = ((entry.get("calibration") or {}).get("inference"))
    if calibrated is not None and InferenceConfig.from_dict(calibrated) != inference:
        log.warning(f"the quality flag of {paths[0].name} was calibrated for {_setting(calibrated)}, not "
                    f"{_setting(inference.to_dict())}: results carry the quality features without a flag")
        return None
    return QCRule.from_dict(entry["rule"])


def _setting(d: dict[str, Any]) -> str:
    return f"threshold {d.get('threshold')}, {d.get('postprocess')}{', TTA' if d.get('tta') else ''}"


def _arrays(pred: Prediction) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(probabilities (S, H, W), spread or None, members float16 (M, S, H, W) or None)."""
    probs = pred.probabilities[:, 0].numpy()
    spread = pred.spread[:, 0].numpy() if pred.spread is not None else None
    members = pred.members.permute(1, 0, 2, 3).numpy().astype(np.float16) if pred.members is not None else None
    return probs, spread, members


def finish(probabilities: np.ndarray, inference: InferenceConfig, spread: np.ndarray | None = None,
           members: np.ndarray | None = None) -> PatientResult:
    """The `PatientResult` of probabilities float32 (S, H, W): thresholded and
    post-processed by `inference`, with what post-processing removed."""
    mask = binarize(probabilities, inference)
    above = probabilities > inference.threshold
    removed = int(np.count_nonzero(above)) - int(np.count_nonzero(mask))
    removed_regions = 0
    if removed:
        _, before = components(above)
        _, after = components(mask)
        removed_regions = before - after
    return PatientResult(mask=mask, probabilities=probabilities, inference=inference, removed_voxels=removed,
                         removed_components=removed_regions, spread=spread, members=members)
