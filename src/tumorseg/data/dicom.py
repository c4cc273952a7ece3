"""Patients given as DICOM: a folder of MR images (any depth, any file names, with or
without a DICOMDIR), read with pydicom into the same `NiftiPatient` the NIfTI route
makes, so prediction, evaluation and the writers treat both alike.

Files. Every file that carries the DICOM preamble ("DICM" at byte 128) is read (headers
only at first); others are skipped. Images are grouped into series by SeriesInstanceUID
and series into sessions by (PatientID, StudyInstanceUID): one session is one patient of
the result, named `study-<8 hex digits of a hash of the StudyInstanceUID>` so that no
name, ID or date of the patient appears in file names, logs or errors (series are named
by their description and number). Localizers and derived reformats (ImageType LOCALIZER,
DERIVED/SECONDARY, MPR, MIP, ...) and images of other modalities (SEG, SR, CT, ...) are
skipped.

Sequences. FLAIR, T1 (pre-contrast) and T1c (post-contrast) are recognised by words of
their SeriesDescription and ProtocolName (`classify_series`); a T1 is post-contrast when
its description says so (T1c, T1+C, POST, GAD, ...) or when ContrastBolusAgent is
filled in. FLAIR is required; a missing T1 or T1c is filled with FLAIR as the NIfTI route
does. Two candidates for one sequence are refused, naming them, unless `series=` picks
one by SeriesInstanceUID.

Geometry. The slices of a series are sorted by their position along the slice normal
(the cross product of the ImageOrientationPatient directions), never by file name or
InstanceNumber; a series with mixed orientations, image sizes or pixel spacings, a
missing slice (a step over 1.5 times the median) or uneven steps is refused. The
affine (voxel (column, row, slice) -> mm) is built from ImageOrientationPatient,
ImagePositionPatient, PixelSpacing and the slice step, and converted from DICOM's LPS to
nibabel's RAS (x and y negated). The volume is then reoriented to the model's layout by
the NIfTI route's `Grid` (a permutation and flips only): an oblique axial series is
predicted in its own tilted plane, a sagittal or coronal one is turned into axial
slices. `DicomPatient.to_source` maps a mask back to the FLAIR series' own images, in
the order the DICOM SEG writer needs. T1/T1c series on another grid than the FLAIR are
resampled onto it (linear, through their affines). Pixel values are rescaled with
RescaleSlope/RescaleIntercept.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tumorseg.config import CHANNELS
from tumorseg.data.formats import is_dicom_file
from tumorseg.data.nifti import MODEL_AXES, Grid, NiftiPatient, bytes_limit, to_input_order
from tumorseg.data.normalization import fill_missing_sequences
from tumorseg.data.resample import resample_to_grid
from tumorseg.errors import DataError

log = logging.getLogger("tumorseg")

MAX_BYTES = 2 * 1024**3  # default limit on the float32 voxels of the series of one patient
MAX_BYTES_ENV = "TUMORSEG_MAX_DICOM_GB"  # overrides MAX_BYTES (GiB)
ROLES = ("FLAIR", "T1", "T1c")  # keys of `series=`
ROLE_CHANNELS = {"T1": "pre-contrast", "FLAIR": "FLAIR", "T1c": "post-contrast"}
OVERRIDE_OPTIONS = {"FLAIR": "--flair-series", "T1": "--t1-series", "T1c": "--t1c-series"}
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
MR_CLASSES = {"1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.4.4"}
NOT_DICOM_SUFFIXES = {".tif", ".tiff", ".png", ".jpg", ".jpeg", ".nii", ".gz", ".csv", ".txt", ".json", ".md",
                      ".html", ".pdf", ".xml", ".zip", ".py", ".pt", ".bin"}
SKIPPED_IMAGE_TYPES = ("LOCALIZER", "MPR", "REFORMATTED", "PROJECTION IMAGE", "MIP", "MNIP", "CPR", "CURVED",
                       "SCREEN SAVE", "SECONDARY CAPTURE")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
GAP_FACTOR = 1.5  # a step this many times the median means a missing slice
STEP_TOLERANCE = 0.05  # relative deviation of a slice step from the median still taken as even
ORIENTATION_TOLERANCE = 1e-3  # per direction-cosine component
COMPRESSED_EXTRA = "pip install 'tumorseg[dicom-compressed]'"
UNCOMPRESSED_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}


# ---------------------------------------------------------------------- series headers

@dataclass(frozen=True)
class Plane:
    """One 2-D image: a single-frame file, or one frame of a multi-frame (enhanced) file."""

    path: Path
    frame: int | None  # 0-based frame of a multi-frame file; None for a single-frame file
    sop_uid: str
    rows: int
    cols: int
    orientation: tuple[float, ...] | None  # ImageOrientationPatient: row direction, column direction (LPS)
    position: tuple[float, float, float] | None  # ImagePositionPatient of the first pixel (LPS, mm)
    spacing: tuple[float, float] | None  # PixelSpacing: between rows, between columns (mm)
    slope: float = 1.0
    intercept: float = 0.0
    thickness: float | None = None


@dataclass
class Series:
    """The headers of one series (no pixel data)."""

    uid: str
    number: int | None
    description: str
    protocol: str
    image_type: tuple[str, ...]
    modality: str
    sop_class: str
    contrast: bool  # ContrastBolusAgent (or its sequence) filled in
    frame_of_reference: str
    planes: list[Plane] = field(default_factory=list)
    headers: dict[Path, object] = field(default_factory=dict)  # pydicom Dataset per file, without pixel data

    @property
    def label(self) -> str:
        """How messages name the series: its description and number, never the patient."""
        number = "?" if self.number is None else self.number
        return f'series "{self.description or "(no description)"}" (number {number})'

    def candidate_line(self) -> str:
        return f'"{self.description or "(no description)"}" number {self.number}: {self.uid}'


def _float_list(value) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        return None


def _item(ds, *path: str):
    """ds.Seq1[0].Seq2[0]...attr, or None when any step is missing."""
    from pydicom.sequence import Sequence as DicomSequence

    for name in path:
        if ds is None or name not in ds:
            return None
        ds = ds.get(name)
        if isinstance(ds, DicomSequence):
            if len(ds) == 0:
                return None
            ds = ds[0]
    return ds


def _has_contrast(ds) -> bool:
    agent = str(ds.get("ContrastBolusAgent", "") or "").strip()
    return bool(agent) or len(ds.get("ContrastBolusAgentSequence", []) or []) > 0


def _planes(ds, path: Path) -> list[Plane]:
    """The planes of one image file, from its headers."""
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" not in ds:
        spacing = _float_list(ds.get("PixelSpacing"))
        position = _float_list(ds.get("ImagePositionPatient"))
        orientation = _float_list(ds.get("ImageOrientationPatient"))
        slope, intercept = ds.get("RescaleSlope", 1), ds.get("RescaleIntercept", 0)
        planes = []
        for f in range(frames):  # a legacy multi-frame file without functional groups: one plane per frame
            planes.append(Plane(path, None if frames == 1 else f, str(ds.get("SOPInstanceUID", "")), rows, cols,
                                tuple(orientation) if orientation and len(orientation) == 6 else None,
                                tuple(position) if position and len(position) == 3 else None,  # type: ignore[arg-type]
                                tuple(spacing) if spacing and len(spacing) == 2 else None,  # type: ignore[arg-type]
                                float(slope if slope not in (None, "") else 1),
                                float(intercept if intercept not in (None, "") else 0),
                                _float_or_none(ds.get("SliceThickness"))))
        return planes
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.PerFrameFunctionalGroupsSequence
    planes = []
    for f in range(frames):
        item = per_frame[f] if f < len(per_frame) else None

        def look(*names, _item_=item):
            value = _item(_item_, *names)
            return value if value is not None else _item(shared, *names)

        orientation = _float_list(look("PlaneOrientationSequence", "ImageOrientationPatient"))
        position = _float_list(look("PlanePositionSequence", "ImagePositionPatient"))
        spacing = _float_list(look("PixelMeasuresSequence", "PixelSpacing"))
        slope = look("PixelValueTransformationSequence", "RescaleSlope")
        intercept = look("PixelValueTransformationSequence", "RescaleIntercept")
        planes.append(Plane(path, f, str(ds.get("SOPInstanceUID", "")), rows, cols,
                            tuple(orientation) if orientation and len(orientation) == 6 else None,
                            tuple(position) if position and len(position) == 3 else None,  # type: ignore[arg-type]
                            tuple(spacing) if spacing and len(spacing) == 2 else None,  # type: ignore[arg-type]
                            float(slope) if slope not in (None, "") else 1.0,
                            float(intercept) if intercept not in (None, "") else 0.0,
                            _float_or_none(look("PixelMeasuresSequence", "SliceThickness"))))
    return planes


def _float_or_none(value) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _candidate_files(folder: Path):
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() in NOT_DICOM_SUFFIXES:
                continue
            yield Path(dirpath) / name


def is_dicom_input(path: str | Path) -> bool:
    """Whether `path` is a DICOMDIR, a DICOM file, or a folder holding DICOM files at any depth."""
    path = Path(path)
    if path.is_file():
        return path.name.upper() == "DICOMDIR" or is_dicom_file(path)
    return path.is_dir() and any(is_dicom_file(p) for p in _candidate_files(path))


def skip_reason(image_type: Sequence[str]) -> str | None:
    """Why a series of this ImageType is no input of the model (None: it is one)."""
    values = [str(v).upper() for v in image_type]
    for word in SKIPPED_IMAGE_TYPES:
        if word in values:
            return f"ImageType {word}"
    if len(values) >= 2 and values[0] == "DERIVED" and values[1] == "SECONDARY":
        return "ImageType DERIVED\\SECONDARY"
    return None


def scan_dicom(path: str | Path) -> dict[tuple[str, str], dict[str, Series]]:
    """The MR image series under `path` (a folder, a DICOMDIR, or one file), headers only,
    by session (PatientID, StudyInstanceUID) and SeriesInstanceUID. Non-DICOM files,
    DICOMDIRs, non-image objects, other modalities, localizers and reformats are skipped.

    Raises:
        DataError: `path` does not exist, or a file with the DICOM preamble is unreadable.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist; pass a folder of DICOM files or a DICOMDIR")
    if path.is_file() and path.name.upper() == "DICOMDIR":
        path = path.parent
    files = [path] if path.is_file() else [p for p in _candidate_files(path) if is_dicom_file(p)]
    sessions: dict[tuple[str, str], dict[str, Series]] = {}
    skipped: dict[str, str] = {}
    for file in files:
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError) as e:
            raise DataError(f"{file}: unreadable DICOM file ({type(e).__name__}: {str(e)[:120]}); remove or "
                            "replace it") from e
        sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
        if sop_class == DICOMDIR_CLASS or "DirectoryRecordSequence" in ds:
            continue
        series_uid = str(ds.get("SeriesInstanceUID", "") or "")
        modality = str(ds.get("Modality", "") or "")
        if not series_uid or not ds.get("Rows") or modality not in ("MR", "") and sop_class not in MR_CLASSES:
            if series_uid and series_uid not in skipped:
                skipped[series_uid] = f"modality {modality or '?'}, not an MR image"
                log.debug(f'skipping series "{ds.get("SeriesDescription", "")}" ({skipped[series_uid]})')
            continue
        image_type = tuple(str(v) for v in (ds.get("ImageType") or ()))
        reason = skip_reason(image_type)
        if reason is not None:
            if series_uid not in skipped:
                skipped[series_uid] = reason
                log.debug(f'skipping series "{ds.get("SeriesDescription", "")}" (number '
                          f'{ds.get("SeriesNumber", "?")}): {reason}, a localizer or reformat')
            continue
        key = (str(ds.get("PatientID", "") or ""), str(ds.get("StudyInstanceUID", "") or ""))
        study = sessions.setdefault(key, {})
        series = study.get(series_uid)
        if series is None:
            number = ds.get("SeriesNumber")
            series = study[series_uid] = Series(
                uid=series_uid, number=int(number) if number not in (None, "") else None,
                description=str(ds.get("SeriesDescription", "") or "").strip(),
                protocol=str(ds.get("ProtocolName", "") or "").strip(), image_type=image_type, modality=modality,
                sop_class=sop_class, contrast=_has_contrast(ds),
                frame_of_reference=str(ds.get("FrameOfReferenceUID", "") or ""))
        series.contrast = series.contrast or _has_contrast(ds)
        series.planes.extend(_planes(ds, file))
        series.headers[file] = ds
    return sessions


# ---------------------------------------------------------------------- which series is which

_FLAIR = re.compile(r"flair|(?<![a-z0-9])t2f(?![a-z0-9])|dark ?fluid|tirm")
_T1 = re.compile(r"(?<![a-z0-9])t1(?!\d)|mp ?rage|spgr|bravo|(?<![a-z])tfl|(?<![a-z])vibe(?![a-z])")
_T2 = re.compile(r"(?<![a-z0-9])t2(?!\d)")
_POST = re.compile(r"(?<![a-z0-9])t1 ?(c|ce|gd|\+ ?c|\+ ?gd)(?![a-z0-9])|\+ ?(c|gd|contrast)(?![a-z])|"
                   r"(?<![a-z])c ?\+|post|gad|(?<![a-z])gd(?![a-z])|contrast|(?<![a-z])ce(?![a-z])|enhanc")
_PRE = re.compile(r"(?<![a-z])pre(?![a-z])|non ?contrast|without contrast|(?<![a-z])no ?(gad|contrast)")


def classify_series(description: str, protocol: str = "", contrast_agent: bool = False) -> str | None:
    """"FLAIR", "T1" (pre-contrast), "T1c" (post-contrast) or None, from the words of a
    series' description and protocol name (any case; `_`, `-`, `.` and `/` read as spaces).
    A T1 is "T1c" when the words say post-contrast (T1c, T1+C, POST, GAD, ...), or when
    `contrast_agent` (ContrastBolusAgent filled in) and the words do not say pre-contrast.
    "T1 FLAIR" (a T1-weighted FLAIR) is a T1, "T2 FLAIR" a FLAIR."""
    text = " ".join(re.sub(r"[_\-./]+", " ", s.lower()) for s in (description, protocol) if s)
    t1 = bool(_T1.search(text))
    if _FLAIR.search(text) and not (t1 and not _T2.search(text)):
        return "FLAIR"
    if not t1:
        return None
    if _PRE.search(text):
        return "T1"
    return "T1c" if _POST.search(text) or contrast_agent else "T1"


def _study_name(study_uid: str, taken: set[str]) -> str:
    base = "study-" + hashlib.sha256(study_uid.encode()).hexdigest()[:8]
    name, k = base, 2
    while name in taken:
        name, k = f"{base}-{k}", k + 1
    return name


def select_series(study: Mapping[str, Series], name: str,
                  series: Mapping[str, str] | None = None) -> dict[str, Series]:
    """The FLAIR, T1 and T1c series of one session by role ("FLAIR" always; T1 and T1c
    when present), picked by `classify_series` or, per role, by SeriesInstanceUID in `series`.

    Raises:
        DataError: no FLAIR, two candidates for one role, or an override UID that is not
            a series of this session.
    """
    chosen: dict[str, Series] = {}
    for role, uid in (series or {}).items():
        if uid in study:
            chosen[role] = study[uid]
    candidates: dict[str, list[Series]] = {r: [] for r in ROLES}
    for s in sorted(study.values(), key=lambda s: (s.number is None, s.number or 0, s.uid)):
        role = classify_series(s.description, s.protocol, s.contrast)
        if role is not None and s.uid not in {c.uid for c in chosen.values()}:
            candidates[role].append(s)
    for role in ROLES:
        if role in chosen:
            continue
        found = candidates[role]
        if len(found) > 1:
            option = OVERRIDE_OPTIONS[role]
            raise DataError(f"{name}: {len(found)} candidate {role} series: "
                            + "; ".join(s.candidate_line() for s in found)
                            + f"; pick one with {option} UID (series={{'{role}': UID}})")
        if found:
            chosen[role] = found[0]
    if "FLAIR" not in chosen:
        listing = "; ".join(s.candidate_line() for s in study.values()) or "(no MR image series)"
        raise DataError(f"{name}: no FLAIR series (recognised by FLAIR, T2-FLAIR, T2F, DARK FLUID or TIRM in the "
                        f"series description); the series are: {listing}; name the FLAIR with --flair-series UID")
    return chosen


# ---------------------------------------------------------------------- one series -> volume

@dataclass
class Stack:
    """A series' planes sorted along the slice normal, with their grid."""

    series: Series
    planes: list[Plane]  # sorted by position along the normal
    affine: np.ndarray  # RAS, voxel (column, row, slice) -> mm
    spacing: tuple[float, float, float]  # mm between columns, rows, slices

    @property
    def shape(self) -> tuple[int, int, int]:  # (columns, rows, slices): the order of the affine's axes
        return (self.planes[0].cols, self.planes[0].rows, len(self.planes))


def sort_planes(series: Series) -> Stack:
    """Sort a series' planes along the slice normal and build its affine, after checking
    that they form one regular stack (see the module docstring).

    Raises:
        DataError: naming the series: missing geometry, mixed sizes, orientations or
            pixel spacings, two images at one position, a missing slice or uneven steps.
    """
    planes = series.planes
    if not planes:
        raise DataError(f"{series.label} holds no images")
    if any(p.orientation is None or p.position is None or p.spacing is None for p in planes):
        raise DataError(f"{series.label} lacks ImageOrientationPatient, ImagePositionPatient or PixelSpacing; "
                        "it cannot be placed in space")
    sizes = {(p.rows, p.cols) for p in planes}
    if len(sizes) > 1:
        raise DataError(f"{series.label} has images of different sizes ({', '.join(f'{r}x{c}' for r, c in sizes)}); "
                        "it is not one volume")
    orient = np.array([p.orientation for p in planes], dtype=float)
    if np.abs(orient - orient[0]).max() > ORIENTATION_TOLERANCE:
        raise DataError(f"{series.label} mixes slice orientations (a multi-plane localizer or several stacks); "
                        "pick another series")
    spacing = np.array([p.spacing for p in planes], dtype=float)
    if np.abs(spacing - spacing[0]).max() > 1e-3 * max(1.0, spacing[0].max()):
        raise DataError(f"{series.label} has images of different pixel spacings; it is not one volume")
    row_dir, col_dir = orient[0, :3], orient[0, 3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.array([p.position for p in planes], dtype=float)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    planes = [planes[i] for i in order]
    positions, along = positions[order], along[order]
    row_spacing, col_spacing = float(spacing[0, 0]), float(spacing[0, 1])
    if len(planes) > 1:
        steps = np.diff(along)
        if steps.min() < 1e-3:
            raise DataError(f"{series.label} has several images at one position (echoes, time points or "
                            "repeats?); split the series or pick another")
        median = float(np.median(steps))
        if steps.max() > GAP_FACTOR * median:
            k = int(np.argmax(steps))
            raise DataError(f"{series.label} misses slices: a step of {steps[k]:.2f} mm after slice {k + 1} of "
                            f"{len(planes)} (the median step is {median:.2f} mm); export the complete series")
        if np.abs(steps - median).max() > STEP_TOLERANCE * median + 0.01:
            raise DataError(f"{series.label} has uneven slice spacing ({steps.min():.2f} to {steps.max():.2f} mm); "
                            "it cannot be read as one regular volume")
        step = (positions[-1] - positions[0]) / (len(planes) - 1)
        off = positions - (positions[0] + np.outer(np.arange(len(planes)), step))
        if np.linalg.norm(off, axis=1).max() > 0.1 * median + 0.01:
            raise DataError(f"{series.label}: its slices do not lie on one line; it cannot be read as one volume")
    else:
        thickness = planes[0].thickness or 1.0
        step = normal * thickness
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing  # column index runs along the row direction
    lps[:3, 1] = col_dir * row_spacing
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    return Stack(series, planes, LPS_TO_RAS @ lps, (col_spacing, row_spacing, float(np.linalg.norm(step))))


def _pixel_error(path: Path, ds, e: Exception) -> DataError:
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    if syntax and syntax not in UNCOMPRESSED_SYNTAXES:
        from pydicom.uid import UID

        name = UID(syntax).name
        try:
            from pydicom.pixels import get_decoder  # pydicom 3

            available = get_decoder(UID(syntax)).is_available
        except ImportError:  # pydicom 2: the error itself says what is missing
            available = "missing" not in str(e).lower() and "no available" not in str(e).lower()
        except NotImplementedError:  # a transfer syntax pydicom has no decoder for at all
            available = False
        if not available:
            return DataError(f"{path.name}: no decoder installed for its {name} pixel data; install one with "
                             f"{COMPRESSED_EXTRA}")
        return DataError(f"{path.name}: cannot decode its {name} pixel data ({type(e).__name__}: {str(e)[:100]}); "
                         f"the file may be damaged, or need the decoders of {COMPRESSED_EXTRA}")
    return DataError(f"{path.name}: unreadable pixel data ({type(e).__name__}: {str(e)[:120]})")


def read_stack(stack: Stack) -> np.ndarray:
    """The rescaled pixel values float32 (slices, rows, columns) of a sorted stack.

    Raises:
        DataError: pixel data that cannot be decoded (naming the extra to install for
            compressed transfer syntaxes), or not one sample per pixel.
    """
    import pydicom

    out = np.empty((len(stack.planes), stack.planes[0].rows, stack.planes[0].cols), dtype=np.float32)
    by_file: dict[Path, list[tuple[int, Plane]]] = {}
    for k, p in enumerate(stack.planes):
        by_file.setdefault(p.path, []).append((k, p))
    for path, items in by_file.items():
        ds = None
        try:
            ds = pydicom.dcmread(path)
            if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
                raise DataError(f"{path.name} ({stack.series.label}) is a colour image; MR series are greyscale")
            pixels = ds.pixel_array
        except DataError:
            raise
        except Exception as e:  # pydicom raises several types for undecodable pixel data
            raise _pixel_error(path, ds, e) from e
        for k, p in items:
            frame = pixels if p.frame is None else pixels[p.frame]
            if frame.shape != (p.rows, p.cols):
                raise DataError(f"{path.name} ({stack.series.label}): pixel data of shape {frame.shape}, headers say "
                                f"{p.rows}x{p.cols}")
            out[k] = frame.astype(np.float32) * np.float32(p.slope) + np.float32(p.intercept)
    return out


# ---------------------------------------------------------------------- patients

@dataclass
class SeriesUsed:
    """Which series filled a channel, for summaries (no patient identity)."""

    role: str  # FLAIR, T1 or T1c
    uid: str
    number: int | None
    description: str
    resampled: bool = False  # resampled onto the FLAIR grid


@dataclass
class DicomPatient(NiftiPatient):
    """A DICOM session in the model's layout (a `NiftiPatient`: volume, grid, label None),
    with what a DICOM SEG of its FLAIR series needs.

    `grid` describes the FLAIR series as a volume (column, row, slice) in its sorted
    slice order, so `write_nifti` writes NIfTI masks for it too.
    """

    series: list[SeriesUsed] = field(default_factory=list)
    flair_sources: list = field(default_factory=list)  # pydicom Datasets (no pixel data) of the FLAIR files
    # source_index[k]: the plane of the FLAIR's source order that is slice k of the sorted
    # stack. Single-frame files are kept sorted along the normal (source_index = 0, 1, ...);
    # the frames of a multi-frame file stay in their file order.
    source_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))

    def to_source(self, array: np.ndarray) -> np.ndarray:
        """An array (S, H, W) in the model's layout -> (F, rows, columns), one plane per
        FLAIR source image (or frame) in `flair_sources` order: what `write_dicom_seg` takes."""
        stack = to_input_order(np.asarray(array), self.grid).transpose(2, 1, 0)  # sorted slices, rows, columns
        out = np.empty_like(stack)
        out[self.source_index] = stack
        return out

    def from_source(self, planes: np.ndarray) -> np.ndarray:
        """The inverse of `to_source`: (F, rows, columns) in source order -> model layout (S, H, W)."""
        from nibabel.orientations import apply_orientation

        native = np.asarray(planes)[self.source_index].transpose(2, 1, 0)
        return np.ascontiguousarray(apply_orientation(native, self.grid.to_model))

    def summary(self) -> str:
        """One line: the series used per channel ("FLAIR: "AX FLAIR" (4); T1: ...")."""
        return "; ".join(f'{u.role}: "{u.description}" ({u.number})' + (" resampled" if u.resampled else "")
                         for u in self.series)


def _nifti_header(shape: tuple[int, int, int], affine: np.ndarray, zooms: Sequence[float]):
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_zooms(tuple(float(z) for z in zooms))
    header.set_xyzt_units("mm")
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    return header


def _grid(stack: Stack) -> Grid:
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    to_model = ornt_transform(io_orientation(stack.affine), axcodes2ornt(MODEL_AXES))
    spacing = [0.0, 0.0, 0.0]
    for axis, (target, _) in enumerate(to_model):
        spacing[int(target)] = float(stack.spacing[axis])
    return Grid(shape=stack.shape, affine=stack.affine, header=_nifti_header(stack.shape, stack.affine, stack.spacing),
                to_model=to_model, spacing=(spacing[0], spacing[1], spacing[2]))


def dicom_max_bytes(max_bytes: int | None = None) -> int:
    """The limit on one study's float32 voxels: `max_bytes`, else $TUMORSEG_MAX_DICOM_GB
    (GiB), else MAX_BYTES.

    Raises:
        DataError: $TUMORSEG_MAX_DICOM_GB is not a positive number.
    """
    return bytes_limit(max_bytes, MAX_BYTES_ENV, MAX_BYTES,
                       lambda value: DataError(f"{MAX_BYTES_ENV}={value!r} is not a positive number of GiB"))


def check_memory(stacks: Sequence[Stack], max_bytes: int | None = None) -> None:
    """Refuse, before any pixel data is read, series whose float32 voxels exceed the
    limit (`dicom_max_bytes`).

    Raises:
        DataError: naming the series and their size.
    """
    max_bytes = dicom_max_bytes(max_bytes)
    sizes = [(s, _float32_bytes(s)) for s in stacks]
    total = sum(n for _, n in sizes)
    if total > max_bytes:
        listing = ", ".join(f"{s.series.label} {s.shape[1]}x{s.shape[0]}x{s.shape[2]}" for s, _ in sizes)
        raise DataError(f"{listing}: {total / 2**30:.2f} GiB as float32, over the limit of {max_bytes / 2**30:.2f} "
                        f"GiB; pick smaller series (--flair-series ...) or raise the limit with {MAX_BYTES_ENV}=N")


def session_bytes(study: Mapping[str, Series], name: str, series: Mapping[str, str] | None = None) -> int:
    """The float32 bytes of the series `read_session` would read, from their headers alone.

    Raises:
        DataError: as `select_series` and `sort_planes`.
    """
    return sum(_float32_bytes(sort_planes(s)) for s in select_series(study, name, series).values())


def _float32_bytes(stack: Stack) -> int:
    return int(np.prod(stack.shape)) * 4


def read_session(study: Mapping[str, Series], name: str, *, series: Mapping[str, str] | None = None,
                 max_bytes: int | None = None) -> DicomPatient:
    """Read one session (the series of one patient's study) into a `DicomPatient`.

    Raises:
        DataError: see `select_series`, `sort_planes`, `check_memory`, `read_stack`.
    """
    from nibabel.orientations import apply_orientation

    chosen = select_series(study, name, series)
    stacks = {role: sort_planes(s) for role, s in chosen.items()}
    check_memory(list(stacks.values()), max_bytes)
    flair = stacks["FLAIR"]
    flair_native = read_stack(flair).transpose(2, 1, 0)  # (columns, rows, slices), the affine's axes
    grid = _grid(flair)
    used, resampled = [], []
    natives: dict[str, np.ndarray | None] = {"FLAIR": flair_native}
    for role in ("T1", "T1c"):
        stack = stacks.get(role)
        if stack is None:
            natives[role] = None
            continue
        native = read_stack(stack).transpose(2, 1, 0)
        same = stack.shape == flair.shape and np.allclose(stack.affine, flair.affine, atol=1e-3)
        if not same:
            native = resample_to_grid(native, stack.affine, flair.shape, flair.affine, order=1)
            resampled.append(role)
        natives[role] = native
    for role in ROLES:
        if role in stacks:
            s = stacks[role].series
            used.append(SeriesUsed(role, s.uid, s.number, s.description, role in resampled))
    if resampled:
        other_frame = [r for r in resampled if stacks[r].series.frame_of_reference != flair.series.frame_of_reference]
        log.warning(f"{name}: {' and '.join(resampled)} on another grid than the FLAIR; resampled onto the FLAIR grid "
                    "(linear)" + (f"; {' and '.join(other_frame)} in another frame of reference, positions may not "
                                  "correspond" if other_frame else ""))
    channels, filled = [], []
    for channel in CHANNELS:
        role = next(r for r, c in ROLE_CHANNELS.items() if c == channel)
        native = natives[role]
        if native is None:
            native = flair_native
            filled.append(channel)
        channels.append(apply_orientation(native, grid.to_model))
    volume = np.stack(channels, axis=-1).astype(np.float32)
    volume, constant = fill_missing_sequences(volume)
    filled += constant
    if filled:
        log.warning(f"{name}: no {' and no '.join(filled)} series (or a constant one); filled with FLAIR, as "
                    "kaggle_3m does for missing sequences (the model is trained for this)")
    # Source order: single-frame files in the order of `flair_sources`, or the frames of one file.
    files = list(dict.fromkeys(p.path for p in flair.planes))  # single-frame files: sorted along the normal
    file_index = {f: i for i, f in enumerate(files)}
    multi = any(p.frame is not None for p in flair.planes)
    if multi and len(files) > 1:
        raise DataError(f"{flair.series.label} spreads its frames over {len(files)} multi-frame files; export it as "
                        "one enhanced file or as single-frame files")
    source_index = np.array([p.frame if multi else file_index[p.path] for p in flair.planes], dtype=int)
    return DicomPatient(name=name, volume=np.ascontiguousarray(volume), grid=grid, label=None, filled=filled,
                        series=used, flair_sources=[flair.series.headers[f] for f in files],
                        source_index=source_index)


def find_dicom_sessions(path: str | Path, *,
                       series: Mapping[str, str] | None = None) -> list[tuple[str, dict[str, Series], dict[str, str]]]:
    """The sessions under `path` without reading pixel data: (name, its series by UID, the
    part of `series` that applies to it) per (PatientID, StudyInstanceUID), sorted by name;
    `read_session(study, name, series=wanted)` reads one. For reading lazily, one patient
    at a time.

    Raises:
        DataError: no DICOM MR series, an override UID found nowhere, or an unknown role.
    """
    unknown = sorted(set(series or {}) - set(ROLES))
    if unknown:
        raise DataError(f"unknown series role {unknown[0]!r}; choose from {', '.join(ROLES)}")
    sessions = scan_dicom(path)
    if not sessions:
        raise DataError(f"{path} holds no DICOM MR image series (localizers and reformats are skipped)")
    all_uids = {uid for study in sessions.values() for uid in study}
    for role, uid in (series or {}).items():
        if uid not in all_uids:
            raise DataError(f"no series with SeriesInstanceUID {uid} (given for {role}) under {path}")
    taken: set[str] = set()
    found = []
    for (_, study_uid), study in sorted(sessions.items(), key=lambda kv: kv[0][1]):
        name = _study_name(study_uid, taken)
        taken.add(name)
        found.append((name, study, {r: u for r, u in (series or {}).items() if u in study}))
    return sorted(found, key=lambda f: f[0])


def read_dicom_patients(path: str | Path, *, series: Mapping[str, str] | None = None,
                        max_bytes: int | None = None) -> list[DicomPatient]:
    """The DICOM patients under `path` (a folder at any depth, a DICOMDIR or one file):
    one per (PatientID, StudyInstanceUID) session, sorted by name.

    Args:
        series: {"FLAIR": uid, "T1": uid, "T1c": uid} (any subset): series picked by
            SeriesInstanceUID instead of by description, in the session that holds them.
        max_bytes: limit on the float32 voxels of the series read for one patient
            (default: `dicom_max_bytes`).

    Raises:
        DataError: see `find_dicom_sessions` and `read_session` (never naming the patient).
    """
    return [read_session(study, name, series=wanted, max_bytes=max_bytes)
            for name, study, wanted in find_dicom_sessions(path, series=series)]


# ---------------------------------------------------------------------- labels given as DICOM SEG

def read_dicom_seg_label(seg_path: str | Path, patient: DicomPatient) -> np.ndarray:
    """A DICOM SEG's label bool (S, H, W) in the model's layout on `patient`'s FLAIR grid:
    the union of its segments, read with highdicom by the FLAIR images it references.

    Raises:
        DataError: not a readable SEG, or a SEG that references no FLAIR image of `patient`
            or has another image size.
    """
    import highdicom as hd

    seg_path = Path(seg_path)
    try:
        seg = hd.seg.segread(seg_path)
    except Exception as e:  # pydicom/highdicom raise many types for a file that is no SEG
        raise DataError(f"{seg_path}: not a readable DICOM SEG ({type(e).__name__}: {str(e)[:120]})") from e
    sources = patient.flair_sources
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    if (int(seg.Rows), int(seg.Columns)) != (rows, cols):
        raise DataError(f"{seg_path}: SEG images of {seg.Rows}x{seg.Columns}, the FLAIR's are {rows}x{cols}")
    referenced = {str(i.ReferencedSOPInstanceUID) for s in seg.get("ReferencedSeriesSequence", [])
                  for i in s.get("ReferencedInstanceSequence", [])}
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    if not referenced & set(uids):
        raise DataError(f"{seg_path}: the SEG references none of the images of the FLAIR series "
                        f'"{patient.series[0].description}"; segmentations of other series are not supported')
    try:
        if len(sources) == 1 and int(sources[0].get("NumberOfFrames", 1) or 1) > 1:
            frames = int(sources[0].NumberOfFrames)
            pixels = seg.get_pixels_by_source_frame(uids[0], list(range(1, frames + 1)),
                                                    assert_missing_frames_are_empty=True)
        else:
            pixels = seg.get_pixels_by_source_instance(uids, assert_missing_frames_are_empty=True)
    except (RuntimeError, ValueError, KeyError) as e:
        raise DataError(f"{seg_path}: cannot map the SEG onto the FLAIR images ({str(e)[:160]})") from e
    return patient.from_source(np.asarray(pixels).reshape(len(patient.source_index), rows, cols, -1).any(-1))


def read_label(path: str | Path, patient: DicomPatient) -> np.ndarray:
    """A label for `patient` bool (S, H, W) on its FLAIR grid, model layout: a DICOM SEG of
    the FLAIR series (`read_dicom_seg_label`), or a NIfTI label (any non-zero voxel is
    tumour) on the FLAIR's grid or, resampled by nearest neighbour through the affines,
    on another grid of the same scanner frame.

    Raises:
        DataError: an unreadable label, or a NIfTI label that does not overlap the FLAIR.
    """
    import nibabel as nib
    from nibabel.orientations import apply_orientation

    from tumorseg.data.nifti import is_nifti

    path = Path(path)
    if not is_nifti(path):
        return read_dicom_seg_label(path, patient)
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for a damaged file
        raise DataError(f"{path}: not a readable NIfTI label ({type(e).__name__}); pass a DICOM SEG or a "
                        ".nii/.nii.gz label on the FLAIR's grid") from e
    data = data.reshape(data.shape[:3]) if data.ndim == 4 and data.shape[3] == 1 else data
    if data.ndim != 3:
        raise DataError(f"{path} is {data.ndim}-D; a label is one 3-D volume")
    grid = patient.grid
    if data.shape != grid.shape or not np.allclose(img.affine, grid.affine, atol=1e-3):
        log.warning(f"{path.name} is on another grid than the FLAIR series; resampled onto it (nearest neighbour)")
        data = resample_to_grid((data != 0).astype(np.float32), img.affine, grid.shape, grid.affine, order=0)
        if not data.any():
            raise DataError(f"{path}: the label does not overlap the FLAIR series once resampled onto its grid; "
                            "is it the label of this study?")
    return apply_orientation(np.asarray(data) != 0, grid.to_model).astype(bool)
