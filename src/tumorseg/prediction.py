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
tumour slices and tumour volume in pixels.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from tumorseg.data.kaggle import _SLICE_RE, IMAGE_SUFFIXES, find_patient_dirs, read_image
from tumorseg.errors import DataError
from tumorseg.inference import (
    binarize,
    load_for_inference,
    predict_volume,
    resolve_precision,
    select_device,
)


@dataclass
class Volume:
    name: str
    files: list[Path]


def _natural_key(path: Path) -> tuple:
    m = _SLICE_RE.match(path.name)
    if m:
        return (0, int(m.group("num")), path.name)
    return (1, [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)], path.name)


def _slice_files(folder: Path) -> list[Path]:
    files = [
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
        and not p.stem.lower().endswith(("_mask", "_pred", "_overlay"))
    ]
    return sorted(files, key=_natural_key)


def collect_volumes(inputs: list[str | Path]) -> list[Volume]:
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
        files = _slice_files(path)
        if files:
            volumes.append(Volume(path.resolve().name, files))
            continue
        try:
            patients = find_patient_dirs(path)
        except DataError:
            raise DataError(f"{path} holds no .tif/.png slices and no patient folders") from None
        for p in patients:
            files = _slice_files(p)
            if not files:
                raise DataError(f"{p} holds only masks, no image slices to predict on")
            volumes.append(Volume(p.name, files))
    names = [v.name for v in volumes]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"two inputs have the same name {dup[0]!r}; their outputs would collide")
    return volumes


def read_volume(volume: Volume) -> np.ndarray:
    """uint8 (S, H, W, 3). Raises DataError on unreadable slices or mixed sizes."""
    slices = []
    for f in volume.files:
        img = read_image(f)
        if slices and img.shape != slices[0].shape:
            raise DataError(f"{f}: size {img.shape[1]}x{img.shape[0]} differs from the other slices "
                            f"of {volume.name} ({slices[0].shape[1]}x{slices[0].shape[0]})")
        slices.append(img)
    return np.stack(slices)


@dataclass
class VolumeSummary:
    volume: str
    slices: int
    tumour_slices: int
    tumour_pixels: int


def predict(
    inputs: list[str | Path],
    out_dir: str | Path,
    *,
    checkpoint: str | Path | None = None,
    threshold: float | None = None,
    postprocess: str | None = None,
    overlay: bool = False,
    tta: bool = False,
    precision: str = "auto",
    device: str = "auto",
    batch_size: int = 16,
    show_progress: bool = True,
) -> list[VolumeSummary]:
    """Predict tumour masks for `inputs` and write them under `out_dir`."""
    from tumorseg.plots import mask_png, write_png
    from tumorseg.plots import overlay as make_overlay

    volumes = collect_volumes(inputs)
    dev = select_device(device)
    loaded = load_for_inference(checkpoint, dev)
    threshold = loaded.threshold if threshold is None else threshold
    postprocess = loaded.postprocess if postprocess is None else postprocess
    dtype = resolve_precision(precision, dev)
    out = Path(out_dir)
    summaries = []
    for vol in tqdm(volumes, desc="predicting", unit="volume", disable=not show_progress or len(volumes) < 2):
        images = read_volume(vol)
        probs = predict_volume(loaded, images, device=dev, dtype=dtype, batch_size=batch_size, tta=tta)
        masks = binarize(probs, threshold, postprocess)
        vdir = out / vol.name
        vdir.mkdir(parents=True, exist_ok=True)
        for f, img, m in zip(vol.files, images, masks, strict=True):
            mask_png(vdir / f"{f.stem}_pred.png", m)
            if overlay:
                write_png(vdir / f"{f.stem}_overlay.png", make_overlay(img, m))
        summaries.append(VolumeSummary(vol.name, len(masks), int(masks.reshape(len(masks), -1).any(1).sum()),
                                       int(masks.sum())))
    out.mkdir(parents=True, exist_ok=True)
    with (out / "summary.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["volume", "slices", "tumour_slices", "tumour_pixels"])
        for s in summaries:
            w.writerow([s.volume, s.slices, s.tumour_slices, s.tumour_pixels])
    return summaries
