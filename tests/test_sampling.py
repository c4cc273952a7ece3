"""data.sampling: seeded slice order, batches, and the assembly of a training batch."""

from __future__ import annotations

import torch

from tumorseg.config import TrainConfig, replace_config
from tumorseg.data.sampling import batches_of, epoch_order, seeded_generator, training_batch


def _gen(seed: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def test_epoch_order_plain_is_a_permutation_and_seeded():
    cfg = replace_config(TrainConfig(), {"tumour_fraction": -1})
    tumour = torch.tensor([0, 1, 0, 0, 1, 0, 0], dtype=torch.bool)
    a = epoch_order(cfg, tumour, 0)
    assert sorted(a.tolist()) == list(range(7))
    assert torch.equal(a, epoch_order(cfg, tumour, 0))
    assert not torch.equal(epoch_order(cfg, tumour, 0), epoch_order(cfg, tumour, 1))


def test_epoch_order_tumour_fraction():
    cfg = replace_config(TrainConfig(), {"tumour_fraction": 0.5, "samples_per_epoch": 1000})
    tumour = torch.zeros(100, dtype=torch.bool)
    tumour[:10] = True
    order = epoch_order(cfg, tumour, 3)
    assert order.numel() == 1000
    # 500 forced tumour draws + about 10% of the 500 uniform draws.
    share = tumour[order].float().mean().item()
    assert 0.52 < share < 0.58


def test_batches_drop_only_a_final_single_slice():
    assert [b.tolist() for b in batches_of(torch.arange(9), 4)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [b.numel() for b in batches_of(torch.arange(10), 4)] == [4, 4, 2]


def _arrays(raw: torch.Tensor):
    from tumorseg.data.dataset import SliceArrays

    n, c = raw.shape[:2]
    return SliceArrays(images=raw, masks=torch.zeros(n, 1, *raw.shape[-2:], dtype=torch.uint8),
                       low=torch.zeros(n, c), high=torch.full((n, c), 255.0),
                       patient_index=torch.zeros(n, dtype=torch.long),
                       slice_numbers=torch.arange(n) + 1, patients=["p"])


def _flair_copies(x: torch.Tensor, flair: int) -> int:
    """How many (image, channel) pairs are an affine copy of the image's `flair` channel
    (augmentation jitters each channel's gain and offset and clamps, so compare correlations)."""
    count = 0
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            if c != flair:
                r = torch.corrcoef(torch.stack([x[i, flair].flatten(), x[i, c].flatten()]))[0, 1]
                count += int(r > 0.9)  # unrelated channels of random data: |r| near 0
    return count


def test_training_batch_simulates_missing_sequences_only_when_flair_is_an_input():
    n = 16
    raw = torch.randint(1, 255, (n, 3, 16, 16), dtype=torch.uint8, generator=_gen())
    base = {"crop": 0, "augment": True}
    on = replace_config(TrainConfig(), {**base, "sequence_dropout": 1.0})
    x, _ = training_batch(_arrays(raw), torch.arange(n), on, 0, 0)
    assert _flair_copies(x, 1) >= n  # every slice lost at least one of its two other sequences
    off = replace_config(TrainConfig(), {**base, "sequence_dropout": 0.0})
    x, _ = training_batch(_arrays(raw), torch.arange(n), off, 0, 0)
    assert _flair_copies(x, 1) == 0
    # Without FLAIR among the inputs there is nothing to copy from.
    no_flair = replace_config(TrainConfig(), {**base, "sequence_dropout": 1.0,
                                              "channels": ("pre-contrast", "post-contrast")})
    x, _ = training_batch(_arrays(raw[:, [0, 2]]), torch.arange(n), no_flair, 0, 0)
    assert _flair_copies(x, 0) == 0


def test_seeded_generators_are_pinned_and_distinct():
    """The streams come from numpy's SeedSequence: pinned values, so that a run resumed by
    another Python or tumorseg version continues with the same batches."""
    draw = lambda *k: torch.randint(1000, (4,), generator=seeded_generator(*k)).tolist()  # noqa: E731
    assert draw(0, 0, 0) == draw(0, 0, 0)
    assert draw(0, 0, 0) == [647, 856, 54, 730]
    keys = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 0, 0, 1), (1, 1, 1, 1)]
    assert len({tuple(draw(*k)) for k in keys}) == len(keys)


def test_training_batch_is_a_function_of_seed_epoch_and_step():
    n = 8
    raw = torch.randint(0, 255, (n, 3, 32, 32), dtype=torch.uint8, generator=_gen())
    cfg = replace_config(TrainConfig(), {"crop": 16, "augment": True, "sequence_dropout": 0.5})
    a = training_batch(_arrays(raw), torch.arange(n), cfg, 2, 5)
    b = training_batch(_arrays(raw), torch.arange(n), cfg, 2, 5)
    c = training_batch(_arrays(raw), torch.arange(n), cfg, 2, 6)
    assert a[0].shape == (n, 3, 16, 16) and a[1].shape == (n, 1, 16, 16)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
