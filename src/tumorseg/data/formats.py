"""The input formats, in one place: what kind of input a file is, and the one-line
refusal of anything else. A new format is added here (and its reader in data/), so
prediction, evaluation, conversion and the web app learn it at once.

    kind      files
    slice     .tif .tiff .png               kaggle_3m slices (`slices.py`)
    nifti     .nii .nii.gz                  volumes (`nifti.py`)
    zip       .zip                          a zipped patient folder (the web app)
    dicom     .dcm, or no suffix and the    DICOM files (`dicom.py`)
              "DICM" marker at byte 128
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePath

from tumorseg.data.nifti import is_nifti
from tumorseg.data.slices import IMAGE_SUFFIXES
from tumorseg.errors import DataError

ZIP_SUFFIXES = (".zip",)
DICOM_SUFFIXES = (".dcm",)
KINDS = ("slice", "nifti", "zip", "dicom")
# The kinds the readers of this package read; a kind is added here when its reader lands.
READ_KINDS = ("slice", "nifti", "zip", "dicom")
SUPPORTED = ".tif/.tiff/.png slices, .nii/.nii.gz volumes, DICOM files, or a .zip of a patient folder"
# Formats users bring that we do not read, and what to do with them.
ADVICE = {
    ".webp": "convert the .webp slices to .tif/.png (a packed copy of kaggle_3m must be restored first)",
    ".jpg": "JPEG loses detail and is not read; export the slices as .tif/.png",
    ".jpeg": "JPEG loses detail and is not read; export the slices as .tif/.png",
    ".mha": "convert it to NIfTI (.nii.gz), e.g. with SimpleITK",
    ".mhd": "convert it to NIfTI (.nii.gz), e.g. with SimpleITK",
    ".nrrd": "convert it to NIfTI (.nii.gz), e.g. with SimpleITK or 3D Slicer",
    ".mgz": "convert it to NIfTI (.nii.gz), e.g. with FreeSurfer's mri_convert",
    "": "give it its file extension (.tif/.png/.nii.gz/.dcm)",
}


def suffix_of(name: str | PurePath) -> str:
    """The extension as the readers see it, lower case: ".nii.gz" whole, else the last one."""
    lower = PurePath(name).name.lower()
    if lower.endswith(".nii.gz"):
        return ".nii.gz"
    return PurePath(lower).suffix


def is_dicom_file(path: str | Path) -> bool:
    """Whether `path` is a file with the DICOM marker "DICM" at byte 128."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def input_kind(path: str | PurePath) -> str:
    """'slice', 'nifti', 'zip', 'dicom', or '' (not an input format) for a file name or
    path. A name of no known suffix is 'dicom' when it is an existing file with the DICOM
    marker (DICOM series are often stored without a suffix or named by UID), else ''."""
    name = PurePath(path).name
    suffix = suffix_of(name)
    if is_nifti(name):
        return "nifti"
    if suffix in IMAGE_SUFFIXES:
        return "slice"
    if suffix in ZIP_SUFFIXES:
        return "zip"
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    # DICOM files are often named without a suffix, or by their UID (1.2.840....): an
    # existing file with the DICOM marker is DICOM whatever its name.
    if Path(path).is_file() and is_dicom_file(path):
        return "dicom"
    return ""


def unsupported_message(path: str | PurePath) -> str:
    """The one-line refusal of a file that is not read: it names the file and its
    extension, lists the supported formats and, for formats users commonly bring, says
    how to convert them."""
    kind = input_kind(path)
    suffix = ".dcm" if kind == "dicom" else suffix_of(path)
    what = f"the extension {suffix}" if suffix else "a file without an extension"
    advice = ADVICE.get(suffix)
    return f"{path}: {what} is not read; supported: {SUPPORTED}" + (f"; {advice}" if advice else "")


def check_input_file(path: str | PurePath) -> str:
    """The kind of one input file (`input_kind`), if it is read.

    Raises:
        DataError: a kind not in READ_KINDS (see `unsupported_message`).
    """
    kind = input_kind(path)
    if kind not in READ_KINDS:
        raise DataError(unsupported_message(path))
    return kind


def check_input_kinds(names: Sequence[str | PurePath]) -> str:
    """The kind of a set of input files given together (an upload, or the files of one
    patient): 'zip' (one zip alone), 'nifti' or 'slice'.

    Raises:
        DataError: no files, a file that is not read (see `unsupported_message`), a zip
            with other files, or kinds mixed.
    """
    if not names:
        raise DataError(f"no files; send a patient as {SUPPORTED}")
    kinds = [check_input_file(n) for n in names]
    found = set(kinds)
    if "zip" in found and len(names) > 1:
        raise DataError("send a zip alone, one patient per upload")
    if len(found) > 1:
        raise DataError(f"the files mix {' and '.join(sorted(found))} files; send one patient in one format")
    return found.pop()
