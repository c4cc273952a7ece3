"""`tumorseg convert`: kaggle_3m patients to NIfTI, or NIfTI patients to kaggle_3m folders
(`data.nifti.kaggle_to_nifti`, `data.nifti.nifti_to_kaggle`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tumorseg.data.kaggle import find_patient_dirs, is_patient_dir
from tumorseg.data.nifti import DEFAULT_SPACING, find_nifti_patients, kaggle_to_nifti, nifti_to_kaggle
from tumorseg.errors import TumorsegError
from tumorseg.evaluation import check_spacing
from tumorseg.fileio import check_output_dir


@dataclass
class Converted:
    out: Path
    to_nifti: bool  # kaggle_3m -> NIfTI (else NIfTI -> kaggle_3m)
    spacing: tuple[float, float, float]  # of the NIfTI written from TIFFs
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
    kaggle, nifti = [], []
    for raw in inputs:
        path = Path(raw)
        if not path.is_dir():
            raise TumorsegError(f"{path} is not a folder; pass kaggle_3m patient folders or a kaggle_3m folder, "
                                "or NIfTI patient folders")
        found = find_nifti_patients(path)
        if found:
            nifti += found
        else:
            kaggle += [path] if is_patient_dir(path) else find_patient_dirs(path)
    if kaggle and nifti:
        raise TumorsegError("the inputs mix kaggle_3m and NIfTI patients; convert one kind at a time")
    if nifti and spacing is not None:
        raise TumorsegError("--spacing sets the spacing of NIfTI written from TIFFs; NIfTI to TIFF keeps none, drop it")
    if kaggle:
        return Converted(folder, True, checked, [(p.name, kaggle_to_nifti(p, folder, checked)) for p in kaggle])
    return Converted(folder, False, checked, [(f.name, nifti_to_kaggle(f, folder)) for f in nifti])
