"""From probabilities to a mask: thresholding and connected-component post-processing.

The methods (`config.POSTPROCESS_CHOICES`), on a patient's thresholded volume, with
26-connected 3-D components (8-connected in a single 2-D slice):
- "none": the thresholded mask as it is;
- "lcc": the largest component only;
- "top_mass": the component with the highest summed probability only (a large weak
  region loses to a smaller confident one);
- "min_size:N": every component of at least N voxels;
- "confident:P": every component whose highest probability is at least P, so that a
  multifocal tumour keeps all its foci while weak false positives go.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from tumorseg.config import InferenceConfig, postprocess_parameter
from tumorseg.errors import ConfigError


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """(labels, count) of the 26-connected (3-D) / 8-connected (2-D) components of a mask."""
    m = np.asarray(mask, dtype=bool)
    return ndimage.label(m, structure=np.ones((3,) * m.ndim, dtype=bool))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 26-connected (3-D) / 8-connected (2-D) component of a binary mask."""
    m = np.asarray(mask, dtype=bool)
    labels, n = components(m)
    if n <= 1:
        return m
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def top_mass_component(mask: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Keep the component of a binary mask whose probabilities `probs` (same shape) sum
    highest (the first such on a tie)."""
    m = np.asarray(mask, dtype=bool)
    labels, n = components(m)
    if n <= 1:
        return m
    mass = np.bincount(labels.ravel(), weights=np.asarray(probs, dtype=np.float64).ravel(), minlength=n + 1)
    mass[0] = -np.inf
    return labels == int(mass.argmax())


def postprocess(mask: np.ndarray, method: str, probs: np.ndarray | None = None) -> np.ndarray:
    """Apply the post-processing `method` to a binary volume (S, H, W); "confident:P" and
    "top_mass" need the probabilities `probs` of the same shape.

    Raises:
        ConfigError: an unknown method, or "confident:P"/"top_mass" without probabilities.
    """
    m = np.asarray(mask, dtype=bool)
    parameter = postprocess_parameter(method)
    if method == "none":
        return m
    if method == "lcc":
        return largest_component(m)
    if method == "top_mass":
        if probs is None:
            raise ConfigError("postprocess top_mass needs the probabilities")
        return top_mass_component(m, probs)
    if method.startswith("min_size:") and isinstance(parameter, int):
        labels, n = components(m)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        keep = sizes >= parameter
        keep[0] = False
        return keep[labels]
    if method.startswith("confident:") and isinstance(parameter, float):
        if probs is None:
            raise ConfigError(f"postprocess {method} needs the probabilities")
        labels, n = components(m)
        peak = ndimage.maximum(np.asarray(probs), labels, index=np.arange(n + 1)) if n else np.zeros(1)
        keep = np.asarray(peak) >= parameter
        keep[0] = False
        return keep[labels]
    raise ConfigError(f"postprocess must be none, lcc, top_mass, min_size:N (N >= 1) or confident:P (0 < P < 1), "
                      f"got {method!r}")


def binarize(probs: np.ndarray | torch.Tensor, config: InferenceConfig | None = None) -> np.ndarray:
    """Binary volume bool (S, H, W) from probabilities (S, 1, H, W) or (S, H, W): `p > threshold`,
    then the configured post-processing (default InferenceConfig: 0.5, none)."""
    config = config or InferenceConfig()
    p = probs.numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    if p.ndim == 4:
        p = p[:, 0]
    return postprocess(p > config.threshold, config.postprocess, p)
