"""Slice image files in and out: the one reader of `.tif`/`.png` slices and masks, shared
by the kaggle_3m data path and the prediction path, and the writers of mask PNGs.

Naming: a slice is `<stem>_<n>.<ext>` and its mask `<stem>_<n>_mask.<ext>`; slices are
ordered by `n` numerically (2 before 10). Other names in a folder of slices are ordered
naturally (digit runs compared as numbers). Slice numbers missing between the first and
the last (`slice_gaps`) are read as they are, without the missing slice, with a warning:
the volume then has a step where the slice was lost.

Masks: any non-zero pixel is tumour (kaggle_3m stores 0/255; other tools write 0/1 or a
label map 0/1/2/...), the same rule as for NIfTI labels.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from tumorseg.data.normalization import fill_missing_sequences
from tumorseg.errors import DataError
from tumorseg.fileio import atomic_write

log = logging.getLogger("tumorseg")

IMAGE_SUFFIXES = (".tif", ".tiff", ".png")
SLICE_RE = re.compile(r"^(?P<stem>.+?)_(?P<num>\d+)(?P<mask>_mask)?\.(?P<ext>tiff?|png)$", re.I)
# Files that tumorseg itself writes next to slices; never read back as input.
OUTPUT_SUFFIXES = ("_mask", "_pred", "_overlay")
# How to fix a slice of another bit depth: the normalisation is per volume, so one linear
# scale for all slices of a sequence keeps their relation.
TO_8_BIT = ("rescale each sequence linearly to 0-255 with one scale for all slices of the volume, "
            "e.g. numpy: (x * 255.0 / x.max()).astype('uint8'), and save 8-bit")


def slice_number(path: Path) -> int | None:
    """The `n` of `<stem>_<n>.tif` (None for other names)."""
    m = SLICE_RE.match(path.name)
    return int(m.group("num")) if m else None


def slice_numbers(files: Sequence[Path]) -> list[int]:
    """The slice numbers of the files named `<stem>_<n>.<ext>` among `files`."""
    return [n for f in files if (n := slice_number(Path(f))) is not None]


def slice_sort_key(path: Path) -> tuple:
    """Numeric order of slice numbers, then natural order of other names."""
    n = slice_number(path)
    if n is not None:
        return (0, n, path.name)
    return (1, [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)], path.name)


def slice_gaps(numbers: Sequence[int]) -> list[int]:
    """The slice numbers missing between the smallest and the largest of `numbers`, in
    order: [11] for 1-10 and 12-20. Numbers before the first are not counted (a folder
    may start at 0 or 1)."""
    present = set(numbers)
    if not present:
        return []
    return [n for n in range(min(present), max(present) + 1) if n not in present]


def describe_numbers(numbers: Sequence[int], limit: int = 10) -> str:
    """Numbers as runs, for messages: "11, 14-16" (at most `limit` runs, then "...")."""
    runs: list[list[int]] = []
    for n in sorted(numbers):
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    text = [f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:limit]]
    return ", ".join(text) + (", ..." if len(runs) > limit else "")


def warn_slice_gaps(folder: Path | str, numbers: Sequence[int]) -> list[int]:
    """`slice_gaps(numbers)`, with a warning (logger "tumorseg") naming `folder` and the
    missing numbers when there are any."""
    gaps = slice_gaps(numbers)
    if gaps:
        log.warning(f"{folder}: slice number(s) {describe_numbers(gaps)} missing between {min(numbers)} and "
                    f"{max(numbers)}; the volume is read without them (restore them for a gap-free volume)")
    return gaps


def check_not_folder(path: Path) -> None:
    """Refuse a folder named like a slice (`<patient>_5.tif/`), which would otherwise be
    skipped without a word.

    Raises:
        DataError: `path` is a folder.
    """
    if path.is_dir():
        raise DataError(f"{path} is a folder named like a slice image; a slice must be a file: move the image out "
                        "of it (or rename the folder)")


def webp_hint(folder: Path) -> str | None:
    """A one-line explanation when `folder` holds `.webp` slices (which are not read), else None."""
    webp = sorted(p.name for p in folder.iterdir() if p.suffix.lower() == ".webp" and not p.name.startswith("."))
    if not webp:
        return None
    return (f"{folder}: its slices are .webp images ({webp[0]}, ... {len(webp)} in all), which are not read; "
            "convert the .webp slices to .tif/.png (a packed copy of kaggle_3m must be restored first)")


def slice_images(folder: Path) -> list[Path]:
    """The image slices of a folder in slice order: `.tif/.tiff/.png` files that are not
    hidden and not masks or tumorseg outputs. Gaps in the slice numbers are not checked
    here: `slice_gaps(slice_numbers(files))` lists them, and `read_volume` warns.

    Raises:
        DataError: two files with the same slice number (`_1` and `_01`), as kaggle.list_slices;
            a folder named like a slice; only `.webp` slices (not read).
    """
    files = []
    for p in folder.iterdir():
        if p.name.startswith(".") or p.suffix.lower() not in IMAGE_SUFFIXES or p.stem.lower().endswith(OUTPUT_SUFFIXES):
            continue
        check_not_folder(p)
        if p.is_file():
            files.append(p)
    files.sort(key=slice_sort_key)
    if not files and (hint := webp_hint(folder)):
        raise DataError(hint)
    seen: dict[int, Path] = {}
    for p in files:
        n = slice_number(p)
        if n is not None and n in seen:
            raise DataError(f"{folder}: two files for slice {n}: {seen[n].name} and {p.name}; keep one")
        if n is not None:
            seen[n] = p
    return files


def _open(path: Path) -> Image.Image:
    try:
        im = Image.open(path)
        im.load()  # decode now so that truncated files fail here, not later
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: {e}; an MRI slice is far smaller, is this the right file?") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: unreadable or truncated image ({e}); re-download this file") from e
    return im


def read_image(path: str | Path) -> np.ndarray:
    """Read an image slice as uint8 (H, W, 3) in the order pre-contrast, FLAIR, post-contrast.

    A single-channel 8-bit slice is taken as FLAIR alone and copied into all three
    channels, as kaggle_3m fills a missing sequence with FLAIR (`read_volume` says so).

    Raises:
        DataError: unreadable file, not 8-bit, or neither 1 nor 3 channels.
    """
    return _read_image(Path(path))[0]


def _read_image(path: Path) -> tuple[np.ndarray, bool]:
    """(uint8 (H, W, 3), whether the file had a single channel)."""
    im = _open(path)
    if im.mode == "RGB":
        return np.asarray(im, dtype=np.uint8), False
    if im.mode == "L":
        grey = np.asarray(im, dtype=np.uint8)
        return np.repeat(grey[..., None], 3, axis=2), True
    if im.mode == "P":
        raise DataError(f"{path}: a palette image (mode P), not an MRI slice; save the three sequences "
                        f"(pre-contrast, FLAIR, post-contrast) as the channels of an 8-bit RGB image")
    if im.mode in ("1", "RGBA", "LA", "CMYK"):
        raise DataError(f"{path}: expected 3 channels (pre-contrast, FLAIR, post-contrast) or FLAIR alone, "
                        f"got {len(im.getbands())} (mode {im.mode}); save the three sequences as the "
                        "channels of an 8-bit RGB image")
    raise DataError(f"{path}: {_depth(im.mode)} pixels (mode {im.mode}), expected 8-bit (uint8); " + TO_8_BIT)


def _depth(mode: str) -> str:
    if mode == "F":
        return "32-bit float"
    if mode.startswith("I;16"):
        return "16-bit"
    if mode == "I":
        return "32-bit integer"
    return "non-8-bit"


def read_mask(path: str | Path) -> np.ndarray:
    """Read a mask slice as uint8 (H, W) with values 0/1: any non-zero pixel is tumour.

    kaggle_3m stores 0/255; other tools write 0/1 or label maps (0/1/2/...: every label is
    tumour); all read the same. 8- or 16-bit grey, 1-bit and RGB masks are read (RGB: a
    pixel is tumour when any channel is non-zero, so a grey mask saved as RGB and a
    coloured label on black both read right).

    Raises:
        DataError: unreadable file, or another pixel type (palette, float, with alpha).
    """
    path = Path(path)
    im = _open(path)
    if im.mode == "1":
        im = im.convert("L")
    if im.mode not in ("L", "RGB", "I") and not im.mode.startswith("I;16"):
        raise DataError(f"{path}: expected a grey mask (8- or 16-bit, or RGB), got mode {im.mode}; save masks as "
                        "8-bit grey images, 0 for background and 255 (any non-zero value) for tumour")
    arr = np.asarray(im)
    if arr.ndim == 3:
        arr = arr.any(axis=2)
    return (arr != 0).astype(np.uint8)


def read_volume(files: Sequence[Path], name: str) -> np.ndarray:
    """Read the image slices `files` (in order) of volume `name` as uint8 (S, H, W, 3).

    Single-channel slices are FLAIR alone (see `read_image`); a pre- or post-contrast
    sequence that is constant over a volume of several slices (missing, filled with zeros
    by another tool) is replaced by FLAIR (`normalization.fill_missing_sequences`). Both
    with a warning naming the volume. Slice numbers missing between the first and the last
    (`slice_gaps`) are warned about (logger "tumorseg"), naming the folder.

    Raises:
        DataError: an unreadable slice, or slices of different sizes.
    """
    warn_slice_gaps(Path(files[0]).parent if files else name, slice_numbers(files))
    slices: list[np.ndarray] = []
    grey = 0
    for f in files:
        img, single = _read_image(Path(f))
        grey += single
        if slices and img.shape != slices[0].shape:
            raise DataError(f"{f}: size {img.shape[1]}x{img.shape[0]} differs from "
                            f"{slices[0].shape[1]}x{slices[0].shape[0]} of the other slices of {name}; "
                            "all slices of a volume must have one size")
        slices.append(img)
    if not slices:
        raise DataError(f"{name}: no image slices")
    if grey:
        warnings.warn(f"{name}: {grey} of {len(slices)} slices have one channel; read as FLAIR, with FLAIR "
                      "also in place of the pre- and post-contrast sequences (as kaggle_3m fills missing "
                      "sequences)", stacklevel=2)
    volume = np.stack(slices)
    if len(volume) > 1:  # one slice may lack a sequence where the head ends; a volume may not
        volume, filled = fill_missing_sequences(volume)
        if filled:
            warnings.warn(f"{name}: {' and '.join(filled)} constant over all {len(volume)} slices (a missing "
                          "sequence); filled with FLAIR, as kaggle_3m does", stacklevel=2)
    return volume


def write_image(path: str | os.PathLike[str], pixels: np.ndarray) -> Path:
    """Write uint8 RGB (H, W, 3) or grey (H, W) pixels to a PNG, or to an uncompressed
    TIFF when the name ends in .tif/.tiff (as kaggle_3m stores its slices), atomically."""
    arr = np.asarray(pixels)
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"expected uint8 (H, W, 3) or (H, W), got {arr.dtype} {arr.shape}")
    img = Image.fromarray(np.ascontiguousarray(arr), mode="RGB" if arr.ndim == 3 else "L")
    fmt = "TIFF" if Path(path).suffix.lower() in (".tif", ".tiff") else "PNG"
    return atomic_write(path, lambda f: img.save(f, format=fmt))


def write_mask(path: str | os.PathLike[str], mask: np.ndarray) -> Path:
    """Write a binary mask (H, W) as an 8-bit grey image (PNG or TIFF, see `write_image`):
    0 background, 255 tumour (the kaggle_3m `_mask.tif` convention)."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"expected a mask (H, W), got shape {m.shape}")
    return write_image(path, np.where(m.astype(bool), 255, 0).astype(np.uint8))
