"""Normalisation and the PyTorch views of the cache (LGGDataset, SliceArrays)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tumorseg.data.cache import prepare
from tumorseg.data.dataset import LGGDataset, load_arrays, normalize
from tumorseg.errors import DataError, TumorsegError


@pytest.fixture
def cache(kaggle, tmp_path):
    return prepare(kaggle.root, tmp_path / "cache", progress=False)


def expected_image(vol: np.ndarray, k: int, channels: list[int]) -> np.ndarray:
    """The original normalisation by hand: per channel over the patient volume."""
    out = []
    for c in channels:
        low, high = np.percentile(vol[..., c], 10), np.percentile(vol[..., c], 99)
        out.append(np.clip((vol[k, ..., c].astype(np.float64) - low) / (high - low), 0, 1))
    return np.stack(out)


def test_normalize_by_hand():
    x = torch.tensor([0, 5, 10, 20, 15], dtype=torch.uint8).reshape(1, 1, 1, 5)
    # low 5, high 15: (x - 5) / 10 clipped -> 0, 0, 0.5, 1, 1
    out = normalize(x, torch.tensor([5.0]), torch.tensor([15.0]))
    assert out.dtype == torch.float32 and out.shape == (1, 1, 1, 5)
    assert out.flatten().tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_normalize_per_image_per_channel_statistics():
    x = torch.full((2, 2, 1, 1), 6.0)
    low = torch.tensor([[2.0, 4.0], [0.0, 6.0]])
    high = torch.tensor([[10.0, 8.0], [12.0, 10.0]])
    # (6-2)/8, (6-4)/4 ; (6-0)/12, (6-6)/4
    assert normalize(x, low, high).flatten().tolist() == [0.5, 0.5, 0.5, 0.0]


@pytest.mark.parametrize("high", [7.0, 3.0])
def test_normalize_constant_channel_gives_zero(high):
    x = torch.tensor([0.0, 7.0, 255.0]).reshape(1, 1, 1, 3)
    out = normalize(x, torch.tensor([7.0]), torch.tensor([high]))
    assert out.flatten().tolist() == [0.0, 0.0, 0.0]


def test_item_shapes_dtypes_and_identity(cache, kaggle):
    ds = LGGDataset(cache)
    assert len(ds) == 12 + 5 + 5
    image, mask, patient, number = ds[13]  # PAT_A has 12 slices: item 13 is PAT_B slice 2
    assert (patient, number) == ("PAT_B_2002", 2)
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
    assert mask.dtype == torch.float32 and mask.shape == (1, 32, 32)
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert image.min() == 0.0 and image.max() == 1.0  # percentile clipping reaches both ends
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert np.array_equal(mask[0].numpy(), kaggle.masks["PAT_B_2002"][1].astype(np.float32))


def test_items_follow_patient_and_slice_order(cache):
    ds = LGGDataset(cache, patients=["PAT_C_2003", "PAT_A_2001"])
    ids = [(ds[i][2], ds[i][3]) for i in range(len(ds))]
    assert ids == [("PAT_C_2003", n) for n in range(1, 6)] + [("PAT_A_2001", n) for n in range(1, 13)]


def test_normalisation_matches_hand_computation(cache, kaggle):
    ds = LGGDataset(cache, patients=["PAT_A_2001"])
    vol = kaggle.images["PAT_A_2001"]
    for k in (0, 9):
        image = ds[k][0].numpy()
        np.testing.assert_allclose(image, expected_image(vol, k, [0, 1, 2]), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "names, indices",
    [
        (["FLAIR"], [1]),
        (["post-contrast", "pre-contrast"], [2, 0]),
        (["flair", "POST-CONTRAST"], [1, 2]),
        ([" Pre-Contrast "], [0]),
    ],
)
def test_channel_selection_by_name(cache, kaggle, names, indices):
    full = LGGDataset(cache, patients=["PAT_B_2002"])[3][0]
    image = LGGDataset(cache, patients=["PAT_B_2002"], channels=names)[3][0]
    assert image.shape == (len(indices), 32, 32)
    assert torch.equal(image, full[indices])
    vol = kaggle.images["PAT_B_2002"]
    np.testing.assert_allclose(image.numpy(), expected_image(vol, 3, indices), rtol=0, atol=1e-6)


@pytest.mark.parametrize("k, below, above", [(3, 2, 4), (0, 0, 1), (4, 3, 4)])
def test_neighbour_channels_are_the_adjacent_slices_with_the_edge_repeated(cache, kaggle, k, below, above):
    # kaggle_3m carries no spacing: the neighbour is the adjacent slice; the edge slice repeats.
    names = ["FLAIR-1", "pre-contrast", "FLAIR+1", "FLAIR"]
    image = LGGDataset(cache, patients=["PAT_B_2002"], channels=names)[k][0]
    vol = kaggle.images["PAT_B_2002"]
    by_hand = np.concatenate([expected_image(vol, below, [1]), expected_image(vol, k, [0]),
                              expected_image(vol, above, [1]), expected_image(vol, k, [1])])
    assert image.shape == (4, 32, 32)
    np.testing.assert_allclose(image.numpy(), by_hand, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "names, fragment",
    [
        (["T1"], "unknown channel 'T1'; choose from pre-contrast, FLAIR, post-contrast, optionally with a "
                 "neighbouring-slice offset such as FLAIR-1 or FLAIR+1"),
        (["T2+1"], "unknown channel 'T2+1'; choose from"),
        (["FLAIR", "flair"], "channel 'flair' given twice"),
        (["FLAIR+1", "flair+01"], "channel 'flair+01' given twice"),
        ([], "at least one channel is needed"),
    ],
)
def test_bad_channel_names(cache, names, fragment):
    with pytest.raises(TumorsegError) as info:
        LGGDataset(cache, channels=names)
    assert str(info.value).startswith(fragment)
    with pytest.raises(TumorsegError):
        load_arrays(cache, ["PAT_A_2001"], channels=names)


def test_unknown_patient(cache):
    with pytest.raises(DataError, match="PAT_Q_9"):
        LGGDataset(cache, patients=["PAT_A_2001", "PAT_Q_9"])
    with pytest.raises(DataError, match="patient PAT_Q_9 is not in the data"):
        load_arrays(cache, ["PAT_Q_9"])
    with pytest.raises(DataError, match="no patients selected"):
        load_arrays(cache, [])


@pytest.mark.parametrize("channels", [("pre-contrast", "FLAIR", "post-contrast"), ("FLAIR",),
                                      ("post-contrast", "FLAIR"),
                                      ("pre-contrast", "FLAIR", "post-contrast", "FLAIR-1", "FLAIR+1")])
def test_slice_arrays_batch_equals_dataset_items(cache, channels):
    patients = ["PAT_B_2002", "PAT_A_2001"]
    arrays = load_arrays(cache, patients, channels=channels)
    ds = LGGDataset(cache, patients=patients, channels=channels)
    assert len(arrays) == len(ds) == 17
    assert arrays.images.dtype == torch.uint8 and arrays.images.shape == (17, len(channels), 32, 32)
    assert arrays.slice_numbers.tolist() == [1, 2, 3, 4, 5] + list(range(1, 13))
    assert arrays.patient_index.tolist() == [0] * 5 + [1] * 12
    idx = torch.tensor([0, 4, 5, 16, 9])
    x, y = arrays.batch(idx)
    assert x.dtype == torch.float32 and y.dtype == torch.float32
    for row, i in enumerate(idx.tolist()):
        image, mask, patient, number = ds[i]
        assert torch.equal(x[row], image)
        assert torch.equal(y[row], mask)
        assert patients[int(arrays.patient_index[i])] == patient
        assert int(arrays.slice_numbers[i]) == number


def test_slice_arrays_helpers(cache, kaggle):
    arrays = load_arrays(cache, ["PAT_C_2003", "PAT_B_2002"])
    assert arrays.patient_slices(1).tolist() == [5, 6, 7, 8, 9]
    expected = [bool(m.any()) for p in ("PAT_C_2003", "PAT_B_2002") for m in kaggle.masks[p]]
    assert arrays.tumour().tolist() == expected
    assert expected == [False, True, False, True, False] * 2


def test_slice_arrays_pad_mixed_sizes_to_normalised_zero(make_kaggle, tmp_path):
    a = make_kaggle(name="a", patients={"PAT_A_1": 2}, size=(32, 32), strays=False)
    b = make_kaggle(name="b", patients={"PAT_B_1": 2}, size=(24, 30), strays=False)
    (b.root / "PAT_B_1").rename(a.root / "PAT_B_1")
    cache = prepare(a.root, tmp_path / "cache", progress=False)
    arrays = load_arrays(cache, ["PAT_A_1", "PAT_B_1"])
    assert arrays.images.shape == (4, 3, 32, 32) and arrays.masks.shape == (4, 1, 32, 32)
    alone = load_arrays(cache, ["PAT_B_1"])
    assert alone.images.shape == (2, 3, 24, 30)
    x, y = arrays.batch(torch.tensor([2, 3]))
    x_alone, y_alone = alone.batch(torch.tensor([0, 1]))
    assert torch.equal(x[:, :, :24, :30], x_alone) and torch.equal(y[:, :, :24, :30], y_alone)
    assert not x[:, :, 24:].any() and not x[:, :, :, 30:].any()  # padding normalises to 0
    assert not y[:, :, 24:].any() and not y[:, :, :, 30:].any()


def test_slice_arrays_reject_unlabelled(make_kaggle, tmp_path):
    u = make_kaggle(name="u", patients={"PAT_U_1": 2}, strays=False)
    for n in (1, 2):
        u.mask_path("PAT_U_1", n).unlink()
    ucache = prepare(u.root, tmp_path / "ucache", require_masks=False, progress=False)
    with pytest.raises(DataError, match="patient PAT_U_1 has no masks"):
        load_arrays(ucache, ["PAT_U_1"])
    image, mask, _, _ = LGGDataset(ucache)[1]
    assert image.shape == (3, 32, 32) and torch.equal(mask, torch.zeros(1, 32, 32))


def test_dataloader_with_default_collate(cache):
    ds = LGGDataset(cache, patients=["PAT_B_2002", "PAT_C_2003"], channels=["FLAIR"])
    batches = list(DataLoader(ds, batch_size=4, shuffle=False))
    assert [b[0].shape for b in batches] == [(4, 1, 32, 32), (4, 1, 32, 32), (2, 1, 32, 32)]
    images, masks, patients, numbers = batches[0]
    assert masks.shape == (4, 1, 32, 32) and masks.dtype == torch.float32
    assert list(patients) == ["PAT_B_2002"] * 4
    assert numbers.tolist() == [1, 2, 3, 4]
    assert torch.equal(images[2], ds[2][0])
    assert list(batches[1][2]) == ["PAT_B_2002", "PAT_C_2003", "PAT_C_2003", "PAT_C_2003"]


def test_fill_missing_sequences_only_fills_constant_non_flair_channels():
    from tumorseg.data.normalization import fill_missing_sequences

    vol = np.zeros((2, 3, 3, 3), dtype=np.uint8)
    vol[..., 1] = np.arange(9, dtype=np.uint8).reshape(3, 3)  # FLAIR
    vol[..., 2] = 7  # constant post-contrast
    vol[0, 0, 0, 0] = 5  # pre-contrast present
    out, filled = fill_missing_sequences(vol)
    assert filled == ["post-contrast"] and out is not vol
    assert np.array_equal(out[..., 2], vol[..., 1]) and np.array_equal(out[..., :2], vol[..., :2])
    same, none = fill_missing_sequences(out)
    assert none == [] and same is out
    blank = np.zeros((2, 3, 3, 3), dtype=np.uint8)  # no FLAIR signal either: nothing to copy
    assert fill_missing_sequences(blank)[1] == []
