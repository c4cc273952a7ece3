"""Augmentation and cropping on whole batches of (image, mask) tensors, together.

Image and mask always receive the same geometric transform; the mask is resampled with
nearest-neighbour interpolation so that it stays binary. All randomness comes from the
`torch.Generator` passed in, so a run is reproducible and resumable step by step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _uniform(n: int, low: float, high: float, g: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g)


def augment_batch(
    images: torch.Tensor,
    masks: torch.Tensor,
    g: torch.Generator,
    *,
    flip: bool = True,
    max_rotation_deg: float = 15.0,
    scale_range: tuple[float, float] = (0.9, 1.1),
    intensity: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random horizontal flip, rotation, scaling and per-channel intensity jitter.

    Args:
        images: float32 (B, C, H, W) normalised to [0, 1].
        masks: float32 (B, 1, H, W) with 0/1.
        g: source of randomness.
    Returns:
        (images, masks) of the same shapes; images stay in [0, 1], masks 0/1.
    """
    b = images.shape[0]
    angle = _uniform(b, -max_rotation_deg, max_rotation_deg, g) * math.pi / 180.0
    scale = _uniform(b, *scale_range, g)
    sx = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0) if flip else torch.ones(b)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * sx, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin * sx, cos
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    masks = F.grid_sample(masks, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    if intensity > 0:
        c = images.shape[1]
        gain = _uniform(b * c, 1 - intensity, 1 + intensity, g).view(b, c, 1, 1)
        shift = _uniform(b * c, -intensity, intensity, g).view(b, c, 1, 1)
        images = (images * gain + shift).clamp_(0.0, 1.0)
    return images.contiguous(), masks.contiguous()


def replace_sequences(images: torch.Tensor, source: int, targets: list[int], p: float,
                      g: torch.Generator) -> torch.Tensor:
    """Simulate missing sequences the way kaggle_3m fills them: copy channel `source`
    (FLAIR) into some of the `targets` channels.

    Each image, with probability `p`, gets a non-empty subset of `targets` (uniform over
    the subsets) replaced by its `source` channel. Works in place and returns `images`.
    Draws nothing from `g` when `p` is 0 or `targets` is empty.
    """
    if p <= 0 or not targets:
        return images
    b = images.shape[0]
    hit = torch.rand(b, generator=g) < p
    n_subsets = 2 ** len(targets) - 1
    subset = torch.randint(1, n_subsets + 1, (b,), generator=g)
    for i in torch.nonzero(hit).flatten().tolist():
        for bit, c in enumerate(targets):
            if int(subset[i]) >> bit & 1:
                images[i, c] = images[i, source]
    return images


def crop_batch(
    images: torch.Tensor, masks: torch.Tensor, size: int, g: torch.Generator,
    tumour_centred: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop a `size` x `size` patch out of each image (and its mask).

    For each image the patch centre is, with probability `tumour_centred`, a random tumour
    pixel (when the mask has one), else a random pixel of the head (any channel > 0),
    else anywhere; the patch is then shifted to lie inside the image.

    Args:
        images: (B, C, H, W); masks: (B, 1, H, W). H, W >= size.
    """
    b, _, h, w = images.shape
    if size >= h and size >= w:
        return images, masks
    ch, cw = min(size, h), min(size, w)
    out_i = images.new_empty((b, images.shape[1], ch, cw))
    out_m = masks.new_empty((b, 1, ch, cw))
    pick = torch.rand(b, generator=g)
    for i in range(b):
        weights = masks[i, 0].flatten()
        if pick[i] >= tumour_centred or weights.sum() == 0:
            weights = (images[i].amax(0) > 0).flatten().float()
        if weights.sum() > 0:
            k = int(torch.multinomial(weights.float(), 1, generator=g))
            cy, cx = divmod(k, w)
        else:
            cy = int(torch.randint(h, (1,), generator=g))
            cx = int(torch.randint(w, (1,), generator=g))
        y0 = min(max(cy - ch // 2, 0), h - ch)
        x0 = min(max(cx - cw // 2, 0), w - cw)
        out_i[i] = images[i, :, y0:y0 + ch, x0:x0 + cw]
        out_m[i] = masks[i, :, y0:y0 + ch, x0:x0 + cw]
    return out_i, out_m
