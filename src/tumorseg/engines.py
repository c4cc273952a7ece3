"""Inference engines behind `Predictor`: PyTorch, ONNX Runtime and OpenVINO.

Every engine maps normalised slices float32 (N, C, H, W) to the logits of each of its M
models, float32 (N, M, H, W) on the CPU or the device; `Predictor` averages the
probabilities and applies TTA on top, whatever the engine.

- `TorchEngine` runs `nn.Module`s under autocast (any device).
- `OnnxRuntimeEngine` and `OpenVinoEngine` run a graph (`tumorseg.graphs`) on the
  CPU: fp32 from an ONNX file or from PyTorch models exported on the fly, int8 from an
  OpenVINO IR written by `tumorseg export --int8`.

onnxruntime and openvino are imported only when an engine needs them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tumorseg.checkpoint import Checkpoint, weights_digest
from tumorseg.config import PRECISION_CHOICES
from tumorseg.errors import ConfigError
from tumorseg.graphs import (
    GraphInfo,
    format_of,
    fuse_batchnorm,
    onnx_bytes,
    openvino_core,
    openvino_model,
    read_graph_info,
    stacked_model,
)
from tumorseg.runtime import (
    autocast,
    cached_choice,
    hardware_name,
    measured_choice,
    model_signature,
    precision_name,
    resolve_precision,
    select_device,
)

log = logging.getLogger("tumorseg")

ENGINE_PACKAGES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}


def engine_installed(name: str) -> bool:
    """True for "torch", and for the ONNX Runtime / OpenVINO engines when their package imports."""
    package = ENGINE_PACKAGES.get(name)
    return package is None or importlib.util.find_spec(package) is not None


def require_engine(name: str, alternative: str = "or use --engine torch") -> None:
    """Raises ConfigError naming the pip command when an engine's package is missing."""
    if not engine_installed(name):
        raise ConfigError(f"engine {name} needs the {ENGINE_PACKAGES[name]} package; "
                          f"pip install {ENGINE_PACKAGES[name]}{', ' + alternative if alternative else ''}")


def _padded(x: torch.Tensor, divisor: int) -> tuple[np.ndarray, int, int]:
    """Slices as a contiguous float32 array, zero-padded at the bottom and right to a
    multiple of `divisor`, as the U-Net pads itself in PyTorch (an exported graph was
    traced on a size that needed no padding, so it cannot pad)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % divisor, (-w) % divisor
    images = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
    if ph or pw:
        images = np.pad(images, ((0, 0), (0, 0), (0, ph), (0, pw)))
    return images, h, w


class TorchEngine:
    """PyTorch models, each switched to eval mode only while it predicts (the training
    loop validates its live model through this engine)."""

    name = "torch"

    def __init__(self, models: Sequence[nn.Module], device: torch.device, dtype: torch.dtype | None,
                 channels_last: bool = True):
        self.models = list(models)
        self.device = device
        self.dtype = dtype
        self.channels_last = channels_last

    @property
    def members(self) -> int:
        return len(self.models)

    @property
    def precision(self) -> str:
        return precision_name(self.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        outputs = []
        for m in self.models:
            mode = m.training
            m.eval()
            try:
                with torch.inference_mode(), autocast(self.device, self.dtype):
                    outputs.append(m(x).float())
            finally:
                m.train(mode)
        return torch.cat(outputs, dim=1)


class GraphEngine:
    """What the engines of exported graphs share: they run on the CPU, a graph holds
    `members` models in one `precision`, and inputs are padded to the U-Net's `divisor`."""

    name = ""

    def __init__(self, model: Any, members: int, precision: str, divisor: int):
        require_engine(self.name, "" if isinstance(model, (str, Path)) else "or use --engine torch")
        self.members = members
        self.precision = precision
        self.divisor = divisor
        self.device = torch.device("cpu")


class OnnxRuntimeEngine(GraphEngine):
    """An ONNX graph (bytes or a file) on ONNX Runtime's CPU execution provider."""

    name = "onnxruntime"

    def __init__(self, model: bytes | str | Path, members: int, precision: str = "fp32", threads: int | None = None,
                 divisor: int = 1):
        super().__init__(model, members, precision, divisor)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.log_severity_level = 3
        source = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        images, h, w = _padded(x, self.divisor)
        out = self.session.run(None, {self.input: images})[0]
        return torch.from_numpy(np.ascontiguousarray(out[..., :h, :w]))


class OpenVinoEngine(GraphEngine):
    """An ONNX graph or an OpenVINO IR (fp32 or int8) on OpenVINO's CPU plugin."""

    name = "openvino"
    CHUNK = 4

    def __init__(self, model: Any, members: int, precision: str = "fp32", threads: int | None = None,
                 divisor: int = 1):
        """`model`: ONNX bytes, an .onnx or .xml path, or an `openvino.Model`."""
        super().__init__(model, members, precision, divisor)
        core = openvino_core()
        if isinstance(model, bytes):
            graph = core.read_model(model)
        elif isinstance(model, (str, Path)):
            graph = core.read_model(str(model))
        else:
            graph = model
        # f32 for what is not quantised: OpenVINO would otherwise choose bf16 by itself on
        # CPUs with bf16 instructions, and the engines' parity was measured in f32.
        config = {"INFERENCE_NUM_THREADS": threads or torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": "f32"}
        self.compiled = core.compile_model(graph, "CPU", config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # In chunks of CHUNK slices: measured 15% faster than 16 at once on a 2-core CPU
        # (the working set of a chunk stays in cache).
        images, h, w = _padded(x, self.divisor)
        outputs = []
        for start in range(0, len(images), self.CHUNK):
            out = self.request.infer([images[start:start + self.CHUNK]])
            outputs.append(np.array(next(iter(out.values()))[..., :h, :w], dtype=np.float32, copy=True))
        return torch.from_numpy(np.concatenate(outputs))


Engine = TorchEngine | OnnxRuntimeEngine | OpenVinoEngine


def torch_engine(models: Sequence[nn.Module], *, device: str | torch.device = "auto", precision: str = "auto",
                 channels_last: bool = True, fuse: bool = True) -> TorchEngine:
    """PyTorch models on `device`, BatchNorm folded into copies with `fuse`, precision
    resolved (timed for "auto", see `runtime.resolve_precision`)."""
    if not models:
        raise ConfigError("a Predictor needs at least one model")
    dev = select_device(device)
    prepared = []
    for m in models:
        if fuse:
            m = fuse_batchnorm(m).to(dev)
            if channels_last:
                m = m.to(memory_format=torch.channels_last)
        prepared.append(m)
    dtype = resolve_precision(precision, dev, prepared[0], sample=(2, 0, 256, 256), channels_last=channels_last)
    return TorchEngine(prepared, dev, dtype, channels_last)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


TIMING_BATCH = 8  # whole 256x256 slices per timed call when engines are compared


def _divisor(model_config: dict[str, Any]) -> int:
    return 2 ** (int(model_config.get("depth", 1)) - 1)


def matching_variants(variants: Sequence[Path], checkpoints: list[Checkpoint]) -> list[Path]:
    """The int8 `variants` that were quantised from exactly these checkpoints' weights
    (their graph records `checkpoint.weights_digest`); any other (an int8 file left beside
    a replaced model, a graph that records no digest, an unreadable one) is left out with
    a warning instead of silently serving another model."""
    if not variants:
        return []
    digest = weights_digest(checkpoints)
    kept = []
    for v in variants:
        try:
            recorded = read_graph_info(v).weights
        except Exception as e:  # a damaged optional file must not stop the model it accompanies
            log.warning(f"{v} could not be read and is left out ({type(e).__name__}: {e})")
            continue
        if recorded == digest:
            kept.append(v)
        elif not recorded:
            log.warning(f"{v} records no digest of the weights it was made from; left out "
                        "(export it again with `tumorseg export ... --int8`)")
        else:
            log.warning(f"{v} was not quantised from the weights of {checkpoints[0].path or 'this model'}; left out "
                        "(export it again with `tumorseg export ... --int8`)")
    return kept


def choose_engine(engine: str, source: list[Checkpoint] | Path, info: GraphInfo | None, *,
                  device: str | torch.device = "auto", precision: str = "auto",
                  variants: Sequence[Path] = ()) -> Engine:
    """The engine that runs `source` (checkpoints, or an exported graph with its `info`).

    "auto" builds every installed engine that can run it on the CPU in the precision asked
    (and the int8 `variants` of the checkpoints, when `precision` is "auto"), times them on
    whole slices once per machine (`runtime.measured_choice`, cached) and keeps the
    fastest. An engine that fails to build is left out with a warning. Exported graphs run
    on the CPU in their own precision; on a GPU, "auto" is PyTorch. bf16 is PyTorch's.

    Raises:
        ConfigError: an engine or precision that is not installed or cannot run this source.
    """
    if precision not in PRECISION_CHOICES:
        raise ConfigError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {precision!r}")
    builders: dict[str, Callable[[], Engine]] = {}
    if isinstance(source, Path):
        assert info is not None
        kind = format_of(source)
        runs = ("onnxruntime", "openvino") if kind == "onnx" else ("openvino",)
        if engine not in ("auto", *runs):
            raise ConfigError(f"{source} is an exported {kind} model; it runs on {' or '.join(runs)}, not {engine} "
                              "(PyTorch runs the .pt checkpoints)")
        if precision not in ("auto", info.precision):
            raise ConfigError(f"{source} is an {info.precision} model; drop --precision {precision} or export the "
                              f"model in {precision}")
        if device not in ("auto", "cpu") and select_device(device).type != "cpu":
            raise ConfigError(f"{source} is an exported model; it runs on the CPU "
                              "(use --device cpu, or a .pt checkpoint)")
        divisor = _divisor(info.model_config)
        for name in runs:
            if engine == name or (engine == "auto" and engine_installed(name)):
                cls = OnnxRuntimeEngine if name == "onnxruntime" else OpenVinoEngine
                builders[name] = lambda cls=cls: cls(source, info.members, info.precision, divisor=divisor)
        if not builders:
            require_engine(runs[0], "")
        signature = f"{info.model_config}x{info.members}-{info.precision}"
        example_channels = len(info.channels)
    else:
        checkpoints = source
        members = len(checkpoints)
        dev = select_device(device)
        models = [ck.build_model() for ck in checkpoints]
        divisor = _divisor(checkpoints[0].model_config.to_dict())
        example = torch.zeros(1, len(checkpoints[0].channels), 256, 256)
        builders["torch"] = lambda: torch_engine(models, device=dev, precision=precision)
        if engine not in ("auto", "torch"):
            if dev.type != "cpu":
                raise ConfigError(f"engine {engine} runs on the CPU; use --device cpu, or --engine torch on {dev}")
            if precision == "bf16":
                raise ConfigError(f"bf16 is PyTorch's; use --engine torch with --precision bf16, or --precision "
                                  f"fp32 with --engine {engine}")
            require_engine(engine)
            if engine == "onnxruntime" and importlib.util.find_spec("onnx") is None:
                raise ConfigError("engine onnxruntime runs .pt checkpoints through ONNX and needs the onnx package: "
                                  "pip install onnx, or export the model with `tumorseg export --format onnx`")
            del builders["torch"]
        if engine in ("auto", "onnxruntime") and dev.type == "cpu" and precision != "bf16":
            if engine_installed("onnxruntime") and importlib.util.find_spec("onnx") is not None:
                builders["onnxruntime"] = lambda: OnnxRuntimeEngine(
                    onnx_bytes(stacked_model(checkpoints), example), members, divisor=divisor)
        openvino = engine_installed("openvino")
        if engine in ("auto", "openvino") and dev.type == "cpu" and precision != "bf16" and openvino:
            builders["openvino"] = lambda: OpenVinoEngine(openvino_model(stacked_model(checkpoints), example),
                                                          members, divisor=divisor)
            if precision == "auto":
                for v in matching_variants(variants, checkpoints):
                    builders["openvino-int8"] = lambda v=v: OpenVinoEngine(v, members, "int8", divisor=divisor)
        signature = f"{model_signature(models[0])}x{members}"
        example_channels = len(checkpoints[0].channels)
    if len(builders) == 1:
        return next(iter(builders.values()))()
    key = {"device": hardware_name(torch.device("cpu")), "torch": torch.__version__,
           "onnxruntime": _version("onnxruntime"), "openvino": _version("openvino"), "model": signature,
           "candidates": sorted(builders), "precision": precision, "batch": TIMING_BATCH}
    cached = cached_choice("engine", key, builders)
    if cached is not None:
        return builders[cached]()
    built: dict[str, Engine] = {}
    failures: list[str] = []
    for name, build in builders.items():
        try:
            built[name] = build()
        except Exception as e:  # an optional engine that cannot take this model drops out of the choice
            failures.append(f"{name}: {type(e).__name__}: {e}")
            log.warning(f"engine {name} could not load this model and is left out ({type(e).__name__}: {e})")
    if not built:
        raise ConfigError(f"no engine could load this model ({'; '.join(failures)}); try --engine torch, or "
                          "reinstall the engine packages")
    x = torch.randn((TIMING_BATCH, example_channels, 256, 256), generator=torch.Generator().manual_seed(0))
    choice = measured_choice("engine", key, {name: (lambda e=e: e(x)) for name, e in built.items()})
    return built[choice]
