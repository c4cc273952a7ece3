"""What a user may pass to `predict` (and the web app), in one place: paths in, patient
volumes out, each as the model reads it together with where its voxels came from.

Inputs:
- a patient folder (kaggle_3m layout; masks, if any, are ignored) or any folder of
  slice images (.tif/.png): one volume, normalised with the percentiles of the whole
  volume, as in training;
- a kaggle_3m folder holding patient folders: one volume per patient;
- a single slice file: a volume of one slice, normalised with the percentiles of that
  slice alone (less stable than a whole volume: pass the folder when you have it);
- a NIfTI patient: a folder of .nii/.nii.gz sequences named by the common conventions, a
  folder of such folders, a FLAIR .nii/.nii.gz alone, or files named explicitly
  (`NiftiFiles`); reoriented and, when its in-plane spacing is far from the training
  data's, resampled for the model (see `data.nifti`);
- DICOM: a folder (any depth, a DICOMDIR export too) of DICOM files: one patient per
  study, its FLAIR, T1 and T1c series chosen by their descriptions (or by `series`
  overrides), see `data.dicom`.

`find_inputs` groups paths into `InputRef`s without reading pixels; `InputRef.read()`
reads one patient into an `InputVolume`. A new input format is added here (and in its
reader module) only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tumorseg.data.dicom import find_dicom_sessions, is_dicom_input, read_session
from tumorseg.data.formats import check_input_file, input_kind
from tumorseg.data.kaggle import find_patient_dirs, list_slices
from tumorseg.data.nifti import (
    Grid,
    NiftiFiles,
    find_sequences,
    is_nifti_patient,
    patient_name,
    read_nifti_patient,
    to_training_scale,
)
from tumorseg.data.slices import read_mask, read_volume, slice_images
from tumorseg.errors import DataError


@dataclass
class InputVolume:
    """One patient as the model reads it, and where its voxels came from.

    `images` are at the model's scale; `grid` (NIfTI input) is the grid the outputs are
    written on, and `native_shape` the in-plane shape of that grid when `images` were
    resampled to the model's scale (probabilities are brought back to it)."""

    name: str
    kind: str  # "slices", "nifti" or "dicom"
    images: np.ndarray  # (S, H, W, 3) in CHANNELS order, model orientation: uint8 slices or float intensities
    files: list[Path]  # the slice images, or the NIfTI files read
    grid: Grid | None = None  # NIfTI geometry of the outputs; None for slice images
    native_shape: tuple[int, int] | None = None  # the grid's in-plane shape when `images` were resampled
    notes: list[str] = field(default_factory=list)  # what a user should know (filled sequences, ...)
    identity: dict[str, Any] = field(default_factory=dict)  # source identifiers a writer must reference
    label: np.ndarray | None = None  # bool (S, H, W) on the output grid, when read with `labels`
    source: Any = None  # the reader's record of the source: a `DicomPatient` (series, headers) for DICOM

    @property
    def spacing(self) -> tuple[float, float, float] | None:
        """mm between slices, rows, columns of the output grid; None for slice images."""
        return self.grid.spacing if self.grid is not None else None

    @property
    def voxel_ml(self) -> float | None:
        return self.grid.voxel_ml if self.grid is not None else None


@dataclass
class InputRef:
    """One patient found among the inputs, not read yet."""

    name: str
    kind: str  # "slices", "nifti" or "dicom"
    files: list[Path] = field(default_factory=list)  # slice images
    nifti: NiftiFiles | None = None
    dicom: tuple[Any, dict[str, str]] | None = None  # (the study's series, the series chosen by UID)
    resample: bool = True  # sequences on other grids than the FLAIR's are resampled onto it (else refused)

    def read(self, labels: bool = False) -> InputVolume:
        """Read the patient (see `InputVolume`); with `labels`, its label too where it has
        one (a NIfTI label file; a mask beside every slice image).

        Raises:
            DataError: unreadable or inconsistent files, naming the file.
        """
        if self.kind == "dicom":
            assert self.dicom is not None
            study, wanted = self.dicom
            patient = read_session(study, self.name, series=wanted)
            images, native = to_training_scale(patient)
            notes = [patient.summary()] + ([f"{', '.join(patient.filled)} filled with FLAIR"] if patient.filled else [])
            return InputVolume(patient.name, "dicom", images, [], patient.grid, native, notes, source=patient)
        if self.kind == "nifti":
            assert self.nifti is not None
            files = self.nifti if labels else dataclasses.replace(self.nifti, label=None)
            patient = read_nifti_patient(files, resample=self.resample)
            images, native = to_training_scale(patient)
            notes = [f"{', '.join(patient.filled)} filled with FLAIR"] if patient.filled else []
            if patient.resampled:
                notes.append(f"{', '.join(patient.resampled)} resampled onto the FLAIR grid")
            paths = [p for p in files.sequences().values() if p is not None]
            return InputVolume(patient.name, "nifti", images, paths, patient.grid, native, notes, label=patient.label)
        images = read_volume(self.files, self.name)
        return InputVolume(self.name, "slices", images, list(self.files),
                           label=slice_labels(self.files) if labels else None)


def slice_labels(files: list[Path]) -> np.ndarray | None:
    """The masks of slice images bool (S, H, W) when every slice has one beside it
    (kaggle_3m naming `<name>_mask.<ext>`), else None."""
    try:
        slices = list_slices(files[0].parent, require_masks=True)
    except DataError:
        return None
    if [s.image for s in slices] != list(files):
        return None
    return np.stack([read_mask(s.mask) for s in slices if s.mask is not None]) > 0


def nifti_ref(files: NiftiFiles, resample: bool = True) -> InputRef:
    """A NIfTI patient given by its files."""
    return InputRef(files.name, "nifti", [], files, resample=resample)


def find_inputs(inputs: Sequence[str | Path], *, dicom_series: dict[str, str] | None = None,
                resample: bool = True) -> list[InputRef]:
    """Group the inputs into patients (see the module docstring), without reading pixels.
    `dicom_series` ({"FLAIR": uid, "T1": uid, "T1c": uid}, any subset) overrides the
    choice of DICOM series by description; without `resample`, NIfTI sequences on another
    grid than the FLAIR's are refused instead of resampled onto it.

    Raises:
        DataError: a path that does not exist, a folder without slices, a file of a
            format that is not read, or two inputs of one name.
    """
    refs: list[InputRef] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise DataError(f"{path} does not exist; pass a patient folder, a folder of slices or .tif/.png files")
        if path.is_file() and input_kind(path) != "dicom":
            kind = check_input_file(path)
            if kind == "nifti":  # one volume given alone: FLAIR
                refs.append(nifti_ref(NiftiFiles(patient_name(path), flair=path), resample))
                continue
            if kind != "slice":
                raise DataError(f"{path}: a {kind} file is not read here; unpack it and pass the folder")
            refs.append(InputRef(path.stem, "slices", [path]))
            continue
        if is_dicom_input(path):
            refs.extend(InputRef(name, "dicom", dicom=(study, dict(wanted)))
                        for name, study, wanted in find_dicom_sessions(path, series=dicom_series))
            continue
        if is_nifti_patient(path):
            refs.append(nifti_ref(find_sequences(path), resample))
            continue
        files = slice_images(path)
        if files:
            refs.append(InputRef(path.resolve().name, "slices", files))
            continue
        nifti = sorted(p for p in path.iterdir() if p.is_dir() and is_nifti_patient(p))
        if nifti:
            refs.extend(nifti_ref(find_sequences(p), resample) for p in nifti)
            continue
        try:
            patients = find_patient_dirs(path)
        except DataError:
            raise DataError(f"{path} holds no .tif/.png slices, no NIfTI volumes and no patient folders") from None
        for p in patients:
            files = slice_images(p)
            if not files:
                raise DataError(f"{p} holds only masks, no image slices to predict on")
            refs.append(InputRef(p.name, "slices", files))
    names = [r.name for r in refs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"two inputs have the same name {dup[0]!r}; their outputs would collide")
    return refs
