"""`tumorseg predict`: masks for new images, no ground truth needed.

Inputs and normalisation:
- a patient folder (kaggle_3m layout; masks, if any, are ignored) or any folder of
  slice images (.tif/.png): one volume, normalised with the percentiles of the whole
  volume, as in training;
- a kaggle_3m folder holding patient folders: one volume per patient;
- a single slice file: a volume of one slice, normalised with the percentiles of that
  slice alone (less stable than a whole volume: pass the folder when you have it).

Outputs, per input slice `<name>.tif`: `<out>/<volume>/<name>_pred.png` (0/255 mask)
and, with overlay, `<name>_overlay.png`; `<out>/summary.csv` lists per volume the slices,
tumour slices, tumour volume in pixels, and the pixels above the threshold that
post-processing removed (a lost focus is never silent). A run adds its volumes' rows to an existing
summary.csv (replacing the rows of volumes predicted again) and never drops other rows,
also when several runs write into one folder at once.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tumorseg.data.kaggle import find_patient_dirs
from tumorseg.data.slices import IMAGE_SUFFIXES, mask_png, read_volume, slice_images, write_png
from tumorseg.errors import DataError
from tumorseg.fileio import atomic_write_text, check_output_dir, prepare_output_dir
from tumorseg.inference import BATCH_SIZE, Predictor, check_model_arguments


@dataclass
class Volume:
    name: str
    files: list[Path]


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
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(f"{path}: not a slice image; expected .tif, .tiff or .png")
            volumes.append(Volume(path.stem, [path]))
            continue
        files = slice_images(path)
        if files:
            volumes.append(Volume(path.resolve().name, files))
            continue
        try:
            patients = find_patient_dirs(path)
        except DataError:
            raise DataError(f"{path} holds no .tif/.png slices and no patient folders") from None
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
) -> list[VolumeSummary]:
    """Predict tumour masks for `inputs` and write them under `out_dir`.

    The model is `predictor`, or `Predictor.from_checkpoints(checkpoint, ...)` (None: the
    shipped model) with threshold/postprocess/tta overriding its stored settings.

    Raises:
        TumorsegError: bad inputs, settings or checkpoint, or an unusable out_dir; checked
            before any prediction runs.
    """
    from tumorseg.plots import overlay as make_overlay

    check_model_arguments(predictor, checkpoint=checkpoint, threshold=threshold, postprocess=postprocess, tta=tta)
    volumes = collect_volumes(inputs)
    out = check_output_dir(out_dir)
    read_summary(out / "summary.csv")  # a table we could not merge into fails now, not after the work
    if predictor is None:
        predictor = Predictor.from_checkpoints(checkpoint, threshold=threshold, postprocess=postprocess, tta=tta,
                                               device=device, precision=precision, engine=engine,
                                               batch_size=batch_size)
    summaries = []
    bar = None if show_progress and len(volumes) > 1 else True  # None: only on a terminal
    for vol in tqdm(volumes, desc="predicting", unit="volume", disable=bar):
        images = read_volume(vol.files, vol.name)
        seg = predictor.segment(images)
        masks = seg.mask
        vdir = prepare_output_dir(out / vol.name)
        for f, img, m in zip(vol.files, images, masks, strict=True):
            mask_png(vdir / f"{f.stem}_pred.png", m)
            if overlay:
                write_png(vdir / f"{f.stem}_overlay.png", make_overlay(img, m))
        summary = VolumeSummary(vol.name, len(masks), int(masks.reshape(len(masks), -1).any(1).sum()),
                                int(masks.sum()), seg.removed_voxels)
        merge_summary(out / "summary.csv", [summary])  # at once: a later failure loses no row
        summaries.append(summary)
    return summaries


SUMMARY_FIELDS = ["volume", "slices", "tumour_slices", "tumour_pixels", "removed_pixels"]


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
            rows[s.volume] = {k: str(v) for k, v in asdict(s).items()}
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows[k] for k in sorted(rows))
        atomic_write_text(path, buf.getvalue())
