"""Per-patient intensity normalisation of the original implementation, and the kaggle_3m
convention for missing sequences.

Each channel of a patient volume is scaled by two percentiles of that channel over all
slices of the volume (default 10th and 99th, `config.NORM_PERCENTILES`):
`x = clip((x - low) / (high - low), 0, 1)`.
"""

from __future__ import annotations

import numpy as np
import torch

from tumorseg.config import CHANNELS, NORM_PERCENTILES

FLAIR = CHANNELS.index("FLAIR")


def volume_percentiles(
    images: np.ndarray, percentiles: tuple[float, float] = NORM_PERCENTILES
) -> tuple[list[float], list[float]]:
    """Per-channel (low, high) percentiles over a volume uint8 (S, H, W, C)."""
    flat = images.reshape(-1, images.shape[-1])
    q = np.percentile(flat, list(percentiles), axis=0)
    return [float(v) for v in q[0]], [float(v) for v in q[1]]


def normalize(images: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """clip((x - low) / (high - low), 0, 1) per channel.

    Args:
        images: (B, C, H, W) uint8 or float raw intensities.
        low, high: (B, C) or (C,) per-channel statistics of each image's patient volume.
            A channel with high <= low (a constant volume) maps to 0.
    Returns:
        float32 (B, C, H, W) in [0, 1].
    """
    low = low.to(torch.float32)
    high = high.to(torch.float32)
    if low.dim() == 1:
        low, high = low[None], high[None]
    scale = torch.where(high > low, 1.0 / (high - low).clamp_min(1e-6), torch.zeros_like(low))
    x = images.to(torch.float32)
    return ((x - low[:, :, None, None]) * scale[:, :, None, None]).clamp_(0.0, 1.0)


def fill_missing_sequences(volume: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """kaggle_3m's convention for a missing sequence, applied to a raw volume uint8
    (S, H, W, 3): a pre- or post-contrast channel that is constant over the whole volume
    (empty, or filled with zeros by another tool) is replaced by the FLAIR channel.

    Returns:
        (the volume, a copy when anything was filled; the names of the filled channels).
    """
    filled = [c for c in range(volume.shape[-1])
              if c != FLAIR and volume[..., c].min() == volume[..., c].max()
              and volume[..., FLAIR].min() != volume[..., FLAIR].max()]
    if not filled:
        return volume, []
    out = np.array(volume, copy=True)
    for c in filled:
        out[..., c] = out[..., FLAIR]
    return out, [CHANNELS[c] for c in filled]
