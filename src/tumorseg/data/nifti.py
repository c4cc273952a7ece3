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

Geometry. The affine of each file (its sform, else its qform) must map the voxel
indices (i, j, k) of the stored array to patient millimetres in the NIfTI RAS+ frame (x
toward the patient's right, y anterior, z superior). It must describe the rows and the
columns too, not only the slice axis: a volume stacked rows-first (array (row, column,
slice)) but saved with a diagonal affine claims that its first axis runs left-right, and
is read transposed. Which axis is
the slice axis, and which way rows and columns run, matter (the model sees axial slices
with the anterior at the top); the left-right convention matters little, as the model is
trained with left-right flips. An affine that places no voxel (all zero, singular, not
finite) or a file with sform_code = qform_code = 0 falls back to the diagonal affine of
the header's pixdim (nibabel's `get_base_affine`), with a warning; when pixdim is
unusable too the file is refused: set a valid sform or qform (e.g. copy them from the
scanner's DICOM conversion with `fslcpgeom`, or `nibabel`'s `set_sform`).

kaggle_3m's TIFFs carry no header; from the TCGA-LGG series they come from, and
as DICOM viewers display axial slices, their layout is: axial slices, slice 1 the most
inferior; row 0 anterior; columns running from the patient's right to the patient's
left (radiological convention: the patient's right on the image's left). In nibabel's
axis codes (the direction in which each array axis runs) that is ("S", "P", "L") for the
array (slice, row, column). Every volume is reoriented to that layout (a permutation
and flips of the voxel order, no interpolation) and the masks are written back in the
input's own voxel order, with its affine and header. The model is trained with
horizontal flips, so a left-right convention error costs little.

Grids. T1 and T1c (and the label) on another grid than FLAIR are resampled onto the
FLAIR grid through their affines (`resample.resample_to_grid`: linear for images,
nearest neighbour for the label), with a warning naming them; this assumes one session
in one scanner frame and does NOT correct motion between sequences. `resample=False`
refuses them instead.

Size. Before any voxel is read, the memory the pipeline will take for the patient
(`pipeline_bytes`) is compared with a limit (MAX_VOLUME_BYTES, 4 GiB; the environment
variable TUMORSEG_MAX_VOLUME_GB, in GiB, or `max_bytes` of `read_nifti_patient` change
it), so that a header claiming 30000^3 voxels is refused by name instead of exhausting
memory.

In-plane scale. The TIFFs carry no spacing either: 256x256 slices of fields of view of
about 220-260 mm, so TRAINING_SPACING = 0.94 mm per pixel is assumed. When a volume's
in-plane spacing is off by more than RESAMPLE_TOLERANCE (25%), its slices are resampled
(linear) to TRAINING_SPACING before prediction and the probabilities back to the input
grid afterwards; the slice axis is never resampled.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tumorseg.config import CHANNELS
from tumorseg.data.normalization import fill_missing_sequences
from tumorseg.data.resample import resample_to_grid
from tumorseg.errors import ConfigError, DataError
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
    resampled: tuple[str, ...] = ()  # sequences (and "label") resampled onto the FLAIR grid


# ---------------------------------------------------------------------- reading

MAX_VOLUME_BYTES = 4 * 2**30  # default limit on the memory one patient may take (pipeline_bytes)
MAX_VOLUME_ENV = "TUMORSEG_MAX_VOLUME_GB"  # environment variable overriding it, in GiB
MIN_COVERAGE = 0.5  # a resampled sequence must cover at least this fraction of the FLAIR grid


def max_volume_bytes(max_bytes: int | None = None) -> int:
    """The memory limit for one patient: `max_bytes` when given, else the environment
    variable TUMORSEG_MAX_VOLUME_GB (GiB) when set, else MAX_VOLUME_BYTES (4 GiB).

    Raises:
        ConfigError: TUMORSEG_MAX_VOLUME_GB is not a positive number.
    """
    return bytes_limit(max_bytes, MAX_VOLUME_ENV, MAX_VOLUME_BYTES,
                       lambda value: ConfigError(f"{MAX_VOLUME_ENV} must be a positive number of GB, got {value!r}"))


def bytes_limit(max_bytes: int | None, env: str, default: int, error: Callable[[str], Exception]) -> int:
    """A memory limit in bytes: `max_bytes` when given, else the environment variable
    `env` (GiB) when set, else `default`.

    Raises:
        `error(value)`: the variable is not a positive number.
    """
    if max_bytes is not None:
        return int(max_bytes)
    value = os.environ.get(env, "").strip()
    if not value:
        return default
    try:
        gb = float(value)
    except ValueError:
        gb = float("nan")
    if not (np.isfinite(gb) and gb > 0):
        raise error(value)
    return int(gb * 2**30)


def pipeline_bytes(flair_shape: Sequence[int], file_shapes: Sequence[Sequence[int]] = (),
                   resampled: int = 0, inplane_scale: float = 1.0) -> int:
    """About the bytes a patient takes from reading to probabilities, every copy counted:

    - each file as float32 (FLAIR's shape, and `file_shapes` for the other files);
    - float32 copies on the FLAIR grid of the `resampled` files on other grids;
    - the volume (S, H, W, 3) float32, twice (stacked, then reoriented or filled);
    - its copy at the training scale, `inplane_scale` times the voxels (S, H', W', 3),
      and the normalised copy the model reads;
    - the probabilities float32 and an ensemble's spread, at the training scale and on
      the input grid.

    Args:
        flair_shape: (I, J, K) of FLAIR.
        file_shapes: shapes of the other files read (T1, T1c, label).
        resampled: how many of them are resampled onto the FLAIR grid.
        inplane_scale: (H' * W') / (H * W) of the training-scale copy (1.0 when none).

    Returns:
        bytes, as a Python int (no overflow for any header).
    """
    n = int(np.prod([int(s) for s in flair_shape], dtype=object))
    files = n + sum(int(np.prod([int(s) for s in shape], dtype=object)) for shape in file_shapes)
    scaled = n if inplane_scale == 1.0 else int(n * float(inplane_scale))
    return 4 * (files + resampled * n + 2 * 3 * n + 2 * 3 * scaled + 2 * scaled + 2 * n)


def affine_problem(affine: np.ndarray) -> str | None:
    """Why `affine` cannot place voxels in space ("all zero", "not finite", "singular"),
    or None when it can."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.isfinite(a).all():
        return "not finite"
    m = a[:3, :3]
    if not m.any():
        return "all zero"
    norms = np.sqrt((m**2).sum(axis=0))
    if (norms == 0).any() or abs(np.linalg.det(m)) < 1e-6 * float(np.prod(norms)):
        return "singular"
    return None


def _raw_header(img, path: Path):
    """The header as stored (nibabel's load silently sets zero pixdim to 1)."""
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(path)) as f:
            return type(img.header).from_fileobj(f, check=False)
    except Exception:  # noqa: BLE001 (the header was read once already; fall back to it)
        return img.header


def usable_affine(img, path: Path) -> np.ndarray:
    """The affine of a loaded NIfTI image that places its voxels: the sform when its code
    is set and it is usable, else the qform likewise, else the diagonal affine of the
    header's pixdim (as nibabel's `get_base_affine`) with a warning naming the file.

    Raises:
        DataError: no usable sform or qform, and pixdim zero, negative or not finite.
    """
    header = img.header
    raw = _raw_header(img, path)
    sform_code, qform_code = int(raw["sform_code"]), int(raw["qform_code"])
    pixdim = np.asarray(raw["pixdim"][1:4], dtype=np.float64)
    pixdim_ok = bool(np.isfinite(pixdim).all() and (pixdim > 0).all())
    problems = []
    if sform_code > 0:
        affine = np.asarray(header.get_sform(), dtype=np.float64)
        if (why := affine_problem(affine)) is None:
            return affine
        problems.append(f"sform {why}")
    if qform_code > 0:
        affine = np.asarray(header.get_qform(), dtype=np.float64) if pixdim_ok else np.zeros((4, 4))
        if pixdim_ok and (why := affine_problem(affine)) is None:
            if problems:
                log.warning(f"{path}: {problems[0]}; using its qform")
            return affine
        problems.append("qform " + (why if pixdim_ok else "unusable (pixdim zero or not finite)"))
    what = ", ".join(problems) if problems else "no orientation (sform_code = qform_code = 0)"
    if not pixdim_ok:
        shown = ", ".join(f"{v:g}" for v in pixdim)
        raise DataError(f"{path}: the header places no voxel in space ({what}; pixdim {shown}); set a valid "
                        "sform or qform (voxel i, j, k -> RAS mm), e.g. with nibabel's set_sform or fslcpgeom")
    hdr = header.copy()
    hdr.set_zooms(tuple(float(z) for z in pixdim) + tuple(hdr.get_zooms()[3:]))
    affine = np.asarray(hdr.get_base_affine(), dtype=np.float64)
    log.warning(f"{path}: {what}; using the voxel sizes of pixdim ({', '.join(f'{v:g}' for v in pixdim)} mm) "
                "with the axes as stored (i toward the patient's left, j anterior, k superior); check the "
                "orientation of the result, or set a valid sform/qform")
    return affine


@dataclass(eq=False)  # compared by identity
class _File:
    """One NIfTI file opened (header only): the image, its usable affine and 3-D shape."""

    path: Path
    img: object
    affine: np.ndarray
    shape: tuple[int, int, int]


def _open(path: Path) -> _File:
    """Open a NIfTI file without reading its voxels.

    Raises:
        DataError: missing, not a NIfTI file, not 3-D, empty, or no usable geometry.
    """
    import nibabel as nib

    if not path.is_file():
        raise DataError(f"{path} does not exist")
    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, zlib.error, ValueError) as e:
        raise DataError(f"{path}: not a readable NIfTI file ({_detail(e)}); is it truncated or another format?") from e
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        what = "a 4-D series" if len(shape) == 4 else f"{len(shape)}-D"
        raise DataError(f"{path} is {what} (shape {shape}); pass one 3-D volume per sequence"
                        + (" (for single 2-D slices use .tif/.png)" if len(shape) == 2 else ""))
    if min(shape) < 1:
        raise DataError(f"{path}: the header gives the empty shape {shape}; the file holds no volume")
    return _File(path, img, usable_affine(img, path), (shape[0], shape[1], shape[2]))


def _detail(e: BaseException) -> str:
    return str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__


def _read(f: _File) -> np.ndarray:
    """The voxels of an opened file as float32 (I, J, K).

    Raises:
        DataError: truncated or unreadable data, or NaN voxels.
    """
    import nibabel as nib

    try:
        data = np.asarray(f.img.dataobj, dtype=np.float32)
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, zlib.error, ValueError) as e:
        raise DataError(f"{f.path}: not a readable NIfTI file ({_detail(e)}); is it truncated or another "
                        "format?") from e
    data = data.reshape(f.shape)
    nans = int(np.isnan(data).sum())
    if nans:
        raise DataError(f"{f.path} has {nans} NaN voxels; replace them (e.g. with 0) before segmenting")
    return data


def _load(path: Path):
    """(nibabel image, float32 3-D data) of one NIfTI file.

    Raises:
        DataError: not a NIfTI file, truncated, not 3-D, NaN voxels or no usable geometry.
    """
    f = _open(path)
    return f.img, _read(f)


def _same_grid(a: _File, b: _File) -> bool:
    return a.shape == b.shape and np.allclose(a.affine, b.affine, atol=1e-3)


def _spacing(affine: np.ndarray, to_model: np.ndarray) -> tuple[float, float, float]:
    """mm along the model's (slice, row, column): the lengths of the affine's columns."""
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    spacing = [0.0, 0.0, 0.0]
    for axis, (target, _) in enumerate(to_model):
        spacing[int(target)] = float(zooms[axis])
    return spacing[0], spacing[1], spacing[2]


def _check_size(flair: _File, others: Sequence[_File], resampled: int, spacing: tuple[float, float, float],
                max_bytes: int | None) -> None:
    """Refuse a patient that would take more memory than the limit, before reading it.

    Raises:
        DataError: over the limit, naming the FLAIR file, the size and how to raise it.
        ConfigError: TUMORSEG_MAX_VOLUME_GB is not a positive number.
    """
    limit = max_volume_bytes(max_bytes)
    rows, cols = spacing[1], spacing[2]
    scale = 1.0
    if not all(1 / RESAMPLE_TOLERANCE <= s / TRAINING_SPACING <= RESAMPLE_TOLERANCE for s in (rows, cols)):
        scale = (rows / TRAINING_SPACING) * (cols / TRAINING_SPACING)
    need = pipeline_bytes(flair.shape, [f.shape for f in others], resampled, scale)
    if need > limit:
        shape = "x".join(str(s) for s in flair.shape)
        raise DataError(f"{flair.path}: the header claims {shape} voxels, which would take about {need / 2**30:.1f} GB "
                        f"to segment, over the limit of {limit / 2**30:g} GB; if this is the right file, raise the "
                        f"limit with the environment variable {MAX_VOLUME_ENV}=<GB>")


def _onto_flair(f: _File, data: np.ndarray, flair: _File, what: str, order: int) -> tuple[np.ndarray, float]:
    """`data` of file `f` resampled onto the FLAIR grid, and the fraction of the FLAIR
    grid it covers.

    Raises:
        DataError: it covers less than MIN_COVERAGE of the FLAIR grid.
    """
    if order == 0:
        return resample_to_grid(data, f.affine, flair.shape, flair.affine, order=0), 1.0
    out = resample_to_grid(data, f.affine, flair.shape, flair.affine, order=1, cval=np.nan)
    outside = np.isnan(out)
    covered = 1.0 - float(outside.mean())
    if covered < MIN_COVERAGE:
        raise DataError(f"{f.path.name} covers {covered:.0%} of the FLAIR grid of {flair.path.name} through their "
                        f"affines; are they of one session? co-register {what} onto FLAIR first (e.g. with ANTs, "
                        "FSL flirt or SimpleITK)")
    out[outside] = 0.0
    return out, covered


def read_nifti_patient(files: NiftiFiles, *, require_label: bool = False, resample: bool = True,
                       max_bytes: int | None = None) -> NiftiPatient:
    """Read a NIfTI patient into the model's layout (see the module docstring).

    Args:
        files: the patient's files.
        require_label: refuse a patient without a label (evaluation, training).
        resample: resample sequences (linear) and a label (nearest neighbour) on another
            grid than FLAIR onto the FLAIR grid through their affines, with a warning
            (logger "tumorseg") and their names in `NiftiPatient.resampled`; this assumes
            one scanner frame and does NOT correct motion between sequences. False
            refuses them.
        max_bytes: the memory limit for the patient (`pipeline_bytes`, checked from the
            headers before any voxel is read); None: $TUMORSEG_MAX_VOLUME_GB (GiB) when
            set, else MAX_VOLUME_BYTES (4 GiB).

    Returns:
        the patient: volume float32 (S, H, W, 3), label bool (S, H, W) or None, grid.

    Raises:
        DataError: an unreadable file or one without usable geometry, sequences or a label
            on another grid than FLAIR (when not `resample`, or covering less than half of
            it), a patient over the memory limit, or no label when `require_label`.
        ConfigError: TUMORSEG_MAX_VOLUME_GB is not a positive number.
    """
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    flair_file = _open(files.flair)
    opened = {name: (flair_file if path == files.flair else _open(path))
              for name, path in files.sequences().items() if path is not None}
    label_file = _open(files.label) if files.label is not None else None
    others = [f for f in opened.values() if f is not flair_file] + ([label_file] if label_file else [])
    off_grid = [f for f in others if not _same_grid(f, flair_file)]
    if off_grid and not resample:
        f = off_grid[0]
        if f is label_file:
            raise DataError(f"label {f.path.name} is on another grid than {files.flair.name} (shape {f.shape} vs "
                            f"{flair_file.shape} or different affines); resample it onto the FLAIR grid (nearest "
                            "neighbour)")
        raise DataError(f"{f.path.name} and {files.flair.name} are on different grids (shape {f.shape} vs "
                        f"{flair_file.shape} or different affines); co-register or resample them onto the FLAIR grid "
                        "first (e.g. with ANTs, FSL flirt or SimpleITK)")
    to_model = ornt_transform(io_orientation(flair_file.affine), axcodes2ornt(MODEL_AXES))
    spacing = _spacing(flair_file.affine, to_model)
    _check_size(flair_file, others, len(off_grid), spacing, max_bytes)

    flair = _read(flair_file)
    grid = Grid(shape=flair_file.shape, affine=flair_file.affine, header=flair_file.img.header, to_model=to_model,
                spacing=spacing)
    channels, filled, resampled, partial = [], [], [], []
    for name in files.sequences():
        f = opened.get(name)
        if f is None:
            channels.append(flair)
            filled.append(name)
            continue
        data = flair if f is flair_file else _read(f)
        if f in off_grid:
            data, covered = _onto_flair(f, data, flair_file, name, order=1)
            resampled.append(name)
            if covered < 0.99:
                partial.append(f"{name} covers {covered:.0%}")
        channels.append(data)
    volume = np.stack([apply_orientation(c, to_model) for c in channels], axis=-1).astype(np.float32, copy=False)
    del channels
    volume, constant = fill_missing_sequences(volume)  # a sequence written as zeros by another tool
    filled += constant
    if filled:
        log.warning(f"{files.name}: no {' and no '.join(filled)} volume (or a constant one); filled with FLAIR, as "
                    "kaggle_3m does for missing sequences (the model is trained for this)")
    label = None
    if label_file is not None:
        data = _read(label_file) != 0  # any non-zero voxel is tumour, as for slice masks
        if label_file in off_grid:
            data, _ = _onto_flair(label_file, data, flair_file, "the label", order=0)
            resampled.append("label")
        label = apply_orientation(data, to_model).astype(bool, copy=False)
    elif require_label:
        raise DataError(f"{files.name}: no label file (*_seg.nii.gz or *_mask.nii.gz); evaluation needs one")
    if resampled:
        log.warning(f"{files.name}: {', '.join(resampled)} on another grid than FLAIR ({files.flair.name}); "
                    "resampled onto the FLAIR grid through the affines (linear; nearest neighbour for a label), "
                    "which assumes one session in one scanner frame and does not correct motion between sequences"
                    + (f" ({'; '.join(partial)} of the FLAIR grid, the rest set to 0)" if partial else ""))
    if volume.shape[-1] != len(CHANNELS):
        raise AssertionError(f"volume has {volume.shape[-1]} channels, expected {len(CHANNELS)}")
    return NiftiPatient(name=files.name, volume=np.ascontiguousarray(volume), grid=grid, label=label, filled=filled,
                        resampled=tuple(resampled))


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
