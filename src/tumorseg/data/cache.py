"""A decoded copy of a kaggle_3m folder or of a folder of NIfTI patients, so that the
source files are read once.

Layout of a cache folder:
    manifest.json                     version, source folder, one record per patient
    patients/<id>/images.npy          (S, H, W, 3) raw intensities in CHANNELS order
    patients/<id>/masks.npy           uint8 (S, H, W), 0/1 (absent for unlabelled folders)

kaggle_3m images are kept as uint8, the pixels of the TIFFs (196 KB per 256x256 slice).
NIfTI patients are kept in the model's orientation and in-plane scale (see `data.nifti`)
and in the smallest type that holds their values exactly (`nifti.exact_dtype`: int16 for
the usual scanner integers, 54 MB for a BraTS patient of 155 x 240 x 240; float32 for
float volumes, twice that), so the normalisation statistics are those of the files; any
non-zero label voxel is tumour. Their records also keep the voxel spacing in mm.

Each record keeps the per-channel normalisation statistics of the patient volume (the
10th and 99th percentiles) and a fingerprint of its source files (names, sizes,
modification times): re-running `prepare` re-decodes only patients whose files changed
and drops patients that disappeared. Files are written to temporaries and renamed, and
the manifest is rewritten after each patient, so an interrupted run loses nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from tumorseg.config import NORM_PERCENTILES
from tumorseg.data.dicom import find_dicom_sessions, read_label, read_session
from tumorseg.data.kaggle import find_patient_dirs, list_slices, read_metadata, read_patient
from tumorseg.data.nifti import NiftiFiles, find_nifti_patients, read_nifti_patient, training_arrays
from tumorseg.data.normalization import volume_percentiles
from tumorseg.errors import DataError
from tumorseg.fileio import atomic_write, atomic_write_text

CACHE_VERSION = 2  # 2: missing sequences filled with FLAIR when read
MANIFEST = "manifest.json"


@dataclass
class PatientRecord:
    """What the cache knows about one patient."""

    patient: str  # folder name, e.g. TCGA_CS_4941_19960909
    slices: list[int]  # slice numbers in order
    height: int
    width: int
    has_masks: bool
    low: list[float]  # per-channel 10th percentile over the patient volume
    high: list[float]  # per-channel 99th percentile
    tumour_pixels: int  # mask pixels == 1 over all slices (0 when unlabelled)
    tumour_slices: int  # slices with at least one tumour pixel
    fingerprint: str  # of the source files
    dtype: str = "uint8"  # of images.npy
    spacing: list[float] | None = None  # mm between slices, rows, columns (NIfTI); None: unknown


def file_fingerprint(paths: list[Path]) -> str:
    h = hashlib.sha1()
    for p in sorted(paths):
        st = p.stat()
        h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def default_cache_dir(raw_root: str | Path) -> Path:
    """Where the cache of `raw_root` lives unless `--out` says otherwise:
    `$TUMORSEG_CACHE` (or ~/.cache/tumorseg) / <folder name>-<hash of its absolute path>."""
    base = Path(os.environ.get("TUMORSEG_CACHE") or Path.home() / ".cache" / "tumorseg")
    resolved = Path(raw_root).resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    return base / f"{resolved.name}-{digest}"


class Cache:
    """An opened cache folder. Arrays are memory-mapped on access."""

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root = root
        self.source = manifest.get("source", "")
        self.metadata: dict[str, dict[str, str]] = manifest.get("metadata", {})
        self.records: dict[str, PatientRecord] = {
            r["patient"]: PatientRecord(**r) for r in manifest["patients"]
        }

    @property
    def patients(self) -> list[str]:
        return sorted(self.records)

    def images(self, patient: str) -> np.ndarray:
        """(S, H, W, 3) of the record's dtype (uint8 for kaggle_3m), memory-mapped.

        Raises:
            DataError: the cached file is missing or damaged.
        """
        rec = self.records[patient]
        return self._load(patient, "images.npy", (len(rec.slices), rec.height, rec.width, 3), rec.dtype)

    def masks(self, patient: str) -> np.ndarray | None:
        """uint8 (S, H, W) with 0/1, memory-mapped; None for an unlabelled patient.

        Raises:
            DataError: the cached file is missing or damaged.
        """
        rec = self.records[patient]
        if not rec.has_masks:
            return None
        return self._load(patient, "masks.npy", (len(rec.slices), rec.height, rec.width))

    def _load(self, patient: str, name: str, shape: tuple[int, ...], dtype: str = "uint8") -> np.ndarray:
        path = self.root / "patients" / patient / name
        array = load_array(path, shape, dtype)
        if array is None:
            source = self.source or "the data folder"
            raise DataError(f"{path}: missing or damaged cache file; run `tumorseg prepare {source}` "
                            "to rebuild it")
        return array

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return f"Cache({str(self.root)!r}, patients={len(self)})"


def load_array(path: Path, shape: tuple[int, ...], dtype: str = "uint8") -> np.ndarray | None:
    """The memory-mapped array at `path` if it is intact, of `shape` and of `dtype`, else
    None (missing, truncated, or not such an array)."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError):  # truncated: "mmap length is greater than file size"
        return None
    if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
        return None
    return array


def is_cache_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def open_cache(path: str | Path) -> Cache:
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path / MANIFEST}: unreadable cache manifest ({e}); delete the folder "
                        "and run `tumorseg prepare` again") from e
    if manifest.get("version") != CACHE_VERSION:
        raise DataError(f"{path}: cache version {manifest.get('version')} is not {CACHE_VERSION}; "
                        "run `tumorseg prepare` on the raw folder again")
    return Cache(path, manifest)


@dataclass
class PatientSource:
    """One patient of a data folder: its name, its files (for the fingerprint) and how to
    read it into (slice numbers, images (S, H, W, 3), masks uint8 0/1 or None, spacing mm
    or None)."""

    name: str
    files: list[Path]
    read: Callable[[], tuple[list[int], np.ndarray, np.ndarray | None, tuple[float, float, float] | None]]


def kaggle_source(patient_dir: Path, require_masks: bool) -> PatientSource:
    files = [f for s in list_slices(patient_dir, require_masks=require_masks) for f in (s.image, s.mask) if f]
    return PatientSource(patient_dir.name, files,
                         lambda: (*read_patient(patient_dir, require_masks=require_masks), None))


def nifti_source(files: NiftiFiles, require_masks: bool) -> PatientSource:
    def read() -> tuple[list[int], np.ndarray, np.ndarray | None, tuple[float, float, float]]:
        volume, label, spacing = training_arrays(read_nifti_patient(files, require_label=require_masks))
        return list(range(1, len(volume) + 1)), volume, label, spacing

    paths = [p for p in (files.flair, files.pre, files.post, files.label) if p is not None]
    return PatientSource(files.name, paths, read)


def dicom_source(folder: Path, label: Path, series: dict[str, str] | None = None) -> PatientSource:
    """The one DICOM study in `folder` with its `label` (a DICOM SEG, or a NIfTI label on
    the FLAIR series' grid), for `evaluate`.

    Raises:
        DataError: no study, or several, in `folder`.
    """
    sessions = find_dicom_sessions(folder, series=series)
    if len(sessions) != 1:
        raise DataError(f"{folder} holds {len(sessions)} DICOM studies; evaluate one study with its --label")
    name, study, wanted = sessions[0]

    def read() -> tuple[list[int], np.ndarray, np.ndarray | None, tuple[float, float, float]]:
        patient = read_session(study, name, series=wanted)
        patient.label = read_label(label, patient)
        volume, mask, spacing = training_arrays(patient)
        return list(range(1, len(volume) + 1)), volume, mask, spacing

    files = sorted(p for p in Path(folder).rglob("*") if p.is_file()) + [Path(label)]
    return PatientSource(name, files, read)


def patient_sources(raw_root: str | Path, require_masks: bool = True) -> list[PatientSource]:
    """The patients of a data folder: NIfTI patients (a patient folder of .nii/.nii.gz
    files or a folder of such folders) or kaggle_3m patient folders.

    Raises:
        DataError: the folder holds neither, naming what it expected.
    """
    raw_root = Path(raw_root)
    nifti = find_nifti_patients(raw_root)
    if nifti:
        return [nifti_source(f, require_masks) for f in nifti]
    try:
        dirs = find_patient_dirs(raw_root)
    except DataError as e:
        if raw_root.is_dir():
            raise DataError(f"{e}, or a folder of NIfTI patient folders (<patient>/<patient>_flair.nii.gz, "
                            "..._t1.nii.gz, ..._t1ce.nii.gz, ..._seg.nii.gz)") from None
        raise
    return [kaggle_source(d, require_masks) for d in dirs]


def prepare(
    raw_root: str | Path,
    out: str | Path | None = None,
    require_masks: bool = True,
    progress: bool = True,
    sources: list[PatientSource] | None = None,
) -> Cache:
    """Decode a data folder (kaggle_3m or NIfTI patients) into a cache (a no-op for
    patients that did not change).

    Args:
        raw_root: the kaggle_3m folder (or a folder holding it), or a folder of NIfTI
            patient folders (or one such folder).
        out: cache folder; default `default_cache_dir(raw_root)`.
        require_masks: every image must have its mask (training/evaluation data).
        progress: show a progress bar.
        sources: the patients, when given explicitly (e.g. NIfTI files named one by one);
            default `patient_sources(raw_root)`.

    Raises:
        DataError: any problem with the raw data, naming the file, or a cache folder that
            cannot be written. Patients decoded before the error stay in the cache; nothing
            half-written is left behind, and no folder is created before the first patient
            is decoded.
    """
    raw_root = Path(raw_root)
    sources = patient_sources(raw_root, require_masks) if sources is None else sources
    out = Path(out) if out is not None else default_cache_dir(raw_root)
    if out.exists() and not out.is_dir():
        raise DataError(f"cache path {out} is a file; pass a folder to --out")
    try:
        return _prepare(raw_root, sources, out, progress)
    except OSError as e:  # a read-only or full disk, no permission
        raise DataError(f"cannot write the cache at {out} ({e.strerror or e}); set TUMORSEG_CACHE to a "
                        "writable folder or pass --out to `tumorseg prepare`") from e


def _prepare(raw_root: Path, sources: list[PatientSource], out: Path, progress: bool) -> Cache:
    old: dict[str, dict[str, Any]] = {}
    if is_cache_dir(out):
        try:
            manifest = json.loads((out / MANIFEST).read_text())
            if manifest.get("version") == CACHE_VERSION:
                old = {r["patient"]: r for r in manifest["patients"]}
        except (OSError, json.JSONDecodeError, KeyError):
            old = {}

    records: dict[str, dict[str, Any]] = {}
    meta = read_metadata(raw_root) if raw_root.is_dir() else {}

    def write_manifest() -> None:
        manifest = {
            "version": CACHE_VERSION,
            "source": str(raw_root.resolve()),
            "percentiles": list(NORM_PERCENTILES),
            "patients": [records[k] for k in sorted(records)],
            "metadata": {k: v for k, v in meta.items()},
        }
        atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))

    # Keep up-to-date records of patients still present even if a later one fails.
    todo = []
    for src in sources:
        fp = file_fingerprint(src.files)
        rec = old.get(src.name)
        if rec and rec["fingerprint"] == fp and _intact(out / "patients" / src.name, rec):
            records[src.name] = rec
        else:
            todo.append((src, fp))
    changed = bool(todo) or set(old) != set(records)

    for src, fp in tqdm(todo, desc="decoding patients", unit="patient", disable=None if progress and todo else True):
        numbers, images, masks, spacing = src.read()
        pdir = out / "patients" / src.name
        pdir.mkdir(parents=True, exist_ok=True)
        atomic_write(pdir / "images.npy", lambda f, a=images: np.save(f, a))
        if masks is not None:
            atomic_write(pdir / "masks.npy", lambda f, a=masks: np.save(f, a))
        else:
            (pdir / "masks.npy").unlink(missing_ok=True)
        low, high = volume_percentiles(images)
        rec = PatientRecord(
            patient=src.name, slices=numbers, height=int(images.shape[1]), width=int(images.shape[2]),
            has_masks=masks is not None, low=low, high=high,
            tumour_pixels=int(masks.sum()) if masks is not None else 0,
            tumour_slices=int((masks.reshape(len(masks), -1).max(1) > 0).sum()) if masks is not None else 0,
            fingerprint=fp, dtype=images.dtype.name, spacing=list(spacing) if spacing is not None else None,
        )
        records[src.name] = asdict(rec)
        write_manifest()

    # Patients whose files are gone leave the cache.
    for name in set(old) - {src.name for src in sources}:
        shutil.rmtree(out / "patients" / name, ignore_errors=True)
    if changed or not is_cache_dir(out):
        write_manifest()
    return open_cache(out)


def _intact(pdir: Path, rec: dict[str, Any]) -> bool:
    """The cached arrays of a manifest record exist and have its shape (a truncated file,
    e.g. after a full disk, is decoded again)."""
    shape = (len(rec["slices"]), rec["height"], rec["width"])
    if load_array(pdir / "images.npy", (*shape, 3), rec.get("dtype", "uint8")) is None:
        return False
    return not rec["has_masks"] or load_array(pdir / "masks.npy", shape) is not None


def open_data(path: str | Path, require_masks: bool = True, progress: bool = True) -> Cache:
    """A cache for `path`: `path` itself when it is a cache folder, otherwise the default
    cache of the raw data folder (kaggle_3m or NIfTI) at `path`, prepared or refreshed as
    needed."""
    if is_cache_dir(path):
        return open_cache(path)
    return prepare(path, require_masks=require_masks, progress=progress)
