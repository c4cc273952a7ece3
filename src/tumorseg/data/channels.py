"""The model's input channels of a patient volume: sequences of each slice and, for
2.5-D models, of its neighbouring slices (`FLAIR-1`, `FLAIR+1`; see `config.parse_channels`).

Training (`dataset.load_arrays`) and inference (`Predictor.normalize_volume`) both build
their inputs here, so a model sees the same channels in both.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tumorseg.config import neighbour_step, parse_channels


def select_channels(volume: np.ndarray, channels: Sequence[str], slice_spacing: float | None = None,
                    slices: Sequence[int] | None = None) -> np.ndarray:
    """The channels (S, H, W, C) of a volume (S, H, W, 3) in CHANNELS order, in its dtype;
    with `slices`, those of these slices only (len(slices), H, W, C).

    A neighbour channel of slice s is slice s + offset * step of its sequence, where step
    is `config.neighbour_step(slice_spacing)` (the adjacent slice when the spacing
    between slices, in mm, is unknown); past the first or last slice the edge slice repeats.
    """
    specs = parse_channels(list(channels))
    if all(c.offset == 0 for c in specs):
        return (volume if slices is None else volume[list(slices)])[..., [c.sequence for c in specs]]
    n = volume.shape[0]
    wanted = np.arange(n) if slices is None else np.asarray(slices, dtype=np.int64)
    step = neighbour_step(slice_spacing)
    out = np.empty((len(wanted), *volume.shape[1:3], len(specs)), dtype=volume.dtype)
    for j, c in enumerate(specs):
        out[..., j] = volume[np.clip(wanted + c.offset * step, 0, n - 1), ..., c.sequence]
    return out


def slice_spacing(spacing: Sequence[float] | None) -> float | None:
    """The spacing between slices (mm) of a (slices, rows, columns) spacing, or None."""
    return float(spacing[0]) if spacing else None

