"""A re-creation of the original pipeline that tumorseg re-implements, for benchmarks.

Not part of the package: the original U-Net (skip connections through forward hooks and a
stack kept on the module, sigmoid inside `forward`), its batch-pooled Dice loss on
probabilities, and its data path (whole slices read one by one from an HDF5 file of
float16 arrays through a DataLoader, as its `MRIDataset` does). `check_baseline_layout`
proves that it is the architecture it claims to be.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tumorseg.data.dataset import SliceArrays
from tumorseg.model import UNet

REPO_ROOT = Path(__file__).resolve().parents[1]
SEED_CHECKPOINT = REPO_ROOT.parent / "shared" / "seed" / "unet.pt"
BATCH_SIZE = 8  # the original's training batch
SEED = 0


class OriginalBlock(nn.Module):
    """conv3x3(bias) -> BN -> ReLU -> conv3x3(bias) -> BN -> ReLU, named as in `unet.pt`."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        # In-place as tumorseg's Block, so that the comparison does not hinge on it.
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(x)))


class OriginalUNet(nn.Module):
    """The original U-Net: every level `n_features` wide, one `nn.Sequential` `layers`,
    skips through forward hooks and the stack `self.activations` kept on the module, and
    probabilities (sigmoid) out of `forward`. (B, 3, H, W) -> (B, 1, H, W)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 1, n_features: int = 32, depth: int = 4):
        super().__init__()
        self.activations: list[torch.Tensor] = []
        layers: list[nn.Module] = []
        prev = in_channels
        for _ in range(depth - 1):
            block = OriginalBlock(prev, n_features)
            block.register_forward_hook(self._push)
            layers += [block, nn.MaxPool2d(2)]
            prev = n_features
        layers.append(OriginalBlock(n_features, n_features))
        for _ in range(depth - 1):
            up = nn.ConvTranspose2d(n_features, n_features, kernel_size=2, stride=2, bias=False)
            up.register_forward_hook(self._pop)
            layers += [up, OriginalBlock(2 * n_features, n_features)]
        layers.append(nn.Conv2d(n_features, out_channels, kernel_size=1))
        self.layers = nn.Sequential(*layers)

    def _push(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self.activations.append(output)

    def _pop(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        return torch.cat((output, self.activations.pop()), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.layers(x))


def baseline_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    """One training step of the original pipeline (which logs the loss every step)."""
    loss = original_dice_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def original_dice_loss(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - (2*sum(p*g) + 1) / (sum(p) + sum(g) + 1) on probabilities, pooled over the batch."""
    p, g = pred[:, 0].contiguous().view(-1), target[:, 0].contiguous().view(-1)
    inter = (p * g).sum()
    return 1.0 - (2.0 * inter + smooth) / (p.sum() + g.sum() + smooth)


class MRIDataset(Dataset):
    """The original's per-item access: each item opens the HDF5 file, reads one float16
    image (3, H, W) and mask (1, H, W) and converts them to float32 tensors."""

    def __init__(self, path: Path):
        self.path = path
        with h5py.File(path, "r") as f:
            self.n = int(f["images"].shape[0])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        with h5py.File(self.path, "r") as f:
            image = torch.from_numpy(f["images"][i].astype(np.float32))
            mask = torch.from_numpy(f["masks"][i].astype(np.float32))
        return image, mask


def write_hdf5(arrays: SliceArrays, path: Path, chunk: int = 64) -> None:
    """The baseline's data file: images float16 (N, 3, H, W) normalised per patient volume
    (10th/99th percentile per channel, clipped to [0, 1]) and masks float16 (N, 1, H, W)."""
    n = len(arrays)
    with h5py.File(path, "w") as f:
        images = f.create_dataset("images", (n, *arrays.images.shape[1:]), dtype="float16")
        masks = f.create_dataset("masks", (n, *arrays.masks.shape[1:]), dtype="float16")
        for start in range(0, n, chunk):
            idx = torch.arange(start, min(start + chunk, n))
            x, y = arrays.batch(idx)
            images[start:start + len(idx)] = x.numpy().astype(np.float16)
            masks[start:start + len(idx)] = y.numpy().astype(np.float16)


def baseline_loader(path: Path, shuffle: bool) -> DataLoader:
    return DataLoader(MRIDataset(path), batch_size=BATCH_SIZE, shuffle=shuffle, num_workers=0,
                      generator=torch.Generator().manual_seed(SEED))


def cycle(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of `loader` without end (a new epoch, reshuffled, when one runs out)."""
    while True:
        yield from loader


def check_baseline_layout(model: OriginalUNet) -> dict[str, bool]:
    """Check that the re-created original matches tumorseg's UNet(32, depth 4) (same state
    dict, same probabilities) and, where it is present, the published `unet.pt`.

    Raises:
        RuntimeError: the re-creation is not the architecture it claims to be.
    """
    same = UNet(n_features=32, depth=4)
    same.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(SEED))
    model.eval()
    same.eval()
    with torch.no_grad():
        diff = float((model(x) - torch.sigmoid(same(x))).abs().max())
    model.train()
    if diff > 1e-5:
        raise RuntimeError(f"baseline U-Net differs from tumorseg UNet(32, depth 4): max |dp| = {diff}")
    checked = False
    if SEED_CHECKPOINT.is_file():
        state = torch.load(SEED_CHECKPOINT, map_location="cpu", weights_only=True)["state_dict"]
        OriginalUNet().load_state_dict(state)  # strict: raises on any layout difference
        checked = True
    return {"matches_tumorseg_unet_32x4": True, "loads_published_unet_pt": checked}
