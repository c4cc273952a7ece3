"""Inference graphs of U-Nets: BatchNorm folding, stacking an ensemble, ONNX bytes and
OpenVINO models, and the graph files (.onnx, OpenVINO IR .xml/.bin) with their metadata.

A graph holds one model or an ensemble with BatchNorm folded into the convolutions. Its
input is `images`, normalised slices float32 (N, C, H, W) with dynamic N, H and W (H and W
multiples of the U-Net's divisor); its output is `logits` float32 (N, M, H, W), one channel
per model of the ensemble (M = 1 for one model). `Predictor` averages the probabilities.

What `Predictor` needs besides the graph (channels, normalisation, inference settings,
number of models, precision) is stored inside the file as JSON (`GraphInfo`): in the ONNX
`metadata_props` under "tumorseg", in the OpenVINO IR's `rt_info` under "tumorseg".

int8 is written as OpenVINO IR by NNCF post-training quantization (`tumorseg.export`
draws the calibration slices). It is not written as ONNX: measured on the CPUs of this
project, a quantised ONNX graph ran slower than fp32 on ONNX Runtime and slower than the
IR on OpenVINO (docs, "Engines and speed").

Packages: ONNX needs `onnx`; OpenVINO needs `openvino`; int8 needs `nncf`. Each is imported
only when it is needed.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import io
import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from tumorseg.checkpoint import NORMALIZATION_METHOD, Checkpoint, weights_digest
from tumorseg.config import InferenceConfig
from tumorseg.errors import CheckpointError, ConfigError
from tumorseg.fileio import atomic_write
from tumorseg.model import Block
from tumorseg.version import __version__

log = logging.getLogger("tumorseg")

GRAPH_FORMAT = "tumorseg-graph"
GRAPH_VERSION = 1
GRAPH_SUFFIXES = {".onnx": "onnx", ".xml": "openvino"}
FORMATS = ("pt", "onnx", "openvino")
OPSET = 17

def need_package(package: str, purpose: str) -> None:
    """Raises ConfigError naming the pip command when `package` is not installed."""
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"{purpose} needs the {package} package: pip install {package} "
                          "(or pip install 'tumorseg[onnx,int8]')")


def format_of(path: str | Path) -> str:
    """"onnx" for *.onnx, "openvino" for *.xml, "pt" otherwise."""
    return GRAPH_SUFFIXES.get(Path(path).suffix.lower(), "pt")


@dataclass(frozen=True)
class GraphInfo:
    """The metadata of an exported graph."""

    channels: tuple[str, ...]
    percentiles: tuple[float, float]
    inference: InferenceConfig
    members: int
    precision: str  # "fp32" or "int8"
    model_config: dict[str, Any]
    notes: str = ""
    calibration: dict[str, Any] | None = None
    weights: str = ""  # checkpoint.weights_digest of the models it was made from ("": not recorded)

    def to_json(self) -> str:
        return json.dumps({
            "format": GRAPH_FORMAT, "format_version": GRAPH_VERSION, "tumorseg_version": __version__,
            "channels": list(self.channels),
            "normalization": {"method": NORMALIZATION_METHOD, "percentiles": list(self.percentiles)},
            "inference": self.inference.to_dict(), "members": self.members, "precision": self.precision,
            "model_config": self.model_config, "notes": self.notes, "calibration": self.calibration,
            "weights": self.weights,
        })

    @classmethod
    def from_json(cls, text: str, path: Path) -> GraphInfo:
        try:
            d = json.loads(text)
            if d.get("format") != GRAPH_FORMAT:
                raise ValueError("format")
            if int(d["format_version"]) > GRAPH_VERSION:
                raise CheckpointError(f"{path} has graph format version {d['format_version']}, newer than the "
                                      f"{GRAPH_VERSION} this tumorseg reads; upgrade tumorseg")
            low, high = d["normalization"]["percentiles"]
            return cls(channels=tuple(d["channels"]), percentiles=(float(low), float(high)),
                       inference=InferenceConfig.from_dict(d["inference"]), members=int(d["members"]),
                       precision=str(d["precision"]), model_config=dict(d["model_config"]),
                       notes=str(d.get("notes", "")), calibration=d.get("calibration"),
                       weights=str(d.get("weights", "")))
        except CheckpointError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: no tumorseg metadata in this graph ({type(e).__name__}); export it "
                                  "with `tumorseg export`") from e


class Stacked(nn.Module):
    """Models side by side: (N, C, H, W) -> logits (N, M, H, W)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self.members], dim=1)


def stacked_model(checkpoints: list[Checkpoint]) -> Stacked:
    """The checkpoints' U-Nets with BatchNorm folded, stacked, in eval mode on the CPU."""
    return Stacked([fuse_batchnorm(ck.build_model()) for ck in checkpoints]).eval()


def _example(checkpoints: list[Checkpoint]) -> torch.Tensor:
    return torch.zeros(1, len(checkpoints[0].channels), 256, 256)


def onnx_bytes(module: nn.Module, example: torch.Tensor) -> bytes:
    """`module` as an ONNX graph (tracing; input `images`, output `logits`, dynamic N/H/W)."""
    need_package("onnx", "ONNX export")
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), buf, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "n", 2: "h", 3: "w"}, "logits": {0: "n", 2: "h", 3: "w"}},
                          opset_version=OPSET, dynamo=False)
    return buf.getvalue()


def openvino_model(module: nn.Module, example: torch.Tensor) -> Any:
    """`module` as an OpenVINO model (converted from PyTorch; dynamic N/H/W)."""
    need_package("openvino", "OpenVINO export")
    import openvino as ov

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        converted = ov.convert_model(module, example_input=example, input=[(-1, example.shape[1], -1, -1)])
    converted.inputs[0].get_tensor().set_names({"images"})
    converted.outputs[0].get_tensor().set_names({"logits"})
    return converted


def graph_info(checkpoints: list[Checkpoint], inference: InferenceConfig, precision: str = "fp32",
               notes: str = "", calibration: dict[str, Any] | None = None) -> GraphInfo:
    first = checkpoints[0]
    return GraphInfo(channels=tuple(first.channels), percentiles=first.percentiles, inference=inference,
                     members=len(checkpoints), precision=precision, model_config=first.model_config.to_dict(),
                     notes=notes or first.notes, calibration=calibration, weights=weights_digest(checkpoints))


def write_onnx(checkpoints: list[Checkpoint], dst: str | Path, inference: InferenceConfig, notes: str = "") -> Path:
    """Write the checkpoints as one fp32 ONNX graph with its metadata."""
    need_package("onnx", "ONNX export")
    import onnx

    model = onnx.load_from_string(onnx_bytes(stacked_model(checkpoints), _example(checkpoints)))
    entry = model.metadata_props.add()
    entry.key, entry.value = "tumorseg", graph_info(checkpoints, inference, notes=notes).to_json()
    return atomic_write(dst, lambda f: f.write(model.SerializeToString()))


def write_openvino(checkpoints: list[Checkpoint], dst: str | Path, inference: InferenceConfig, notes: str = "",
                   calibration: list[np.ndarray] | None = None,
                   calibration_info: dict[str, Any] | None = None) -> Path:
    """Write the checkpoints as an OpenVINO IR (`dst` .xml and its .bin), fp32, or int8
    quantised by NNCF on `calibration` batches of normalised slices."""
    need_package("openvino", "OpenVINO export")
    if calibration is not None:
        need_package("nncf", "int8 export")
    import openvino as ov

    dst = Path(dst)
    if dst.suffix.lower() != ".xml":
        raise ConfigError(f"an OpenVINO model is written as NAME.xml (+ NAME.bin); got {dst}")
    model = openvino_model(stacked_model(checkpoints), _example(checkpoints))
    precision = "fp32"
    if calibration is not None:
        import nncf

        nncf_log = logging.getLogger("nncf")
        level = nncf_log.level
        nncf_log.setLevel(logging.ERROR)
        try:
            model = nncf.quantize(model, nncf.Dataset(calibration), subset_size=sum(len(b) for b in calibration),
                                  preset=nncf.QuantizationPreset.PERFORMANCE)
        finally:
            nncf_log.setLevel(level)
        precision = "int8"
    info = graph_info(checkpoints, inference, precision=precision, notes=notes, calibration=calibration_info)
    model.set_rt_info(info.to_json(), "tumorseg")
    # Written to a temporary folder beside it, then moved, the .xml last: a failure never
    # leaves half an IR behind.
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".export-") as tmp:
        tmp_xml = Path(tmp) / dst.name
        ov.save_model(model, str(tmp_xml), compress_to_fp16=False)
        os.replace(tmp_xml.with_suffix(".bin"), dst.with_suffix(".bin"))
        os.replace(tmp_xml, dst)
    return dst


def read_graph_info(path: str | Path) -> GraphInfo:
    """The metadata of an exported .onnx or .xml graph.

    Raises:
        CheckpointError: missing or unreadable file, or no tumorseg metadata in it.
        ConfigError: the package needed to read it is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    kind = format_of(path)
    try:
        if kind == "onnx":
            need_package("onnx", "reading an ONNX model")
            import onnx

            model = onnx.load(str(path), load_external_data=False)
            text = next((p.value for p in model.metadata_props if p.key == "tumorseg"), "")
        else:
            need_package("openvino", "reading an OpenVINO model")
            if not path.with_suffix(".bin").is_file():
                raise CheckpointError(f"{path.with_suffix('.bin')} is missing; an OpenVINO model is the .xml "
                                      "and the .bin beside it")
            model = openvino_core().read_model(str(path))
            text = model.get_rt_info(["tumorseg"]).astype(str) if model.has_rt_info(["tumorseg"]) else ""
    except (CheckpointError, ConfigError):
        raise
    except Exception as e:  # the readers raise their own error types on damaged files
        raise CheckpointError(f"{path}: not a readable {kind} model ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})") from e
    return GraphInfo.from_json(text, path)


def fuse_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of an eval-mode U-Net with every BatchNorm folded into the convolution before
    it: the same function (up to rounding) with one pass over each feature map fewer.
    The copy keeps the skip-connection hooks; it is for inference only."""
    fused = copy.deepcopy(model).eval()
    for block in fused.modules():
        if isinstance(block, Block):
            block.conv1 = fuse_conv_bn_eval(block.conv1, block.bn1)
            block.conv2 = fuse_conv_bn_eval(block.conv2, block.bn2)
            block.bn1, block.bn2 = nn.Identity(), nn.Identity()
    return fused


@functools.cache
def openvino_core() -> Any:
    """The one `openvino.Core` of the process. Every Core loads its own CPU plugin, which
    installs an alternate signal stack on the thread that creates it; with several Cores
    created and destroyed, a later Ctrl-C ran on a freed stack and crashed the process
    (OpenVINO 2026.4). One Core, kept for the life of the process, avoids that."""
    import openvino as ov

    return ov.Core()
