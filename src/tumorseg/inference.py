"""The one prediction path: `Predictor` holds one model or an ensemble, the channels and
normalisation it expects, an `InferenceConfig`, the device and the precision.

Training validation, `evaluate` and `predict` all go through it:
- `Predictor.predict(x)`: probabilities (and logits) for normalised slices, in chunks;
- `Predictor.segment(volume)`: a raw uint8 patient volume in, mask and probabilities out.

An ensemble averages the probabilities of its models; TTA averages each model's
probabilities with those of the horizontally flipped slices.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tumorseg.checkpoint import Checkpoint, load_members
from tumorseg.config import CHANNELS, NORM_PERCENTILES, InferenceConfig, channel_indices
from tumorseg.data.normalization import normalize, volume_percentiles
from tumorseg.errors import CheckpointError, ConfigError
from tumorseg.postprocess import binarize
from tumorseg.runtime import autocast, precision_name, resolve_precision, select_device


def fuse_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of an eval-mode U-Net with every BatchNorm folded into the convolution before
    it: the same function (up to rounding) with one pass over each feature map fewer.
    The copy keeps the skip-connection hooks; it is for inference only."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    from tumorseg.model import Block

    fused = copy.deepcopy(model).eval()
    for block in fused.modules():
        if isinstance(block, Block):
            block.conv1 = fuse_conv_bn_eval(block.conv1, block.bn1)
            block.conv2 = fuse_conv_bn_eval(block.conv2, block.bn2)
            block.bn1, block.bn2 = nn.Identity(), nn.Identity()
    return fused


BATCH_SIZE = 16  # slices per forward pass, unless the caller says otherwise


def default_checkpoint_path() -> Path:
    """The model shipped inside the package."""
    return Path(__file__).resolve().parent / "weights" / "tumorseg_lgg.pt"


@dataclass
class Prediction:
    """Per-slice model outputs, float32 on the CPU."""

    probabilities: torch.Tensor  # (N, 1, H, W)
    logits: torch.Tensor | None = None  # (N, 1, H, W); an ensemble's: the logit of the mean probability


@dataclass
class Segmentation:
    """The result of `Predictor.segment` for one volume."""

    mask: np.ndarray  # bool (S, H, W), after threshold and post-processing
    probabilities: np.ndarray  # float32 (S, H, W)
    removed_voxels: int  # voxels above the threshold that post-processing removed


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
    """One model or an ensemble, ready to predict.

    Args:
        models: U-Nets returning logits; an ensemble averages their probabilities.
        channels: the input sequences the models expect, by name (subset of CHANNELS).
        percentiles: per-patient normalisation percentiles (low, high).
        inference: threshold, post-processing and TTA.
        device, precision: where and in which autocast dtype to run ("auto" measures
            nothing: CUDA/MPS/CPU and bf16 where native, see runtime).
        batch_size: slices per forward pass.
        channels_last: feed channels-last tensors.
        fuse: fold BatchNorm into the convolutions (a copy of each model; for models that
            are only used for inference). Without it the models are used as they are, and
            switched to eval mode only while predicting (training validation).
        source: where the models came from (for reports).
        kind: "tumorseg" or "original" (the original implementation's unet.pt).

    Raises:
        ConfigError: no models, models with different inputs, or a bad batch size.
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        *,
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
    ):
        if not models:
            raise ConfigError("a Predictor needs at least one model")
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        self.device = select_device(device)
        self.dtype = resolve_precision(precision, self.device)
        self.channels = tuple(channels)
        self._channel_index = channel_indices(self.channels)
        self.percentiles = (float(percentiles[0]), float(percentiles[1]))
        self.inference = inference or InferenceConfig()
        self.batch_size = batch_size
        self.channels_last = channels_last
        self.source = source
        self.kind = kind
        prepared = []
        for m in models:
            if fuse:
                m = fuse_batchnorm(m).to(self.device)
                if channels_last:
                    m = m.to(memory_format=torch.channels_last)
            prepared.append(m)
        self.models = prepared

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
        batch_size: int = BATCH_SIZE,
    ) -> Predictor:
        """A Predictor of one checkpoint, or an ensemble of several or of an ensemble file
        (they must agree on channels and normalisation; the first one's inference settings
        apply), or of the model shipped with the package when `paths` is None. threshold/postprocess/tta
        override the stored inference settings where given.

        Raises:
            CheckpointError: unreadable checkpoints, checkpoints that disagree, or no
                shipped model in this install.
            ConfigError: an override out of range.
        """
        if paths is None:
            path = default_checkpoint_path()
            if not path.is_file():
                raise CheckpointError(
                    f"no model is shipped with this installation ({path} is missing); "
                    "pass --checkpoint PATH (a tumorseg best.pt or the original unet.pt)")
            paths = [path]
        elif isinstance(paths, (str, Path)):
            paths = [paths]
        checkpoints: list[Checkpoint] = [ck for p in paths for ck in load_members(p)]
        if not checkpoints:
            raise CheckpointError("no checkpoint given")
        first = checkpoints[0]
        for ck in checkpoints[1:]:
            if (ck.channels, ck.percentiles) != (first.channels, first.percentiles):
                raise CheckpointError(f"{ck.path} expects channels {list(ck.channels)} and percentiles "
                                      f"{ck.percentiles}, unlike {first.path}; an ensemble needs one input")
        inference = first.inference.replace(threshold=threshold, postprocess=postprocess, tta=tta)
        return cls([ck.build_model() for ck in checkpoints], channels=first.channels,
                   percentiles=first.percentiles, inference=inference, device=device, precision=precision,
                   batch_size=batch_size, source=", ".join(dict.fromkeys(ck.path for ck in checkpoints)),
                   kind=first.kind)

    @property
    def precision(self) -> str:
        return precision_name(self.dtype)

    # ------------------------------------------------------------------ normalised slices

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, *, logits: bool = False) -> Prediction:
        """Probabilities (and, with `logits`, logits) float32 (N, 1, H, W) for normalised
        images float32 (N, C, H, W), in chunks of `batch_size` on the device."""
        if images.dim() != 4 or images.shape[1] != len(self.channels):
            raise ConfigError(f"expected images (N, {len(self.channels)}, H, W), got {tuple(images.shape)}")
        n = images.shape[0]
        probs = torch.empty((n, 1, *images.shape[-2:]), dtype=torch.float32)
        raw = torch.empty_like(probs) if logits else None
        modes = [m.training for m in self.models]
        for m in self.models:
            m.eval()
        try:
            for start in range(0, n, self.batch_size):
                s = slice(start, min(start + self.batch_size, n))
                x = images[s].to(self.device)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                p, z = self._forward(x)
                probs[s] = p.cpu()
                if raw is not None:
                    raw[s] = z.cpu()
        finally:
            for m, mode in zip(self.models, modes, strict=True):
                m.train(mode)
        return Prediction(probs, raw)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities, logits) of one chunk: mean over models (and the flip with TTA)."""
        total = torch.zeros((x.shape[0], 1, *x.shape[-2:]), dtype=torch.float32, device=x.device)
        single_logits = None
        for m in self.models:
            with autocast(self.device, self.dtype):
                z = m(x).float()
                p = torch.sigmoid(z)
                if self.inference.tta:
                    p = 0.5 * (p + torch.sigmoid(m(x.flip(-1)).float()).flip(-1))
            total += p
            single_logits = z
        p = total / len(self.models)
        if len(self.models) == 1 and not self.inference.tta:
            return p, single_logits  # type: ignore[return-value]
        return p, torch.logit(p, eps=1e-6)

    # ------------------------------------------------------------------ raw volumes

    def normalize_volume(self, volume: np.ndarray, low: Sequence[float] | None = None,
                         high: Sequence[float] | None = None) -> torch.Tensor:
        """Model input float32 (S, C, H, W) for a raw volume uint8 (S, H, W, 3).

        The channels are normalised with `low`/`high` (statistics of all three channels,
        e.g. from the cache) or, when not given, with the percentiles of this volume.
        """
        volume = np.asarray(volume)
        if volume.ndim != 4 or volume.shape[-1] != len(CHANNELS):
            raise ConfigError(f"expected a volume (S, H, W, {len(CHANNELS)}), got {volume.shape}")
        if low is None or high is None:
            low, high = volume_percentiles(volume, self.percentiles)
        ch = self._channel_index
        x = torch.from_numpy(np.ascontiguousarray(volume[..., ch])).permute(0, 3, 1, 2)
        return normalize(x, torch.tensor([low[c] for c in ch]), torch.tensor([high[c] for c in ch]))

    def segment(self, volume: np.ndarray, low: Sequence[float] | None = None,
                high: Sequence[float] | None = None) -> Segmentation:
        """Segment one patient volume uint8 (S, H, W, 3): normalise (see
        `normalize_volume`), predict, threshold and post-process as configured."""
        probs = self.predict(self.normalize_volume(volume, low, high)).probabilities[:, 0].numpy()
        mask = binarize(probs, self.inference)
        removed = int(np.count_nonzero(probs > self.inference.threshold)) - int(np.count_nonzero(mask))
        return Segmentation(mask=mask, probabilities=probs, removed_voxels=removed)
