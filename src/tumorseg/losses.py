"""Dice losses: pure functions first, thin nn.Module wrappers after.

Every function takes `pred` and `target` of the same shape (B, 1, H, W) (any shape with a
leading batch dimension works) and `logits`: True when `pred` holds raw model outputs
(a sigmoid is applied inside), False when it already holds probabilities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _check(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    if pred.dim() < 1 or pred.shape[0] == 0:
        raise ValueError(f"expected a non-empty batch, got shape {tuple(pred.shape)}")


def soft_dice_loss(pred: torch.Tensor, target: torch.Tensor, *, logits: bool,
                   smooth: float = 1.0) -> torch.Tensor:
    """The loss of the original: 1 - (2·Σpg + s) / (Σp + Σg + s), sums pooled over the
    whole batch. An empty target with an empty prediction gives 0."""
    _check(pred, target)
    p = torch.sigmoid(pred.float()) if logits else pred.float()
    g = target.float()
    inter = (p * g).sum()
    return 1.0 - (2.0 * inter + smooth) / (p.sum() + g.sum() + smooth)


def per_image_dice_loss(pred: torch.Tensor, target: torch.Tensor, *, logits: bool,
                        smooth: float = 1.0) -> torch.Tensor:
    """Mean over images of 1 - (2·Σpg + s) / (Σp + Σg + s), sums per image."""
    _check(pred, target)
    p = (torch.sigmoid(pred.float()) if logits else pred.float()).flatten(1)
    g = target.float().flatten(1)
    dice = (2.0 * (p * g).sum(1) + smooth) / (p.sum(1) + g.sum(1) + smooth)
    return (1.0 - dice).mean()


def bce_dice_loss(pred: torch.Tensor, target: torch.Tensor, *, logits: bool,
                  smooth: float = 1.0, bce_weight: float = 1.0) -> torch.Tensor:
    """Binary cross-entropy (mean over pixels) + batch-pooled soft Dice loss.
    With logits, BCE uses the numerically stable `binary_cross_entropy_with_logits`."""
    _check(pred, target)
    if logits:
        bce = F.binary_cross_entropy_with_logits(pred.float(), target.float())
    else:
        bce = F.binary_cross_entropy(pred.float().clamp(1e-7, 1 - 1e-7), target.float())
    return bce_weight * bce + soft_dice_loss(pred, target, logits=logits, smooth=smooth)


class DiceLoss(nn.Module):
    """Batch-pooled soft Dice loss (the original's). `logits` says what `pred` holds."""

    def __init__(self, logits: bool = True, smooth: float = 1.0, per_image: bool = False):
        super().__init__()
        self.logits, self.smooth, self.per_image = logits, smooth, per_image

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        fn = per_image_dice_loss if self.per_image else soft_dice_loss
        return fn(pred, target, logits=self.logits, smooth=self.smooth)


class BCEDiceLoss(nn.Module):
    def __init__(self, logits: bool = True, smooth: float = 1.0, bce_weight: float = 1.0):
        super().__init__()
        self.logits, self.smooth, self.bce_weight = logits, smooth, bce_weight

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return bce_dice_loss(pred, target, logits=self.logits, smooth=self.smooth,
                             bce_weight=self.bce_weight)


def make_loss(name: str) -> nn.Module:
    """The training loss by config name (the model outputs logits)."""
    if name == "dice":
        return DiceLoss(logits=True)
    if name == "dice_per_image":
        return DiceLoss(logits=True, per_image=True)
    if name == "bce_dice":
        return BCEDiceLoss(logits=True)
    raise ValueError(f"unknown loss {name!r}; choose dice, dice_per_image or bce_dice")
