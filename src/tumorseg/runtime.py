"""Where and how computation runs, for training and inference alike: device choice,
precision (autocast dtype, measured), choices made by timing and cached per machine, and
stop signals (Ctrl-C/SIGTERM handled at step boundaries)."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import platform
import signal
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tumorseg.config import PRECISION_CHOICES
from tumorseg.errors import ConfigError
from tumorseg.fileio import atomic_write_text

log = logging.getLogger("tumorseg")

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
    (Linux); elsewhere False. Informational only: precision is chosen by timing, because
    the flag does not say whether bf16 pays (it is slower than fp32 on some CPUs that have it)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


# ---------------------------------------------------------------------- measured choices

CACHE_ENV = "TUMORSEG_CACHE_DIR"


def user_cache_dir() -> Path:
    """Where measured choices are kept: $TUMORSEG_CACHE_DIR, else $XDG_CACHE_HOME/tumorseg,
    else ~/.cache/tumorseg."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    try:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    except RuntimeError:  # no home directory (some containers)
        base = tempfile.gettempdir()
    return Path(base) / "tumorseg"


def hardware_name(device: torch.device) -> str:
    """The processor a measurement was made on: the CPU model (with the thread count
    PyTorch uses) or the GPU's name."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    if device.type == "mps":
        return f"mps:{platform.machine()}"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu:{name}, {torch.get_num_threads()} threads"


def model_signature(model: nn.Module) -> str:
    """A short hash of a model's class and parameter shapes: models that cost the same share it."""
    shapes = [type(model).__name__] + [f"{n}:{tuple(p.shape)}" for n, p in model.named_parameters()]
    return hashlib.sha1("|".join(shapes).encode()).hexdigest()[:12]


def time_candidates(candidates: dict[str, Callable[[], object]], repeats: int = 3,
                    give_up: float = 3.0) -> dict[str, float]:
    """Seconds per call of each candidate: the best of `repeats` calls after one warm-up.
    A candidate whose warm-up call already takes `give_up` times the fastest warm-up so far
    is not repeated (a precision without hardware support can be 100x slower; one call
    says so). Warm-ups are compared with warm-ups, so one-off start-up work counts alike."""
    timings: dict[str, float] = {}
    warmups: dict[str, float] = {}
    for name, run in candidates.items():
        t = time.perf_counter()
        run()
        warm = time.perf_counter() - t
        if warmups and warm > give_up * min(warmups.values()):
            timings[name] = warm
            continue
        warmups[name] = warm
        best = warm
        for _ in range(repeats):
            t = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - t)
        timings[name] = best
    return timings


MIN_SPEEDUP = 1.05  # another candidate must be this much faster than the first (the default) to be chosen


def _choice_table(kind: str) -> tuple[Path, dict[str, Any]]:
    path = user_cache_dir() / f"{kind}.json"
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    return path, table if isinstance(table, dict) else {}


def cached_choice(kind: str, key: dict[str, Any], names: Iterable[str]) -> str | None:
    """The choice stored for `kind` and `key` by `measured_choice`, if it is one of `names`."""
    path, table = _choice_table(kind)
    cached = table.get(json.dumps(key, sort_keys=True))
    if isinstance(cached, dict) and cached.get("choice") in set(names):
        log.info(f"{kind}: {cached['choice']} (measured earlier on this machine; cache {path})")
        return str(cached["choice"])
    return None


def measured_choice(kind: str, key: dict[str, Any], candidates: dict[str, Callable[[], object]]) -> str:
    """The fastest of `candidates` (name -> one representative call), timed the first time
    this `kind` and `key` are met and then read from `user_cache_dir()/<kind>.json`. The
    first candidate is the default: another must be MIN_SPEEDUP times faster to replace it.
    Says in the log what it picked and whether it measured. A cache that cannot be read
    or written is measured around, never an error."""
    if not candidates:
        raise ValueError(f"no {kind} candidates to choose from")
    if len(candidates) == 1:
        return next(iter(candidates))
    cached = cached_choice(kind, key, candidates)
    if cached is not None:
        return cached
    timings = time_candidates(candidates)
    default = next(iter(candidates))
    fastest = min(timings, key=timings.__getitem__)
    choice = fastest if timings[fastest] * MIN_SPEEDUP < timings[default] else default
    path, table = _choice_table(kind)
    table[json.dumps(key, sort_keys=True)] = {"choice": choice, "seconds": {k: round(v, 6) for k, v in timings.items()}}
    try:
        atomic_write_text(path, json.dumps(table, indent=1, sort_keys=True) + "\n")
    except OSError as e:
        log.warning(f"could not cache the {kind} choice in {path}: {e}")
    shown = ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in timings.items())
    log.info(f"{kind}: {choice} (measured now: {shown})")
    return choice


# ---------------------------------------------------------------------- precision

def precision_candidates(device: torch.device, train: bool = False) -> dict[str, torch.dtype | None]:
    """The autocast dtypes worth timing on `device`, fp32 first (the default unless another
    is clearly faster): bf16, or on CUDA GPUs without bf16 fp16 for inference (training
    in fp16 would need loss scaling, which tumorseg does not do); MPS runs fp32."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return {"fp32": None, "bf16": torch.bfloat16}
        return {"fp32": None} if train else {"fp32": None, "fp16": torch.float16}
    if device.type == "cpu":
        return {"fp32": None, "bf16": torch.bfloat16}
    return {"fp32": None}


def resolve_precision(precision: str, device: torch.device, model: nn.Module | None = None, *,
                      train: bool = False, sample: tuple[int, ...] = (2, 3, 128, 128),
                      channels_last: bool = False) -> torch.dtype | None:
    """The autocast dtype for `precision` ("auto", "bf16", "fp32") on `device`, or None
    for plain fp32.

    "auto" times `model` in each candidate dtype (`precision_candidates`) on a random input
    of shape `sample` (channels from the model's first convolution; channels-last memory
    format if asked): forward passes for inference, forward+backward with `train`, and
    keeps the faster, cached per device, torch version and model shape
    (`measured_choice`). Without a model, "auto" is fp32.

    Raises:
        ConfigError: an unknown precision.
    """
    if precision == "fp16":  # not offered to users; the name `precision_name` gives a resolved fp16
        return torch.float16
    if precision not in PRECISION_CHOICES:
        raise ConfigError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    candidates = precision_candidates(device, train)
    if model is None or len(candidates) == 1:
        return None
    in_channels = next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if in_channels is None:  # nothing that autocast would change
        return None
    shape = (sample[0], in_channels, *sample[2:])
    key = {"device": hardware_name(device), "torch": torch.__version__, "model": model_signature(model),
           "task": "train" if train else "inference", "sample": list(shape), "channels_last": channels_last}
    # A copy, so that timing never touches the weights, BatchNorm statistics or gradients
    # of the model (a resumed run continues exactly), and a private generator for the input.
    probe = copy.deepcopy(model).train(train)
    param = next(probe.parameters(), None)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x = x.to(param.device if param is not None else device)
    if channels_last:
        probe, x = probe.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)

    def run(dtype: torch.dtype | None) -> Callable[[], object]:
        def once() -> object:
            if train:
                with autocast(x.device, dtype):
                    loss = probe(x).float().mean()
                loss.backward()
                probe.zero_grad(set_to_none=True)
            else:
                with torch.inference_mode(), autocast(x.device, dtype):
                    probe(x)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            return None
        return once

    choice = measured_choice(f"precision-{key['task']}", key, {k: run(v) for k, v in candidates.items()})
    return candidates[choice]


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
    resumes exactly. A second Ctrl-C stops at once (and saves nothing); a repeated
    SIGTERM does not: a scheduler may signal every process of a job while torchrun
    forwards its own.

    The flag is only ever set, never cleared: a signal handled at any moment (even in
    the middle of a collective that reads the flag) is never lost."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum, frame) -> None:
        if self.requested:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
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
