"""Training and inference speed of tumorseg against a re-creation of the original pipeline.

    python benchmarks/speed.py [--quick] [--json OUT] [--data DIR] [--patients N]
                               [--ours-metrics CSV] [--original-metrics CSV]

One run, one machine, the same restored LGG slices, batch size 8 for training. Rows:

baseline            the original pipeline, re-created in original_pipeline.py (it is not
                    part of the package): depth-4 U-Net with 32 features at every level, skip
                    connections through forward hooks and a stack on the module, sigmoid in
                    `forward`, batch-pooled Dice loss on probabilities, Adam 1e-4, fp32,
                    NCHW, whole 256x256 slices read one by one from an HDF5 file of float16
                    arrays through a DataLoader (num_workers=0), as its `MRIDataset` does.
tumorseg same-arch  the original architecture (`UNet(n_features=32, depth=4)`) on whole
                    slices through tumorseg's own code path (in-memory uint8 slices, batch
                    normalisation, augmentation, bce_dice, measured precision, channels_last):
                    shows how much comes from precision/layout/data path alone.
tumorseg default    training: `preset("default")` (depth 5, widths 16-32-64-128-128, 160x160
                    crops, channels_last) in fp32 and in bf16; the precision that "auto"
                    measures and picks is marked. Training throughput counts crops.
                    inference: the shipped model (default architecture) on whole slices,
                    through `Predictor` on every installed engine and precision (PyTorch
                    fp32/bf16, ONNX Runtime fp32, OpenVINO fp32 and the shipped int8
                    variant), and with `engine="auto"`, what `tumorseg predict` runs.

A bf16 row is timed only when a short probe (the same model, fp32 against bf16) finds bf16
less than 3x slower than fp32; on CPUs without bf16 hardware it can be 100x slower and the
row would take minutes. The probe's ratio is reported instead.

Training is timed through `tumorseg.training.train_one_epoch` itself (epoch of `steps`
batches); inference through `tumorseg.Predictor.predict` (batch 16) on whole slices,
normalised from uint8 inside the timed region (the counterpart of the baseline's HDF5
reads). Rows are timed round-robin, so a change of background load hits all of them;
every figure is the median over repetitions, after a warm-up of one step and one batch per
row. "% of peak" divides the achieved GFLOP/s by the peak matmul GFLOP/s of the fastest
precision measured in the same run (fp32 or bf16; int8 peak is not measured). The
shipped default's cost per patient is `Predictor.segment` (normalise, predict,
post-process) of whole patients. Peak memory of a short default training on ALL patients
is measured in a child process (`ru_maxrss`).

Time to quality is read from the metrics.csv files of real runs (never re-run here):
`--ours-metrics` (default: the training history stored in the shipped model; an ensemble
stores none, so give a fold's metrics.csv, e.g. runs/cv-default/fold_0/metrics.csv) and
`--original-metrics` (a run of `tumorseg train --preset seed`; without it the line says so).

Data: --data DIR (a kaggle_3m folder or a prepared tumorseg cache); default
$TUMORSEG_TEST_DATA, else ../shared/data/lgg restored into a temporary folder. Nothing is
asserted on time: this measures, it does not test.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from original_pipeline import (
    BATCH_SIZE,
    SEED,
    OriginalUNet,
    baseline_loader,
    baseline_step,
    check_baseline_layout,
    cycle,
    original_dice_loss,
    write_hdf5,
)
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tumorseg.config import TrainConfig, preset, replace_config
from tumorseg.data.cache import Cache, default_cache_dir, is_cache_dir, open_cache, prepare
from tumorseg.data.dataset import SliceArrays, load_arrays
from tumorseg.data.splits import make_split
from tumorseg.errors import TumorsegError
from tumorseg.inference import Predictor
from tumorseg.losses import make_loss
from tumorseg.model import UNet
from tumorseg.runtime import autocast, cpu_has_native_bf16, precision_name, resolve_precision
from tumorseg.training import EpochProgress, build_training, train_one_epoch

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKED_LGG = REPO_ROOT.parent / "shared" / "data" / "lgg"
INFER_BATCH_TUMORSEG = 16  # `tumorseg predict`'s batch
GIB = 2**30


# ============================================================ measurement helpers


@dataclass
class Row:
    """One configuration under test: `train(steps)` times that many training steps of
    BATCH_SIZE images and `infer(images)` the prediction of that many whole slices; both
    return seconds. A row may time only one of the two (None)."""

    name: str
    label: str
    train: Callable[[int], float] | None
    infer: Callable[[int], float] | None
    precision: str  # "fp32", "bf16" or "int8"
    train_size: int  # side of the training inputs (crop or whole slice)
    model: nn.Module
    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    dtype: torch.dtype | None
    channels_last: bool
    info: dict[str, Any] = field(default_factory=dict)
    train_s: list[float] = field(default_factory=list)
    infer_s: list[float] = field(default_factory=list)


def median_rate(images: int, seconds: list[float]) -> float | None:
    return images / statistics.median(seconds) if seconds else None


def count_gflop_per_image(row: Row, size: int, train: bool, batch: int = 2) -> float:
    """GFLOP per image counted by FlopCounterMode (convolutions and matmuls; element-wise
    ops, BN and the optimiser are not counted) for a forward (+ loss + backward when
    `train`) pass on `batch` random images of size x size, in fp32 (the count does not
    depend on the precision). Runs on a copy of the model."""
    model = copy.deepcopy(row.model)
    model.train(train)
    g = torch.Generator().manual_seed(SEED)
    x = torch.rand(batch, 3, size, size, generator=g)
    y = (torch.rand(batch, 1, size, size, generator=g) > 0.9).float()
    with FlopCounterMode(display=False) as counter:
        if train:
            row.loss_of(model(x).float(), y).backward()
        else:
            with torch.no_grad():
                model(x)
    return counter.get_total_flops() / batch / 1e9


def peak_matmul_gflops(dtype: torch.dtype, n: int, reps: int) -> float:
    """GFLOP/s of an n x n matmul in `dtype` (median of `reps` after one warm-up)."""
    g = torch.Generator().manual_seed(SEED)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    out = torch.matmul(a, b)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def peak_gflops(n: int, reps: int) -> dict[str, Any]:
    """Peak matmul GFLOP/s in fp32 and bf16. bf16 is first measured at 512: where it is
    under a third of fp32 there (no bf16 hardware), the large matmul would take minutes and
    the 512 figure is kept."""
    fp32 = peak_matmul_gflops(torch.float32, n, reps)
    small = {dt: peak_matmul_gflops(dt, 512, reps) for dt in (torch.float32, torch.bfloat16)}
    if small[torch.bfloat16] < small[torch.float32] / 3:
        return {"fp32": fp32, "bf16": small[torch.bfloat16], "bf16_size": 512, "size": n}
    return {"fp32": fp32, "bf16": peak_matmul_gflops(torch.bfloat16, n, reps), "bf16_size": n, "size": n}


def bf16_probe(model: nn.Module, size: int, train: bool) -> float:
    """How many times slower bf16 autocast is than fp32 for one short pass of `model` (2
    images of size x size; forward + backward with `train`), on a copy of the model."""
    from tumorseg.runtime import time_candidates

    probe = copy.deepcopy(model).train(train).to(memory_format=torch.channels_last)
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(SEED))
    x = x.contiguous(memory_format=torch.channels_last)

    def run(dtype: torch.dtype | None) -> Callable[[], None]:
        def once() -> None:
            if train:
                with autocast(torch.device("cpu"), dtype):
                    out = probe(x).float().mean()
                out.backward()
            else:
                with torch.no_grad(), autocast(torch.device("cpu"), dtype):
                    probe(x)
        return once

    t = time_candidates({"fp32": run(None), "bf16": run(torch.bfloat16)}, repeats=2)
    return t["bf16"] / t["fp32"]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peak_rss() -> dict[str, float | None]:
    """Peak resident memory of this process in GiB: ru_maxrss (KiB on Linux) and VmHWM."""
    out: dict[str, float | None] = {"ru_maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                                    "vmhwm_gib": None}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                out["vmhwm_gib"] = int(line.split()[1]) / 2**20
    except OSError:
        pass
    return out


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ============================================================ the rows


def baseline_row(h5_path: Path) -> Row:
    torch.manual_seed(SEED)
    model = OriginalUNet(n_features=32, depth=4)
    info = check_baseline_layout(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    train_batches = cycle(baseline_loader(h5_path, shuffle=True))
    infer_batches = cycle(baseline_loader(h5_path, shuffle=False))

    def train(steps: int) -> float:
        model.train()
        t0 = time.perf_counter()
        for _ in range(steps):
            baseline_step(model, optimizer, *next(train_batches))
        return time.perf_counter() - t0

    @torch.no_grad()
    def infer(images: int) -> float:
        model.eval()
        t0 = time.perf_counter()
        for _ in range(-(-images // BATCH_SIZE)):
            x, _ = next(infer_batches)
            model(x)
        return time.perf_counter() - t0

    return Row("baseline", "baseline (original, fp32 NCHW, 256, HDF5)", train, infer, "fp32", 256, model,
               lambda p, g: original_dice_loss(p, g), None, False, info)


def tumorseg_row(name: str, label: str, cfg: TrainConfig, arrays: SliceArrays, *, infer: bool = True) -> Row:
    """A row timed through the package's own training (and, with `infer`, prediction) functions."""
    device = torch.device("cpu")
    model, optimizer, _, loss_fn = build_training(cfg, device)
    dtype = resolve_precision(cfg.precision, device, model, train=True, sample=(2, 3, cfg.crop or 128, cfg.crop or 128),
                              channels_last=cfg.channels_last)
    epochs = itertools.count()
    order = torch.randperm(len(arrays), generator=torch.Generator().manual_seed(SEED))

    def train(steps: int) -> float:
        # An epoch of exactly `steps` batches, drawn as `tumorseg train` draws them.
        epoch_cfg = replace_config(cfg, {"samples_per_epoch": steps * cfg.batch_size})
        t0 = time.perf_counter()
        train_one_epoch(model, arrays, epoch_cfg, optimizer, loss_fn, device, dtype,
                        EpochProgress(epoch=next(epochs)), show_progress=False)
        return time.perf_counter() - t0

    def predict(n: int) -> float:
        # The Predictor of `tumorseg predict`/`evaluate` on PyTorch: BatchNorm folded.
        predictor = Predictor([model.eval()], channels=cfg.channels, device=device, precision=cfg.precision,
                              batch_size=INFER_BATCH_TUMORSEG, channels_last=cfg.channels_last)
        t0 = time.perf_counter()
        images, _ = arrays.batch(order[:n])
        predictor.predict(images)
        return time.perf_counter() - t0

    precision = precision_name(dtype)
    label = label.format(prec=precision, layout="CL" if cfg.channels_last else "NCHW")
    info = {"config": {k: cfg.to_dict()[k] for k in ("features", "n_features", "depth", "crop", "loss", "augment",
                                                      "tumour_fraction", "precision", "channels_last")},
            "autocast_dtype": str(dtype).replace("torch.", "") if dtype else None}
    return Row(name, label, train, predict if infer else None, precision, cfg.crop or 256, model,
               lambda p, g: loss_fn(p, g), dtype, cfg.channels_last, info)


def engine_row(name: str, label: str, predictor: Predictor, model: nn.Module, arrays: SliceArrays) -> Row:
    """Inference only: a ready Predictor (any engine) on whole slices."""
    order = torch.randperm(len(arrays), generator=torch.Generator().manual_seed(SEED))

    def predict(n: int) -> float:
        t0 = time.perf_counter()
        images, _ = arrays.batch(order[:n])
        predictor.predict(images)
        return time.perf_counter() - t0

    info = {"engine": predictor.engine.name, "precision": predictor.precision, "source": predictor.source}
    return Row(name, label.format(engine=predictor.engine.name, prec=predictor.precision), None, predict,
               predictor.precision, 256, model, lambda p, g: p.mean(), None, True, info)


def per_patient_seconds(predictor: Predictor, cache: Cache, patients: list[str]) -> dict[str, float]:
    """Seconds of `Predictor.segment` (normalise, predict, post-process) per whole patient,
    after one warm-up patient."""
    import numpy as np

    predictor.segment(np.asarray(cache.images(patients[0])))
    seconds, slices = [], []
    for p in patients:
        volume = np.asarray(cache.images(p))
        t0 = time.perf_counter()
        predictor.segment(volume)
        seconds.append(time.perf_counter() - t0)
        slices.append(len(volume))
    return {"seconds_per_patient": statistics.mean(seconds), "slices_per_patient": statistics.mean(slices),
            "seconds_per_slice": sum(seconds) / sum(slices), "patients": len(patients)}


def time_to_quality(path: Path | None, history: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """Hours of training until the epoch with the best validation Dice mean, from a
    metrics.csv (or a checkpoint's history): the sum of the epochs' `seconds`."""
    import csv

    if path is not None:
        with open(path, newline="") as f:
            history = list(csv.DictReader(f))
    if not history:
        return None
    rows = [(int(h["epoch"]), float(h["val_dice_mean"]), float(h["seconds"])) for h in history
            if str(h.get("val_dice_mean", "")) not in ("", "nan", "None")]
    if not rows:
        return None
    best = max(rows, key=lambda r: r[1])
    hours = sum(r[2] for r in rows if r[0] <= best[0]) / 3600
    return {"source": str(path) if path else "the shipped model's stored history", "best_epoch": best[0],
            "best_val_dice_mean": best[1], "hours_to_best": hours, "epochs": len(rows)}


# ============================================================ peak memory (child process)


def memory_child(kind: str, data: Path, steps: int, h5_path: Path | None) -> dict[str, Any]:
    """Run `steps` training steps the way `tumorseg train` (kind "tumorseg": ALL patients of
    the cache in memory, default config) or the baseline (from the HDF5 file) does."""
    at_import = peak_rss()
    result: dict[str, Any] = {"kind": kind, "steps": steps, "rss_after_import_gib": at_import["ru_maxrss_gib"]}
    if kind == "tumorseg":
        cfg = replace_config(preset("default"), {"samples_per_epoch": steps * BATCH_SIZE})
        device = torch.device("cpu")
        torch.manual_seed(cfg.seed)
        model = UNet.from_config(cfg.model_config()).to(memory_format=torch.channels_last)
        dtype = resolve_precision(cfg.precision, device, model, train=True, sample=(2, 3, cfg.crop, cfg.crop),
                                  channels_last=True)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        cache = open_cache(data)
        try:  # as `fit`: the training and the validation patients of fold 0, both in memory
            split = make_split(cache.patients, cfg.folds, cfg.test_fraction, cfg.split_seed)
            sets = [split.train(cfg.fold), split.val(cfg.fold)]
        except TumorsegError:  # fewer patients than folds
            sets = [cache.patients]
        loaded = [load_arrays(cache, patients, cfg.channels) for patients in sets]
        result["patients"] = sum(len(a.patients) for a in loaded)
        result["slices"] = sum(len(a) for a in loaded)
        result["arrays_gib"] = sum(a.images.nbytes + a.masks.nbytes for a in loaded) / GIB
        train_one_epoch(model, loaded[0], cfg, optimizer, make_loss(cfg.loss), device, dtype, EpochProgress(),
                        show_progress=False)
    else:
        if h5_path is None:
            raise SystemExit("--_memory-child baseline needs --_h5")
        torch.manual_seed(SEED)
        model = OriginalUNet()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        batches = cycle(baseline_loader(h5_path, shuffle=True))
        for _ in range(steps):
            baseline_step(model, optimizer, *next(batches))
    peak = peak_rss()
    result["peak_rss_gib"] = peak["ru_maxrss_gib"]
    result["peak_vmhwm_gib"] = peak["vmhwm_gib"]
    return result


def measure_memory(kind: str, cache: Cache, steps: int, h5_path: Path | None = None) -> dict[str, Any] | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-child", kind, "--data", str(cache.root),
           "--memory-steps", str(steps)]
    if h5_path is not None:
        cmd += ["--_h5", str(h5_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        log(f"memory child ({kind}) failed with exit code {proc.returncode}:\n{proc.stderr[-2000:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ============================================================ data


def open_benchmark_data(arg: str | None, tmp: Path, restore_limit: int) -> tuple[Cache, str]:
    """The cache to read: --data, else $TUMORSEG_TEST_DATA, else the packed LGG copy restored
    into `tmp`. A raw folder is prepared into $TUMORSEG_CACHE when set, else into `tmp`."""
    if arg:
        path = Path(arg)
    elif os.environ.get("TUMORSEG_TEST_DATA"):
        path = Path(os.environ["TUMORSEG_TEST_DATA"])
    else:
        restore = PACKED_LGG / "restore.py"
        if not restore.is_file():
            raise SystemExit(f"no data: pass --data DIR or set TUMORSEG_TEST_DATA ({restore} not found)")
        log(f"restoring {restore_limit} patients from {PACKED_LGG} ...")
        subprocess.run([sys.executable, str(restore), str(tmp / "raw"), "--limit", str(restore_limit)],
                       check=True, stdout=subprocess.DEVNULL)
        path = tmp / "raw" / "kaggle_3m"
    if is_cache_dir(path):
        return open_cache(path), f"cache {path}"
    if not path.is_dir():
        raise SystemExit(f"data folder {path} does not exist")
    out = default_cache_dir(path) if os.environ.get("TUMORSEG_CACHE") else tmp / "cache"
    log(f"preparing a cache of {path} in {out} ...")
    return prepare(path, out=out, progress=False), f"raw {path} (cache {out})"


# ============================================================ report


def table(rows: list[Row], result: dict[str, Any]) -> str:
    base = result["rows"]["baseline"]

    def cell(value: float | None, fmt: str, width: int) -> str:
        return f"{value:>{width}{fmt}}" if value is not None else f"{'-':>{width}}"

    head = (f"{'row':<58} {'train img/s':>11} {'x base':>7} {'x/pixel':>7} {'infer img/s':>11} {'x base':>7} "
            f"{'train GFLOP/img':>15} {'train %peak':>11} {'infer %peak':>11}")
    lines = [head, "-" * len(head)]
    for r in rows:
        t = result["rows"][r.name]
        tr, inf = t["train_img_s"], t["infer_img_s"]
        lines.append(
            f"{r.label:<58} {cell(tr, '.2f', 11)} "
            f"{cell(tr / base['train_img_s'] if tr else None, '.2f', 7)} "
            f"{cell(t['train_per_pixel_ratio'], '.2f', 7)} {cell(inf, '.2f', 11)} "
            f"{cell(inf / base['infer_img_s'] if inf else None, '.2f', 7)} "
            f"{cell(t['train_step_gflop_per_img'], '.2f', 9)} @{r.train_size:<4} "
            f"{cell(100 * t['train_fraction_of_peak'] if tr else None, '.1f', 10)}% "
            f"{cell(100 * t['infer_fraction_of_peak'] if t['infer_fraction_of_peak'] else None, '.1f', 10)}%"
        )
    for note in result["skipped"]:
        lines.append(f"  not timed: {note}")
    return "\n".join(lines)


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from tumorseg.checkpoint import load_members, load_model
    from tumorseg.engines import engine_installed
    from tumorseg.inference import default_checkpoint_path, default_int8_path

    started = time.perf_counter()
    torch.manual_seed(SEED)
    reps = args.reps or (3 if args.quick else 5)
    steps = args.steps or (2 if args.quick else 5)
    # A whole number of the baseline's batches of 8.
    infer_images = -(-(args.infer_images or (16 if args.quick else 64)) // BATCH_SIZE) * BATCH_SIZE
    matmul_reps = 3 if args.quick else 7
    load_before = os.getloadavg()
    busy = load_before[0] > 0.5 * (os.cpu_count() or 1)
    if busy:
        log(f"warning: load average {load_before[0]:.1f} on {os.cpu_count()} CPUs: other processes compete for "
            "the cores; absolute numbers are not meaningful and ratios only roughly")

    with tempfile.TemporaryDirectory(prefix="tumorseg-speed-") as tmp_name:
        tmp = Path(tmp_name)
        # The "auto" rows measure their choices in this run, not read them from the user's cache.
        os.environ["TUMORSEG_CACHE_DIR"] = str(tmp / "measured")
        cache, data_desc = open_benchmark_data(args.data, tmp, args.patients)

        # First, while this process is still small: a child's ru_maxrss can inherit the
        # high-water mark of the process it was forked from.
        memory: dict[str, Any] = {}
        memory_steps = args.memory_steps or (3 if args.quick else 10)
        if not args.no_memory:
            log(f"peak memory: {memory_steps} default training steps on all {len(cache)} patients ...")
            memory["tumorseg"] = measure_memory("tumorseg", cache, memory_steps)

        patients = cache.patients[: args.patients]
        arrays = load_arrays(cache, patients)
        h5_path = tmp / "lgg.h5"
        log(f"timing on {len(patients)} patients, {len(arrays)} slices; writing {h5_path.name} ...")
        write_hdf5(arrays, h5_path)
        if not args.no_memory and not args.quick:
            log("peak memory of the baseline ...")
            memory["baseline"] = measure_memory("baseline", cache, max(2, memory_steps // 2), h5_path)

        default = preset("default")
        same_arch = replace_config(default, {"features": None, "n_features": 32, "depth": 4, "crop": 0})
        shipped = load_model(default_checkpoint_path())  # one U-Net, or an ensemble of them
        skipped: list[str] = []
        log("bf16 probes ...")
        probes = {"train": bf16_probe(UNet.from_config(default.model_config()), default.crop, train=True),
                  "infer": bf16_probe(shipped, 256, train=False)}
        auto_train = tumorseg_row("tumorseg_auto", "", default, arrays, infer=False).precision
        rows = [
            baseline_row(h5_path),
            tumorseg_row("tumorseg_same_arch", "tumorseg same-arch (32x4 flat, {prec} {layout}, 256)",
                         same_arch, arrays),
        ]
        crop = f"crop {default.crop}"
        for prec in ("fp32", "bf16"):
            if prec == "bf16" and probes["train"] >= 3:
                skipped.append(f"default training in bf16: {probes['train']:.0f}x slower than fp32 in the probe")
                continue
            mark = " = auto" if prec == auto_train else ""
            rows.append(tumorseg_row(f"tumorseg_train_{prec}", f"tumorseg default train ({{prec}} {{layout}}, "
                                     f"{crop}){mark}", replace_config(default, {"precision": prec}), arrays,
                                     infer=False))
        engines = [("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"), ("openvino", "fp32")]
        for engine, prec in engines:
            if not engine_installed(engine):
                skipped.append(f"inference on {engine}: not installed")
                continue
            if prec == "bf16" and probes["infer"] >= 3:
                skipped.append(f"inference in bf16 on torch: {probes['infer']:.0f}x slower than fp32 in the probe")
                continue
            p = Predictor.from_checkpoints(None, engine=engine, precision=prec, device="cpu")
            rows.append(engine_row(f"shipped_{engine}_{prec}", "shipped model on {engine} ({prec})", p, shipped,
                                   arrays))
        if default_int8_path().is_file() and engine_installed("openvino"):
            p = Predictor.from_checkpoints(default_int8_path())
            rows.append(engine_row("shipped_openvino_int8", "shipped model on {engine} ({prec})", p, shipped, arrays))
        auto = Predictor.from_checkpoints(None, device="cpu")
        rows.append(engine_row("tumorseg", "shipped model, engine auto: {engine} ({prec})", auto, shipped, arrays))

        log("peak matmul ...")
        peak = peak_gflops(args.matmul_size, matmul_reps)
        fastest = max(peak["fp32"], peak["bf16"])

        log("counting FLOPs ...")
        flops = {r.name: {"train": count_gflop_per_image(r, r.train_size, train=True) if r.train else None,
                          "infer": count_gflop_per_image(r, 256, train=False) if r.infer else None} for r in rows}

        log("warm-up ...")
        for r in rows:
            if r.train:
                r.train(1)
            if r.infer:
                r.infer(INFER_BATCH_TUMORSEG)
        # Round-robin: repetition k of every row runs before repetition k+1 of any row.
        for k in range(reps):
            log(f"repetition {k + 1}/{reps}")
            for r in rows:
                if r.train:
                    r.train_s.append(r.train(steps))
                if r.infer:
                    r.infer_s.append(r.infer(infer_images))

        log("seconds per patient of the shipped default ...")
        cost = per_patient_seconds(auto, cache, patients[:3] if args.quick else patients)

    result_rows: dict[str, Any] = {}
    for r in rows:
        train_img_s = median_rate(steps * BATCH_SIZE, r.train_s)
        infer_img_s = median_rate(infer_images, r.infer_s)
        f = flops[r.name]
        result_rows[r.name] = {
            "label": r.label, "precision": r.precision, "channels_last": r.channels_last,
            "train_input_size": r.train_size, "train_img_s": train_img_s,
            "train_megapixel_s": train_img_s * r.train_size**2 / 1e6 if train_img_s else None,
            "infer_img_s": infer_img_s,
            "train_step_gflop_per_img": f["train"], "infer_gflop_per_img": f["infer"],
            "train_fraction_of_peak": train_img_s * f["train"] / fastest if train_img_s else None,
            # int8 rows: no int8 peak is measured, so no fraction of it.
            "infer_fraction_of_peak": (infer_img_s * f["infer"] / fastest if infer_img_s and r.precision != "int8"
                                       else None),
            "train_seconds": r.train_s, "infer_seconds": r.infer_s, **r.info,
        }
    b = result_rows["baseline"]
    for v in result_rows.values():
        v["train_per_pixel_ratio"] = (v["train_megapixel_s"] / b["train_megapixel_s"]
                                      if v["train_megapixel_s"] else None)
    s, d, a = result_rows["tumorseg_same_arch"], result_rows[f"tumorseg_train_{auto_train}"], result_rows["tumorseg"]
    ours = time_to_quality(args.ours_metrics, None if args.ours_metrics else
                           load_members(default_checkpoint_path())[0].history)
    original = time_to_quality(args.original_metrics) if args.original_metrics else None
    tumorseg_mem = memory.get("tumorseg") or {}
    result = {
        "train": {"baseline_img_s": b["train_img_s"], "tumorseg_img_s": d["train_img_s"],
                  "ratio": d["train_img_s"] / b["train_img_s"], "per_pixel_ratio": d["train_per_pixel_ratio"],
                  "auto_precision": auto_train, "same_arch_img_s": s["train_img_s"],
                  "same_arch_ratio": s["train_img_s"] / b["train_img_s"],
                  "input_size": {n: v["train_input_size"] for n, v in result_rows.items() if v["train_img_s"]}},
        "infer": {"baseline_img_s": b["infer_img_s"], "tumorseg_img_s": a["infer_img_s"],
                  "ratio": a["infer_img_s"] / b["infer_img_s"], "auto_engine": a["engine"],
                  "auto_precision": a["precision"], "same_arch_img_s": s["infer_img_s"],
                  "same_arch_ratio": s["infer_img_s"] / b["infer_img_s"], "input_size": 256,
                  "tumorseg_batch_size": INFER_BATCH_TUMORSEG, "baseline_batch_size": BATCH_SIZE,
                  "by_row": {n: v["infer_img_s"] / b["infer_img_s"] for n, v in result_rows.items()
                             if v["infer_img_s"]}},
        "shipped_default_cost": {**cost, "engine": a["engine"], "precision": a["precision"]},
        "time_to_quality": {"ours": ours, "original": original},
        "bf16_probe_slowdown": probes,
        "skipped": skipped,
        "train_step_gflop_per_img": {n: v["train_step_gflop_per_img"] for n, v in result_rows.items()},
        "infer_gflop_per_img": {n: v["infer_gflop_per_img"] for n, v in result_rows.items()},
        "flop_note": "FlopCounterMode on a batch of 2, per image; train = forward + loss + backward at each "
                     "row's training input size (train.input_size), infer = forward at 256x256",
        "peak_matmul_gflops": {**peak, "fastest": fastest},
        "fraction_of_peak": {
            "of": "the peak matmul GFLOP/s of the fastest precision (peak_matmul_gflops.fastest)",
            "train": {n: v["train_fraction_of_peak"] for n, v in result_rows.items()},
            "infer": {n: v["infer_fraction_of_peak"] for n, v in result_rows.items()},
        },
        "train_peak_rss_gib": tumorseg_mem.get("peak_rss_gib"),
        "memory": memory,
        "rows": result_rows,
        "settings": {
            "quick": args.quick, "reps": reps, "train_steps_per_rep": steps, "infer_images_per_rep": infer_images,
            "batch_size": BATCH_SIZE, "seed": SEED, "data": data_desc, "patients": len(patients),
            "slices": len(arrays),
            "statistic": "median over reps after a warm-up (1 step, 1 batch) per row; rows round-robin",
        },
        "machine": {
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "native_bf16_flag": cpu_has_native_bf16(),
            "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "busy_at_start": busy,
        },
        "seconds": time.perf_counter() - started,
    }
    print(table(rows, result))
    m = result["machine"]
    print(f"\npeak matmul: fp32 {peak['fp32']:.1f} GFLOP/s ({peak['size']}^2), bf16 {peak['bf16']:.1f} GFLOP/s "
          f"({peak['bf16_size']}^2); % of peak is of {fastest:.1f}; {m['cpu']}, {m['torch_threads']} threads, "
          f"torch {m['torch']}")
    print(f"bf16 probe: training {probes['train']:.2f}x, inference {probes['infer']:.2f}x the time of fp32; "
          f"auto picks {auto_train} for training, {a['engine']} {a['precision']} for inference")
    print(f"inference, engine auto: {result['infer']['ratio']:.2f}x the original; training ({auto_train}): "
          f"{result['train']['ratio']:.2f}x per image, {result['train']['per_pixel_ratio']:.2f}x per pixel")
    print(f"shipped default ({a['engine']}, {a['precision']}): {cost['seconds_per_patient']:.2f} s per patient "
          f"({cost['slices_per_patient']:.0f} slices on average, {cost['patients']} patients; "
          f"{1000 * cost['seconds_per_slice']:.0f} ms per slice)")
    for who, q, flag in (("tumorseg default recipe", ours, "--ours-metrics"),
                         ("original recipe", original, "--original-metrics")):
        if q:
            print(f"time to quality, {who}: {q['hours_to_best']:.2f} h to its best validation Dice mean "
                  f"{q['best_val_dice_mean']:.3f} (epoch {q['best_epoch']} of {q['epochs']}; {q['source']})")
        else:
            print(f"time to quality, {who}: no metrics.csv given ({flag} FILE)")
    print(f"train: {steps} steps x batch {BATCH_SIZE} per rep; infer: {infer_images} whole slices per rep; "
          f"{reps} reps; {len(patients)} patients, {len(arrays)} slices; load average "
          f"{load_before[0]:.1f} -> {m['loadavg_after'][0]:.1f}")
    if tumorseg_mem:
        print(f"peak RSS of `tumorseg train` (default, {tumorseg_mem['patients']} patients / "
              f"{tumorseg_mem['slices']} slices in memory, {tumorseg_mem['steps']} steps): "
              f"{tumorseg_mem['peak_rss_gib']:.2f} GiB (uint8 slices {tumorseg_mem['arrays_gib']:.2f} GiB, "
              f"after imports {tumorseg_mem['rss_after_import_gib']:.2f} GiB)")
    if memory.get("baseline"):
        print(f"peak RSS of the baseline ({memory['baseline']['steps']} steps from HDF5): "
              f"{memory['baseline']['peak_rss_gib']:.2f} GiB")
    print(f"({result['seconds']:.0f} s)")
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and steps (under 2 minutes)")
    ap.add_argument("--json", type=Path, metavar="OUT", help="write the results as JSON to OUT")
    ap.add_argument("--data", help="kaggle_3m folder or prepared cache (default: $TUMORSEG_TEST_DATA, "
                                   "else ../shared/data/lgg restored into a temporary folder)")
    ap.add_argument("--patients", type=int, default=8, help="patients used for timing (default 8); also how "
                                                            "many are restored when no data is given")
    ap.add_argument("--reps", type=int, help="timed repetitions (default 5, --quick 3)")
    ap.add_argument("--steps", type=int, help="training steps per repetition (default 5, --quick 2)")
    ap.add_argument("--infer-images", type=int, help="slices predicted per repetition, rounded up to a multiple of 8 "
                                                        "(default 64, --quick 16)")
    ap.add_argument("--matmul-size", type=int, default=2048, help="side of the peak matmul (default 2048)")
    ap.add_argument("--memory-steps", type=int, default=None,
                    help="training steps of the peak-memory run (default 10, --quick 3)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory child process")
    ap.add_argument("--ours-metrics", type=Path, metavar="CSV",
                    help="metrics.csv of a default-recipe run for the time-to-quality line (default: the history "
                         "stored in the shipped model; an ensemble stores none)")
    ap.add_argument("--original-metrics", type=Path, metavar="CSV",
                    help="metrics.csv of a `tumorseg train --preset seed` run for the time-to-quality line")
    ap.add_argument("--_memory-child", dest="memory_child", choices=["tumorseg", "baseline"], help=argparse.SUPPRESS)
    ap.add_argument("--_h5", dest="h5", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, Path(args.data), args.memory_steps or 10, args.h5)))
        return
    for name in ("patients", "reps", "steps", "infer_images", "matmul_size", "memory_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    result = run_benchmark(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
