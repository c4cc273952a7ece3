"""`tumorseg predict`: masks for new images, no ground truth needed.

Inputs and normalisation:
- a patient folder (kaggle_3m layout; masks, if any, are ignored) or any folder of
  slice images (.tif/.png): one volume, normalised with the percentiles of the whole
  volume, as in training;
- a kaggle_3m folder holding patient folders: one volume per patient;
- a single slice file: a volume of one slice, normalised with the percentiles of that
  slice alone (less stable than a whole volume: pass the folder when you have it);
- a NIfTI patient: a folder of .nii/.nii.gz sequences named by the common conventions, a
  folder of such folders, a FLAIR .nii/.nii.gz alone, or files named explicitly
  (`NiftiFiles`); reoriented and, when its in-plane spacing is far from the training
  data's, resampled for the model (see `data.nifti`).

Outputs, per input slice `<name>.tif`: `<out>/<volume>/<name>_pred.png` (0/255 mask)
and, with overlay, `<name>_overlay.png`; per NIfTI patient `<out>/<name>/<name>_pred.nii.gz`
(uint8 0/1 with the input's affine, shape and header geometry) and, with overlay, a PNG
per tumour slice; with save_probabilities, the probability map (`_prob.nii.gz` or
`_prob.png`) and for an ensemble its spread across the models (`_prob_spread`).
`<out>/summary.csv` lists per volume the slices, tumour slices, tumour volume in pixels
and in mL (NIfTI input: from the voxel size), and the pixels above the threshold that
post-processing removed (a lost focus is never silent). A run adds its volumes' rows to an existing
summary.csv (replacing the rows of volumes predicted again) and never drops other rows,
also when several runs write into one folder at once.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from tumorseg.data.kaggle import find_patient_dirs
from tumorseg.data.nifti import (
    NiftiFiles,
    find_sequences,
    is_nifti,
    is_nifti_patient,
    patient_name,
    read_nifti_patient,
    resample_slices,
    to_training_scale,
    write_nifti,
)
from tumorseg.data.slices import IMAGE_SUFFIXES, read_volume, slice_images, write_image, write_mask
from tumorseg.errors import ConfigError, DataError
from tumorseg.fileio import atomic_write_text, check_output_dir, prepare_output_dir
from tumorseg.inference import BATCH_SIZE, Predictor, Progress, check_model_arguments


@dataclass
class Volume:
    name: str
    files: list[Path]  # slice images; empty for a NIfTI patient
    nifti: NiftiFiles | None = None


def collect_volumes(inputs: Sequence[str | Path]) -> list[Volume]:
    """Group the inputs into volumes (see the module docstring).

    Raises:
        DataError: a path that does not exist, a folder without slices, a file that is
            not a .tif/.png slice.
    """
    volumes: list[Volume] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise DataError(f"{path} does not exist; pass a patient folder, a folder of slices or .tif/.png files")
        if path.is_file():
            if is_nifti(path):  # one volume given alone: FLAIR
                volumes.append(Volume(patient_name(path), [], NiftiFiles(patient_name(path), flair=path)))
                continue
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(f"{path}: not a slice image or NIfTI volume; expected .tif, .tiff, .png, .nii "
                                "or .nii.gz")
            volumes.append(Volume(path.stem, [path]))
            continue
        if is_nifti_patient(path):
            files = find_sequences(path)
            volumes.append(Volume(files.name, [], files))
            continue
        files = slice_images(path)
        if files:
            volumes.append(Volume(path.resolve().name, files))
            continue
        nifti = sorted(p for p in path.iterdir() if p.is_dir() and is_nifti_patient(p))
        if nifti:
            volumes.extend(Volume(p.name, [], find_sequences(p)) for p in nifti)
            continue
        try:
            patients = find_patient_dirs(path)
        except DataError:
            raise DataError(f"{path} holds no .tif/.png slices, no NIfTI volumes and no patient folders") from None
        for p in patients:
            files = slice_images(p)
            if not files:
                raise DataError(f"{p} holds only masks, no image slices to predict on")
            volumes.append(Volume(p.name, files))
    names = [v.name for v in volumes]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"two inputs have the same name {dup[0]!r}; their outputs would collide")
    return volumes


@dataclass
class VolumeSummary:
    volume: str
    slices: int
    tumour_slices: int
    tumour_pixels: int
    removed_pixels: int = 0  # above the threshold, but removed by post-processing
    volume_ml: float | None = None  # tumour volume from the voxel size (NIfTI input); None for slices


def predict(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    checkpoint: str | Path | Sequence[str | Path] | None = None,
    threshold: float | None = None,
    postprocess: str | None = None,
    overlay: bool = False,
    tta: bool | None = None,
    precision: str = "auto",
    device: str | torch.device = "auto",
    engine: str = "auto",
    batch_size: int = BATCH_SIZE,
    show_progress: bool = True,
    predictor: Predictor | None = None,
    save_probabilities: bool = False,
    nifti: NiftiFiles | None = None,
    progress: Progress | None = None,
    shard: tuple[int, int] | None = None,
) -> list[VolumeSummary]:
    """Predict tumour masks for `inputs` (and the NIfTI patient `nifti`, given by its
    files) and write them under `out_dir`; `save_probabilities` also writes the
    probability maps (and, for an ensemble, their spread across the models).
    `progress(done, total)` follows the slices of each volume. With `shard` (k, n) only
    the k-th of n disjoint parts of the volumes is predicted (`shard_volumes`), and its
    rows go to `summary.shard-<k>-of-<n>.csv`, for `merge_shard_summaries` to join.

    The model is `predictor`, or `Predictor.from_checkpoints(checkpoint, ...)` (None: the
    shipped model) with threshold/postprocess/tta overriding its stored settings.

    Raises:
        TumorsegError: bad inputs, settings or checkpoint, or an unusable out_dir; checked
            before any prediction runs.
    """
    from tumorseg.plots import overlay as make_overlay

    check_model_arguments(predictor, checkpoint=checkpoint, threshold=threshold, postprocess=postprocess, tta=tta)
    volumes = collect_volumes(inputs)
    if nifti is not None:
        volumes.append(Volume(nifti.name, [], nifti))
    if not volumes:
        raise DataError("nothing to predict: pass INPUT paths or --flair")
    summary_name = "summary.csv"
    if shard is not None:
        volumes = shard_volumes(volumes, *shard)
        summary_name = f"summary.shard-{shard[0]}-of-{shard[1]}.csv"
    out = check_output_dir(out_dir)
    read_summary(out / summary_name)  # a table we could not merge into fails now, not after the work
    if not volumes:  # a shard with nothing to do (more array tasks than inputs) still reports
        prepare_output_dir(out)
        merge_summary(out / summary_name, [])
        return []
    if predictor is None:
        predictor = Predictor.from_checkpoints(checkpoint, threshold=threshold, postprocess=postprocess, tta=tta,
                                               device=device, precision=precision, engine=engine,
                                               batch_size=batch_size)
    summaries = []
    bar = None if show_progress and len(volumes) > 1 else True  # None: only on a terminal
    for vol in tqdm(volumes, desc="predicting", unit="volume", disable=bar):
        if vol.nifti is not None:
            summary = _predict_nifti(predictor, vol.nifti, out, overlay, save_probabilities, progress)
        else:
            images = read_volume(vol.files, vol.name)
            seg = predictor.segment(images, progress=progress)
            masks = seg.mask
            vdir = prepare_output_dir(out / vol.name)
            for i, (f, img, m) in enumerate(zip(vol.files, images, masks, strict=True)):
                write_mask(vdir / f"{f.stem}_pred.png", m)
                if overlay:
                    write_image(vdir / f"{f.stem}_overlay.png", make_overlay(img, m))
                if save_probabilities:
                    write_image(vdir / f"{f.stem}_prob.png", _probability_png(seg.probabilities[i]))
                    if seg.spread is not None:
                        write_image(vdir / f"{f.stem}_prob_spread.png", _probability_png(seg.spread[i]))
            summary = VolumeSummary(vol.name, len(masks), int(masks.reshape(len(masks), -1).any(1).sum()),
                                    int(masks.sum()), seg.removed_voxels)
        merge_summary(out / summary_name, [summary])  # at once: a later failure loses no row
        summaries.append(summary)
    return summaries


def parse_shard(text: str) -> tuple[int, int]:
    """"K/N" -> (K, N), 0 <= K < N.

    Raises:
        ConfigError: anything else.
    """
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ConfigError(f"--shard must be K/N with 0 <= K < N (e.g. 0/4 for the first of 4 parts), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def shard_volumes(volumes: list[Volume], k: int, n: int) -> list[Volume]:
    """The k-th of n parts of `volumes`: every n-th volume in name order from the k-th.
    The parts are disjoint and together complete, whatever order the inputs came in."""
    return sorted(volumes, key=lambda v: v.name)[k::n]


def merge_shard_summaries(out_dir: str | Path) -> tuple[int, list[str]]:
    """Join the `summary.shard-K-of-N.csv` tables of `out_dir` into its summary.csv (rows
    merged by volume, as one run's); returns (rows in summary.csv, missing shards as
    "K/N").

    Raises:
        DataError: no shard tables, tables of different N, or an unreadable table.
    """
    out = Path(out_dir)
    found: dict[tuple[int, int], Path] = {}
    for path in sorted(out.glob("summary.shard-*-of-*.csv")):
        m = re.fullmatch(r"summary\.shard-(\d+)-of-(\d+)\.csv", path.name)
        if m:
            found[(int(m.group(1)), int(m.group(2)))] = path
    if not found:
        raise DataError(f"{out} holds no summary.shard-K-of-N.csv; run `tumorseg predict ... --shard K/N --out {out}` "
                        "first")
    sizes = sorted({n for _, n in found})
    if len(sizes) > 1:
        raise DataError(f"{out} holds shard tables of {' and '.join(map(str, sizes))} parts; keep one --shard N")
    n = sizes[0]
    rows: dict[str, dict[str, str]] = {}
    for path in found.values():
        rows.update(read_summary(path))
    summaries = [VolumeSummary(**{k: _typed(k, r.get(k, "")) for k in SUMMARY_FIELDS}) for r in rows.values()]
    merge_summary(out / "summary.csv", summaries)
    missing = [f"{k}/{n}" for k in range(n) if (k, n) not in found]
    return len(read_summary(out / "summary.csv")), missing


def _typed(field_name: str, value: str) -> object:
    if field_name == "volume":
        return value
    if field_name == "volume_ml":
        return float(value) if value else None
    return int(value) if value else 0


def _probability_png(p: np.ndarray) -> np.ndarray:
    """Probabilities (or their spread) in [0, 1] as 8-bit grey levels."""
    return np.round(np.clip(p, 0.0, 1.0) * 255).astype(np.uint8)


def _predict_nifti(predictor: Predictor, files: NiftiFiles, out: Path, overlay: bool,
                   save_probabilities: bool, progress: Progress | None = None) -> VolumeSummary:
    """Segment one NIfTI patient and write `<name>_pred.nii.gz` (uint8 0/1 on the input's
    grid) and, on request, probability maps and overlay PNGs (model orientation)."""
    from tumorseg.plots import overlay as make_overlay

    patient = read_nifti_patient(files)
    volume, input_shape = to_training_scale(patient)
    probs, spread = predictor.volume_probabilities(volume, progress=progress)
    if input_shape is not None:  # back to the input's grid before threshold and post-processing
        probs = resample_slices(probs, input_shape)
        spread = resample_slices(spread, input_shape) if spread is not None else None
    seg = predictor.finish(probs, spread)
    masks = seg.mask
    vdir = prepare_output_dir(out / patient.name)
    write_nifti(vdir / f"{patient.name}_pred.nii.gz", masks, patient.grid, np.uint8)
    if save_probabilities:
        write_nifti(vdir / f"{patient.name}_prob.nii.gz", seg.probabilities, patient.grid, np.float32)
        if seg.spread is not None:
            write_nifti(vdir / f"{patient.name}_prob_spread.nii.gz", seg.spread, patient.grid, np.float32)
    if overlay:
        for i in np.flatnonzero(masks.reshape(len(masks), -1).any(1)):
            write_image(vdir / f"{patient.name}_{i + 1}_overlay.png", make_overlay(patient.volume[i], masks[i]))
    voxels = int(masks.sum())
    return VolumeSummary(patient.name, len(masks), int(masks.reshape(len(masks), -1).any(1).sum()), voxels,
                         seg.removed_voxels, voxels * patient.grid.voxel_ml)


SUMMARY_FIELDS = ["volume", "slices", "tumour_slices", "tumour_pixels", "removed_pixels", "volume_ml"]


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive advisory lock on `folder` itself, so no lock file is left behind
    (POSIX; elsewhere no lock)."""
    try:
        import fcntl
    except ImportError:  # Windows: runs into one --out must not overlap there
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def read_summary(path: Path) -> dict[str, dict[str, str]]:
    """The rows of an existing summary table by volume ({} when there is none).

    Raises:
        DataError: the path is a folder, or the file is not a summary table.
    """
    if not path.exists():
        return {}
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "volume" not in reader.fieldnames:
                raise ValueError("no 'volume' column")
            return {r["volume"]: r for r in reader if r.get("volume")}
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as e:
        raise DataError(f"{path} is not a tumorseg summary table ({e}); move it away or choose another "
                        "--out") from e


def merge_summary(path: Path, summaries: Sequence[VolumeSummary]) -> None:
    """Add or replace the rows of `summaries` in the summary table at `path`, keeping every
    other row: read, merge and atomically rewrite under a lock, so runs into one folder,
    one after the other or at once, never lose a row. Rows are sorted by volume."""
    with _locked(path.parent):
        rows = read_summary(path)
        for s in summaries:
            rows[s.volume] = {k: "" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
                              for k, v in asdict(s).items()}
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows[k] for k in sorted(rows))
        atomic_write_text(path, buf.getvalue())
