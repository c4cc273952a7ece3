"""Inference: device and precision choice, batched prediction, post-processing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tumorseg.checkpoint import LoadedModel, load_checkpoint
from tumorseg.errors import CheckpointError, TumorsegError
from tumorseg.metrics import largest_component


def select_device(name: str = "auto") -> torch.device:
    """"auto" picks CUDA, then Apple MPS, then the CPU.

    Raises:
        TumorsegError: an unknown device name or one this machine does not have.
    """
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError as e:
            raise TumorsegError(f"unknown device {name!r}; use cpu, cuda, cuda:N, mps or auto") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TumorsegError("device cuda asked for, but PyTorch sees no CUDA GPU here; use --device cpu")
        mps = getattr(torch.backends, "mps", None)
        if device.type == "mps" and not (mps is not None and mps.is_available()):
            raise TumorsegError("device mps asked for, but it is not available here; use --device cpu")
        if device.type not in ("cpu", "cuda", "mps"):
            raise TumorsegError(f"unsupported device {name!r}; use cpu, cuda, mps or auto")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_native_bf16() -> bool:
    """True on CPUs with AVX512-BF16 or AMX-BF16 instructions, where bf16 convolutions
    run about twice as fast as fp32. Read from /proc/cpuinfo (Linux); elsewhere False."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` ("auto", "bf16", "fp32") on `device`, or None
    for plain fp32. "auto" uses bf16 on CPUs with native bf16 and on CUDA GPUs with
    bf16 support; elsewhere fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def fuse_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of an eval-mode U-Net with every BatchNorm folded into the convolution before
    it: the same function (up to rounding) with one pass over each feature map fewer.
    The copy keeps the skip-connection hooks; it is for inference only."""
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    from tumorseg.model import Block

    fused = copy.deepcopy(model).eval()
    for block in fused.modules():
        if isinstance(block, Block):
            block.conv1 = fuse_conv_bn_eval(block.conv1, block.bn1)
            block.conv2 = fuse_conv_bn_eval(block.conv2, block.bn2)
            block.bn1, block.bn2 = nn.Identity(), nn.Identity()
    return fused


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    # bf16 autocast runs convolutions in bf16 while BatchNorm and the loss stay in fp32.
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


@torch.inference_mode()
def predict_probabilities(
    model: nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int = 16,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    tta: bool = False,
    channels_last: bool = True,
) -> torch.Tensor:
    """Tumour probabilities float32 (N, 1, H, W) for normalised images float32 (N, C, H, W).

    `tta` averages the probabilities of the image and its horizontal flip.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.empty((images.shape[0], 1, *images.shape[-2:]), dtype=torch.float32)
    try:
        for s in _batches(images.shape[0], batch_size):
            x = images[s].to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, dtype):
                p = torch.sigmoid(model(x).float())
                if tta:
                    p = 0.5 * (p + torch.sigmoid(model(x.flip(-1)).float()).flip(-1))
            out[s] = p.cpu()
    finally:
        model.train(was_training)
    return out


def binarize(probs: np.ndarray | torch.Tensor, threshold: float = 0.5,
             postprocess: str = "none") -> np.ndarray:
    """Binary volume (S, H, W) from probabilities (S, 1, H, W) or (S, H, W).

    postprocess "lcc" keeps the largest 3-D connected component of the volume.
    """
    p = probs.numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    if p.ndim == 4:
        p = p[:, 0]
    mask = p > threshold
    if postprocess == "lcc":
        mask = largest_component(mask)
    elif postprocess != "none":
        raise ValueError(f"unknown postprocess {postprocess!r}; choose none or lcc")
    return mask


def default_checkpoint_path() -> Path:
    """The model shipped inside the package."""
    return Path(__file__).resolve().parent / "weights" / "tumorseg_lgg.pt"


def load_for_inference(checkpoint: str | Path | None, device: torch.device) -> LoadedModel:
    """Load `checkpoint` (a tumorseg checkpoint or the original unet.pt) or, when None,
    the model shipped with the package, onto `device` in eval mode, with BatchNorm folded
    into the convolutions (`fuse_batchnorm`).

    Raises:
        CheckpointError: unreadable checkpoint, or no shipped model in this install.
    """
    if checkpoint is None:
        path = default_checkpoint_path()
        if not path.is_file():
            raise CheckpointError(
                f"no model is shipped with this installation ({path} is missing); "
                "pass --checkpoint PATH (a tumorseg best.pt or the original unet.pt)"
            )
        checkpoint = path
    loaded = load_checkpoint(checkpoint)
    # BatchNorm folded into the convolutions: about 1.2-1.4x faster on a CPU.
    loaded.model = fuse_batchnorm(loaded.model).to(device).to(memory_format=torch.channels_last)
    return loaded


def predict_volume(
    loaded: LoadedModel, images: np.ndarray, *, low: list[float] | None = None,
    high: list[float] | None = None, device: torch.device, dtype: torch.dtype | None,
    batch_size: int = 16, tta: bool = False,
) -> torch.Tensor:
    """Tumour probabilities float32 (S, 1, H, W) for a raw volume uint8 (S, H, W, 3).

    The volume is normalised per channel with `low`/`high` (all three channels), or, when
    they are not given, with the percentiles of this volume (the original's normalisation).
    """
    from tumorseg.config import channel_indices
    from tumorseg.data.cache import volume_percentiles
    from tumorseg.data.dataset import normalize

    if low is None or high is None:
        low, high = volume_percentiles(images, loaded.percentiles)
    ch = channel_indices(loaded.channels)
    x = torch.from_numpy(np.ascontiguousarray(images[..., ch])).permute(0, 3, 1, 2)
    x = normalize(x, torch.tensor([low[c] for c in ch]), torch.tensor([high[c] for c in ch]))
    return predict_probabilities(loaded.model, x, batch_size=batch_size, device=device,
                                 dtype=dtype, tta=tta)
