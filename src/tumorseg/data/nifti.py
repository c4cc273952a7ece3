"""Patients given as NIfTI volumes (.nii, .nii.gz), read with nibabel.

A patient is a folder with one file per sequence, named by the common conventions
(matched on the last `_`- or `-`-separated word of the file name, any case):

    FLAIR          *_flair, *-t2f (BraTS 2023)          required
    pre-contrast   *_t1, *-t1n                          optional
    post-contrast  *_t1ce, *_t1gd, *_t1c, *-t1c          optional
    label          *_seg, *_mask, *_label               optional (any non-zero voxel is tumour)

or the same files named explicitly (`NiftiFiles`). T2 (`*_t2`, `*-t2w`) is not an input of
the model and is ignored. A missing pre- or post-contrast sequence is filled with FLAIR,
as kaggle_3m does for its missing sequences (the model is trained for that).

Geometry. kaggle_3m's TIFFs carry no header; from the TCGA-LGG series they come from, and
as DICOM viewers display axial slices, their layout is: axial slices, slice 1 the most
inferior; row 0 anterior; columns running from the patient's right to the patient's
left (radiological convention: the patient's right on the image's left). In nibabel's
axis codes (the direction in which each array axis runs) that is ("S", "P", "L") for the
array (slice, row, column). Every volume is reoriented to that layout (a permutation
and flips of the voxel order, no interpolation) and the masks are written back in the
input's own voxel order, with its affine and header. The model is trained with
horizontal flips, so a left-right convention error costs little.

In-plane scale. The TIFFs carry no spacing either: 256x256 slices of fields of view of
about 220-260 mm, so TRAINING_SPACING = 0.94 mm per pixel is assumed. When a volume's
in-plane spacing is off by more than RESAMPLE_TOLERANCE (25%), its slices are resampled
(linear) to TRAINING_SPACING before prediction and the probabilities back to the input
grid afterwards; the slice axis is never resampled.
"""

from __future__ import annotations

import gzip
import logging
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tumorseg.config import CHANNELS
from tumorseg.data.normalization import fill_missing_sequences
from tumorseg.errors import DataError
from tumorseg.fileio import atomic_write

log = logging.getLogger("tumorseg")

NIFTI_SUFFIXES = (".nii", ".nii.gz")
MODEL_AXES = ("S", "P", "L")  # (slice, row, column) of kaggle_3m, in nibabel axis codes
TRAINING_SPACING = 0.94  # mm per pixel assumed for the kaggle_3m slices
RESAMPLE_TOLERANCE = 1.25  # resample in-plane when the spacing is off by more than this factor
SEQUENCE_WORDS: dict[str, tuple[str, ...]] = {
    "FLAIR": ("flair", "t2f"),
    "pre-contrast": ("t1", "t1n"),
    "post-contrast": ("t1ce", "t1gd", "t1c"),
    "label": ("seg", "mask", "label"),
}
IGNORED_WORDS = ("t2", "t2w")


def is_nifti(path: str | Path) -> bool:
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | Path) -> str:
    """The file name without .nii or .nii.gz."""
    name = Path(path).name
    return re.sub(r"\.nii(\.gz)?$", "", name, flags=re.IGNORECASE)


def patient_name(path: str | Path) -> str:
    """A NIfTI file's name without .nii(.gz) and without a trailing sequence word (_flair ...)."""
    stem = nifti_stem(path)
    words = re.split(r"([_\-])", stem)
    if len(words) > 2 and words[-1].lower() in {w for ws in SEQUENCE_WORDS.values() for w in ws}:
        return "".join(words[:-2])
    return stem


@dataclass
class NiftiFiles:
    """The files of one NIfTI patient, by sequence."""

    name: str
    flair: Path
    pre: Path | None = None  # T1 before contrast
    post: Path | None = None  # T1 after contrast
    label: Path | None = None

    def sequences(self) -> dict[str, Path | None]:
        return {"pre-contrast": self.pre, "FLAIR": self.flair, "post-contrast": self.post}


def find_sequences(folder: str | Path) -> NiftiFiles:
    """The sequence files of a NIfTI patient folder (see the module docstring).

    Raises:
        DataError: no FLAIR file, or two files for one sequence.
    """
    folder = Path(folder)
    found: dict[str, list[Path]] = {k: [] for k in SEQUENCE_WORDS}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith(".") or not is_nifti(path):
            continue
        word = re.split(r"[_\-]", nifti_stem(path).lower())[-1]
        for sequence, words in SEQUENCE_WORDS.items():
            if word in words:
                found[sequence].append(path)
    for sequence, paths in found.items():
        if len(paths) > 1:
            raise DataError(f"{folder}: {len(paths)} files for {sequence} ({', '.join(p.name for p in paths)}); "
                            "keep one, or name the files with --flair/--t1/--t1c/--mask")
    if not found["FLAIR"]:
        raise DataError(f"{folder}: no FLAIR volume (a file named *_flair.nii.gz or *-t2f.nii.gz); FLAIR is "
                        "required, or name it with --flair")
    first = lambda k: found[k][0] if found[k] else None  # noqa: E731
    return NiftiFiles(name=folder.name, flair=found["FLAIR"][0], pre=first("pre-contrast"),
                      post=first("post-contrast"), label=first("label"))


def is_nifti_patient(folder: str | Path) -> bool:
    folder = Path(folder)
    return folder.is_dir() and any(is_nifti(p) for p in folder.iterdir() if p.is_file())


def find_nifti_patients(root: str | Path) -> list[NiftiFiles]:
    """The NIfTI patients at `root`: `root` itself when it holds NIfTI files, else its
    sub-folders that do, sorted by name ([] when there are none).

    Raises:
        DataError: a patient folder without FLAIR or with two files for one sequence.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    if is_nifti_patient(root):
        return [find_sequences(root)]
    return [find_sequences(p) for p in sorted(root.iterdir())
            if not p.name.startswith(".") and is_nifti_patient(p)]


@dataclass
class Grid:
    """Where a volume's voxels are: its shape, affine and header, and how its voxel order
    maps to the model's (slice, row, column)."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    header: object  # nibabel header of the FLAIR file
    to_model: np.ndarray  # nibabel orientation transform, input voxel order -> MODEL_AXES
    spacing: tuple[float, float, float]  # mm along the model's (slice, row, column)

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0


@dataclass
class NiftiPatient:
    """A NIfTI patient in the model's layout."""

    name: str
    volume: np.ndarray  # float32 (S, H, W, 3) in CHANNELS order, model orientation, input grid
    grid: Grid
    label: np.ndarray | None = None  # bool (S, H, W), model orientation
    filled: list[str] = field(default_factory=list)  # sequences filled with FLAIR


def _load(path: Path):
    """(nibabel image, float32 3-D data) of one NIfTI file.

    Raises:
        DataError: not a NIfTI file, truncated, not 3-D, or NaN voxels.
    """
    import nibabel as nib

    if not path.is_file():
        raise DataError(f"{path} does not exist")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, zlib.error, ValueError) as e:
        detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: not a readable NIfTI file ({detail}); is it truncated or another format?") from e
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        what = "a 4-D series" if data.ndim == 4 else f"{data.ndim}-D"
        raise DataError(f"{path} is {what} (shape {data.shape}); pass one 3-D volume per sequence"
                        + (" (for single 2-D slices use .tif/.png)" if data.ndim == 2 else ""))
    nans = int(np.isnan(data).sum())
    if nans:
        raise DataError(f"{path} has {nans} NaN voxels; replace them (e.g. with 0) before segmenting")
    return img, data


def _same_grid(a, b) -> bool:
    return a.shape[:3] == b.shape[:3] and np.allclose(a.affine, b.affine, atol=1e-3)


def read_nifti_patient(files: NiftiFiles, *, require_label: bool = False) -> NiftiPatient:
    """Read a NIfTI patient into the model's layout (see the module docstring).

    Raises:
        DataError: an unreadable file, sequences or a label on another grid than FLAIR,
            or no label when `require_label`.
    """
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    flair_img, flair = _load(files.flair)
    to_model = ornt_transform(io_orientation(flair_img.affine), axcodes2ornt(MODEL_AXES))
    zooms = flair_img.header.get_zooms()[:3]
    spacing = [0.0, 0.0, 0.0]
    for axis, (target, _) in enumerate(to_model):
        spacing[int(target)] = float(zooms[axis])
    grid = Grid(shape=tuple(int(s) for s in flair.shape), affine=flair_img.affine, header=flair_img.header,
                to_model=to_model, spacing=(spacing[0], spacing[1], spacing[2]))
    channels, filled = [], []
    for name, path in files.sequences().items():
        if path is None:
            channels.append(flair)
            filled.append(name)
            continue
        img, data = (flair_img, flair) if path == files.flair else _load(path)
        if not _same_grid(img, flair_img):
            raise DataError(f"{path.name} and {files.flair.name} are on different grids (shape {img.shape[:3]} vs "
                            f"{flair_img.shape[:3]} or different affines); co-register or resample them onto the "
                            "FLAIR grid first (e.g. with ANTs, FSL flirt or SimpleITK)")
        channels.append(data)
    volume = np.stack([apply_orientation(c, to_model) for c in channels], axis=-1).astype(np.float32)
    volume, constant = fill_missing_sequences(volume)  # a sequence written as zeros by another tool
    filled += constant
    if filled:
        log.warning(f"{files.name}: no {' and no '.join(filled)} volume (or a constant one); filled with FLAIR, as "
                    "kaggle_3m does for missing sequences (the model is trained for this)")
    label = None
    if files.label is not None:
        img, data = _load(files.label)
        if not _same_grid(img, flair_img):
            raise DataError(f"label {files.label.name} is on another grid than {files.flair.name} (shape "
                            f"{img.shape[:3]} vs {flair_img.shape[:3]} or different affines); resample it onto "
                            "the FLAIR grid (nearest neighbour)")
        label = apply_orientation(data, to_model) != 0
    elif require_label:
        raise DataError(f"{files.name}: no label file (*_seg.nii.gz or *_mask.nii.gz); evaluation needs one")
    assert volume.shape[-1] == len(CHANNELS)
    return NiftiPatient(name=files.name, volume=np.ascontiguousarray(volume), grid=grid, label=label, filled=filled)


# ---------------------------------------------------------------------- in-plane scale

def inplane_factors(grid: Grid) -> tuple[float, float] | None:
    """The zoom factors (rows, columns) that bring a volume to TRAINING_SPACING, or None
    when its spacing is within RESAMPLE_TOLERANCE of it."""
    rows, cols = grid.spacing[1], grid.spacing[2]
    if all(1 / RESAMPLE_TOLERANCE <= s / TRAINING_SPACING <= RESAMPLE_TOLERANCE for s in (rows, cols)):
        return None
    return rows / TRAINING_SPACING, cols / TRAINING_SPACING


def resample_slices(array: np.ndarray, shape: tuple[int, int], order: int = 1) -> np.ndarray:
    """Resample every slice of `array` (S, H, W[, C]) to `shape` (linear by default)."""
    from scipy.ndimage import zoom

    h, w = array.shape[1:3]
    factors = (1.0, shape[0] / h, shape[1] / w) + ((1.0,) if array.ndim == 4 else ())
    out = zoom(array, factors, order=order, grid_mode=True, mode="nearest")
    return out[:, : shape[0], : shape[1]]


def to_training_scale(patient: NiftiPatient) -> tuple[np.ndarray, tuple[int, int] | None]:
    """The volume at TRAINING_SPACING in-plane (or as it is), and the input's in-plane
    shape when it was resampled (None otherwise)."""
    factors = inplane_factors(patient.grid)
    if factors is None:
        return patient.volume, None
    h, w = patient.volume.shape[1:3]
    target = (max(16, round(h * factors[0])), max(16, round(w * factors[1])))
    log.warning(f"{patient.name}: in-plane spacing {patient.grid.spacing[1]:.2f} x {patient.grid.spacing[2]:.2f} mm "
                f"is far from the {TRAINING_SPACING} mm the model was trained at; resampling {h}x{w} -> "
                f"{target[0]}x{target[1]} for prediction, and back")
    return resample_slices(patient.volume, target), (h, w)


def training_arrays(patient: NiftiPatient) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float, float]]:
    """What the cache keeps of a NIfTI patient: the volume at the model's scale (see
    `to_training_scale`) in the smallest data type that holds its values exactly
    (`exact_dtype`), the label resampled the same way (nearest neighbour) as uint8 0/1,
    and the spacing (slice, row, column) in mm of those arrays."""
    volume, input_shape = to_training_scale(patient)
    label = None if patient.label is None else patient.label.astype(np.uint8)
    spacing = patient.grid.spacing
    if input_shape is not None:
        h, w = volume.shape[1:3]
        if label is not None:
            label = resample_slices(label, (h, w), order=0)
        spacing = (spacing[0], spacing[1] * input_shape[0] / h, spacing[2] * input_shape[1] / w)
    return volume.astype(exact_dtype(volume), copy=False), label, spacing


def exact_dtype(values: np.ndarray) -> type:
    """uint8 or int16 when every value is an integer in their range, float32 otherwise:
    the cheapest type that keeps the normalisation statistics exact (scanners write
    12-16-bit integers; a BraTS patient, 155 x 240 x 240 x 3 voxels, takes 54 MB as
    int16 and 107 MB as float32)."""
    if values.size and np.array_equal(values, np.round(values)):
        low, high = float(values.min()), float(values.max())
        if low >= 0 and high <= 255:
            return np.uint8
        if low >= -32768 and high <= 32767:
            return np.int16
    return np.float32


# ---------------------------------------------------------------------- writing

def to_input_order(array: np.ndarray, grid: Grid) -> np.ndarray:
    """An array in the model's layout back in the input file's voxel order."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

    back = ornt_transform(axcodes2ornt(MODEL_AXES), _input_ornt(grid))
    out = apply_orientation(array, back)
    if out.shape != grid.shape:
        raise AssertionError(f"reoriented shape {out.shape} != input shape {grid.shape}")
    return np.ascontiguousarray(out)


def _input_ornt(grid: Grid) -> np.ndarray:
    from nibabel.orientations import io_orientation

    return io_orientation(grid.affine)


def write_nifti(path: str | Path, array: np.ndarray, grid: Grid, dtype: type = np.uint8) -> Path:
    """Write `array` (model layout) as a NIfTI file on the input's grid: the input's
    voxel order, affine and header geometry, data type `dtype` without scaling. Written
    atomically; gzip-compressed for .nii.gz."""
    import nibabel as nib

    data = to_input_order(np.asarray(array).astype(dtype), grid)
    header = grid.header.copy()
    header.set_data_dtype(dtype)
    img = nib.Nifti1Image(data, grid.affine, header=header)
    img.header.set_slope_inter(1.0, 0.0)
    raw = img.to_bytes()
    path = Path(path)
    payload = gzip.compress(raw, compresslevel=6) if path.name.lower().endswith(".gz") else raw
    return atomic_write(path, lambda f: f.write(payload))


def nifti_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """The NIfTI files among `paths`."""
    return [Path(p) for p in paths if is_nifti(p)]


# ---------------------------------------------------------------------- kaggle_3m -> NIfTI

DEFAULT_SPACING = (1.0, TRAINING_SPACING, TRAINING_SPACING)  # (slice, row, column) mm assumed for kaggle_3m
CONVERTED_NAMES = {"pre-contrast": "t1", "FLAIR": "flair", "post-contrast": "t1ce"}


def kaggle_affine(spacing: Sequence[float]) -> np.ndarray:
    """The affine of a converted kaggle_3m volume stored as (column, row, slice): LPS voxel
    order (x toward the patient's left, y toward posterior, z toward superior), the layout
    DICOM and ITK use, so viewers show it the right way up. Origin at 0."""
    dz, dy, dx = (float(s) for s in spacing)
    return np.diag([-dx, -dy, dz, 1.0])


def kaggle_to_nifti(patient_dir: str | Path, out_dir: str | Path,
                    spacing: Sequence[float] = DEFAULT_SPACING) -> list[Path]:
    """Write a kaggle_3m patient folder as NIfTI: `<out>/<patient>/<patient>_{t1,flair,t1ce}.nii.gz`
    (uint8, the TIFF values unchanged) and `<patient>_seg.nii.gz` (uint8 0/1) when it has
    masks, on the grid of `kaggle_affine(spacing)`. Read back with `read_nifti_patient`,
    the volume equals the TIFF volume voxel for voxel.

    Raises:
        DataError: an unreadable patient folder.
    """
    from tumorseg.data.kaggle import read_patient

    patient_dir = Path(patient_dir)
    name = patient_dir.name
    _, images, masks = read_patient(patient_dir, require_masks=False)
    folder = Path(out_dir) / name
    volumes = {f"{name}_{CONVERTED_NAMES[c]}.nii.gz": images[..., i].astype(np.uint8) for i, c in enumerate(CHANNELS)}
    if masks is not None:
        volumes[f"{name}_seg.nii.gz"] = (masks > 0).astype(np.uint8)
    return [write_kaggle_volume(folder / filename, array, spacing) for filename, array in volumes.items()]


def write_kaggle_volume(path: str | Path, array: np.ndarray, spacing: Sequence[float] = DEFAULT_SPACING) -> Path:
    """Write a volume in the kaggle_3m layout (slice, row, column) as NIfTI on the grid of
    `kaggle_affine(spacing)`, in its own data type, atomically (gzip for .nii.gz)."""
    import nibabel as nib

    img = nib.Nifti1Image(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)), kaggle_affine(spacing))
    img.header.set_xyzt_units("mm")
    img.header.set_slope_inter(1.0, 0.0)
    raw = img.to_bytes()
    path = Path(path)
    payload = gzip.compress(raw, compresslevel=6) if path.name.lower().endswith(".gz") else raw
    return atomic_write(path, lambda f: f.write(payload))


# ---------------------------------------------------------------------- NIfTI -> kaggle_3m

def nifti_to_kaggle(files: NiftiFiles, out_dir: str | Path) -> list[Path]:
    """Write a NIfTI patient as a kaggle_3m patient folder: `<out>/<name>/<name>_<k>.tif`
    (RGB uint8: pre-contrast, FLAIR, post-contrast; k = 1 the most inferior slice) and
    `<name>_<k>_mask.tif` (0/255) when it has a label, in the model's orientation. When
    every value is an integer in 0-255 the values are kept as they are (a converted
    kaggle_3m patient comes back file for file); otherwise each sequence is scaled
    linearly from its minimum to its maximum onto 0-255, with a warning (8 bits lose precision: predict on the NIfTI
    files where you can). The in-plane grid is kept; the spacing is lost (TIFFs have none).

    Raises:
        DataError: an unreadable or inconsistent patient (see `read_nifti_patient`).
    """
    from tumorseg.data.slices import write_image, write_mask

    patient = read_nifti_patient(files)
    volume = patient.volume
    scaled = []
    if exact_dtype(volume) is not np.uint8:
        out = np.empty(volume.shape, dtype=np.uint8)
        for c in range(volume.shape[-1]):
            low, high = float(volume[..., c].min()), float(volume[..., c].max())
            out[..., c] = np.round((volume[..., c] - low) * (255.0 / (high - low))) if high > low else 0
            scaled.append(f"{CHANNELS[c]} {low:g}..{high:g}")
        log.warning(f"{files.name}: intensities scaled to 8 bits for the TIFFs ({', '.join(scaled)} -> 0..255)")
        volume = out
    folder = Path(out_dir) / patient.name
    written = []
    for k in range(len(volume)):
        written.append(write_image(folder / f"{patient.name}_{k + 1}.tif", volume[k].astype(np.uint8)))
        if patient.label is not None:
            written.append(write_mask(folder / f"{patient.name}_{k + 1}_mask.tif", patient.label[k]))
    return written
