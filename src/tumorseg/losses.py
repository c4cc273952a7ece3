"""Dice losses: pure functions first, thin nn.Module wrappers after.

Every function takes `pred` and `target` of the same shape (B, 1, H, W) (any shape with a
leading batch dimension works) and `logits`: True when `pred` holds raw model outputs
(a sigmoid is applied inside), False when it already holds probabilities.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Pool = Callable[[torch.Tensor], torch.Tensor]


def _check(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    if pred.dim() < 1 or pred.shape[0] == 0:
        raise ValueError(f"expected a non-empty batch, got shape {tuple(pred.shape)}")


def soft_dice_loss(pred: torch.Tensor, target: torch.Tensor, *, logits: bool,
                   smooth: float = 1.0, pool: Pool | None = None) -> torch.Tensor:
    """The loss of the original: 1 - (2·Σpg + s) / (Σp + Σg + s), sums pooled over the
    whole batch. An empty target with an empty prediction gives 0. `pool`, when given,
    maps the three sums (a tensor of 3) to the sums of a larger batch (data-parallel
    training adds those of every process)."""
    _check(pred, target)
    p = torch.sigmoid(pred.float()) if logits else pred.float()
    g = target.float()
    sums = torch.stack([(p * g).sum(), p.sum(), g.sum()])
    if pool is not None:
        sums = pool(sums)
    return 1.0 - (2.0 * sums[0] + smooth) / (sums[1] + sums[2] + smooth)


def per_image_dice_loss(pred: torch.Tensor, target: torch.Tensor, *, logits: bool,
                        smooth: float = 1.0) -> torch.Tensor:
    """Mean over images of 1 - (2·Σpg + s) / (Σp + Σg + s), sums per image."""
    _check(pred, target)
    p = (torch.sigmoid(pred.float()) if logits else pred.float()).flatten(1)
    g = target.float().flatten(1)
    dice = (2.0 * (p * g).sum(1) + smooth) / (p.sum(1) + g.sum(1) + smooth)
    return (1.0 - dice).mean()


def bce_dice_loss(pred: torch.Tensor, target: torch.Tensor, *, logits: bool,
                  smooth: float = 1.0, bce_weight: float = 1.0, pool: Pool | None = None) -> torch.Tensor:
    """Binary cross-entropy (mean over pixels) + batch-pooled soft Dice loss.
    With logits, BCE uses the numerically stable `binary_cross_entropy_with_logits`."""
    _check(pred, target)
    if logits:
        bce = F.binary_cross_entropy_with_logits(pred.float(), target.float())
    else:
        bce = F.binary_cross_entropy(pred.float().clamp(1e-7, 1 - 1e-7), target.float())
    return bce_weight * bce + soft_dice_loss(pred, target, logits=logits, smooth=smooth, pool=pool)


def tversky_loss(pred: torch.Tensor, target: torch.Tensor, *, logits: bool, alpha: float = 0.5,
                 beta: float = 0.5, smooth: float = 1.0, pool: Pool | None = None) -> torch.Tensor:
    """1 - (Σpg + s) / (Σpg + α·Σp(1-g) + β·Σ(1-p)g + s), sums pooled over the whole
    batch (Salehi et al. 2017). α weighs false positives, β false negatives; α = β = 0.5
    is the soft Dice loss with smoothing 2s. An empty target with an empty prediction
    gives 0. `pool` as in `soft_dice_loss`."""
    _check(pred, target)
    p = torch.sigmoid(pred.float()) if logits else pred.float()
    g = target.float()
    sums = torch.stack([(p * g).sum(), (p * (1 - g)).sum(), ((1 - p) * g).sum()])
    if pool is not None:
        sums = pool(sums)
    return 1.0 - (sums[0] + smooth) / (sums[0] + alpha * sums[1] + beta * sums[2] + smooth)


class TverskyLoss(nn.Module):
    """Binary cross-entropy (mean over pixels) + batch-pooled Tversky loss (`tversky_loss`)."""

    def __init__(self, alpha: float, beta: float, logits: bool = True, smooth: float = 1.0,
                 pool: Pool | None = None):
        super().__init__()
        self.alpha, self.beta, self.logits, self.smooth, self.pool = alpha, beta, logits, smooth, pool

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.logits:
            bce = F.binary_cross_entropy_with_logits(pred.float(), target.float())
        else:
            bce = F.binary_cross_entropy(pred.float().clamp(1e-7, 1 - 1e-7), target.float())
        return bce + tversky_loss(pred, target, logits=self.logits, alpha=self.alpha, beta=self.beta,
                                  smooth=self.smooth, pool=self.pool)


class DiceLoss(nn.Module):
    """Batch-pooled soft Dice loss (the original's). `logits` says what `pred` holds."""

    def __init__(self, logits: bool = True, smooth: float = 1.0, per_image: bool = False, pool: Pool | None = None):
        super().__init__()
        self.logits, self.smooth, self.per_image, self.pool = logits, smooth, per_image, pool

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.per_image:
            return per_image_dice_loss(pred, target, logits=self.logits, smooth=self.smooth)
        return soft_dice_loss(pred, target, logits=self.logits, smooth=self.smooth, pool=self.pool)


class BCEDiceLoss(nn.Module):
    def __init__(self, logits: bool = True, smooth: float = 1.0, bce_weight: float = 1.0, pool: Pool | None = None):
        super().__init__()
        self.logits, self.smooth, self.bce_weight, self.pool = logits, smooth, bce_weight, pool

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return bce_dice_loss(pred, target, logits=self.logits, smooth=self.smooth,
                             bce_weight=self.bce_weight, pool=self.pool)


def make_loss(name: str, pool: Pool | None = None) -> nn.Module:
    """The training loss by config name (the model outputs logits); `pool` see
    `soft_dice_loss` (means over images or pixels need none: DDP averages them).
    "bce_tversky:A,B" is BCE + the Tversky loss with α = A (false positives) and β = B
    (false negatives)."""
    if name.startswith("bce_tversky:"):
        alpha, beta = tversky_weights(name)
        return TverskyLoss(alpha, beta, logits=True, pool=pool)
    if name == "dice":
        return DiceLoss(logits=True, pool=pool)
    if name == "dice_per_image":
        return DiceLoss(logits=True, per_image=True)
    if name == "bce_dice":
        return BCEDiceLoss(logits=True, pool=pool)
    raise ValueError(f"unknown loss {name!r}; choose dice, dice_per_image, bce_dice or bce_tversky:A,B")


def tversky_weights(name: str) -> tuple[float, float]:
    """(α, β) of "bce_tversky:A,B".

    Raises:
        ValueError: not two numbers in [0, 1] with a positive sum.
    """
    try:
        alpha, beta = (float(v) for v in name.split(":", 1)[1].split(","))
    except ValueError:
        raise ValueError(f"loss {name!r}: expected bce_tversky:A,B, e.g. bce_tversky:0.7,0.3") from None
    if not (0 <= alpha <= 1 and 0 <= beta <= 1 and alpha + beta > 0):
        raise ValueError(f"loss {name!r}: A and B must be in [0, 1], not both 0")
    return alpha, beta
