"""Command-line interface: argument parsing only; each command calls a typed function.

Errors caused by the user's input are printed on one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import warnings
from pathlib import Path

from tumorseg.config import (
    ENGINE_CHOICES,
    PRECISION_CHOICES,
    PRESETS,
    InferenceConfig,
    ServeConfig,
    TrainConfig,
    field_help,
    merge_layers,
    preset,
)
from tumorseg.errors import TumorsegError
from tumorseg.export import CALIBRATION_SLICES, FORMATS
from tumorseg.inference import BATCH_SIZE, Predictor
from tumorseg.runs import RunDir, TrainingDir
from tumorseg.runtime import DEVICE_HELP


def _describe(name: str) -> str:
    d = getattr(preset("default"), name)
    s = PRESETS["seed"].get(name, d)
    fmt = lambda v: ",".join(map(str, v)) if isinstance(v, tuple) else v  # noqa: E731
    return f"{field_help(TrainConfig, name)} (default preset: {fmt(d)}; seed preset: {fmt(s)})"


def _add_inference_args(p: argparse.ArgumentParser, default: str) -> None:
    """--threshold/--postprocess/--tta, the fields of InferenceConfig; `default` says
    where an option left out comes from."""
    p.add_argument("--threshold", type=float, default=None,
                   help=f"{field_help(InferenceConfig, 'threshold')} (default: {default})")
    p.add_argument("--postprocess", default=None, metavar="METHOD",
                   help=f"{field_help(InferenceConfig, 'postprocess')} (default: {default})")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help=f"{field_help(InferenceConfig, 'tta').removesuffix(': true/false')} (default: {default})")


def _add_train_config_args(p: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(TrainConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f"cfg_{f.name}", default=None,
                       metavar=f.name.upper(), help=_describe(f.name))


def _set_threads(threads: int | None) -> None:
    import torch

    if threads is not None:
        if threads < 1:
            raise TumorsegError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def _add_common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", nargs="+", action="extend", default=None, metavar="PATH",
                   help="tumorseg checkpoint, the original unet.pt, or a model exported to .onnx or .xml "
                        "(OpenVINO); several checkpoints make an ensemble that averages probabilities "
                        "(default: the model shipped with the package)")
    _add_inference_args(p, "the checkpoint's; for unet.pt 0.5, none, no TTA")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                   help="auto (the fastest, timed once on this machine and cached; includes the shipped "
                        "model's int8 variant), bf16 or fp32 (default: auto)")
    p.add_argument("--engine", choices=ENGINE_CHOICES, default="auto",
                   help="torch, onnxruntime, openvino, or auto (the fastest installed engine for this model "
                        "on this machine, timed once and cached) (default: auto)")
    p.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default: auto)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars (default: shown)")


DATA_HELP = "kaggle_3m folder, a folder of NIfTI patient folders (or one), or a prepared cache"


def _add_nifti_file_args(p: argparse.ArgumentParser, command: str) -> None:
    """--flair/--t1/--t1c/--name (and --mask for evaluate): one NIfTI patient by its files."""
    p.add_argument("--flair", default=None, metavar="NII", help="a NIfTI patient by its files: FLAIR (required)")
    p.add_argument("--t1", default=None, metavar="NII", help="T1 before contrast (default: FLAIR in its place)")
    p.add_argument("--t1c", default=None, metavar="NII", help="T1 after contrast (default: FLAIR in its place)")
    if command == "evaluate":
        p.add_argument("--mask", default=None, metavar="NII",
                       help="the --flair patient's label (any non-zero voxel is tumour) (required with --flair)")
    p.add_argument("--name", default=None, help="name of the --flair patient (default: from the file name)")


def _nifti_files(a: argparse.Namespace):
    """The NiftiFiles named by --flair/--t1/--t1c(/--mask)/--name, or None."""
    from tumorseg.data.nifti import NiftiFiles, patient_name

    mask = getattr(a, "mask", None)
    if not a.flair:
        if a.t1 or a.t1c or a.name or mask:
            given = [o for o, v in (("--t1", a.t1), ("--t1c", a.t1c), ("--mask", mask), ("--name", a.name)) if v]
            raise TumorsegError(f"{', '.join(given)} describe a --flair patient; pass --flair too")
        return None
    return NiftiFiles(a.name or patient_name(Path(a.flair)), flair=Path(a.flair), pre=Path(a.t1) if a.t1 else None,
                      post=Path(a.t1c) if a.t1c else None, label=Path(mask) if mask else None)


def _parser_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="decode a kaggle_3m or NIfTI folder into a cache (run once)",
                       description="Decode the TIFFs of a kaggle_3m folder (or the volumes of a folder of NIfTI "
                                   "patients) once into a cache of raw arrays with per-patient normalisation "
                                   "statistics. Other commands do this automatically when given the raw folder.")
    p.add_argument("raw_dir", help="the kaggle_3m folder (or the folder holding it), or a folder of NIfTI patients")
    p.add_argument("--out", default=None,
                   help="cache folder (default: $TUMORSEG_CACHE or ~/.cache/tumorseg, "
                        "/<name>-<hash of the path>)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar (default: shown)")


def _parser_train(sub) -> None:
    p = sub.add_parser("train", help="train a U-Net",
                       description="Train a U-Net on one fold of a patient-level split. Settings "
                                   "come from the preset, then --config, then the options below.")
    p.add_argument("--data", required=False, help=f"{DATA_HELP} (required unless --resume)")
    p.add_argument("--config", default=None, help="JSON/TOML/YAML file of config fields (default: none)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="seed = the original recipe; default = tumorseg's recipe (default: default)")
    p.add_argument("--out", default=None,
                   help="run folder (default: runs/<preset>-fold<K>, or runs/<preset>-all with --fold -1)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last.pt (default: start a new run)")
    p.add_argument("--split", default=None, help="use this splits.json instead of making one (default: none)")
    p.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default: auto)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for PyTorch (default: PyTorch's choice, the physical cores)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars (default: shown)")
    _add_train_config_args(p)
    _add_inference_args(p, "0.5, none; validation only, recorded in the checkpoints")


def _parser_crossval(sub) -> None:
    p = sub.add_parser("crossval", help="train every fold, score every patient out of fold, choose post-processing",
                       description="Train every fold of one patient split into RUN/fold_<k>, score each patient "
                                   "with the fold model that never saw it, and choose the threshold and "
                                   "post-processing on those out-of-fold predictions; writes RUN/crossval/. "
                                   "Run it again to continue an interrupted cross-validation. With --fold K it "
                                   "trains fold K alone (one process per GPU, e.g. with --device cuda:K); run it "
                                   "once more without --fold for the report.")
    p.add_argument("--data", required=True, help=f"{DATA_HELP} (required)")
    p.add_argument("--out", required=True, metavar="RUN", help="run folder (required)")
    p.add_argument("--config", default=None, help="JSON/TOML/YAML file of config fields (default: none)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="seed = the original recipe; default = tumorseg's recipe (default: default)")
    p.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default: auto)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for PyTorch (default: PyTorch's choice, the physical cores)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars (default: shown)")
    _add_train_config_args(p)


def _parser_export(sub) -> None:
    p = sub.add_parser("export", help="one file to ship: a fold ensemble, a release copy, or an ONNX/OpenVINO model",
                       description="Write the fold models of a `tumorseg crossval` run as one ensemble (with the "
                                   "threshold and post-processing chosen out of fold), or a checkpoint without "
                                   "its training state; as a .pt file (float16 weights for an ensemble), an "
                                   "fp32 ONNX graph, or an OpenVINO IR in fp32 or int8. Graphs have BatchNorm "
                                   "folded, logits as output, dynamic batch and size, and the metadata that "
                                   "`--checkpoint FILE` needs inside.")
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                   help="a crossval run folder, a tumorseg checkpoint or ensemble file")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="the file to write: NAME.pt, NAME.onnx or NAME.xml (+ NAME.bin) (required)")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="pt, onnx or openvino (default: from the --out suffix: .onnx, .xml, else pt)")
    p.add_argument("--int8", action="store_true",
                   help="quantise to int8 with NNCF (--format openvino; needs --calibration) (default: fp32)")
    p.add_argument("--calibration", default=None, metavar="DATA",
                   help="kaggle_3m folder or cache with the patients the model trained on; int8 calibrates "
                        "on slices of those patients only (default: none)")
    p.add_argument("--calibration-slices", type=int, default=CALIBRATION_SLICES,
                   help=f"slices drawn for calibration (default: {CALIBRATION_SLICES})")
    p.add_argument("--threshold", type=float, default=None,
                   help=f"{field_help(InferenceConfig, 'threshold')} (default: the run's choice or the checkpoint's)")
    p.add_argument("--postprocess", default=None, metavar="METHOD",
                   help=f"{field_help(InferenceConfig, 'postprocess')} (default: the run's choice or the "
                        "checkpoint's)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars (default: shown)")


def _parser_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="per-patient scores and a report on labelled data",
                       description="Score a model on labelled patients: per-patient Dice, IoU, "
                                   "precision, recall, HD95 (in mm too for NIfTI data or with --spacing); "
                                   "report.json, per_patient.csv and plots. In a NIfTI label any non-zero "
                                   "voxel is tumour.")
    p.add_argument("--data", default=None,
                   help=f"{DATA_HELP} (required unless --flair and --mask name one NIfTI patient)")
    _add_nifti_file_args(p, "evaluate")
    p.add_argument("--dicom", default=None, metavar="DIR",
                   help="one DICOM study to evaluate (with --label) (default: none)")
    p.add_argument("--label", default=None, metavar="SEG_OR_NII",
                   help="the --dicom study's label: a DICOM SEG of its FLAIR series, or a NIfTI label on the FLAIR "
                        "series' grid (any non-zero voxel is tumour) (required with --dicom)")
    for role, option in SERIES_OPTIONS.items():
        p.add_argument(f"--{option}", default=None, metavar="UID",
                       help=f"DICOM: the SeriesInstanceUID of the {role} series (default: chosen by description)")
    p.add_argument("--out", default="report", help="report folder (default: report)")
    p.add_argument("--split", default=None,
                   help="splits.json of a run: evaluate only its held-out patients (default: all patients)")
    p.add_argument("--fold", type=int, default=None,
                   help="with --split: evaluate the validation patients of this fold "
                        "(default: the split's test patients)")
    p.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="voxel spacing in mm (between slices, rows, columns) for HD95 in mm, overriding the NIfTI "
                        "headers (default: the headers' for NIfTI, none for kaggle_3m: HD95 in pixels only)")
    _add_common_model_args(p)


def _parser_predict(sub) -> None:
    p = sub.add_parser("predict", help="tumour masks for new images (no masks needed)",
                       description="Predict masks for patient folders, folders of slices or single "
                                   ".tif/.png slices, NIfTI patients (a folder of sequences, a FLAIR file, or "
                                   "--flair/--t1/--t1c) and DICOM studies (a folder of DICOM files: a NIfTI mask "
                                   "and a DICOM SEG per study). A folder is normalised as one volume; a single "
                                   "slice with its own percentiles.")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="patient folder (kaggle_3m slices, NIfTI files or DICOM files), folder of slices or of "
                        "patients, slice files, or a FLAIR .nii/.nii.gz")
    _add_nifti_file_args(p, "predict")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write the probability map (NIfTI, or PNG per slice), and for an ensemble the "
                        "spread across its models (default: off)")
    p.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    p.add_argument("--overlay", action="store_true", help="also write an overlay PNG per slice (default: off)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                   help=f"slices per forward pass (default: {BATCH_SIZE})")
    _add_input_args(p)
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="predict only the K-th of N disjoint parts of the inputs (K from 0; for job arrays), with "
                        "its rows in OUT/summary.shard-K-of-N.csv; join them with `tumorseg merge OUT` "
                        "(default: all inputs)")
    _add_common_model_args(p)


def _parser_calibrate_qc(sub) -> None:
    p = sub.add_parser("calibrate-qc", help="fit the per-patient quality flag of a model out of fold",
                       description="Predict every patient of DATA with the fold model that never saw it (a fold "
                                   "ensemble keeps each model's split), compute the quality features and the Dice "
                                   "of each, fit the rule that flags patients likely below Dice 0.7 at "
                                   "specificity >= 0.9, estimate its sensitivity and specificity leaving one fold "
                                   "out, and store the rule in the model file (`predict` and `evaluate` then flag "
                                   "results). Writes OUT/qc_calibration.json and OUT/qc_features.csv; the "
                                   "probabilities are kept in OUT/probabilities and reused.")
    p.add_argument("model", metavar="MODEL", help="a fold ensemble file (`tumorseg export RUN`)")
    p.add_argument("--data", required=True, help="the labelled data the ensemble was cross-validated on (required)")
    p.add_argument("--out", default="qc-calibration", help="report folder (default: qc-calibration)")
    p.add_argument("--store", action=argparse.BooleanOptionalAction, default=True,
                   help="write the fitted rule into MODEL (default: yes)")
    p.add_argument("--engine", choices=ENGINE_CHOICES, default="auto",
                   help="engine of the out-of-fold predictions (default: auto)")
    p.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default: auto)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars (default: shown)")


def _parser_merge(sub) -> None:
    p = sub.add_parser("merge", help="join the summaries of sharded predict runs (predict --shard K/N)",
                       description="Merge OUT/summary.shard-K-of-N.csv, written by `tumorseg predict --shard K/N`, "
                                   "into OUT/summary.csv (rows by volume; existing rows are kept), and say which "
                                   "shards are missing.")
    p.add_argument("out", metavar="OUT", help="the --out folder of the sharded predict runs")


def _parser_convert(sub) -> None:
    p = sub.add_parser("convert", help="kaggle_3m patients to NIfTI (for ITK-SNAP, 3D Slicer, nibabel), or back",
                       description="Write each kaggle_3m patient folder as NIfTI volumes OUT/<patient>/<patient>_"
                                   "{t1,flair,t1ce,seg}.nii.gz: the TIFF values unchanged (uint8), the mask as 0/1, "
                                   "LPS voxel order. The TIFFs carry no spacing: --spacing sets it. Given NIfTI "
                                   "patient folders instead, writes them as kaggle_3m folders of TIFF slices "
                                   "(axial, in the training layout; values outside 0-255 scaled to 8 bits). Given "
                                   "DICOM folders, writes each study as a NIfTI patient on its FLAIR series' grid.")
    p.add_argument("inputs", nargs="+", metavar="PATIENT",
                   help="kaggle_3m patient folders or a kaggle_3m folder; NIfTI patient folders or a folder of them; "
                        "or folders of DICOM files")
    p.add_argument("--out", required=True, help="output folder (required)")
    p.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="to NIfTI: mm between slices, rows and columns (default: 1.0 0.94 0.94, an assumption)")


def _parser_serve(sub) -> None:
    p = sub.add_parser("serve", help="a local web app: upload a patient, see the mask over the slices",
                       description="Serve a web page (and a JSON API, documented at /docs) that segments an uploaded "
                                   "patient with one model loaded once, and shows the slices with the mask over them "
                                   "in the niivue viewer. Listens on 127.0.0.1 only unless --host says otherwise.")
    for f in dataclasses.fields(ServeConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f"serve_{f.name}", type=type(f.default),
                       default=f.default, metavar=f.name.upper(),
                       help=f"{field_help(ServeConfig, f.name)} (default: {f.default:g})" if isinstance(
                           f.default, float) else f"{field_help(ServeConfig, f.name)} (default: {f.default})")
    p.add_argument("--work-dir", default=None,
                   help="where the jobs' files go: a new subfolder of it, deleted at shutdown (default: the "
                        "system's temporary folder)")
    _add_common_model_args(p)


def _add_input_args(p: argparse.ArgumentParser) -> None:
    """--flair-series/--t1-series/--t1c-series (DICOM) and --no-resample (NIfTI)."""
    for role, option in SERIES_OPTIONS.items():
        p.add_argument(f"--{option}", default=None, metavar="UID",
                       help=f"DICOM: the SeriesInstanceUID of the {role} series, where the series descriptions "
                            "are ambiguous (default: chosen by SeriesDescription/ProtocolName)")
    p.add_argument("--no-resample", action="store_true",
                   help="NIfTI: refuse T1/T1c on another grid than the FLAIR's instead of resampling them onto it "
                        "(default: resample, linear, through the affines; motion between sequences is not corrected; "
                        "DICOM series are always resampled)")


SERIES_OPTIONS = {"FLAIR": "flair-series", "T1": "t1-series", "T1c": "t1c-series"}


def _dicom_series(a: argparse.Namespace) -> dict[str, str] | None:
    chosen = {role: getattr(a, option.replace("-", "_")) for role, option in SERIES_OPTIONS.items()}
    return {k: v for k, v in chosen.items() if v} or None


def build_parser() -> argparse.ArgumentParser:
    from tumorseg.version import __version__

    parser = argparse.ArgumentParser(
        prog="tumorseg",
        description="Brain-tumour segmentation in MRI (TCGA-LGG kaggle_3m) with a U-Net.",
    )
    parser.add_argument("--version", action="version", version=f"tumorseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_parser_prepare, _parser_train, _parser_crossval, _parser_export, _parser_evaluate,
                _parser_predict, _parser_merge, _parser_convert, _parser_calibrate_qc, _parser_serve):
        add(sub)
    return parser


def _cmd_convert(a: argparse.Namespace) -> int:
    from tumorseg.conversion import convert

    done = convert(a.inputs, a.out, a.spacing)
    for name, written in done.patients:
        if done.to_nifti:
            print(f"{name}: {', '.join(p.name for p in written)}")
        else:
            print(f"{name}: {sum(not p.stem.endswith('_mask') for p in written)} slices")
    if done.to_nifti:
        sp = done.spacing
        shown = f" (spacing {sp[0]} x {sp[1]} x {sp[2]} mm)" if sp else " (on each study's FLAIR grid)"
        print(f"{len(done.patients)} patients written to {done.out}/{shown}")
    else:
        print(f"{len(done.patients)} patients written to {done.out}/ as kaggle_3m folders")
    return 0


def _cmd_prepare(a: argparse.Namespace) -> int:
    from tumorseg.data.cache import prepare

    cache = prepare(a.raw_dir, a.out, progress=not a.no_progress)
    slices = sum(len(r.slices) for r in cache.records.values())
    tumour = sum(r.tumour_slices for r in cache.records.values())
    print(f"cache {cache.root}: {len(cache)} patients, {slices} slices ({tumour} with tumour)")
    return 0


def _cmd_train(a: argparse.Namespace) -> int:
    from tumorseg.distributed import shutdown as shutdown_distributed
    from tumorseg.distributed import world_from_env
    from tumorseg.training import resolve_run, run_training

    _set_threads(a.threads)
    options = {f.name: getattr(a, f"cfg_{f.name}") for f in dataclasses.fields(TrainConfig)}
    inference_options = {"threshold": a.threshold, "postprocess": a.postprocess, "tta": a.tta}
    run_dir, cfg, inference = resolve_run(resume=a.resume, data=a.data, preset=a.preset, config=a.config,
                                          options=options, inference_options=inference_options, out=a.out,
                                          split=a.split)
    world = world_from_env()
    if not world.is_main:  # under torchrun only rank 0 prints
        logging.getLogger("tumorseg").setLevel(logging.ERROR)
    try:
        result = run_training(run_dir, data=a.data, cfg=cfg, inference=inference, resume=bool(a.resume),
                              split_file=a.split, device=a.device, show_progress=not a.no_progress and world.is_main)
    finally:
        shutdown_distributed()
    if not world.is_main:
        return 130 if result.interrupted else 0
    if result.interrupted:
        saved = "stopped at once: nothing saved since the last epoch's" if result.at_once else "interrupted: saved"
        print(f"{saved} {TrainingDir(run_dir).last}; continue with `tumorseg train --resume {run_dir}`",
              file=sys.stderr)
        return 130
    if not result.best_epoch:
        print(f"done: {result.epochs_done} epochs on every non-test patient ({TrainingDir(run_dir).last})")
        return 0
    print(f"done: {result.epochs_done} epochs; best validation per-patient Dice mean "
          f"{result.best_dice:.4f} at epoch {result.best_epoch} ({TrainingDir(run_dir).best})")
    return 0


def _cmd_crossval(a: argparse.Namespace) -> int:
    from tumorseg.crossval import crossval

    _set_threads(a.threads)
    from tumorseg.distributed import world_from_env

    if world_from_env().distributed:
        raise TumorsegError("crossval runs one process per fold, not under torchrun: start `tumorseg crossval ... "
                            "--fold K --device cuda:K` for each fold K, then once without --fold for the report")
    options = {f.name: getattr(a, f"cfg_{f.name}") for f in dataclasses.fields(TrainConfig)}
    only = options.pop("fold")
    cfg = merge_layers(a.preset, a.config, options)
    only = int(only) if only is not None else None
    report = crossval(cfg, a.data, a.out, device=a.device, precision=cfg.precision, show_progress=not a.no_progress,
                      only_fold=only)
    if only is not None and report is not None:
        print(f"fold {only} trained ({RunDir(Path(a.out)).fold(only).root}); when every fold is done, run the same "
              "command without --fold for the out-of-fold report")
        return 0
    if report is None:
        print(f"interrupted; continue with the same command (`tumorseg crossval ... --out {a.out}`)",
              file=sys.stderr)
        return 130
    s = report["summary"]
    print(f"{s['patients']} patients out of fold: per-patient Dice mean {s['dice_mean']:.4f} median "
          f"{s['dice_median']:.4f}, with threshold {report['threshold']} and postprocess {report['postprocess']} "
          "chosen on these predictions")
    for f in report["folds"]:
        print(f"  fold {f['fold']}: {f['patients']} patients, mean {f['dice_mean']:.4f} median {f['dice_median']:.4f}")
    print(f"report: {RunDir(Path(a.out)).report}")
    return 0


def _cmd_export(a: argparse.Namespace) -> int:
    from tumorseg.export import export_model

    written = export_model(a.source, a.out, fmt=a.format, int8=a.int8, calibration=a.calibration,
                           calibration_slices=a.calibration_slices, threshold=a.threshold,
                           postprocess=a.postprocess, progress=not a.no_progress)
    size = sum(p.stat().st_size for p in written) / 2**20
    print(f"wrote {', '.join(str(p) for p in written)} ({size:.1f} MiB)")
    return 0


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from tumorseg.evaluation import evaluate_data

    report = evaluate_data(a.out, data=a.data, files=_nifti_files(a), dicom=a.dicom, label=a.label,
                           dicom_series=_dicom_series(a), split=a.split, fold=a.fold,
                           spacing=a.spacing, checkpoint=a.checkpoint, threshold=a.threshold,
                           postprocess=a.postprocess, tta=a.tta, device=a.device, precision=a.precision,
                           engine=a.engine, show_progress=not a.no_progress)
    s = {k: ("n/a" if v is None else f"{v:.4f}") for k, v in report["summary"].items() if k != "patients"}
    mm = f" ({s['hd95_mm_mean']} mm)" if report["summary"]["hd95_mm_mean"] is not None else ""
    n = report["summary"]["patients"]
    print(f"{n} patient{'s' if n != 1 else ''}: per-patient Dice mean {s['dice_mean']} median "
          f"{s['dice_median']} (std {s['dice_std']}); IoU {s['iou_mean']}; HD95 {s['hd95_mean']} px{mm}; "
          f"tumour-slice Dice {s['tumor_slice_dice_mean']}; empty-slice FP rate {s['empty_slice_fp_rate']}")
    print(f"report: {Path(a.out) / 'report.json'}")
    return 0


def _cmd_predict(a: argparse.Namespace) -> int:
    from tumorseg.prediction import parse_shard, predict

    nifti = _nifti_files(a)
    summaries = predict(a.inputs, a.out, checkpoint=a.checkpoint, threshold=a.threshold,
                        postprocess=a.postprocess, overlay=a.overlay, tta=a.tta, precision=a.precision,
                        device=a.device, engine=a.engine, batch_size=a.batch_size, show_progress=not a.no_progress,
                        save_probabilities=a.save_probabilities, nifti=nifti,
                        shard=parse_shard(a.shard) if a.shard else None, dicom_series=_dicom_series(a),
                        resample=not a.no_resample)
    if not summaries:
        print(f"nothing in this shard ({a.shard}); its empty table is in {a.out}/")
        return 0
    width = max(len("volume"), *(len(s.volume) for s in summaries))
    print(f"{'volume':<{width}}  slices  tumour slices  tumour pixels  volume mL  removed by post-processing  qc")
    for s in summaries:
        ml = f"{s.volume_ml:.2f}" if s.volume_ml is not None else "-"
        print(f"{s.volume:<{width}}  {s.slices:>6}  {s.tumour_slices:>13}  {s.tumour_pixels:>13}  {ml:>9}  "
              f"{s.removed_pixels:>26}  {s.qc or '-'}")
    flagged = [s.volume for s in summaries if s.qc == "review"]
    if flagged:
        print(f"{len(flagged)} of {len(summaries)} result(s) flagged for review (qc_reason in summary.csv): "
              f"{', '.join(flagged)}")
    elif summaries and not any(s.qc for s in summaries):
        print("no quality flag: this model has no calibrated rule (see `tumorseg calibrate-qc`); the quality "
              "features are in summary.csv")
    print(f"masks written to {a.out}/")
    return 0


def _cmd_calibrate_qc(a: argparse.Namespace) -> int:
    from tumorseg.calibration import calibrate_qc, store_rule
    from tumorseg.qc import QCRule

    report = calibrate_qc(a.model, a.data, a.out, device=a.device, engine=a.engine, progress=not a.no_progress)
    rule = QCRule.from_dict(report["rule"])
    oof = report["out_of_fold"]

    def share(k: str) -> str:
        ci = oof.get(f"{k}_ci95")
        value = oof.get(k)
        return "n/a" if value is None else f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

    print(f"rule: review when {' or '.join(f'{c.feature} {c.direction} {c.threshold:.4g}' for c in rule.conditions)}")
    auc = f"{oof['auc_score']:.3f}" if oof.get("auc_score") is not None else "n/a"
    print(f"out of fold ({oof['patients']} patients, {oof['bad']} below Dice {oof['bad_below']}): sensitivity "
          f"{share('sensitivity')}, specificity {share('specificity')} (Wilson 95%), AUC {auc}")
    if a.store:
        store_rule(a.model, rule, report)
        print(f"rule stored in {a.model}")
    print(f"report: {Path(a.out) / 'qc_calibration.json'}")
    return 0


def _cmd_merge(a: argparse.Namespace) -> int:
    from tumorseg.prediction import merge_shard_summaries

    rows, missing = merge_shard_summaries(a.out)
    print(f"{Path(a.out) / 'summary.csv'}: {rows} volumes")
    if missing:
        print(f"tumorseg merge: warning: shard(s) {', '.join(missing)} have no summary yet", file=sys.stderr)
        return 1
    return 0


def _cmd_serve(a: argparse.Namespace) -> int:
    import socket

    try:
        import uvicorn

        from tumorseg.serve.app import LOOPBACK_HOSTS, create_app
    except ImportError as e:
        raise TumorsegError(f"tumorseg serve needs FastAPI and uvicorn ({e.name} is missing); install them with "
                            "pip install 'tumorseg[serve]'") from None
    config = ServeConfig(**{f.name: getattr(a, f"serve_{f.name}") for f in dataclasses.fields(ServeConfig)})
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:  # a clear line now, not a traceback later
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((config.host, config.port))
        except OSError as e:
            raise TumorsegError(f"cannot listen on {config.host}:{config.port} ({e.strerror or e}); pass another "
                                "--port (or --host)") from None
    if config.host not in LOOPBACK_HOSTS:
        warnings.warn(f"listening on {config.host}: anyone who can reach this computer on port {config.port} can "
                      "upload scans and read results; there is no login", stacklevel=1)
    predictor = Predictor.from_checkpoints(a.checkpoint, threshold=a.threshold, postprocess=a.postprocess,
                                           tta=a.tta, device=a.device, precision=a.precision, engine=a.engine)
    app = create_app(predictor, config, a.work_dir)
    shown = f"[{config.host}]" if ":" in config.host else config.host
    print(f"tumorseg serve: model {predictor.source} ({predictor.engine.name}, {predictor.precision}); open "
          f"http://{shown}:{config.port}/ in a browser (Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
    return 0


COMMANDS = {"prepare": _cmd_prepare, "convert": _cmd_convert, "train": _cmd_train, "crossval": _cmd_crossval,
            "export": _cmd_export, "evaluate": _cmd_evaluate, "predict": _cmd_predict, "merge": _cmd_merge,
            "calibrate-qc": _cmd_calibrate_qc, "serve": _cmd_serve}


class _Lines(logging.Handler):
    """Log records as plain lines on stdout, written around any progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        tqdm.write(self.format(record), file=sys.stdout)


def _log_to_stdout() -> None:
    logger = logging.getLogger("tumorseg")
    if not any(isinstance(h, _Lines) for h in logger.handlers):
        logger.addHandler(_Lines())
    logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _log_to_stdout()
    # A warning is one line too: "tumorseg predict: warning: ...", without Python's source line.
    show = warnings.showwarning
    warnings.showwarning = lambda message, category, *rest, **kw: print(  # noqa: E731
        f"tumorseg {args.command}: warning: {message}", file=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except TumorsegError as e:
        print(f"tumorseg {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = show


if __name__ == "__main__":
    sys.exit(main())
