"""Where and how computation runs, for training and inference alike: device choice,
precision (autocast dtype), and stop signals (Ctrl-C/SIGTERM handled at step boundaries)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from tumorseg.config import PRECISION_CHOICES
from tumorseg.errors import ConfigError

DEVICE_HELP = "cpu, cuda, cuda:N, mps, or auto (CUDA, then MPS, then the CPU)"


def select_device(name: str | torch.device = "auto") -> torch.device:
    """"auto" picks CUDA, then Apple MPS, then the CPU.

    Raises:
        ConfigError: an unknown device name or one this machine does not have.
    """
    if isinstance(name, torch.device):
        return name
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError as e:
            raise ConfigError(f"unknown device {name!r}; use cpu, cuda, cuda:N, mps or auto") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device cuda asked for, but PyTorch sees no CUDA GPU here; use --device cpu")
        mps = getattr(torch.backends, "mps", None)
        if device.type == "mps" and not (mps is not None and mps.is_available()):
            raise ConfigError("device mps asked for, but it is not available here; use --device cpu")
        if device.type not in ("cpu", "cuda", "mps"):
            raise ConfigError(f"unsupported device {name!r}; use cpu, cuda, mps or auto")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_native_bf16() -> bool:
    """True on CPUs with AVX512-BF16 or AMX-BF16 instructions. Read from /proc/cpuinfo
    (Linux); elsewhere False."""
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
    bf16 support (fp16 on older GPUs); elsewhere fp32.

    Raises:
        ConfigError: an unknown precision.
    """
    if precision not in PRECISION_CHOICES:
        raise ConfigError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def precision_name(dtype: torch.dtype | None) -> str:
    """"bf16", "fp16" or "fp32" for an autocast dtype from `resolve_precision`."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")  # type: ignore[arg-type]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    # bf16 autocast runs convolutions in bf16 while BatchNorm and the loss stay in fp32.
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class StopTraining(Exception):
    """Raised at a step boundary after a stop was requested (Ctrl-C, kill, or a step limit)."""


class StopRequest:
    """Ctrl-C and SIGTERM only set a flag; work stops at the next `check()`, a step
    boundary where weights, optimiser and progress are consistent, so the saved state
    resumes exactly. A second Ctrl-C stops at once (and saves nothing)."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("stopping after this step and saving (Ctrl-C again to stop at once, without saving)")

    def check(self) -> None:
        if self.requested:
            raise StopTraining


@contextlib.contextmanager
def graceful_stop() -> Iterator[StopRequest]:
    """Route SIGINT/SIGTERM to a `StopRequest` while the block runs (main thread only;
    elsewhere signals cannot be handled and the request is only set by hand)."""
    request = StopRequest()
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, request)
    except ValueError:  # not the main thread
        pass
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
