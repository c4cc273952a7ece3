"""data.transforms: geometric transforms shared by image and mask, crops, simulated missing sequences."""

from __future__ import annotations

import torch

from tumorseg.config import preset
from tumorseg.data.transforms import augment_batch, crop_batch, replace_sequences


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(b: int = 4, c: int = 3, h: int = 32, w: int = 32):
    g = _gen(1)
    images = torch.rand(b, c, h, w, generator=g)
    masks = torch.zeros(b, 1, h, w)
    masks[:, :, 10:18, 5:12] = 1.0
    return images, masks


def test_identity_transform_returns_the_input():
    images, masks = _batch()
    x, y = augment_batch(images.clone(), masks.clone(), _gen(), flip=False, max_rotation_deg=0.0,
                         scale_range=(1.0, 1.0), intensity=0.0)
    torch.testing.assert_close(x, images, atol=1e-6, rtol=0)
    assert torch.equal(y, masks)


def test_flip_mirrors_image_and_mask_together():
    images, masks = _batch(b=64)
    x, y = augment_batch(images.clone(), masks.clone(), _gen(3), flip=True, max_rotation_deg=0.0,
                         scale_range=(1.0, 1.0), intensity=0.0)
    flipped = [bool(torch.allclose(x[i], images[i].flip(-1), atol=1e-6)) for i in range(64)]
    kept = [bool(torch.allclose(x[i], images[i], atol=1e-6)) for i in range(64)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))  # each image is either mirrored or kept
    assert 10 < sum(flipped) < 54
    for i in range(64):
        assert torch.equal(y[i], masks[i].flip(-1) if flipped[i] else masks[i])


def test_rotation_keeps_masks_binary_and_images_in_range():
    images, masks = _batch(b=8)
    x, y = augment_batch(images, masks, _gen(5), max_rotation_deg=30.0, scale_range=(0.8, 1.2), intensity=0.2)
    assert set(torch.unique(y).tolist()) <= {0.0, 1.0}
    assert y.sum() > 0
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert x.shape == images.shape and y.shape == masks.shape


def test_crop_centred_on_tumour_contains_tumour():
    images = torch.rand(6, 3, 64, 64, generator=_gen())
    masks = torch.zeros(6, 1, 64, 64)
    masks[:, :, 50:54, 2:6] = 1.0  # near a corner: the patch must be shifted inside the image
    x, y = crop_batch(images, masks, 24, _gen(), tumour_centred=1.0)
    assert x.shape == (6, 3, 24, 24) and y.shape == (6, 1, 24, 24)
    assert (y.flatten(1).sum(1) == 16).all()  # the whole 4x4 tumour lies inside every patch
    # The patch is a true sub-window of the image at the same offset as the mask's.
    for i in range(6):
        found = [(a, b) for a in range(41) for b in range(41)
                 if torch.equal(images[i, :, a:a + 24, b:b + 24], x[i])]
        assert len(found) == 1
        a, b = found[0]
        assert torch.equal(masks[i, :, a:a + 24, b:b + 24], y[i])


def test_replace_sequences_copies_flair_into_a_nonempty_subset():
    images = torch.rand(300, 3, 8, 8, generator=_gen())
    out = replace_sequences(images.clone(), 1, [0, 2], 1.0, _gen(2))
    assert torch.equal(out[:, 1], images[:, 1])
    patterns = set()
    for i in range(300):
        pre = torch.equal(out[i, 0], images[i, 1])
        post = torch.equal(out[i, 2], images[i, 1])
        assert pre or post  # p = 1: every image loses at least one sequence
        assert torch.equal(out[i, 0], images[i, 1] if pre else images[i, 0])
        assert torch.equal(out[i, 2], images[i, 1] if post else images[i, 2])
        patterns.add((pre, post))
    assert patterns == {(True, False), (False, True), (True, True)}


def test_replace_sequences_rate_and_no_op():
    images = torch.rand(2000, 3, 2, 2, generator=_gen())
    out = replace_sequences(images.clone(), 1, [0, 2], 0.2, _gen(4))
    changed = ((out != images).flatten(1).any(1)).float().mean().item()
    assert 0.16 < changed < 0.24
    g = _gen(9)
    state = g.get_state()
    assert torch.equal(replace_sequences(images.clone(), 1, [0, 2], 0.0, g), images)
    assert torch.equal(g.get_state(), state)  # p = 0 draws nothing: other randomness is unchanged


def test_seed_preset_never_replaces_sequences():
    assert preset("seed").sequence_dropout == 0.0
    assert preset("default").sequence_dropout == 0.2
