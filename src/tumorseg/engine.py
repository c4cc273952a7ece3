"""Training and validation: plain functions (`fit`, `train_one_epoch`, `validate`).

Reproducibility: every random draw of epoch `e` comes from generators seeded by
(seed, e) for the slice order and (seed, e, step) for crops and augmentation, so a run
interrupted at any step and resumed from its checkpoint continues with exactly the same
batches; on the CPU the final weights equal those of an uninterrupted run.
"""

from __future__ import annotations

import csv
import io
import json
import math
import signal
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from tumorseg.augment import augment_batch, crop_batch, replace_sequences
from tumorseg.checkpoint import read_checkpoint, save_checkpoint
from tumorseg.config import NORM_PERCENTILES, TrainConfig
from tumorseg.data.cache import Cache
from tumorseg.data.dataset import SliceArrays, load_arrays
from tumorseg.data.splits import Split, load_split, make_split, save_split
from tumorseg.errors import TumorsegError
from tumorseg.fileio import atomic_write_text
from tumorseg.inference import autocast, binarize, resolve_precision, select_device
from tumorseg.losses import make_loss
from tumorseg.metrics import confusion_counts, dice_from_counts
from tumorseg.model import UNet

METRIC_FIELDS = ["epoch", "train_loss", "val_loss", "val_dice_mean", "val_dice_median", "lr",
                 "seconds", "train_img_s"]


def _generator(*keys: int) -> torch.Generator:
    g = torch.Generator()
    # A fixed mixing of the keys: hash() of a tuple of ints does not depend on
    # PYTHONHASHSEED and is the same on every run of one CPython version.
    g.manual_seed(hash(tuple(keys)) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def epoch_order(cfg: TrainConfig, tumour: torch.Tensor, epoch: int) -> torch.Tensor:
    """Indices of the training slices seen in `epoch`, in order.

    tumour_fraction < 0: every slice once, shuffled (the original). Otherwise
    `samples_per_epoch` (default: number of slices) draws, `tumour_fraction` of them
    from slices with tumour and the rest from all slices.
    """
    g = _generator(cfg.seed, epoch)
    n = tumour.numel()
    if cfg.tumour_fraction < 0:
        return torch.randperm(n, generator=g)
    total = cfg.samples_per_epoch or n
    pos = torch.nonzero(tumour).flatten()
    n_pos = round(cfg.tumour_fraction * total) if pos.numel() else 0
    pick_pos = pos[torch.randint(pos.numel(), (n_pos,), generator=g)] if n_pos else pos[:0]
    pick_any = torch.randint(n, (total - n_pos,), generator=g)
    both = torch.cat([pick_pos, pick_any])
    return both[torch.randperm(both.numel(), generator=g)]


def batches_of(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Split an epoch order into batches; a final batch of one slice is dropped
    (BatchNorm cannot train on it)."""
    out = list(order.split(batch_size))
    if len(out) > 1 and out[-1].numel() == 1:
        out.pop()
    return out


@dataclass
class EpochProgress:
    """Where a run stands inside an epoch; saved on interruption."""

    epoch: int = 0
    step: int = 0
    loss_sum: float = 0.0
    images: int = 0
    seconds: float = 0.0


def make_training_batch(arrays: SliceArrays, idx: torch.Tensor, cfg: TrainConfig, epoch: int,
                        step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised (and, per config, cropped and augmented) images and masks of one step."""
    x, y = arrays.batch(idx)
    g = _generator(cfg.seed, epoch, step)
    if cfg.crop:
        x, y = crop_batch(x, y, cfg.crop, g)
    if cfg.augment:
        names = [c.lower() for c in cfg.channels]
        if "flair" in names:
            flair = names.index("flair")
            others = [c for c in range(len(names)) if c != flair]
            x = replace_sequences(x, flair, others, cfg.sequence_dropout, g)
        x, y = augment_batch(x, y, g)
    return x, y


def train_one_epoch(
    model: nn.Module, arrays: SliceArrays, cfg: TrainConfig, optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module, device: torch.device, dtype: torch.dtype | None, progress: EpochProgress,
    show_progress: bool = True, on_step: Callable[[EpochProgress], None] | None = None,
) -> float:
    """Train on the batches of `progress.epoch` from `progress.step` on; returns the mean
    training loss of the epoch. `progress` is updated after every step."""
    model.train()
    order = epoch_order(cfg, arrays.tumour(), progress.epoch)
    batches = batches_of(order, cfg.batch_size)
    bar = tqdm(total=len(batches), initial=progress.step, desc=f"epoch {progress.epoch + 1}/{cfg.epochs}",
               unit="batch", disable=not show_progress, leave=False, dynamic_ncols=True)
    try:
        for step in range(progress.step, len(batches)):
            t0 = time.perf_counter()
            x, y = make_training_batch(arrays, batches[step], cfg, progress.epoch, step)
            x, y = x.to(device), y.to(device)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, dtype):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            if not torch.isfinite(loss):
                raise TumorsegError(f"training loss became {loss.item()} at epoch {progress.epoch + 1} "
                                    f"step {step}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            dt = time.perf_counter() - t0
            progress.step = step + 1
            progress.loss_sum += float(loss.detach()) * x.shape[0]
            progress.images += x.shape[0]
            progress.seconds += dt
            bar.update(1)
            bar.set_postfix(loss=f"{progress.loss_sum / progress.images:.4f}",
                            img_s=f"{progress.images / max(progress.seconds, 1e-9):.1f}")
            if on_step is not None:
                on_step(progress)
    finally:
        bar.close()
    return progress.loss_sum / max(progress.images, 1)


@torch.inference_mode()
def validate(
    model: nn.Module, arrays: SliceArrays, loss_fn: nn.Module, device: torch.device,
    dtype: torch.dtype | None, *, threshold: float = 0.5, postprocess: str = "none",
    batch_size: int = 16, channels_last: bool = True,
) -> dict[str, Any]:
    """Validation loss (the loss of each patient's chunks of `batch_size` slices, weighted by
    chunk size, averaged over slices) and per-patient Dice (one Dice per patient over
    all its slices, after thresholding and optional post-processing)."""
    model.eval()
    loss_sum, n = 0.0, 0
    dices: dict[str, float] = {}
    for i, patient in enumerate(arrays.patients):
        idx = arrays.patient_slices(i)
        probs = []
        for chunk in idx.split(batch_size):
            x, y = arrays.batch(chunk)
            x, y = x.to(device), y.to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, dtype):
                logits = model(x)
            loss_sum += float(loss_fn(logits.float(), y)) * x.shape[0]
            n += x.shape[0]
            probs.append(torch.sigmoid(logits.float()).cpu())
        pred = binarize(torch.cat(probs), threshold, postprocess)
        truth = arrays.masks[idx, 0].numpy() > 0
        dices[patient] = dice_from_counts(confusion_counts(pred, truth))
    values = np.array(list(dices.values()))
    return {
        "val_loss": loss_sum / max(n, 1),
        "val_dice_mean": float(values.mean()),
        "val_dice_median": float(np.median(values)),
        "per_patient": dices,
    }


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer):
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[cfg.lr_step], gamma=cfg.lr_gamma)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)


def build_training(cfg: TrainConfig, device: torch.device):
    """The seeded model (in the configured memory layout), Adam, its schedule and the loss
    of a run, as `fit` uses them; returns (model, optimizer, scheduler, loss_fn)."""
    torch.manual_seed(cfg.seed)
    model = UNet.from_config(cfg.model_config()).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return model, optimizer, make_scheduler(cfg, optimizer), make_loss(cfg.loss)


def write_metrics_csv(rows: list[dict[str, Any]], path: Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


class StopTraining(Exception):
    """Raised at a step boundary after a stop was requested (Ctrl-C, kill, or a step limit)."""


class _StopRequest:
    """Ctrl-C and SIGTERM only set a flag; training stops at the next step boundary, where
    weights, optimiser and progress are consistent, so the saved state resumes exactly.
    A second Ctrl-C stops at once (and saves nothing)."""

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


@contextmanager
def _graceful_stop():
    request = _StopRequest()
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, request)
    except ValueError:  # not the main thread: signals cannot be handled here
        pass
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class FitResult:
    run_dir: Path
    epochs_done: int
    best_epoch: int
    best_dice: float
    history: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False


def prepare_split(cfg: TrainConfig, cache: Cache, run_dir: Path, split_file: str | Path | None,
                  resume: bool = False) -> Split:
    """The split of this run: the run's own splits.json when resuming, `split_file` if
    given, or a new seeded split; always written to RUN_DIR/splits.json."""
    own = run_dir / "splits.json"
    if resume and own.is_file():
        split = load_split(own)
    elif split_file is not None:
        split = load_split(split_file)
    else:
        split = make_split(cache.patients, cfg.folds, cfg.test_fraction, cfg.split_seed)
    missing = sorted({p for f in split.folds for p in f} - set(cache.patients))
    if missing:
        raise TumorsegError(f"split names patients absent from the data: {', '.join(missing[:5])}")
    if len(split.folds) != cfg.folds:
        raise TumorsegError(f"split has {len(split.folds)} folds, config asks for {cfg.folds}")
    save_split(split, own)
    return split


def fit(
    cfg: TrainConfig,
    cache: Cache,
    run_dir: str | Path,
    *,
    resume: bool = False,
    device: str = "auto",
    split_file: str | Path | None = None,
    show_progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    stop_after_steps: int | None = None,
    data_path: str | None = None,
) -> FitResult:
    """Train a U-Net by `cfg` on `cache`, writing everything into `run_dir`.

    Writes config.json, splits.json, metrics.csv, training_curves.png, last.pt (every
    epoch, and on interruption with the position inside the epoch) and best.pt (best
    validation per-patient Dice mean). With `resume`, continues from run_dir/last.pt.
    Ctrl-C or SIGTERM stops at the next step boundary and saves last.pt, as does
    `stop_after_steps` after that many optimiser steps.

    Raises:
        TumorsegError: bad config/split/data, or a diverging loss.
    """
    from tumorseg.plots import plot_training_curves

    run_dir = Path(run_dir)
    last_path = run_dir / "last.pt"
    state: dict[str, Any] | None = None
    if resume:
        if not last_path.is_file():
            raise TumorsegError(f"cannot resume: {last_path} does not exist")
        state = read_checkpoint(last_path)
        cfg = TrainConfig.from_dict(state["config"])
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=1) + "\n")
    split = prepare_split(cfg, cache, run_dir, split_file, resume)
    if cfg.fold < 0:  # a final model: every non-test patient trains, nothing validates
        train_patients, val_patients = split.train_all(), []
    else:
        train_patients, val_patients = split.train(cfg.fold), split.val(cfg.fold)

    dev = select_device(device)
    dtype = resolve_precision(cfg.precision, dev)
    model, optimizer, scheduler, loss_fn = build_training(cfg, dev)
    history: list[dict[str, Any]] = []
    progress = EpochProgress()
    best = {"epoch": 0, "dice": -math.inf}
    if state is not None:
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = list(state["history"])
        progress = EpochProgress(**state["progress"])
        best = dict(state["best"])
        torch.set_rng_state(state["rng"]["torch"])

    train = load_arrays(cache, train_patients, cfg.channels)
    val = load_arrays(cache, val_patients, cfg.channels) if val_patients else None

    def checkpoint(path: Path, metrics: dict[str, Any] | None = None) -> None:
        save_checkpoint(
            path, model,
            config=cfg.to_dict(), channels=list(cfg.channels),
            normalization={"method": "per-patient volume percentiles, clipped to [0, 1]",
                           "percentiles": list(NORM_PERCENTILES)},
            threshold=cfg.threshold, postprocess=cfg.postprocess,
            epoch=progress.epoch, progress=progress.__dict__.copy(),
            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            rng={"torch": torch.get_rng_state()}, history=history, best=best,
            metrics=metrics or {}, split={"fold": cfg.fold, "train": train_patients, "val": val_patients},
            data_path=data_path,
        )

    steps_done = 0

    interrupted = False
    last_metrics: dict[str, Any] = dict(state["metrics"]) if state is not None else {}
    with _graceful_stop() as stop:

        def on_step(p: EpochProgress) -> None:
            nonlocal steps_done
            steps_done += 1
            if stop_after_steps is not None and steps_done >= stop_after_steps:
                stop.requested = True
            stop.check()

        try:
            while progress.epoch < cfg.epochs:
                train_loss = train_one_epoch(model, train, cfg, optimizer, loss_fn, dev, dtype, progress,
                                             show_progress, on_step)
                if val is not None:
                    v = validate(model, val, loss_fn, dev, dtype, threshold=cfg.threshold,
                                 postprocess=cfg.postprocess, channels_last=cfg.channels_last)
                else:
                    v = {"val_loss": math.nan, "val_dice_mean": math.nan, "val_dice_median": math.nan,
                         "per_patient": {}}
                row = {
                    "epoch": progress.epoch + 1, "train_loss": train_loss, "val_loss": v["val_loss"],
                    "val_dice_mean": v["val_dice_mean"], "val_dice_median": v["val_dice_median"],
                    "lr": optimizer.param_groups[0]["lr"], "seconds": progress.seconds,
                    "train_img_s": progress.images / max(progress.seconds, 1e-9),
                }
                history.append(row)
                with warnings.catch_warnings():
                    # After a resume at the very end of an epoch this process made no
                    # optimiser step yet; the restored schedule is still right.
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                    scheduler.step()
                progress = EpochProgress(epoch=progress.epoch + 1)
                improved = val is not None and v["val_dice_mean"] > best["dice"]
                if improved:
                    best = {"epoch": row["epoch"], "dice": v["val_dice_mean"]}
                last_metrics = {**row, "val_per_patient": v["per_patient"]}
                if improved:  # best.pt first: last.pt never names a best epoch not yet saved
                    checkpoint(run_dir / "best.pt", last_metrics)
                checkpoint(last_path, last_metrics)
                write_metrics_csv(history, run_dir / "metrics.csv")
                plot_training_curves(history, run_dir / "training_curves.png")
                if show_progress:
                    tqdm.write(
                        f"epoch {row['epoch']}/{cfg.epochs}: train loss {train_loss:.4f}  "
                        f"val loss {v['val_loss']:.4f}  val Dice mean {v['val_dice_mean']:.4f} "
                        f"median {v['val_dice_median']:.4f}  {row['train_img_s']:.1f} img/s"
                        + ("  *best*" if improved else "")
                    )
                if on_epoch is not None:
                    on_epoch(row)
                stop.check()
        except StopTraining:
            interrupted = True
            checkpoint(last_path, last_metrics)
        except KeyboardInterrupt:  # second Ctrl-C: the state may be torn, keep the last save
            interrupted = True
    return FitResult(run_dir, progress.epoch, int(best["epoch"]), float(best["dice"]), history, interrupted)
