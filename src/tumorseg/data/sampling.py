"""Which training slices each step sees, and how a step's batch is assembled.

Reproducibility: every random draw comes from a generator seeded by
(purpose, seed, epoch, step) through `numpy.random.SeedSequence`, so the slice order of
an epoch and the crops/augmentation of a step do not depend on anything but those keys:
a run interrupted at any step and resumed continues with exactly the same batches.
"""

from __future__ import annotations

import numpy as np
import torch

from tumorseg.config import CHANNELS, Channel, TrainConfig, parse_channels
from tumorseg.data.dataset import SliceArrays
from tumorseg.data.transforms import augment_batch, crop_batch, replace_sequences

# The purposes of seeded generators, so that the streams never coincide.
_ORDER, _STEP = 0, 1
# How batches are drawn; recorded in checkpoints so that a resume can tell a run started
# by a version that drew them differently (tumorseg 0.1's checkpoints have none).
SAMPLER = "seedsequence-1"
# The channel that stands in for a missing sequence (sequence dropout).
FLAIR_CHANNEL = Channel(CHANNELS.index("FLAIR"))


def seeded_generator(purpose: int, seed: int, epoch: int, step: int = 0) -> torch.Generator:
    """A torch.Generator seeded from the keys by numpy's SeedSequence (keys must be >= 0)."""
    words = np.random.SeedSequence([purpose, seed, epoch, step]).generate_state(2, dtype=np.uint32)
    g = torch.Generator()
    g.manual_seed((int(words[0]) << 32 | int(words[1])) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def epoch_order(cfg: TrainConfig, tumour: torch.Tensor, epoch: int) -> torch.Tensor:
    """Indices of the training slices seen in `epoch`, in order.

    tumour: bool (N,), the slices with tumour. tumour_fraction < 0: every slice once,
    shuffled (the original). Otherwise `samples_per_epoch` (default: number of slices)
    draws, `tumour_fraction` of them from slices with tumour and the rest from all slices.
    """
    g = seeded_generator(_ORDER, cfg.seed, epoch)
    n = tumour.numel()
    if cfg.tumour_fraction < 0:
        return torch.randperm(n, generator=g)
    total = cfg.samples_per_epoch or n
    pos = torch.nonzero(tumour).flatten()
    n_pos = round(cfg.tumour_fraction * total) if pos.numel() else 0
    pick_pos = pos[torch.randint(pos.numel(), (n_pos,), generator=g)] if n_pos else pos[:0]
    pick_any = torch.randint(n, (total - n_pos,), generator=g)
    both = torch.cat([pick_pos, pick_any])
    return both[torch.randperm(both.numel(), generator=g)]


def batches_of(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Split an epoch order into batches; a final batch of one slice is dropped
    (BatchNorm cannot train on it)."""
    out = list(order.split(batch_size))
    if len(out) > 1 and out[-1].numel() == 1:
        out.pop()
    return out


def training_batch(arrays: SliceArrays, idx: torch.Tensor, cfg: TrainConfig, epoch: int,
                   step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised (and, per config, cropped and augmented) images float32 (B, C, h, w) and
    masks float32 (B, 1, h, w) of one step."""
    x, y = arrays.batch(idx)
    g = seeded_generator(_STEP, cfg.seed, epoch, step)
    if cfg.crop:
        x, y = crop_batch(x, y, cfg.crop, g)
    if cfg.augment:
        specs = parse_channels(cfg.channels)
        if FLAIR_CHANNEL in specs:  # the slice's own sequences; neighbour channels stay as they are
            flair = specs.index(FLAIR_CHANNEL)
            others = [j for j, c in enumerate(specs) if c.offset == 0 and j != flair]
            x = replace_sequences(x, flair, others, cfg.sequence_dropout, g)
        x, y = augment_batch(x, y, g)
    return x, y
