"""Command-line interface: argument parsing only; each command calls a typed function.

Errors caused by the user's input are printed on one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from tumorseg.config import PRESETS, TrainConfig, load_config_file, preset, replace_config
from tumorseg.errors import TumorsegError

FIELD_HELP = {
    "channels": "input sequences by name, comma-separated (pre-contrast,FLAIR,post-contrast)",
    "folds": "number of patient-level folds",
    "fold": "validation fold of this run (0-based); -1 trains on every non-test patient without validation",
    "test_fraction": "fraction of patients held out from all folds",
    "split_seed": "seed of the patient shuffle that makes the split",
    "n_features": "U-Net width of every level (when --features is not given)",
    "depth": "U-Net levels including the bottleneck (>= 2)",
    "features": "per-level widths, comma-separated, e.g. 32,64,128,256; none = --n-features at every level",
    "epochs": "training epochs",
    "batch_size": "slices per optimiser step",
    "lr": "Adam learning rate",
    "weight_decay": "Adam weight decay",
    "schedule": "learning-rate schedule: step or cosine",
    "lr_step": "epoch of the step decay (schedule step)",
    "lr_gamma": "factor of the step decay",
    "loss": "dice (batch-pooled, the original), dice_per_image or bce_dice",
    "augment": "flips, rotation, scaling, intensity jitter: true/false",
    "sequence_dropout": "share of training slices whose non-FLAIR sequences are replaced by FLAIR, "
                        "as kaggle_3m does for missing sequences (with --augment)",
    "tumour_fraction": "share of slices drawn from tumour slices; negative = every slice once per epoch",
    "samples_per_epoch": "slices per epoch; 0 = number of training slices",
    "crop": "train on crop x crop patches; 0 = whole slices",
    "seed": "seed of weights, slice order and augmentation",
    "precision": "auto (bf16 where the hardware has it), bf16 or fp32",
    "channels_last": "channels-last memory layout: true/false",
    "threshold": "probability threshold for validation Dice (stored in checkpoints)",
    "postprocess": "none or lcc (largest 3-D connected component); stored in checkpoints",
}


def _describe(name: str) -> str:
    d = getattr(preset("default"), name)
    s = PRESETS["seed"].get(name, d)
    fmt = lambda v: ",".join(map(str, v)) if isinstance(v, tuple) else v  # noqa: E731
    return f"{FIELD_HELP[name]} (default preset: {fmt(d)}; seed preset: {fmt(s)})"


def _add_common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None,
                   help="tumorseg checkpoint or the original unet.pt (default: the model shipped "
                        "with the package)")
    p.add_argument("--threshold", type=float, default=None,
                   help="probability threshold (default: the checkpoint's, 0.5 for unet.pt)")
    p.add_argument("--postprocess", choices=["none", "lcc"], default=None,
                   help="none, or lcc to keep the largest 3-D connected component "
                        "(default: the checkpoint's)")
    p.add_argument("--tta", action="store_true", help="average with the horizontally flipped image (default: off)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto uses bf16 on CPUs/GPUs with native bf16 (default: auto)")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default: auto)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars (default: shown)")


def build_parser() -> argparse.ArgumentParser:
    from tumorseg import __version__

    parser = argparse.ArgumentParser(
        prog="tumorseg",
        description="Brain-tumour segmentation in MRI (TCGA-LGG kaggle_3m) with a U-Net.",
    )
    parser.add_argument("--version", action="version", version=f"tumorseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="decode a kaggle_3m folder into a cache (run once)",
                       description="Decode the TIFFs of a kaggle_3m folder once into a cache of raw "
                                   "uint8 arrays with per-patient normalisation statistics. Other "
                                   "commands do this automatically when given the raw folder.")
    p.add_argument("raw_dir", help="the kaggle_3m folder (or the folder holding it)")
    p.add_argument("--out", default=None,
                   help="cache folder (default: $TUMORSEG_CACHE or ~/.cache/tumorseg, "
                        "/<name>-<hash of the path>)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar (default: shown)")

    p = sub.add_parser("train", help="train a U-Net",
                       description="Train a U-Net on one fold of a patient-level split. Settings "
                                   "come from the preset, then --config, then the options below.")
    p.add_argument("--data", required=False, help="kaggle_3m folder or a prepared cache (required unless --resume)")
    p.add_argument("--config", default=None, help="JSON/TOML/YAML file of config fields (default: none)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="seed = the original recipe; default = tumorseg's recipe (default: default)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<preset>-fold<K>)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last.pt (default: start a new run)")
    p.add_argument("--split", default=None, help="use this splits.json instead of making one (default: none)")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default: auto)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for PyTorch (default: PyTorch's choice, the physical cores)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars (default: shown)")
    for f in dataclasses.fields(TrainConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f"cfg_{f.name}", default=None,
                       metavar=f.name.upper(), help=_describe(f.name))

    p = sub.add_parser("evaluate", help="per-patient scores and a report on labelled data",
                       description="Score a model on labelled patients: per-patient Dice, IoU, "
                                   "precision, recall, HD95; report.json, per_patient.csv and plots.")
    p.add_argument("--data", required=True, help="kaggle_3m folder or a prepared cache (required)")
    p.add_argument("--out", default="report", help="report folder (default: report)")
    p.add_argument("--split", default=None,
                   help="splits.json of a run: evaluate only its held-out patients (default: all patients)")
    p.add_argument("--fold", type=int, default=None,
                   help="with --split: evaluate the validation patients of this fold "
                        "(default: the split's test patients)")
    p.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="voxel spacing in mm to also report HD95 in mm (default: pixels only)")
    _add_common_model_args(p)

    p = sub.add_parser("predict", help="tumour masks for new images (no masks needed)",
                       description="Predict masks for patient folders, folders of slices or single "
                                   ".tif/.png slices. A folder is normalised as one volume; a "
                                   "single slice with its own percentiles.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="patient folder, folder of slices, or slice files")
    p.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    p.add_argument("--overlay", action="store_true", help="also write an overlay PNG per slice (default: off)")
    p.add_argument("--batch-size", type=int, default=16, help="slices per forward pass (default: 16)")
    _add_common_model_args(p)
    return parser


def _cmd_prepare(a: argparse.Namespace) -> int:
    from tumorseg.data.cache import prepare

    cache = prepare(a.raw_dir, a.out, progress=not a.no_progress)
    slices = sum(len(r.slices) for r in cache.records.values())
    tumour = sum(r.tumour_slices for r in cache.records.values())
    print(f"cache {cache.root}: {len(cache)} patients, {slices} slices ({tumour} with tumour)")
    return 0


def _train_config(a: argparse.Namespace) -> TrainConfig:
    """Preset, then config file, then options; merged first and checked once, so that
    layers may change related fields together (e.g. depth in the file, features here)."""
    name = a.preset or "default"
    preset(name)  # rejects an unknown preset by name
    merged = dict(PRESETS[name])
    if a.config:
        merged.update(load_config_file(a.config))
    merged.update({f.name: getattr(a, f"cfg_{f.name}") for f in dataclasses.fields(TrainConfig)
                   if getattr(a, f"cfg_{f.name}") is not None})
    return replace_config(TrainConfig(), merged)


def _cmd_train(a: argparse.Namespace) -> int:
    import torch

    from tumorseg.data.cache import open_data
    from tumorseg.engine import fit

    if a.threads is not None:
        if a.threads < 1:
            raise TumorsegError(f"--threads must be >= 1, got {a.threads}")
        torch.set_num_threads(a.threads)
    if a.resume:
        changed = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(TrainConfig)
                   if getattr(a, f"cfg_{f.name}") is not None]
        changed += [o for o, v in (("--preset", a.preset), ("--config", a.config), ("--split", a.split),
                                   ("--out", a.out)) if v]
        if changed:
            raise TumorsegError(f"--resume continues the saved config; drop {', '.join(changed)}")
        run_dir = Path(a.resume)
        last = run_dir / "last.pt"
        if not last.is_file():
            raise TumorsegError(f"cannot resume: {last} does not exist")
        from tumorseg.checkpoint import read_checkpoint

        saved = read_checkpoint(last)
        data = a.data or saved.get("data_path")
        if not data:
            raise TumorsegError("pass --data with --resume")
        cfg = TrainConfig.from_dict(saved["config"])
    else:
        if not a.data:
            raise TumorsegError("--data is required (the kaggle_3m folder or a prepared cache)")
        data = a.data
        cfg = _train_config(a)
        run_dir = Path(a.out) if a.out else Path("runs") / (
            f"{a.preset or 'default'}-" + (f"fold{cfg.fold}" if cfg.fold >= 0 else "all"))
        if (run_dir / "last.pt").exists():
            raise TumorsegError(f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                                "or choose another --out")
    cache = open_data(data, progress=not a.no_progress)
    print(f"training fold {cfg.fold} of {cfg.folds} into {run_dir} "
          f"({'resuming' if a.resume else 'new run'})", file=sys.stderr)
    result = fit(cfg, cache, run_dir, resume=bool(a.resume), device=a.device,
                 split_file=a.split, show_progress=not a.no_progress, data_path=str(Path(data).resolve()))
    if result.interrupted:
        print(f"interrupted: saved {run_dir / 'last.pt'}; continue with "
              f"`tumorseg train --resume {run_dir}`", file=sys.stderr)
        return 130
    if cfg.fold < 0:
        print(f"done: {result.epochs_done} epochs on every non-test patient ({run_dir / 'last.pt'})")
        return 0
    print(f"done: {result.epochs_done} epochs; best validation per-patient Dice mean "
          f"{result.best_dice:.4f} at epoch {result.best_epoch} ({run_dir / 'best.pt'})")
    return 0


def _check_threshold(a: argparse.Namespace) -> None:
    if a.threshold is not None and not 0.0 < a.threshold < 1.0:
        raise TumorsegError(f"--threshold must be between 0 and 1, got {a.threshold}")


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from tumorseg.data.cache import open_data
    from tumorseg.data.splits import load_split
    from tumorseg.evaluation import evaluate

    _check_threshold(a)
    cache = open_data(a.data, progress=not a.no_progress)
    patients = None
    if a.split:
        split = load_split(a.split)
        patients = split.val(a.fold) if a.fold is not None else split.test
        if not patients:
            raise TumorsegError(f"{a.split} has no test patients; pass --fold K to evaluate a validation fold")
    elif a.fold is not None:
        raise TumorsegError("--fold needs --split (the splits.json of a run)")
    report = evaluate(cache, a.out, checkpoint=a.checkpoint, patients=patients, threshold=a.threshold,
                      postprocess=a.postprocess, tta=a.tta, precision=a.precision, device=a.device,
                      spacing=tuple(a.spacing) if a.spacing else None, show_progress=not a.no_progress)
    s = {k: ("n/a" if v is None else f"{v:.4f}") for k, v in report["summary"].items() if k != "patients"}
    print(f"{report['summary']['patients']} patients: per-patient Dice mean {s['dice_mean']} median "
          f"{s['dice_median']} (std {s['dice_std']}); IoU {s['iou_mean']}; HD95 {s['hd95_mean']} px; "
          f"tumour-slice Dice {s['tumor_slice_dice_mean']}; empty-slice FP rate {s['empty_slice_fp_rate']}")
    print(f"report: {Path(a.out) / 'report.json'}")
    return 0


def _cmd_predict(a: argparse.Namespace) -> int:
    from tumorseg.prediction import predict

    _check_threshold(a)
    if a.batch_size < 1:
        raise TumorsegError(f"--batch-size must be >= 1, got {a.batch_size}")
    summaries = predict(a.inputs, a.out, checkpoint=a.checkpoint, threshold=a.threshold,
                        postprocess=a.postprocess, overlay=a.overlay, tta=a.tta, precision=a.precision,
                        device=a.device, batch_size=a.batch_size, show_progress=not a.no_progress)
    width = max(len("volume"), *(len(s.volume) for s in summaries))
    print(f"{'volume':<{width}}  slices  tumour slices  tumour pixels")
    for s in summaries:
        print(f"{s.volume:<{width}}  {s.slices:>6}  {s.tumour_slices:>13}  {s.tumour_pixels:>13}")
    print(f"masks written to {a.out}/")
    return 0


COMMANDS = {"prepare": _cmd_prepare, "train": _cmd_train, "evaluate": _cmd_evaluate, "predict": _cmd_predict}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except TumorsegError as e:
        print(f"tumorseg {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
