"""Training: plain functions. `train_one_epoch` and `validate` do one pass each; `fit`
runs a whole training into a run folder (`runs.TrainingDir`) in named steps
(`_set_up`, `_run_epoch`, `_validation`, `_save`); `run_training` starts or resumes one
from the command line's arguments (a data path, a config or a run folder).

A run interrupted at any step (Ctrl-C, SIGTERM, a step limit) saves last.pt with its
position inside the epoch and resumes exactly: the batches come from data.sampling's
seeded generators, and on the CPU the final weights equal those of an uninterrupted run.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from tumorseg.checkpoint import Checkpoint, TrainingState, load_checkpoint, load_member, save_checkpoint
from tumorseg.config import NORM_PERCENTILES, InferenceConfig, TrainConfig, merge_layers, parse_channels
from tumorseg.data.cache import Cache, open_data
from tumorseg.data.dataset import SliceArrays, load_arrays
from tumorseg.data.sampling import SAMPLER, batches_of, epoch_order, training_batch
from tumorseg.data.splits import Split, load_split, make_split, save_split
from tumorseg.distributed import (
    SINGLE,
    World,
    any_rank,
    barrier,
    broadcast,
    gather,
    shard_of,
    split_patients,
    sum_across_ranks,
    world_from_env,
)
from tumorseg.distributed import init as init_distributed
from tumorseg.errors import TumorsegError
from tumorseg.fileio import atomic_write_text, check_output_dir, prepare_output_dir, undo_on_failure
from tumorseg.inference import Predictor
from tumorseg.losses import make_loss
from tumorseg.metrics import score_patient
from tumorseg.model import FIRST_CONV, UNet
from tumorseg.postprocess import binarize
from tumorseg.runs import TrainingDir
from tumorseg.runtime import (
    StopRequest,
    StopTraining,
    autocast,
    graceful_stop,
    precision_name,
    resolve_precision,
    select_device,
)

log = logging.getLogger(__name__)

METRIC_FIELDS = ["epoch", "train_loss", "val_loss", "val_dice_mean", "val_dice_median", "lr",
                 "seconds", "train_img_s"]


@dataclass
class EpochProgress:
    """Where a run stands inside an epoch; saved on interruption."""

    epoch: int = 0
    step: int = 0
    loss_sum: float = 0.0
    images: int = 0
    seconds: float = 0.0


def train_one_epoch(
    model: nn.Module, arrays: SliceArrays, cfg: TrainConfig, optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module, device: torch.device, dtype: torch.dtype | None, progress: EpochProgress,
    show_progress: bool = True, on_step: Callable[[EpochProgress], None] | None = None,
    world: World = SINGLE,
) -> float:
    """Train on the batches of `progress.epoch` from `progress.step` on; returns the mean
    training loss of the epoch (this process's). `progress` is updated after every step.

    Under torchrun (`world`), a step's global batch is `cfg.batch_size` x world.size slices
    of the epoch order, built (cropped, augmented) whole on every rank as in a single
    process, and each rank trains on its shard; an incomplete last global batch is dropped.
    """
    model.train()
    order = epoch_order(cfg, arrays.tumour(), progress.epoch)
    batches = global_batches(order, cfg.batch_size, world.size)
    # A bar only on a terminal (disable=None): logs of background runs keep the epoch lines.
    bar = tqdm(total=len(batches), initial=progress.step, desc=f"epoch {progress.epoch + 1}/{cfg.epochs}",
               unit="batch", disable=None if show_progress else True, leave=False, dynamic_ncols=True)
    try:
        for step in range(progress.step, len(batches)):
            t0 = time.perf_counter()
            x, y = training_batch(arrays, batches[step], cfg, progress.epoch, step)
            if world.distributed:
                shard = shard_of(x, world)
                x, y = x[shard], y[shard]
            x, y = x.to(device), y.to(device)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, dtype):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            if any_rank(not bool(torch.isfinite(loss)), device):  # every rank stops, or none
                raise TumorsegError(f"training loss became {loss.item()} at epoch {progress.epoch + 1} "
                                    f"step {step}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            dt = time.perf_counter() - t0
            progress.step = step + 1
            # images count the global batch; loss_sum / images is this process's mean loss
            progress.loss_sum += float(loss.detach()) * x.shape[0] * world.size
            progress.images += x.shape[0] * world.size
            progress.seconds += dt
            bar.update(1)
            bar.set_postfix(loss=f"{progress.loss_sum / progress.images:.4f}",
                            img_s=f"{progress.images / max(progress.seconds, 1e-9):.1f}")
            if on_step is not None:
                on_step(progress)
    finally:
        bar.close()
    return progress.loss_sum / max(progress.images, 1)


def global_batches(order: torch.Tensor, batch_size: int, world_size: int = 1) -> list[torch.Tensor]:
    """The batches of an epoch order: of `batch_size` for one process; of batch_size x
    world_size for several, without an incomplete last one (each rank needs a full shard)."""
    if world_size == 1:
        return batches_of(order, batch_size)
    size = batch_size * world_size
    return list(order[: len(order) // size * size].split(size))


def validate(predictor: Predictor, arrays: SliceArrays, loss_fn: nn.Module) -> dict[str, Any]:
    """Validation loss (the loss of each patient's chunks of `predictor.batch_size`
    slices, weighted by chunk size, averaged over slices) and per-patient Dice
    (`metrics.score_patient` after the predictor's threshold and post-processing)."""
    loss_sum, n = 0.0, 0
    dices: dict[str, float] = {}
    for i, patient in enumerate(arrays.patients):
        x, y = arrays.patient_batch(i)  # at the patient's own size: scores never depend on the others
        out = predictor.predict(x, logits=True)
        assert out.logits is not None  # asked for
        for z, t in zip(out.logits.split(predictor.batch_size), y.split(predictor.batch_size), strict=True):
            loss_sum += float(loss_fn(z, t)) * z.shape[0]
            n += z.shape[0]
        pred = binarize(out.probabilities, predictor.inference)
        dices[patient] = score_patient(patient, pred, y[:, 0].numpy() > 0, surface=False).dice
    return merge_validations([{"loss_sum": loss_sum, "slices": n, "per_patient": dices}])


def merge_validations(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One validation result from the parts of several processes (each a share of the
    patients): the loss over all slices, per-patient Dice over all patients."""
    dices = {p: d for part in parts for p, d in part["per_patient"].items()}
    loss_sum, n = sum(part["loss_sum"] for part in parts), sum(part["slices"] for part in parts)
    values = np.array(list(dices.values()))
    return {
        "val_loss": loss_sum / max(n, 1),
        "val_dice_mean": float(values.mean()) if len(values) else math.nan,
        "val_dice_median": float(np.median(values)) if len(values) else math.nan,
        "per_patient": dict(sorted(dices.items())),
        "loss_sum": loss_sum,
        "slices": n,
    }


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer):
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[cfg.lr_step], gamma=cfg.lr_gamma)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)


def build_training(cfg: TrainConfig, device: torch.device):
    """The seeded model (in the configured memory layout), Adam, its schedule and the loss
    of a run, as `fit` uses them; returns (model, optimizer, scheduler, loss_fn)."""
    torch.manual_seed(cfg.seed)
    model = UNet.from_config(cfg.model_config())
    if cfg.init:
        model.load_state_dict(initial_weights(cfg))
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return model, optimizer, make_scheduler(cfg, optimizer), make_loss(cfg.loss)


def initial_weights(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The weights `cfg.init` names: a checkpoint, or model K of an ensemble file
    (`MODEL.pt@K`), in float32.

    Raises:
        TumorsegError: a missing model, or one of another architecture than `cfg`'s.
    """
    chosen = load_member(cfg.init)
    if replace(chosen.model_config, in_channels=len(cfg.channels)) != cfg.model_config():
        raise TumorsegError(f"--init {cfg.init} is a {chosen.model_config} model; the run's config asks for "
                            f"{cfg.model_config()}: give the same depth and features")
    weights = {k: v.float() for k, v in chosen.state_dict.items()}
    if tuple(chosen.channels) != tuple(cfg.channels):
        kept = set(parse_channels(list(cfg.channels)))
        dropped = [n for n, c in zip(chosen.channels, parse_channels(list(chosen.channels)), strict=True)
                   if c not in kept]
        if dropped:
            log.warning(f"--init {cfg.init}: its input channel(s) {', '.join(dropped)} are not among the run's "
                        f"channels; their weights are dropped, so the run does not start from its output")
        weights[FIRST_CONV] = map_input_channels(weights[FIRST_CONV], chosen.channels, cfg.channels)
    return weights


def map_input_channels(weight: torch.Tensor, old: Sequence[str], new: Sequence[str]) -> torch.Tensor:
    """The first convolution's weights (out, len(old), k, k) rearranged for the input
    channels `new`: a channel of `old` keeps its weights, a new one (e.g. `FLAIR+1` of a
    2.5-D model) starts at zero, so the model starts out computing what the old one did."""
    before = {c: i for i, c in enumerate(parse_channels(list(old)))}
    out = weight.new_zeros((weight.shape[0], len(new), *weight.shape[2:]))
    for j, c in enumerate(parse_channels(list(new))):
        if c in before:
            out[:, j] = weight[:, before[c]]
    return out


def write_metrics_csv(rows: list[dict[str, Any]], path: Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


@dataclass
class FitResult:
    run_dir: Path
    epochs_done: int
    best_epoch: int  # 0 when nothing was validated (fold -1)
    best_dice: float
    history: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False
    at_once: bool = False  # a second Ctrl-C: nothing saved since the last epoch's last.pt


def prepare_split(cfg: TrainConfig, cache: Cache, run_dir: Path, split_file: str | Path | None,
                  resume: bool = False, write: bool = True) -> Split:
    """The split of this run: the run's own splits.json when resuming, `split_file` if
    given, or a new seeded split; written to RUN_DIR/splits.json (with `write`)."""
    own = TrainingDir(run_dir).splits
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
    if write:
        save_split(split, own)
    return split


def fit(
    cfg: TrainConfig,
    cache: Cache,
    run_dir: str | Path,
    *,
    inference: InferenceConfig | None = None,
    resume: bool = False,
    device: str = "auto",
    split_file: str | Path | None = None,
    show_progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    stop_after_steps: int | None = None,
    data_path: str | None = None,
) -> FitResult:
    """Train a U-Net by `cfg` on `cache`, writing everything into `run_dir`.

    Writes config.json, inference.json, splits.json, metrics.csv, training_curves.png,
    last.pt (every epoch, and on interruption with the position inside the epoch) and
    best.pt (best validation per-patient Dice mean; none for fold -1). Validation uses
    `inference` (default: threshold 0.5, no post-processing), which the checkpoints record.
    With `resume`, continues from run_dir/last.pt with its saved config and inference
    settings (`cfg` and `inference` are then ignored). Ctrl-C or SIGTERM stops at the next
    step boundary and saves last.pt, as does `stop_after_steps` after that many steps.

    If a new run fails before its first checkpoint, the files it wrote (config.json,
    inference.json, splits.json) are removed again, and its folder if it made it.

    Raises:
        TumorsegError: bad config/split/data, an existing run when not resuming, an
            output folder that cannot be written, or a diverging loss.
    """
    run_dir = Path(run_dir)
    last_path = TrainingDir(run_dir).last
    world = world_from_env()
    state = check_run_dir(run_dir, resume)
    if state is not None:
        assert state.train_config is not None  # check_run_dir
        cfg, inference = state.train_config, state.inference
    inference = inference or InferenceConfig()
    if not world.is_main:  # only rank 0 writes
        return _fit(cfg, cache, run_dir, inference, state, device, split_file, False, on_epoch,
                    stop_after_steps, data_path, world)
    # A failure before the first checkpoint leaves no half-made run behind.
    with undo_on_failure(run_dir, TrainingDir.SETUP_FILES, kept=last_path.exists):
        prepare_output_dir(run_dir)
        return _fit(cfg, cache, run_dir, inference, state, device, split_file, show_progress, on_epoch,
                    stop_after_steps, data_path, world)


def resumed_step(step: int, batch_size: int, saved_world: int, world: int) -> int:
    """The step to resume at with `world` processes after `step` steps with `saved_world`:
    the same; or, for another world size (another global batch), the first whole new
    batch at or after the same position in the epoch's order (a few slices may repeat)."""
    if saved_world == world:
        return step
    done = step * batch_size * saved_world
    new = done // (batch_size * world)
    log.warning(f"resuming a run of {saved_world} process(es) with {world}: the global batch becomes "
                f"{batch_size * world} slices; the epoch continues at slice {new * batch_size * world} of its order")
    return new


def check_run_dir(run_dir: Path, resume: bool) -> Checkpoint | None:
    """Before any work: the run folder can take a new run (it can be written and holds no
    run), or, with `resume`, its last.pt can be resumed; returns that checkpoint.

    Raises:
        TumorsegError: what is wrong, and what to do.
    """
    last = TrainingDir(run_dir).last
    if not resume:
        check_output_dir(run_dir)
        if last.exists():
            raise TumorsegError(f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                                "or choose another --out")
        return None
    if not last.is_file():
        raise TumorsegError(f"cannot resume: {last} does not exist")
    state = load_checkpoint(last)
    if state.training is None or state.train_config is None:
        raise TumorsegError(f"cannot resume: {last} holds no training state (a released model?) or no "
                            "readable training config")
    if state.training.sampler != SAMPLER:
        warnings.warn(f"{last} was started by an older tumorseg that drew its batches differently; the "
                      "resumed run is not identical to an uninterrupted run of that version", stacklevel=2)
    return state


@dataclass
class _Session:
    """Everything one training run works with, made by `_set_up`."""

    cfg: TrainConfig
    files: TrainingDir
    inference: InferenceConfig
    world: World
    device: torch.device
    dtype: torch.dtype | None
    model: nn.Module  # the weights being trained (what checkpoints save)
    trained: nn.Module  # `model`, wrapped in DistributedDataParallel under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: nn.Module  # validation's: no collectives
    train_loss_fn: nn.Module  # pooled across ranks under torchrun
    train: SliceArrays
    val: SliceArrays | None  # this rank's share of the validation patients
    predictor: Predictor  # the live model, unfused: validation sees exactly the weights being trained
    train_patients: list[str]
    val_patients: list[str]
    data_path: str | None
    progress: EpochProgress = field(default_factory=EpochProgress)
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"epoch": 0, "dice": -math.inf})
    last_metrics: dict[str, Any] = field(default_factory=dict)


def _set_up(cfg: TrainConfig, cache: Cache, run_dir: Path, inference: InferenceConfig, state: Checkpoint | None,
            device: str, split_file: str | Path | None, data_path: str | None, world: World) -> _Session:
    """Write the run's config, choose the split, device and precision, build the model,
    optimiser and data, and restore them from `state` when resuming."""
    files = TrainingDir(run_dir)
    resume = state is not None
    main = world.is_main
    if main:
        atomic_write_text(files.config, json.dumps(cfg.to_dict(), indent=1) + "\n")
        atomic_write_text(files.inference, json.dumps(inference.to_dict(), indent=1) + "\n")
    split = prepare_split(cfg, cache, run_dir, split_file, resume, write=main)
    if cfg.fold < 0:  # a final model: every non-test patient trains, nothing validates
        train_patients, val_patients = split.train_all(), []
    else:
        train_patients, val_patients = split.train(cfg.fold), split.val(cfg.fold)

    dev = init_distributed(world, select_device(device))
    if cfg.sync_bn and world.distributed and dev.type != "cuda":
        raise TumorsegError("sync_bn needs CUDA (PyTorch's SyncBatchNorm has no CPU version); on the CPU each "
                            "process normalises its own shard: drop --sync-bn")
    model, optimizer, scheduler, loss_fn = build_training(cfg, dev)
    dtype = _training_precision(cfg, state, dev, model, world)
    what = f"fold {cfg.fold} of {cfg.folds}" if cfg.fold >= 0 else "every non-test patient"
    processes = f", {world.size} processes (global batch {cfg.batch_size * world.size})" if world.distributed else ""
    log.info(f"training {what} into {run_dir} ({'resuming' if resume else 'new run'}) on {dev}, "
             f"{precision_name(dtype)}{processes}")
    progress = EpochProgress()
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": 0, "dice": -math.inf}
    last_metrics: dict[str, Any] = {}
    if state is not None:
        assert state.training is not None  # check_run_dir
        model.load_state_dict(state.state_dict)
        optimizer.load_state_dict(state.training.optimizer)
        scheduler.load_state_dict(state.training.scheduler)
        torch.set_rng_state(state.training.rng["torch"])
        progress = EpochProgress(**state.training.progress)
        history, best, last_metrics = list(state.history), dict(state.best), dict(state.metrics)
        data_path = data_path or state.training.data_path
        progress.step = resumed_step(progress.step, cfg.batch_size, state.training.world_size, world.size)
    if cfg.sync_bn and world.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    trained: nn.Module = model
    if world.distributed:  # gradients averaged across ranks in backward
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    train = load_arrays(cache, train_patients, cfg.channels)
    per_epoch = cfg.samples_per_epoch or len(train)
    if world.distributed and per_epoch < cfg.batch_size * world.size:  # (one process keeps a partial batch)
        raise TumorsegError(f"an epoch of {per_epoch} slices holds no global batch of {cfg.batch_size} x "
                            f"{world.size} processes; raise --samples-per-epoch or lower --batch-size")
    height, width = train.images.shape[-2:]
    if cfg.crop > min(height, width):
        raise TumorsegError(f"crop {cfg.crop} is larger than the {height}x{width} slices of the data; "
                            f"use --crop {min(height, width)} or less, or --crop 0 for whole slices")
    mine = split_patients(val_patients, world)  # validation is sharded by patient, then gathered
    val = load_arrays(cache, mine, cfg.channels) if mine else None
    predictor = Predictor([model], channels=cfg.channels, inference=inference, device=dev,
                          precision=precision_name(dtype), channels_last=cfg.channels_last, fuse=False)
    return _Session(cfg=cfg, files=files, inference=inference, world=world, device=dev, dtype=dtype, model=model,
                    trained=trained, optimizer=optimizer, scheduler=scheduler, loss_fn=loss_fn,
                    train_loss_fn=make_loss(cfg.loss, pool=sum_across_ranks), train=train, val=val,
                    predictor=predictor, train_patients=train_patients, val_patients=val_patients,
                    data_path=data_path, progress=progress, history=history, best=best, last_metrics=last_metrics)


def _training_precision(cfg: TrainConfig, state: Checkpoint | None, dev: torch.device, model: nn.Module,
                        world: World) -> torch.dtype | None:
    """The autocast dtype of the run: a resumed run keeps the precision it started in;
    a new one resolves `cfg.precision` (timed for "auto"); under torchrun every rank
    trains in rank 0's choice."""
    recorded = state.training.precision if state is not None and state.training is not None else ""
    dtype: torch.dtype | None = None
    if cfg.precision == "auto" and recorded:
        dtype = resolve_precision(recorded, dev)
    elif world.is_main:
        side = cfg.crop or 256
        dtype = resolve_precision(cfg.precision, dev, model, train=True,
                                  sample=(cfg.batch_size, len(cfg.channels), side, side),
                                  channels_last=cfg.channels_last)
    if world.distributed:
        dtype = resolve_precision(broadcast(precision_name(dtype) if world.is_main else ""), dev)
    return dtype


def _save(run: _Session, path: Path) -> None:
    """Save the run's whole state (weights, optimiser, schedule, RNG, position) to `path`."""
    cfg = run.cfg
    save_checkpoint(path, Checkpoint.of_model(
        run.model, channels=cfg.channels, percentiles=NORM_PERCENTILES, inference=run.inference,
        train_config=cfg, epoch=run.progress.epoch, history=run.history, best=run.best, metrics=run.last_metrics,
        split={"fold": cfg.fold, "train": run.train_patients, "val": run.val_patients},
        training=TrainingState(optimizer=run.optimizer.state_dict(), scheduler=run.scheduler.state_dict(),
                               rng={"torch": torch.get_rng_state()}, progress=asdict(run.progress),
                               data_path=run.data_path, sampler=SAMPLER, precision=precision_name(run.dtype),
                               world_size=run.world.size),
    ))


def _validation(run: _Session) -> dict[str, Any]:
    """This epoch's validation, gathered across ranks (NaN scores for fold -1)."""
    if not run.val_patients:
        return {"val_loss": math.nan, "val_dice_mean": math.nan, "val_dice_median": math.nan, "per_patient": {}}
    part = (validate(run.predictor, run.val, run.loss_fn) if run.val is not None
            else {"loss_sum": 0.0, "slices": 0, "per_patient": {}})
    return merge_validations(gather(part))


def _run_epoch(run: _Session, show_progress: bool, on_step: Callable[[EpochProgress], None]) -> tuple[dict, bool]:
    """Train and validate one epoch, step the schedule, and save (rank 0): best.pt when
    validation improved, then last.pt, metrics.csv and the curves. Returns (the epoch's
    row, whether it improved)."""
    from tumorseg.plots import plot_training_curves  # matplotlib: loaded when a plot is drawn

    cfg, progress = run.cfg, run.progress
    train_loss = train_one_epoch(run.trained, run.train, cfg, run.optimizer, run.train_loss_fn, run.device,
                                 run.dtype, progress, show_progress, on_step, run.world)
    v = _validation(run)
    row = {
        "epoch": progress.epoch + 1, "train_loss": train_loss, "val_loss": v["val_loss"],
        "val_dice_mean": v["val_dice_mean"], "val_dice_median": v["val_dice_median"],
        "lr": run.optimizer.param_groups[0]["lr"], "seconds": progress.seconds,
        "train_img_s": progress.images / max(progress.seconds, 1e-9),
    }
    run.history.append(row)
    with warnings.catch_warnings():
        # After a resume at the very end of an epoch this process made no optimiser step
        # yet; the restored schedule is still right.
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        run.scheduler.step()
    run.progress = EpochProgress(epoch=progress.epoch + 1)
    improved = bool(run.val_patients) and v["val_dice_mean"] > run.best["dice"]
    if improved:
        run.best = {"epoch": row["epoch"], "dice": v["val_dice_mean"]}
    run.last_metrics = {**row, "val_per_patient": v["per_patient"]}
    if run.world.is_main:
        if improved:  # best.pt first: last.pt never names a best epoch not yet saved
            _save(run, run.files.best)
        _save(run, run.files.last)
        write_metrics_csv(run.history, run.files.metrics)
        plot_training_curves(run.history, run.files.curves)
    scores = (f"val loss {v['val_loss']:.4f}  val Dice mean {v['val_dice_mean']:.4f} "
              f"median {v['val_dice_median']:.4f}" if run.val_patients else f"no validation (fold {cfg.fold})")
    log.info(f"epoch {row['epoch']}/{cfg.epochs}: train loss {train_loss:.4f}  {scores}  "
             f"{row['train_img_s']:.1f} img/s" + ("  *best*" if improved else ""))
    return row, improved


def _fit(cfg: TrainConfig, cache: Cache, run_dir: Path, inference: InferenceConfig, state: Checkpoint | None,
         device: str, split_file: str | Path | None, show_progress: bool,
         on_epoch: Callable[[dict[str, Any]], None] | None, stop_after_steps: int | None,
         data_path: str | None, world: World) -> FitResult:
    """Set up, then run epochs until done or stopped (Ctrl-C, SIGTERM, a step limit:
    last.pt is saved with the position inside the epoch)."""
    run = _set_up(cfg, cache, run_dir, inference, state, device, split_file, data_path, world)
    steps_done = 0
    interrupted = at_once = False
    with graceful_stop() as stop:

        def check_stop() -> None:
            if stop_agreed(stop, world, run.device):
                raise StopTraining

        def on_step(p: EpochProgress) -> None:
            nonlocal steps_done
            steps_done += 1
            if stop_after_steps is not None and steps_done >= stop_after_steps:
                stop.requested = True
            check_stop()

        try:
            while run.progress.epoch < cfg.epochs:
                row, _ = _run_epoch(run, show_progress, on_step)
                if on_epoch is not None:
                    on_epoch(row)
                if run.progress.epoch < cfg.epochs:  # a signal during validation or saving; a finished run is done
                    check_stop()
        except StopTraining:
            interrupted = True
            if world.is_main:
                _save(run, run.files.last)
        except KeyboardInterrupt:  # second Ctrl-C: the state may be torn, keep the last save
            # (under torchrun the other ranks are ended by torchrun when this one exits)
            interrupted = at_once = True
    best_dice = float(run.best["dice"]) if run.best["epoch"] else math.nan
    return FitResult(run_dir, run.progress.epoch, int(run.best["epoch"]), best_dice, run.history, interrupted,
                     at_once)


def stop_agreed(stop: StopRequest, world: World, device: torch.device) -> bool:
    """Whether to stop at this step boundary. Under torchrun a signal on any rank stops
    every rank at the same step: the all_reduced answer decides, and the local flag is
    never written back, so a signal handled during the collective is not lost but waits
    for the next check on every rank alike."""
    if world.distributed:
        return any_rank(stop.requested, device)
    return stop.requested


def resolve_run(*, resume: str | Path | None, data: str | Path | None, preset: str | None,
                config: str | Path | None, options: dict[str, Any], inference_options: dict[str, Any],
                out: str | Path | None, split: str | Path | None) -> tuple[Path, TrainConfig | None,
                                                                     InferenceConfig | None]:
    """(run folder, config, inference settings) of `tumorseg train`: a resumed run keeps
    its saved config (and refuses options that would change it); a new one layers the
    preset, the config file and the options, in a folder named by preset and fold unless
    `out` names one.

    Raises:
        TumorsegError: options given with `resume`, or no data for a new run.
    """
    if resume:
        changed = [f"--{k.replace('_', '-')}" for k, v in {**options, **inference_options}.items() if v is not None]
        changed += [o for o, v in (("--preset", preset), ("--config", config), ("--split", split), ("--out", out))
                    if v]
        if changed:
            raise TumorsegError(f"--resume continues the saved config; drop {', '.join(changed)}")
        return Path(resume), None, None
    if not data:
        raise TumorsegError("--data is required (the kaggle_3m folder or a prepared cache)")
    cfg = merge_layers(preset, config, options)
    inference = InferenceConfig().replace(**inference_options)
    name = f"fold{cfg.fold}" if cfg.fold >= 0 else "all"
    return (Path(out) if out else Path("runs") / f"{preset or 'default'}-{name}"), cfg, inference


def run_training(
    run_dir: str | Path,
    *,
    data: str | Path | None = None,
    cfg: TrainConfig | None = None,
    inference: InferenceConfig | None = None,
    resume: bool = False,
    split_file: str | Path | None = None,
    device: str = "auto",
    show_progress: bool = True,
) -> FitResult:
    """Start a run of `cfg` on the data at `data` (a kaggle_3m folder or a prepared
    cache), or with `resume` continue the run in `run_dir` (its data path is remembered;
    `data` overrides it, e.g. after moving the data).

    Raises:
        TumorsegError: no data, nothing to resume, or what `fit` raises.
    """
    run_dir = Path(run_dir)
    if not resume and data is None:
        raise TumorsegError("--data is required (the kaggle_3m folder or a prepared cache)")
    state = check_run_dir(run_dir, resume)  # before the data are read
    if state is not None:
        assert state.training is not None and state.train_config is not None  # check_run_dir
        data = data or state.training.data_path
        if not data:
            raise TumorsegError("pass --data with --resume")
        cfg = state.train_config
    cfg = cfg or TrainConfig()
    assert data is not None
    world = world_from_env()
    if world.distributed:  # rank 0 decodes the data once; the others then find the cache up to date
        init_distributed(world, select_device(device))
        cache = open_data(data, progress=show_progress) if world.is_main else None
        barrier()
        if cache is None:
            cache = open_data(data, progress=False)
    else:
        cache = open_data(data, progress=show_progress)
    return fit(cfg, cache, run_dir, inference=inference, resume=resume, device=device, split_file=split_file,
               show_progress=show_progress, data_path=str(Path(data).resolve()))
