"""Training and inference speed of tumorseg against a re-creation of the original pipeline.

    python benchmarks/speed.py [--quick] [--json OUT] [--data DIR] [--patients N]

One run, one machine, the same restored LGG slices, batch size 8 for training. Rows:

baseline            the original pipeline, re-created in original_pipeline.py (it is not
                    part of the package): depth-4 U-Net with 32 features at every level, skip
                    connections through forward hooks and a stack on the module, sigmoid in
                    `forward`, batch-pooled Dice loss on probabilities, Adam 1e-4, fp32,
                    NCHW, whole 256x256 slices read one by one from an HDF5 file of float16
                    arrays through a DataLoader (num_workers=0), as its `MRIDataset` does.
tumorseg same-arch  the original architecture (`UNet(n_features=32, depth=4)`) on whole
                    slices through tumorseg's own code path (in-memory uint8 slices, batch
                    normalisation, augmentation, bce_dice, autocast, channels_last): shows
                    how much comes from precision/layout/data path alone.
tumorseg default    what `tumorseg train` / `tumorseg predict` run with their defaults
                    (`preset("default")`: depth 5, widths 16-32-64-128-128, 160x160 crops,
                    precision "auto", channels_last). Training throughput counts crops.

Training is timed through `tumorseg.engine.train_one_epoch` itself (epoch of `steps`
batches); inference through `tumorseg.Predictor.predict` (batch 16) on whole
slices, normalised from uint8 inside the timed region (the counterpart of the baseline's
HDF5 reads). Rows are timed round-robin, so a change of background load hits all of them;
every figure is the median over repetitions, after a warm-up of one step and one batch per
row. Peak memory of a short default training on ALL patients is measured in a child
process (`ru_maxrss`).

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
from tumorseg.engine import EpochProgress, build_training, train_one_epoch
from tumorseg.errors import TumorsegError
from tumorseg.inference import Predictor
from tumorseg.losses import make_loss
from tumorseg.model import UNet
from tumorseg.runtime import autocast, cpu_has_native_bf16, resolve_precision

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKED_LGG = REPO_ROOT.parent / "shared" / "data" / "lgg"
INFER_BATCH_TUMORSEG = 16  # `tumorseg predict`'s batch
GIB = 2**30


# ============================================================ measurement helpers


@dataclass
class Row:
    """One configuration under test: `train(steps)` times that many training steps of
    BATCH_SIZE images and `infer(images)` the prediction of that many whole slices; both
    return seconds."""

    name: str
    label: str
    train: Callable[[int], float]
    infer: Callable[[int], float]
    precision: str  # "fp32" or "bf16": the peak it is compared with
    train_size: int  # side of the training inputs (crop or whole slice)
    model: nn.Module
    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    dtype: torch.dtype | None
    channels_last: bool
    info: dict[str, Any] = field(default_factory=dict)
    train_s: list[float] = field(default_factory=list)
    infer_s: list[float] = field(default_factory=list)


def median_rate(images: int, seconds: list[float]) -> float:
    return images / statistics.median(seconds)


def count_gflop_per_image(row: Row, size: int, train: bool, batch: int = 2) -> float:
    """GFLOP per image counted by FlopCounterMode (convolutions and matmuls; element-wise
    ops, BN and the optimiser are not counted) for a forward (+ loss + backward when
    `train`) pass on `batch` random images of size x size. Runs on a copy of the model."""
    model = copy.deepcopy(row.model)
    model.train(train)
    g = torch.Generator().manual_seed(SEED)
    x = torch.rand(batch, 3, size, size, generator=g)
    y = (torch.rand(batch, 1, size, size, generator=g) > 0.9).float()
    if row.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    device = torch.device("cpu")
    with FlopCounterMode(display=False) as counter:
        if train:
            with autocast(device, row.dtype):
                out = model(x)
            row.loss_of(out.float(), y).backward()
        else:
            with torch.no_grad(), autocast(device, row.dtype):
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


def tumorseg_row(name: str, label: str, cfg: TrainConfig, arrays: SliceArrays) -> Row:
    """A row timed through the package's own training and prediction functions."""
    device = torch.device("cpu")
    dtype = resolve_precision(cfg.precision, device)
    model, optimizer, _, loss_fn = build_training(cfg, device)
    epochs = itertools.count()
    order = torch.randperm(len(arrays), generator=torch.Generator().manual_seed(SEED))

    def train(steps: int) -> float:
        # An epoch of exactly `steps` batches, drawn as `tumorseg train` draws them.
        epoch_cfg = replace_config(cfg, {"samples_per_epoch": steps * cfg.batch_size})
        t0 = time.perf_counter()
        train_one_epoch(model, arrays, epoch_cfg, optimizer, loss_fn, device, dtype,
                        EpochProgress(epoch=next(epochs)), show_progress=False)
        return time.perf_counter() - t0

    def infer(n: int) -> float:
        # The Predictor of `tumorseg predict`/`evaluate`: BatchNorm folded into the convolutions.
        predictor = Predictor([model.eval()], channels=cfg.channels, device=device, precision=cfg.precision,
                              batch_size=INFER_BATCH_TUMORSEG, channels_last=cfg.channels_last)
        t0 = time.perf_counter()
        images, _ = arrays.batch(order[:n])
        predictor.predict(images)
        return time.perf_counter() - t0

    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    label = label.format(prec=precision, layout="CL" if cfg.channels_last else "NCHW")
    info = {"config": {k: cfg.to_dict()[k] for k in ("features", "n_features", "depth", "crop", "loss", "augment",
                                                      "tumour_fraction", "precision", "channels_last")},
            "autocast_dtype": str(dtype).replace("torch.", "") if dtype else None}
    return Row(name, label, train, infer, precision, cfg.crop or 256, model, lambda p, g: loss_fn(p, g), dtype,
               cfg.channels_last, info)


# ============================================================ peak memory (child process)


def memory_child(kind: str, data: Path, steps: int, h5_path: Path | None) -> dict[str, Any]:
    """Run `steps` training steps the way `tumorseg train` (kind "tumorseg": ALL patients of
    the cache in memory, default config) or the baseline (from the HDF5 file) does."""
    at_import = peak_rss()
    result: dict[str, Any] = {"kind": kind, "steps": steps, "rss_after_import_gib": at_import["ru_maxrss_gib"]}
    if kind == "tumorseg":
        cfg = replace_config(preset("default"), {"samples_per_epoch": steps * BATCH_SIZE})
        device = torch.device("cpu")
        dtype = resolve_precision(cfg.precision, device)
        torch.manual_seed(cfg.seed)
        model = UNet.from_config(cfg.model_config()).to(memory_format=torch.channels_last)
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
    base = rows[0]
    head = (f"{'row':<52} {'train img/s':>11} {'x base':>7} {'infer img/s':>11} {'x base':>7} "
            f"{'train GFLOP/img':>15} {'infer GFLOP/img':>15} {'train %peak':>11} {'infer %peak':>11}")
    lines = [head, "-" * len(head)]
    for r in rows:
        t, i = result["rows"][r.name], result["rows"][base.name]
        lines.append(
            f"{r.label:<52} {t['train_img_s']:>11.2f} {t['train_img_s'] / i['train_img_s']:>7.2f} "
            f"{t['infer_img_s']:>11.2f} {t['infer_img_s'] / i['infer_img_s']:>7.2f} "
            f"{t['train_step_gflop_per_img']:>9.2f} @{r.train_size:<4} {t['infer_gflop_per_img']:>9.2f} @256 "
            f"{100 * t['train_fraction_of_peak']:>10.1f}% {100 * t['infer_fraction_of_peak']:>10.1f}%"
        )
    return "\n".join(lines)


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
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
        cache, data_desc = open_benchmark_data(args.data, tmp, args.patients)

        # First, while this process is still small: a child's ru_maxrss can inherit the
        # high-water mark of the process it was forked from.
        memory: dict[str, Any] = {}
        if not args.no_memory:
            log(f"peak memory: {args.memory_steps} default training steps on all {len(cache)} patients ...")
            memory["tumorseg"] = measure_memory("tumorseg", cache, args.memory_steps)

        patients = cache.patients[: args.patients]
        arrays = load_arrays(cache, patients)
        h5_path = tmp / "lgg.h5"
        log(f"timing on {len(patients)} patients, {len(arrays)} slices; writing {h5_path.name} ...")
        write_hdf5(arrays, h5_path)
        if not args.no_memory and not args.quick:
            log("peak memory of the baseline ...")
            memory["baseline"] = measure_memory("baseline", cache, max(2, args.memory_steps // 2), h5_path)

        default = preset("default")
        same_arch = replace_config(default, {"features": None, "n_features": 32, "depth": 4, "crop": 0})
        rows = [
            baseline_row(h5_path),
            tumorseg_row("tumorseg_same_arch", "tumorseg same-arch (32x4 flat, {prec} {layout}, 256)",
                         same_arch, arrays),
            tumorseg_row("tumorseg", f"tumorseg default ({'-'.join(map(str, default.features or ()))}, "
                         f"{{prec}} {{layout}}, crop {default.crop or 256})", default, arrays),
        ]

        log("peak matmul ...")
        peak = {"fp32": peak_matmul_gflops(torch.float32, args.matmul_size, matmul_reps),
                "bf16": peak_matmul_gflops(torch.bfloat16, args.matmul_size, matmul_reps)}

        log("counting FLOPs ...")
        flops = {r.name: {"train": count_gflop_per_image(r, r.train_size, train=True),
                          "infer": count_gflop_per_image(r, 256, train=False)} for r in rows}

        log("warm-up ...")
        for r in rows:
            r.train(1)
            r.infer(INFER_BATCH_TUMORSEG)
        # Round-robin: repetition k of every row runs before repetition k+1 of any row.
        for k in range(reps):
            log(f"repetition {k + 1}/{reps}")
            for r in rows:
                r.train_s.append(r.train(steps))
                r.infer_s.append(r.infer(infer_images))

    result_rows: dict[str, Any] = {}
    for r in rows:
        train_img_s = median_rate(steps * BATCH_SIZE, r.train_s)
        infer_img_s = median_rate(infer_images, r.infer_s)
        f = flops[r.name]
        result_rows[r.name] = {
            "label": r.label, "precision": r.precision, "channels_last": r.channels_last,
            "train_input_size": r.train_size, "train_img_s": train_img_s,
            "train_megapixel_s": train_img_s * r.train_size**2 / 1e6, "infer_img_s": infer_img_s,
            "train_step_gflop_per_img": f["train"], "infer_gflop_per_img": f["infer"],
            "train_fraction_of_peak": train_img_s * f["train"] / peak[r.precision],
            "infer_fraction_of_peak": infer_img_s * f["infer"] / peak[r.precision],
            "train_seconds": r.train_s, "infer_seconds": r.infer_s, **r.info,
        }
    b, s, d = (result_rows[n] for n in ("baseline", "tumorseg_same_arch", "tumorseg"))

    def section(kind: str) -> dict[str, float]:
        key = f"{kind}_img_s"
        return {"baseline_img_s": b[key], "tumorseg_img_s": d[key], "ratio": d[key] / b[key],
                "same_arch_img_s": s[key], "same_arch_ratio": s[key] / b[key]}

    tumorseg_mem = memory.get("tumorseg") or {}
    result = {
        "train": {**section("train"), "input_size": {n: v["train_input_size"] for n, v in result_rows.items()}},
        "infer": {**section("infer"), "input_size": 256, "tumorseg_batch_size": INFER_BATCH_TUMORSEG,
                  "baseline_batch_size": BATCH_SIZE},
        "train_step_gflop_per_img": {n: v["train_step_gflop_per_img"] for n, v in result_rows.items()},
        "infer_gflop_per_img": {n: v["infer_gflop_per_img"] for n, v in result_rows.items()},
        "flop_note": "FlopCounterMode on a batch of 2, per image; train = forward + loss + backward at each "
                     "row's training input size (train.input_size), infer = forward at 256x256",
        "peak_matmul_gflops": {**peak, "size": args.matmul_size},
        "fraction_of_peak": {
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
            "torch_threads": torch.get_num_threads(), "native_bf16": cpu_has_native_bf16(),
            "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "busy_at_start": busy,
        },
        "seconds": time.perf_counter() - started,
    }
    print(table(rows, result))
    m = result["machine"]
    print(f"\npeak matmul {args.matmul_size}^2: fp32 {peak['fp32']:.1f} GFLOP/s, bf16 {peak['bf16']:.1f} GFLOP/s; "
          f"{m['cpu']}, {m['torch_threads']} threads, native bf16: {m['native_bf16']}, torch {m['torch']}")
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
    ap.add_argument("--memory-steps", type=int, default=10, help="training steps of the peak-memory run")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory child process")
    ap.add_argument("--_memory-child", dest="memory_child", choices=["tumorseg", "baseline"], help=argparse.SUPPRESS)
    ap.add_argument("--_h5", dest="h5", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, Path(args.data), args.memory_steps, args.h5)))
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
