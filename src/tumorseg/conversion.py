"""`tumorseg convert`: kaggle_3m patients to NIfTI, NIfTI patients to kaggle_3m folders
(`data.nifti.kaggle_to_nifti`, `data.nifti.nifti_to_kaggle`), or DICOM studies to NIfTI
(`dicom_to_nifti`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tumorseg.config import CHANNELS
from tumorseg.data.dicom import find_dicom_sessions, is_dicom_input, read_session
from tumorseg.data.kaggle import find_patient_dirs, is_patient_dir
from tumorseg.data.nifti import (
    CONVERTED_NAMES,
    DEFAULT_SPACING,
    find_nifti_patients,
    kaggle_to_nifti,
    nifti_to_kaggle,
    write_nifti,
)
from tumorseg.errors import TumorsegError
from tumorseg.evaluation import check_spacing
from tumorseg.fileio import check_output_dir


@dataclass
class Converted:
    out: Path
    to_nifti: bool  # kaggle_3m -> NIfTI (else NIfTI -> kaggle_3m)
    spacing: tuple[float, float, float] | None  # of the NIfTI written from TIFFs (DICOM: their own)
    patients: list[tuple[str, list[Path]]]  # (patient, files written)


def convert(inputs: Sequence[str | Path], out: str | Path, spacing: Sequence[float] | None = None) -> Converted:
    """Convert kaggle_3m patient folders (or a kaggle_3m folder) to NIfTI with `spacing`
    (mm between slices, rows, columns; default `DEFAULT_SPACING`), or NIfTI patient folders
    to kaggle_3m folders.

    Raises:
        TumorsegError: inputs that are not folders, kinds mixed, or spacing for NIfTI input.
    """
    checked = check_spacing(spacing) or DEFAULT_SPACING
    folder = check_output_dir(out)
    kaggle, nifti, dicom = [], [], []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir() and is_dicom_input(path):
            dicom.append(path)
            continue
        if not path.is_dir():
            raise TumorsegError(f"{path} is not a folder; pass kaggle_3m patient folders or a kaggle_3m folder, "
                                "or NIfTI patient folders")
        found = find_nifti_patients(path)
        if found:
            nifti += found
        else:
            kaggle += [path] if is_patient_dir(path) else find_patient_dirs(path)
    kinds = [name for name, found in (("kaggle_3m", kaggle), ("NIfTI", nifti), ("DICOM", dicom)) if found]
    if len(kinds) > 1:
        raise TumorsegError(f"the inputs mix {' and '.join(kinds)} patients; convert one kind at a time")
    if dicom:
        if spacing is not None:
            raise TumorsegError("--spacing sets the spacing of NIfTI written from TIFFs; DICOM has its own, drop it")
        done = [item for path in dicom for item in dicom_to_nifti(path, folder)]
        return Converted(folder, True, None, done)
    if nifti and spacing is not None:
        raise TumorsegError("--spacing sets the spacing of NIfTI written from TIFFs; NIfTI to TIFF keeps none, drop it")
    if kaggle:
        return Converted(folder, True, checked, [(p.name, kaggle_to_nifti(p, folder, checked)) for p in kaggle])
    return Converted(folder, False, checked, [(f.name, nifti_to_kaggle(f, folder)) for f in nifti])


def dicom_to_nifti(folder: Path, out: Path) -> list[tuple[str, list[Path]]]:
    """Write each DICOM study in `folder` as a NIfTI patient on its FLAIR series' grid:
    `<out>/<study>/<study>_{t1,flair,t1ce}.nii.gz` (float32, rescaled values; T1/T1c
    resampled onto the FLAIR grid where they lie on another), which `predict` and
    `evaluate` read as any NIfTI patient.

    Raises:
        DataError: what reading the studies raises (see `data.dicom`).
    """
    import numpy as np

    done = []
    for name, study, wanted in find_dicom_sessions(folder):
        patient = read_session(study, name, series=wanted)
        files = [write_nifti(out / name / f"{name}_{CONVERTED_NAMES[c]}.nii.gz", patient.volume[..., i], patient.grid,
                             np.float32) for i, c in enumerate(CHANNELS) if c not in patient.filled]
        done.append((name, files))
        del patient
    return done
