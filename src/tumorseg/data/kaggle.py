"""Reading the Kaggle `kaggle_3m` layout exactly as downloaded.

    kaggle_3m/
      data.csv                     optional per-patient metadata
      README.md                    ignored (as are hidden files and other stray files)
      TCGA_CS_4941_19960909/
        TCGA_CS_4941_19960909_1.tif        256x256x3 uint8 (pre-contrast, FLAIR, post-contrast)
        TCGA_CS_4941_19960909_1_mask.tif   256x256 uint8, 0 or 255
        ...
"""

from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tumorseg.data.slices import SLICE_RE, check_not_folder, read_mask, read_volume, webp_hint
from tumorseg.errors import DataError


@dataclass(frozen=True)
class SliceFiles:
    """One slice of a patient: its number, image file and mask file (None if absent)."""

    number: int
    image: Path
    mask: Path | None


def is_patient_dir(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".") and any(
        SLICE_RE.match(p.name) and not p.name.startswith(".") for p in path.iterdir()
    )


def find_patient_dirs(root: str | Path) -> list[Path]:
    """Patient folders under `root`, sorted by name.

    `root` may be the `kaggle_3m` folder, a folder holding `kaggle_3m` (such as the
    unzipped Kaggle download), or a single patient folder.

    Raises:
        DataError: `root` does not exist or holds no patient folder.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; download kaggle_3m from Kaggle "
                        "(lgg-mri-segmentation) and pass its path")
    if not root.is_dir():
        raise DataError(f"{root} is a file; pass the kaggle_3m folder")
    for candidate in (root, root / "kaggle_3m", root / "lgg-mri-segmentation" / "kaggle_3m"):
        if not candidate.is_dir():
            continue
        dirs = sorted(p for p in candidate.iterdir() if is_patient_dir(p))
        if dirs:
            return dirs
    if is_patient_dir(root):
        return [root]
    raise DataError(f"{root} holds no patient folder with <patient>_<n>.tif slices; "
                    "pass the kaggle_3m folder of the Kaggle lgg-mri-segmentation download")


def list_slices(patient_dir: str | Path, require_masks: bool = True) -> list[SliceFiles]:
    """Slices of one patient folder ordered by slice number (numerically).

    Stray files (hidden files, .DS_Store, README.md, data.csv, anything not named
    `<stem>_<n>.tif` / `<stem>_<n>_mask.tif`) are ignored. Gaps in the slice numbers are
    allowed: `slice_gaps([s.number for s in slices])` lists them and `read_patient` warns.

    Raises:
        DataError: empty folder, a mask without its image, an image without its mask
            (when `require_masks`), two files for the same slice number, a folder named
            like a slice, or `.webp` slices (not read).
    """
    patient_dir = Path(patient_dir)
    if not patient_dir.is_dir():
        raise DataError(f"patient folder {patient_dir} does not exist")
    images: dict[int, Path] = {}
    masks: dict[int, Path] = {}
    for p in patient_dir.iterdir():
        m = SLICE_RE.match(p.name)
        if p.name.startswith(".") or not m:
            continue
        check_not_folder(p)
        if not p.is_file():
            continue
        num = int(m.group("num"))
        target = masks if m.group("mask") else images
        if num in target:
            raise DataError(f"{patient_dir}: two files for slice {num}: {target[num].name} and "
                            f"{p.name}; keep one")
        target[num] = p
    orphans = sorted(set(masks) - set(images))
    if (orphans or not images) and (hint := webp_hint(patient_dir)):
        raise DataError(hint)
    if not images and not masks:
        raise DataError(f"{patient_dir} holds no slice files (<patient>_<n>.tif)")
    if orphans:
        raise DataError(f"{masks[orphans[0]]}: mask without its image "
                        f"{masks[orphans[0]].name.replace('_mask', '')}; restore or delete it")
    missing = sorted(set(images) - set(masks))
    if require_masks and missing:
        img = images[missing[0]]
        raise DataError(f"{img}: image without its mask {img.stem}_mask{img.suffix} "
                        f"({len(missing)} slice(s) lack masks); restore the masks or delete the image")
    return [SliceFiles(n, images[n], masks.get(n)) for n in sorted(images)]


def read_patient(
    patient_dir: str | Path, require_masks: bool = True
) -> tuple[list[int], np.ndarray, np.ndarray | None]:
    """Read all slices of a patient. Missing slice numbers are warned about (see
    `slices.read_volume`) and show in the returned numbers (`slices.slice_gaps`).

    Returns:
        (slice numbers, images uint8 (S, H, W, 3), masks uint8 (S, H, W) or None when the
        folder has no masks at all).

    Raises:
        DataError: see `list_slices`, `read_image`, `read_mask`; slices of different sizes.
    """
    files = list_slices(patient_dir, require_masks=require_masks)
    has_masks = all(f.mask is not None for f in files)  # some missing: treated as unlabelled
    images = read_volume([f.image for f in files], f"patient {Path(patient_dir).name}")
    masks = []
    if has_masks:
        for f, img in zip(files, images, strict=True):
            assert f.mask is not None  # has_masks
            mask = read_mask(f.mask)
            if mask.shape != img.shape[:2]:
                raise DataError(f"{f.mask}: size {mask.shape[1]}x{mask.shape[0]} differs from its "
                                f"image {img.shape[1]}x{img.shape[0]}")
            masks.append(mask)
    return [f.number for f in files], images, np.stack(masks) if has_masks else None


def read_metadata(root: str | Path) -> dict[str, dict[str, str]]:
    """Per-patient rows of `data.csv` keyed by the `Patient` column (empty if no file).

    The table is optional: an unreadable one gives a warning and no metadata.
    """
    root = Path(root)
    for candidate in (root / "data.csv", root / "kaggle_3m" / "data.csv"):
        if candidate.is_file():
            try:
                with candidate.open(newline="", encoding="utf-8") as f:
                    return {row["Patient"]: row for row in csv.DictReader(f) if row.get("Patient")}
            except (OSError, UnicodeDecodeError, csv.Error) as e:
                warnings.warn(f"{candidate}: unreadable metadata table ({type(e).__name__}); "
                              "going on without it", stacklevel=2)
                return {}
    return {}
