"""Normalisation and PyTorch access to cached slices.

`LGGDataset` is the plain per-item `torch.utils.data.Dataset`. Training and evaluation
use `SliceArrays` instead: all slices of a set of patients in memory as raw tensors
(uint8 for kaggle_3m), normalised batch by batch, which avoids per-item Python work on
small CPUs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from tumorseg.config import CHANNELS, channel_indices
from tumorseg.data.cache import Cache
from tumorseg.data.channels import select_channels, slice_spacing
from tumorseg.data.normalization import normalize
from tumorseg.errors import DataError


class LGGDataset(Dataset):
    """Slices of cached patients as `(image, mask, patient, slice_number)`.

    image: float32 (C, H, W) normalised per patient volume; mask: float32 (1, H, W) 0/1.
    `channels` selects sequences by name, in the order given (default all three), with
    neighbouring slices for 2.5-D models (`FLAIR+1`, see `channels.select_channels`).
    """

    def __init__(self, cache: Cache, patients: Sequence[str] | None = None,
                 channels: Sequence[str] = CHANNELS):
        self.cache = cache
        self.patients = list(patients) if patients is not None else cache.patients
        unknown = [p for p in self.patients if p not in cache.records]
        if unknown:
            raise DataError(f"patient(s) not in the data at {cache.source or cache.root}: "
                            f"{', '.join(unknown[:5])}")
        self.channels = tuple(channels)
        self._ch = channel_indices(self.channels)
        self.index: list[tuple[str, int]] = [
            (p, i) for p in self.patients for i in range(len(cache.records[p].slices))
        ]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str, int]:
        patient, k = self.index[i]
        rec = self.cache.records[patient]
        img = torch.from_numpy(np.ascontiguousarray(
            select_channels(self.cache.images(patient), self.channels, slice_spacing(rec.spacing), slices=[k])))
        img = img.permute(0, 3, 1, 2)
        low = torch.tensor([rec.low[c] for c in self._ch])
        high = torch.tensor([rec.high[c] for c in self._ch])
        image = normalize(img, low, high)[0]
        masks = self.cache.masks(patient)
        if masks is None:
            mask = torch.zeros((1, rec.height, rec.width), dtype=torch.float32)
        else:
            mask = torch.from_numpy(np.asarray(masks[k], dtype=np.float32))[None]
        return image, mask, patient, rec.slices[k]


@dataclass
class SliceArrays:
    """All slices of some patients in memory (raw intensities), normalised on demand per batch."""

    images: torch.Tensor  # (N, C, H, W), the cache's type (uint8 for kaggle_3m)
    masks: torch.Tensor  # uint8 (N, 1, H, W), 0/1
    low: torch.Tensor  # float32 (N, C): the statistics of each slice's patient
    high: torch.Tensor  # float32 (N, C)
    patient_index: torch.Tensor  # int64 (N,): index into `patients`
    slice_numbers: torch.Tensor  # int64 (N,)
    patients: list[str]
    sizes: list[tuple[int, int]] = field(default_factory=list)  # each patient's (H, W) before padding

    def patient_batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised slices and masks of patient `patients[i]` (see `batch`), at the
        patient's own size (without the padding to the largest patient)."""
        x, y = self.batch(self.patient_slices(i))
        if self.sizes:
            h, w = self.sizes[i]
            x, y = x[..., :h, :w], y[..., :h, :w]
        return x, y

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float32 images (B, C, H, W) and float32 masks (B, 1, H, W)."""
        x = normalize(self.images[idx], self.low[idx], self.high[idx])
        return x, self.masks[idx].to(torch.float32)

    def tumour(self) -> torch.Tensor:
        """bool (N,): slice has at least one tumour pixel."""
        return self.masks.flatten(1).amax(1) > 0

    def patient_slices(self, i: int) -> torch.Tensor:
        """Indices (in slice order) of the slices of patient `patients[i]`."""
        return torch.nonzero(self.patient_index == i).flatten()


def load_arrays(cache: Cache, patients: Sequence[str], channels: Sequence[str] = CHANNELS) -> SliceArrays:
    """Read the slices of `patients` into memory as raw tensors.

    Patients of different slice sizes (NIfTI data) are padded at the bottom and right to
    the largest, with intensities that normalise to 0 and no tumour.

    Raises:
        DataError: unknown patient, or a patient without masks.
    """
    ch = channel_indices(tuple(channels))
    patients = list(patients)
    if not patients:
        raise DataError("no patients selected")
    for p in patients:
        if p not in cache.records:
            raise DataError(f"patient {p} is not in the data at {cache.source or cache.root}")
        if not cache.records[p].has_masks:
            raise DataError(f"patient {p} has no masks; training and evaluation need them")
    height = max(cache.records[p].height for p in patients)
    width = max(cache.records[p].width for p in patients)
    dtype = np.result_type(*{np.dtype(cache.records[p].dtype) for p in patients})
    imgs, msks, lows, highs, pidx, nums = [], [], [], [], [], []
    for i, p in enumerate(patients):
        rec = cache.records[p]
        img = select_channels(np.asarray(cache.images(p)), channels, slice_spacing(rec.spacing))
        img = img.astype(dtype, copy=False)
        masks = np.array(cache.masks(p), dtype=np.uint8)
        pad = ((0, 0), (0, height - rec.height), (0, width - rec.width))
        if pad[1][1] or pad[2][1]:
            floor = np.floor([rec.low[c] for c in ch]).astype(dtype)  # <= low: normalises to 0
            img = np.stack([np.pad(img[..., j], pad, constant_values=floor[j]) for j in range(len(ch))], -1)
            masks = np.pad(masks, pad)
        imgs.append(torch.from_numpy(img).permute(0, 3, 1, 2).contiguous())
        msks.append(torch.from_numpy(masks)[:, None])
        s = len(rec.slices)
        lows.append(torch.tensor([rec.low[c] for c in ch]).expand(s, -1))
        highs.append(torch.tensor([rec.high[c] for c in ch]).expand(s, -1))
        pidx.append(torch.full((s,), i, dtype=torch.int64))
        nums.append(torch.tensor(rec.slices, dtype=torch.int64))
    return SliceArrays(
        images=torch.cat(imgs), masks=torch.cat(msks), low=torch.cat(lows).float(),
        high=torch.cat(highs).float(), patient_index=torch.cat(pidx), slice_numbers=torch.cat(nums),
        patients=patients, sizes=[(cache.records[p].height, cache.records[p].width) for p in patients],
    )
