"""Result values -> files: the outputs of `predict`, one function per format.

Per input slice `<name>.tif`: `<out>/<volume>/<name>_pred.png` (0/255 mask) and, with
overlay, `<name>_overlay.png`; per NIfTI patient `<out>/<name>/<name>_pred.nii.gz` (uint8
0/1 with the input's affine, shape and header geometry) and, with overlay, a PNG per
tumour slice; per DICOM patient the same NIfTI files on the FLAIR series' grid and
`<name>_seg.dcm`, a DICOM Segmentation referencing the FLAIR series (`tumorseg.dicomseg`);
with probabilities, the probability map (`_prob.nii.gz` or `_prob.png`) and for an
ensemble its spread across the models (`_prob_spread`).

`<out>/summary.csv` lists one row per volume (`SUMMARY_FIELDS`): its size, the tumour
found, what post-processing removed, notes on the input, and the quality flag with the
features it rests on (`tumorseg.qc`; the flag is empty for a model without a calibrated
rule). A run adds its volumes'
rows to an existing summary.csv (replacing the rows of volumes predicted again) and never
drops other rows, also when several runs write into one folder at once.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tumorseg.data.inputs import InputVolume
from tumorseg.data.nifti import resample_slices, write_nifti
from tumorseg.data.slices import write_image, write_mask
from tumorseg.errors import DataError
from tumorseg.fileio import atomic_write_text, prepare_output_dir
from tumorseg.inference import PatientResult
from tumorseg.plots import overlay as make_overlay
from tumorseg.qc import SHOWN_FEATURES


@dataclass
class VolumeSummary:
    """One row of summary.csv."""

    volume: str
    slices: int
    tumour_slices: int
    tumour_pixels: int
    removed_pixels: int = 0  # above the threshold, but removed by post-processing
    volume_ml: float | None = None  # tumour volume from the voxel size (NIfTI input); None for slices
    notes: str = ""  # what the user should know about the input (filled sequences, ...)
    qc: str = ""  # "ok" or "review" ("" without a calibrated rule)
    qc_score: float | None = None  # the estimated probability that Dice < 0.7 (see tumorseg.qc)
    qc_reason: str = ""  # the condition that flagged it, in words
    mean_prob: float | None = None  # the quality features (tumorseg.qc.QCFeatures)
    ambiguity: float | None = None
    removed_fraction: float | None = None
    removed_components: float | None = None
    components: float | None = None
    touches_edge: float | None = None
    disagreement: float | None = None


SUMMARY_FIELDS = [f for f in VolumeSummary.__dataclass_fields__]
_TEXT_FIELDS = ("volume", "notes", "qc", "qc_reason")
_INT_FIELDS = ("slices", "tumour_slices", "tumour_pixels", "removed_pixels")


def summary_of(volume: InputVolume, result: PatientResult) -> VolumeSummary:
    """The summary row of one predicted patient."""
    voxels = result.tumour_voxels
    ml = voxels * volume.voxel_ml if volume.voxel_ml is not None else None
    features = result.qc.get("features", {})
    shown = {k: _finite(features.get(k)) for k in SHOWN_FEATURES}
    return VolumeSummary(volume.name, len(result.mask), result.tumour_slices, voxels, result.removed_voxels, ml,
                         "; ".join(volume.notes), result.qc.get("qc", ""), _finite(result.qc.get("qc_score")),
                         result.qc.get("qc_reason", ""), **shown)


def _finite(value: object) -> float | None:
    """A float, or None for what is missing or NaN (an empty cell)."""
    if value is None:
        return None
    value = float(value)  # type: ignore[arg-type]
    return None if math.isnan(value) else value


def probability_png(p: np.ndarray) -> np.ndarray:
    """Probabilities (or their spread) in [0, 1] as 8-bit grey levels."""
    return np.round(np.clip(p, 0.0, 1.0) * 255).astype(np.uint8)


def write_slices(out: Path, volume: InputVolume, result: PatientResult, *, overlay: bool = False,
                 probabilities: bool = False) -> list[Path]:
    """One 0/255 mask PNG per input slice (and overlays, probability maps) in
    `<out>/<volume>/`; returns the files written."""
    vdir = prepare_output_dir(out / volume.name)
    written = []
    for i, (f, img, m) in enumerate(zip(volume.files, volume.images, result.mask, strict=True)):
        written.append(write_mask(vdir / f"{f.stem}_pred.png", m))
        if overlay:
            written.append(write_image(vdir / f"{f.stem}_overlay.png", make_overlay(img, m)))
        if probabilities:
            written.append(write_image(vdir / f"{f.stem}_prob.png", probability_png(result.probabilities[i])))
            if result.spread is not None:
                written.append(write_image(vdir / f"{f.stem}_prob_spread.png", probability_png(result.spread[i])))
    return written


def nifti_mask_path(out: Path, name: str) -> Path:
    return out / name / f"{name}_pred.nii.gz"


def write_nifti_result(out: Path, volume: InputVolume, result: PatientResult, *, overlay: bool = False,
                       probabilities: bool = False) -> list[Path]:
    """`<name>_pred.nii.gz` (uint8 0/1 on the input's grid) in `<out>/<name>/`, and on
    request the probability maps and an overlay PNG per tumour slice (model orientation)."""
    assert volume.grid is not None
    name = volume.name
    vdir = prepare_output_dir(out / name)
    written = [write_nifti(nifti_mask_path(out, name), result.mask, volume.grid, np.uint8)]
    if probabilities:
        written.append(write_nifti(vdir / f"{name}_prob.nii.gz", result.probabilities, volume.grid, np.float32))
        if result.spread is not None:
            written.append(write_nifti(vdir / f"{name}_prob_spread.nii.gz", result.spread, volume.grid, np.float32))
    if overlay:
        images = volume.images
        if images.shape[1:3] != result.mask.shape[1:]:  # resampled for the model: back to the input's grid
            images = resample_slices(images, result.mask.shape[1:])
        for i in np.flatnonzero(result.mask.reshape(len(result.mask), -1).any(1)):
            written.append(write_image(vdir / f"{name}_{i + 1}_overlay.png", make_overlay(images[i], result.mask[i])))
    return written


def write_dicom_result(out: Path, volume: InputVolume, result: PatientResult, *, overlay: bool = False,
                       probabilities: bool = False) -> list[Path]:
    """The NIfTI outputs on the FLAIR series' grid and `<name>_seg.dcm`, a DICOM SEG of the
    mask referencing the FLAIR series; the quality flag, where there is one, goes into the
    SEG's series description and a sidecar JSON."""
    from tumorseg.dicomseg import write_patient_seg  # highdicom: loaded for DICOM input only

    written = write_nifti_result(out, volume, result, overlay=overlay, probabilities=probabilities)
    qc = {k: v for k, v in result.qc.items() if k in ("qc", "qc_score", "qc_reason")} or None
    seg = out / volume.name / f"{volume.name}_seg.dcm"
    try:
        written.append(write_patient_seg(seg, volume.source, result.mask, qc=qc))
    except (ValueError, AttributeError, TypeError, KeyError) as e:  # highdicom refuses headers it cannot use
        raise DataError(f"{volume.name}: cannot build a DICOM SEG from the FLAIR series' headers "
                        f"({type(e).__name__}: {str(e)[:160]}); the NIfTI mask is in {written[0]}") from e
    return written


def write_result(out: Path, volume: InputVolume, result: PatientResult, *, overlay: bool = False,
                 probabilities: bool = False) -> list[Path]:
    """Write one patient's outputs in the format of its input (slices -> PNG per slice,
    NIfTI -> NIfTI, DICOM -> NIfTI and DICOM SEG); returns the files written."""
    write = {"nifti": write_nifti_result, "dicom": write_dicom_result}.get(volume.kind, write_slices)
    return write(out, volume, result, overlay=overlay, probabilities=probabilities)


# ---------------------------------------------------------------------- summary.csv

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


def summary_from_row(row: dict[str, str]) -> VolumeSummary:
    """A summary row read back from summary.csv (missing columns take their defaults)."""
    def typed(name: str, value: str) -> object:
        if name in _TEXT_FIELDS:
            return value
        if name in _INT_FIELDS:
            return int(value) if value else 0
        return float(value) if value else None

    return VolumeSummary(**{k: typed(k, row.get(k) or "") for k in SUMMARY_FIELDS})


def merge_summary(path: Path, summaries: Sequence[VolumeSummary]) -> None:
    """Add or replace the rows of `summaries` in the summary table at `path`, keeping every
    other row: read, merge and atomically rewrite under a lock, so runs into one folder,
    one after the other or at once, never lose a row. Rows are sorted by volume."""
    with _locked(path.parent):
        rows = read_summary(path)
        for s in summaries:
            rows[s.volume] = {k: "" if v is None else (f"{v:.4g}" if isinstance(v, float) and k != "volume_ml"
                                                       else f"{v:.3f}" if isinstance(v, float) else str(v))
                              for k, v in asdict(s).items()}
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows[k] for k in sorted(rows))
        atomic_write_text(path, buf.getvalue())
