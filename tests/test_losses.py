"""Dice losses against values computed by hand on tiny tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tumorseg.losses import (
    BCEDiceLoss,
    DiceLoss,
    bce_dice_loss,
    make_loss,
    per_image_dice_loss,
    soft_dice_loss,
)


def t(rows) -> torch.Tensor:
    """A (1, 1, H, W) float tensor from nested lists."""
    return torch.tensor(rows, dtype=torch.float32)[None, None]


@pytest.mark.parametrize(
    "p, g, expected",
    [
        # inter 1, sum p 1, sum g 2: 1 - (2+1)/(1+2+1) = 1/4
        ([[1, 0], [0, 0]], [[1, 1], [0, 0]], 0.25),
        # perfect: 1 - (2*2+1)/(2+2+1) = 0
        ([[1, 1], [0, 0]], [[1, 1], [0, 0]], 0.0),
        # disjoint: 1 - 1/(1+1+1) = 2/3
        ([[0, 1], [0, 0]], [[1, 0], [0, 0]], 2 / 3),
        # empty target, empty prediction: 1 - 1/1 = 0
        ([[0, 0], [0, 0]], [[0, 0], [0, 0]], 0.0),
        # empty target, p sums to 2: 1 - 1/(2+0+1) = 2/3
        ([[0.5, 0.5], [0.5, 0.5]], [[0, 0], [0, 0]], 2 / 3),
        # soft: inter 0.5+0.25 = 0.75, sum p 1.5, sum g 2: 1 - 2.5/4.5 = 4/9
        ([[0.5, 0.25], [0.75, 0]], [[1, 1], [0, 0]], 4 / 9),
    ],
)
def test_soft_dice_hand_values(p, g, expected):
    loss = soft_dice_loss(t(p), t(g), logits=False)
    assert loss.item() == pytest.approx(expected, abs=1e-7)


def test_smooth_is_used():
    # inter 1, sum p 1, sum g 2, smooth 0: 1 - 2/3 = 1/3; smooth 3: 1 - 5/6 = 1/6
    p, g = t([[1, 0], [0, 0]]), t([[1, 1], [0, 0]])
    assert soft_dice_loss(p, g, logits=False, smooth=0.0).item() == pytest.approx(1 / 3)
    assert soft_dice_loss(p, g, logits=False, smooth=3.0).item() == pytest.approx(1 / 6)


def two_images():
    # image 0: p = g = [1, 1] -> per-image loss 1 - 5/5 = 0
    # image 1: p = [0, 0], g = [1, 0] -> per-image loss 1 - 1/2 = 1/2
    p = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).reshape(2, 1, 1, 2)
    g = torch.tensor([[1.0, 1.0], [1.0, 0.0]]).reshape(2, 1, 1, 2)
    return p, g


def test_batch_pooled_and_per_image_differ_by_hand():
    p, g = two_images()
    # pooled: inter 2, sum p 2, sum g 3: 1 - 5/6 = 1/6
    assert soft_dice_loss(p, g, logits=False).item() == pytest.approx(1 / 6)
    # per image: mean(0, 1/2) = 1/4
    assert per_image_dice_loss(p, g, logits=False).item() == pytest.approx(0.25)


def test_logits_flag_equals_sigmoid_of_input():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 5, 4, generator=gen) * 3
    g = (torch.rand(3, 1, 5, 4, generator=gen) > 0.6).float()
    for fn in (soft_dice_loss, per_image_dice_loss, bce_dice_loss):
        a = fn(x, g, logits=True)
        b = fn(torch.sigmoid(x), g, logits=False)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_bce_dice_equals_reference_bce_plus_dice():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 6, 6, generator=gen)
    g = (torch.rand(2, 1, 6, 6, generator=gen) > 0.5).float()
    expected = F.binary_cross_entropy_with_logits(x, g) + soft_dice_loss(x, g, logits=True)
    torch.testing.assert_close(bce_dice_loss(x, g, logits=True), expected, rtol=0, atol=1e-6)
    p = torch.sigmoid(x)
    expected_p = F.binary_cross_entropy(p, g) + soft_dice_loss(p, g, logits=False)
    torch.testing.assert_close(bce_dice_loss(p, g, logits=False), expected_p, rtol=0, atol=1e-5)
    weighted = 0.25 * F.binary_cross_entropy_with_logits(x, g) + soft_dice_loss(x, g, logits=True)
    torch.testing.assert_close(bce_dice_loss(x, g, logits=True, bce_weight=0.25), weighted,
                               rtol=0, atol=1e-6)


def test_bce_dice_hand_value():
    # p = [1, 0] (clamped to 1-1e-7 and 1e-7), g = [1, 0]: BCE ~ 1e-7, Dice 1 - 3/3 = 0
    p = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)
    assert bce_dice_loss(p, p.clone(), logits=False).item() == pytest.approx(0.0, abs=1e-6)
    # p = 0.5 everywhere, g = [1, 0]: BCE = ln 2; Dice 1 - (2*0.5+1)/(1+1+1) = 1/3
    half = torch.full((1, 1, 1, 2), 0.5)
    g = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)
    expected = 0.6931471805599453 + 1 / 3
    assert bce_dice_loss(half, g, logits=False).item() == pytest.approx(expected, abs=1e-6)


def test_bce_with_logits_is_stable_for_extreme_logits():
    x = torch.tensor([200.0, -200.0]).reshape(1, 1, 1, 2)
    g = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)
    loss = bce_dice_loss(x, g, logits=True)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("fn", [soft_dice_loss, per_image_dice_loss, bce_dice_loss])
def test_shape_mismatch_names_both_shapes(fn):
    with pytest.raises(ValueError) as info:
        fn(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 3), logits=True)
    assert "(2, 1, 4, 4)" in str(info.value) and "(2, 1, 4, 3)" in str(info.value)


def test_empty_batch_raises():
    with pytest.raises(ValueError, match="non-empty batch"):
        soft_dice_loss(torch.zeros(0, 1, 4, 4), torch.zeros(0, 1, 4, 4), logits=True)


@pytest.mark.parametrize("fn", [soft_dice_loss, per_image_dice_loss, bce_dice_loss])
def test_gradient_flows_and_lowers_the_loss(fn):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1, 4, 4, generator=gen, requires_grad=True)
    g = (torch.rand(2, 1, 4, 4, generator=gen) > 0.5).float()
    loss = fn(x, g, logits=True)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # Dice (and BCE) gradients push logits up on tumour pixels, down elsewhere.
    assert (x.grad[g == 1] < 0).all() and (x.grad[g == 0] > 0).all()
    with torch.no_grad():
        assert fn(x - 0.1 * x.grad, g, logits=True) < loss


def test_modules_match_functions():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 1, 5, 5, generator=gen)
    g = (torch.rand(3, 1, 5, 5, generator=gen) > 0.5).float()
    p = torch.sigmoid(x)
    assert torch.equal(DiceLoss()(x, g), soft_dice_loss(x, g, logits=True))
    assert torch.equal(DiceLoss(logits=False)(p, g), soft_dice_loss(p, g, logits=False))
    assert torch.equal(DiceLoss(per_image=True)(x, g), per_image_dice_loss(x, g, logits=True))
    assert torch.equal(DiceLoss(smooth=0.5)(x, g), soft_dice_loss(x, g, logits=True, smooth=0.5))
    assert torch.equal(BCEDiceLoss()(x, g), bce_dice_loss(x, g, logits=True))
    assert torch.equal(BCEDiceLoss(bce_weight=0.3)(x, g),
                       bce_dice_loss(x, g, logits=True, bce_weight=0.3))


@pytest.mark.parametrize(
    "name, cls, per_image",
    [("dice", DiceLoss, False), ("dice_per_image", DiceLoss, True), ("bce_dice", BCEDiceLoss, None)],
)
def test_make_loss_names(name, cls, per_image):
    loss = make_loss(name)
    assert type(loss) is cls
    assert loss.logits is True
    if per_image is not None:
        assert loss.per_image is per_image


def test_make_loss_by_name_computes_the_right_value():
    p, g = two_images()
    x = torch.logit(p.clamp(1e-6, 1 - 1e-6))  # logits whose sigmoid is (almost) p
    assert make_loss("dice")(x, g).item() == pytest.approx(1 / 6, abs=1e-5)
    assert make_loss("dice_per_image")(x, g).item() == pytest.approx(0.25, abs=1e-5)


def test_make_loss_unknown_name():
    with pytest.raises(ValueError, match="unknown loss 'focal'"):
        make_loss("focal")


def test_tversky_loss_by_hand_and_its_dice_case():
    from tumorseg.losses import tversky_loss, tversky_weights

    p = torch.tensor([[0.9, 0.6, 0.2, 0.0]])
    g = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    tp, fp, fn = 0.9 + 0.2, 0.6, 0.1 + 0.8  # Σpg, Σp(1-g), Σ(1-p)g
    for alpha, beta in [(0.7, 0.3), (0.3, 0.7), (1.0, 0.0)]:
        expected = 1 - (tp + 1) / (tp + alpha * fp + beta * fn + 1)
        assert tversky_loss(p, g, logits=False, alpha=alpha, beta=beta).item() == pytest.approx(expected, rel=1e-6)
    # alpha = beta = 0.5 is the soft Dice loss with half the smoothing; empty target and prediction give 0
    assert tversky_loss(p, g, logits=False, smooth=0.5).item() == pytest.approx(
        soft_dice_loss(p, g, logits=False).item(), rel=1e-6)
    assert tversky_loss(torch.zeros(1, 4), torch.zeros(1, 4), logits=False).item() == 0.0
    z = torch.tensor([[2.0, -1.0]])
    t = torch.tensor([[1.0, 0.0]])
    loss = make_loss("bce_tversky:0.7,0.3")(z, t)
    expected = F.binary_cross_entropy_with_logits(z, t) + tversky_loss(z, t, logits=True, alpha=0.7, beta=0.3)
    assert loss.item() == pytest.approx(expected.item())
    assert tversky_weights("bce_tversky:0.6,0.4") == (0.6, 0.4)
    for bad in ("bce_tversky:0.5", "bce_tversky:a,b", "bce_tversky:2,0", "bce_tversky:0,0"):
        with pytest.raises(ValueError, match="bce_tversky"):
            make_loss(bad)
