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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tumorseg.data.kaggle import find_patient_dirs
from tumorseg.data.slices import IMAGE_SUFFIXES, mask_png, read_volume, slice_images, write_png
from tumorseg.errors import DataError
from tumorseg.fileio import prepare_output_dir
from tumorseg.inference import Predictor, check_model_arguments


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
    batch_size: int = 16,
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
    out = prepare_output_dir(out_dir)
    if predictor is None:
        predictor = Predictor.from_checkpoints(checkpoint, threshold=threshold, postprocess=postprocess, tta=tta,
                                               device=device, precision=precision, batch_size=batch_size)
    summaries = []
    for vol in tqdm(volumes, desc="predicting", unit="volume", disable=not show_progress or len(volumes) < 2):
        images = read_volume(vol.files, vol.name)
        masks = predictor.segment(images).mask
        vdir = out / vol.name
        vdir.mkdir(parents=True, exist_ok=True)
        for f, img, m in zip(vol.files, images, masks, strict=True):
            mask_png(vdir / f"{f.stem}_pred.png", m)
            if overlay:
                write_png(vdir / f"{f.stem}_overlay.png", make_overlay(img, m))
        summaries.append(VolumeSummary(vol.name, len(masks), int(masks.reshape(len(masks), -1).any(1).sum()),
                                       int(masks.sum())))
    with (out / "summary.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["volume", "slices", "tumour_slices", "tumour_pixels"])
        for s in summaries:
            w.writerow([s.volume, s.slices, s.tumour_slices, s.tumour_pixels])
    return summaries
