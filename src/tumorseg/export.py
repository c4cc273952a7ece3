"""Export to inference graphs: ONNX (fp32) and OpenVINO IR (fp32 or int8).

A graph holds one model or an ensemble with BatchNorm folded into the convolutions. Its
input is `images`, normalised slices float32 (N, C, H, W) with dynamic N, H and W (H and W
multiples of the U-Net's divisor); its output is `logits` float32 (N, M, H, W), one channel
per model of the ensemble (M = 1 for one model). `Predictor` averages the probabilities.

What `Predictor` needs besides the graph (channels, normalisation, inference settings,
number of models, precision) is stored inside the file as JSON: in the ONNX
`metadata_props` under "tumorseg", in the OpenVINO IR's `rt_info` under "tumorseg".

int8 is written as OpenVINO IR by NNCF post-training quantization, calibrated on slices of
the patients the models trained on. It is not written as ONNX: measured on the CPUs of
this project, a quantised ONNX graph ran slower than fp32 on ONNX Runtime and slower than
the IR on OpenVINO (README, "Inference engines").

Packages: ONNX export needs `onnx`; OpenVINO export needs `openvino`; int8 needs `nncf`.
"""

from __future__ import annotations

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

from tumorseg.checkpoint import NORMALIZATION_METHOD, Checkpoint, weights_digest
from tumorseg.config import InferenceConfig
from tumorseg.errors import CheckpointError, ConfigError, DataError
from tumorseg.fileio import atomic_write

log = logging.getLogger("tumorseg")

GRAPH_FORMAT = "tumorseg-graph"
GRAPH_VERSION = 1
GRAPH_SUFFIXES = {".onnx": "onnx", ".xml": "openvino"}
FORMATS = ("pt", "onnx", "openvino")
OPSET = 17
CALIBRATION_SLICES = 300


def _need(package: str, purpose: str) -> None:
    import importlib.util

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
        from tumorseg import __version__

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
    from tumorseg.inference import fuse_batchnorm

    return Stacked([fuse_batchnorm(ck.build_model()) for ck in checkpoints]).eval()


def _example(checkpoints: list[Checkpoint]) -> torch.Tensor:
    return torch.zeros(1, len(checkpoints[0].channels), 256, 256)


def onnx_bytes(module: nn.Module, example: torch.Tensor) -> bytes:
    """`module` as an ONNX graph (tracing; input `images`, output `logits`, dynamic N/H/W)."""
    _need("onnx", "ONNX export")
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), buf, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "n", 2: "h", 3: "w"}, "logits": {0: "n", 2: "h", 3: "w"}},
                          opset_version=OPSET, dynamo=False)
    return buf.getvalue()


def openvino_model(module: nn.Module, example: torch.Tensor) -> Any:
    """`module` as an OpenVINO model (converted from PyTorch; dynamic N/H/W)."""
    _need("openvino", "OpenVINO export")
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
    _need("onnx", "ONNX export")
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
    _need("openvino", "OpenVINO export")
    if calibration is not None:
        _need("nncf", "int8 export")
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
            _need("onnx", "reading an ONNX model")
            import onnx

            model = onnx.load(str(path), load_external_data=False)
            text = next((p.value for p in model.metadata_props if p.key == "tumorseg"), "")
        else:
            _need("openvino", "reading an OpenVINO model")
            if not path.with_suffix(".bin").is_file():
                raise CheckpointError(f"{path.with_suffix('.bin')} is missing; an OpenVINO model is the .xml "
                                      "and the .bin beside it")
            from tumorseg.engines import openvino_core

            model = openvino_core().read_model(str(path))
            text = model.get_rt_info(["tumorseg"]).astype(str) if model.has_rt_info(["tumorseg"]) else ""
    except (CheckpointError, ConfigError):
        raise
    except Exception as e:  # the readers raise their own error types on damaged files
        raise CheckpointError(f"{path}: not a readable {kind} model ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})") from e
    return GraphInfo.from_json(text, path)


def calibration_batches(data: str | Path, checkpoints: list[Checkpoint], slices: int = CALIBRATION_SLICES,
                        batch: int = 16, seed: int = 0, progress: bool = True) -> tuple[list[np.ndarray], dict]:
    """Normalised slices for int8 calibration: `slices` slices drawn at random (fixed
    seed) from the patients the checkpoints trained on, as their stored splits say, among
    those in `data`. A checkpoint without a stored split (the original unet.pt) draws
    from every patient of `data`, with a warning: never evaluate the int8 model on them.

    Raises:
        DataError: no usable patients.
    """
    from tumorseg.data.cache import open_data
    from tumorseg.data.dataset import load_arrays

    cache = open_data(data, progress=progress)
    trained: set[str] = set()
    for ck in checkpoints:
        if ck.split and ck.split.get("train"):
            trained.update(ck.split["train"])
    if trained:
        patients = sorted(trained & set(cache.patients))
        if not patients:
            raise DataError(f"none of the patients the model trained on is in {data}; calibrate on its "
                            "training data")
    else:
        patients = cache.patients
        log.warning(f"the model records no training patients: calibrating on all {len(patients)} patients of "
                    f"{data}; do not evaluate the int8 model on them")
    arrays = load_arrays(cache, patients, checkpoints[0].channels)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(arrays), generator=g)[:slices]
    out = [arrays.batch(idx[i:i + batch])[0].numpy() for i in range(0, len(idx), batch)]
    info = {"patients": patients, "slices": int(len(idx)), "seed": seed, "data": Path(data).name}
    return out, info



def export_model(source: str | Path, dst: str | Path, *, fmt: str | None = None, int8: bool = False,
                 calibration: str | Path | None = None, calibration_slices: int = CALIBRATION_SLICES,
                 threshold: float | None = None, postprocess: str | None = None, progress: bool = True) -> list[Path]:
    """Export `source` (a cross-validation run folder, a checkpoint or an ensemble file) to
    `dst` in `fmt` (default: from the suffix of `dst`, see `format_of`):

    - "pt": a release checkpoint without training state, or a run's fold ensemble;
    - "onnx": an fp32 ONNX graph;
    - "openvino": an OpenVINO IR, fp32 or, with `int8`, quantised on `calibration` data.

    threshold/postprocess override the stored (or out-of-fold chosen) settings. Returns
    the files written.

    Raises:
        ConfigError: contradicting options or a missing package.
        TumorsegError: an unusable source, calibration data or output path.
    """
    from tumorseg.checkpoint import export_weights, load_checkpoint, load_members
    from tumorseg.crossval import export_run, run_members
    from tumorseg.fileio import check_output_dir

    source, dst = Path(source), Path(dst)
    fmt = fmt or format_of(dst)
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    wanted = {"onnx": ".onnx", "openvino": ".xml"}.get(fmt)
    if wanted and dst.suffix.lower() != wanted:
        raise ConfigError(f"an {fmt} model is written to a {wanted} file; got --out {dst}")
    if fmt == "pt" and format_of(dst) != "pt":
        raise ConfigError(f"--out {dst} names an {format_of(dst)} file; pass --format {format_of(dst)} or a .pt name")
    if int8 and fmt != "openvino":
        raise ConfigError("int8 models are written as OpenVINO IR (measured faster than int8 ONNX): "
                          "use --format openvino --out NAME.xml")
    if int8 and calibration is None:
        raise ConfigError("--int8 needs --calibration DATA: the kaggle_3m folder (or cache) the model trained on; "
                          "only its training patients are used")
    if calibration is not None and not int8:
        raise ConfigError("--calibration is for --int8 exports only")
    if calibration_slices < 16:
        raise ConfigError(f"--calibration-slices must be >= 16, got {calibration_slices}")
    if fmt == "onnx":
        _need("onnx", "ONNX export")
    if fmt == "openvino":
        _need("openvino", "OpenVINO export")
    if int8:
        _need("nncf", "int8 export")
    check_output_dir(dst.parent)
    if dst.is_dir():
        raise ConfigError(f"{dst} is a folder; pass a file name to --out")
    if not source.exists():
        raise CheckpointError(f"{source} does not exist")
    if fmt == "pt":
        if source.is_dir():
            export_run(source, dst, threshold=threshold, postprocess=postprocess)
        else:
            export_weights(source, dst, threshold=threshold, postprocess=postprocess)
        return [dst]
    if source.is_dir():
        paths, inference, _, notes = run_members(source, threshold=threshold, postprocess=postprocess)
        checkpoints = [load_checkpoint(p) for p in paths]
    else:
        checkpoints = load_members(source)
        inference = checkpoints[0].inference.replace(threshold=threshold, postprocess=postprocess)
        notes = checkpoints[0].notes
    if fmt == "onnx":
        return [write_onnx(checkpoints, dst, inference, notes=notes)]
    batches, info = (calibration_batches(calibration, checkpoints, calibration_slices, progress=progress)
                     if int8 else (None, None))
    write_openvino(checkpoints, dst, inference, notes=notes, calibration=batches, calibration_info=info)
    return [dst, dst.with_suffix(".bin")]
