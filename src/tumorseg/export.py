"""`tumorseg export`: a model as a release checkpoint, a run's fold ensemble, an ONNX graph
or an OpenVINO IR (fp32, or int8 quantised by NNCF on slices of the patients the models
trained on). The graphs themselves are built by `tumorseg.graphs`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from tumorseg.checkpoint import (
    Checkpoint,
    export_ensemble,
    export_weights,
    load_checkpoint,
    load_members,
)
from tumorseg.data.cache import open_data
from tumorseg.data.dataset import load_arrays
from tumorseg.errors import CheckpointError, ConfigError, DataError, TumorsegError
from tumorseg.fileio import check_output_dir
from tumorseg.graphs import FORMATS, format_of, need_package, write_onnx, write_openvino
from tumorseg.runs import run_members

log = logging.getLogger("tumorseg")

CALIBRATION_SLICES = 300


def calibration_batches(data: str | Path, checkpoints: list[Checkpoint], slices: int = CALIBRATION_SLICES,
                        batch: int = 16, seed: int = 0, progress: bool = True) -> tuple[list[np.ndarray], dict]:
    """Normalised slices for int8 calibration: `slices` slices drawn at random (fixed
    seed) from the patients the checkpoints trained on, as their stored splits say, among
    those in `data`. A checkpoint without a stored split (the original unet.pt) draws
    from every patient of `data`, with a warning: never evaluate the int8 model on them.

    Raises:
        DataError: no usable patients.
    """
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
        need_package("onnx", "ONNX export")
    if fmt == "openvino":
        need_package("openvino", "OpenVINO export")
    if int8:
        need_package("nncf", "int8 export")
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
        members = run_members(source, threshold=threshold, postprocess=postprocess)
        checkpoints = [load_checkpoint(p) for p in members.models]
        inference, notes = members.inference, members.notes
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


def export_run(run_dir: str | Path, dst: str | Path, *, threshold: float | None = None,
               postprocess: str | None = None) -> Path:
    """Write the fold models of a cross-validation run as one ensemble file (float16
    weights) with the settings of `runs.run_members`.

    Raises:
        TumorsegError: not a finished cross-validation run, or a bad setting.
    """
    members = run_members(run_dir, threshold=threshold, postprocess=postprocess)
    check_output_dir(Path(dst).parent)
    if Path(dst).is_dir():
        raise TumorsegError(f"{dst} is a folder; pass a file name to --out")
    return export_ensemble(members.models, dst, inference=members.inference, metrics=members.metrics,
                           notes=members.notes)
