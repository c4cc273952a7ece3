"""From probabilities to a mask: thresholding and connected-component post-processing.

The choices (`config.POSTPROCESS_CHOICES`):
- "none": the thresholded mask as it is;
- "lcc": the largest 3-D connected component of the patient volume (26-connected; in a
  single 2-D slice, 8-connected).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from tumorseg.config import POSTPROCESS_CHOICES, InferenceConfig
from tumorseg.errors import ConfigError


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 26-connected (3-D) / 8-connected (2-D) component of a binary mask."""
    m = np.asarray(mask, dtype=bool)
    labels, n = ndimage.label(m, structure=np.ones((3,) * m.ndim, dtype=bool))
    if n <= 1:
        return m
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def postprocess(mask: np.ndarray, method: str) -> np.ndarray:
    """Apply the post-processing `method` to a binary volume (S, H, W).

    Raises:
        ConfigError: an unknown method.
    """
    if method == "none":
        return np.asarray(mask, dtype=bool)
    if method == "lcc":
        return largest_component(mask)
    raise ConfigError(f"postprocess must be one of {', '.join(POSTPROCESS_CHOICES)}, got {method!r}")


def binarize(probs: np.ndarray | torch.Tensor, config: InferenceConfig | None = None) -> np.ndarray:
    """Binary volume bool (S, H, W) from probabilities (S, 1, H, W) or (S, H, W): `p > threshold`,
    then the configured post-processing (default InferenceConfig: 0.5, none)."""
    config = config or InferenceConfig()
    p = probs.numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    if p.ndim == 4:
        p = p[:, 0]
    return postprocess(p > config.threshold, config.postprocess)
