"""What an upload may be, and how it becomes one patient folder that `tumorseg predict`
reads: safely, without trusting a name, a size or a zip header.

An upload is one of:
- a zip of one patient folder (kaggle_3m slices `<patient>_<n>.tif` with or without
  `_mask.tif`, or NIfTI sequences);
- slice files (.tif/.tiff/.png), masks `<name>_mask.<ext>` among them;
- NIfTI files (.nii/.nii.gz): FLAIR, optionally T1/T1c and a label, named by the
  conventions of `data.nifti`;
- DICOM files of one study (.dcm, or without a suffix), or a zip of them: its FLAIR,
  T1 and T1c series are chosen by `data.dicom`.

Every file lands flat in one folder of the job (`<job>/input/<patient>/<basename>`): no
name from the client or from a zip is ever joined to a path as it is. A zip entry that is
absolute, climbs with `..`, or is a symbolic link is refused, as are zips whose entries
or unpacked bytes exceed the limits; the bytes are counted while unpacking, since a zip
header can lie.
"""

from __future__ import annotations

import re
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from tumorseg.data.formats import check_input_kinds, input_kind
from tumorseg.data.nifti import is_nifti, patient_name
from tumorseg.data.slices import SLICE_RE
from tumorseg.errors import DataError

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ ()+-]{0,199}$")
FLAIR_NAME = re.compile(r"[_-](flair|t2f)\.nii(\.gz)?$", flags=re.IGNORECASE)
COPY_CHUNK = 1 << 20


class UploadError(Exception):
    """An upload refused, with the HTTP status to answer and a message for the user."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Limits:
    max_files: int
    max_unpacked_bytes: int


def safe_name(name: str | None) -> str:
    """The base name of an uploaded file, if it is a plain file name.

    Raises:
        UploadError (422): empty, hidden, or with characters outside letters, digits and ._ ()+-.
    """
    base = PurePosixPath((name or "").replace("\\", "/")).name
    if not SAFE_NAME.match(base) or base in (".", ".."):
        raise UploadError(422, f"file name {name!r} is not allowed; use letters, digits and ._- only")
    return base


def kind_of(name: str) -> str:
    """'nifti', 'slice', 'zip', 'dicom' or '' (anything else): `data.formats.input_kind`."""
    return input_kind(name)


def patient_folder_name(names: list[str], fallback: str = "patient") -> str:
    """A patient name from its file names: the FLAIR file's name without the sequence
    word for NIfTI, the common `<patient>` of `<patient>_<n>.tif` slices, else `fallback`."""
    nifti = [n for n in names if is_nifti(n)]
    flair = [n for n in nifti if FLAIR_NAME.search(n)]
    if flair or nifti:
        return _clean(patient_name((flair or nifti)[0]), fallback)
    stems = {m.group(1) for n in names if (m := SLICE_RE.match(n))}
    return _clean(stems.pop(), fallback) if len(stems) == 1 else fallback


def _clean(name: str, fallback: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip("._-")
    return name[:100] if name else fallback


def dicom_name(index: int) -> str:
    """The name a DICOM file of an upload is stored under: its files are told by content,
    and the files of several series (or folders of a zip) often share names."""
    return f"dicom{index:05d}.dcm"


def check_kinds(names: list[str] | list[Path]) -> str:
    """The kind of a set of uploaded files (names, or paths of the files as written, so
    that DICOM files without a suffix are told by content): 'zip' (one zip alone),
    'nifti', 'slice' or 'dicom' (`data.formats.check_input_kinds`).

    Raises:
        UploadError (422): no files, unsupported files, or kinds mixed.
    """
    if not names:
        raise UploadError(422, "no files uploaded; send a zip of a patient folder, slice images, NIfTI volumes or "
                               "DICOM files")
    try:
        return check_input_kinds(names)
    except DataError as e:
        raise UploadError(422, str(e)) from None


def too_large(limit: int, where: str) -> UploadError:
    """The refusal of an upload whose images decode to more than `limit` bytes."""
    return UploadError(413, f"the upload decodes to more than {limit / 2**20:.0f} MB of images ({where}); send one "
                            "patient (start `tumorseg serve --max-unpacked-mb N` to raise the limit)")


def check_decoded_size(folder: Path, names: list[str], kind: str, limit: int) -> None:
    """Refuse files that would decode to more than `limit` bytes, from their headers alone
    (before any pixel is decoded): float32 voxels for NIfTI, RGB pixels for slices.

    Raises:
        UploadError (413): too large; (422) a header that cannot be read is left to the
            reader, which names the file.
    """
    total = 0
    for name in names:
        try:
            if kind == "dicom":
                continue  # counted per study from the headers of the series it reads (`dicom.session_bytes`)
            if kind == "nifti":
                import nibabel as nib

                total += 4 * int(np.prod(nib.load(str(folder / name)).shape, dtype=np.int64))
            else:
                from PIL import Image

                with Image.open(folder / name) as im:
                    total += 3 * im.width * im.height
        except Exception:  # noqa: BLE001 (unreadable: the reader says why, with the file's name)
            continue
        if total > limit:
            raise too_large(limit, f"at {name}")


def unpack_zip(archive: Path, dest: Path, limits: Limits) -> list[str]:
    """Unpack the files of a patient zip flat into `dest`, skipping folders, hidden files
    and macOS `__MACOSX` entries; returns their names.

    Raises:
        UploadError: 422 for a damaged zip, unsafe entries (absolute, `..`, symbolic
            links), files of several folders or two files of one name; 413 for more
            entries or more unpacked bytes than the limits allow.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise UploadError(422, f"{archive.name}: not a readable zip file ({e})") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_files:
            raise UploadError(413, f"{archive.name} holds {len(infos)} entries; at most {limits.max_files} are "
                                   "accepted")
        declared = sum(i.file_size for i in infos)
        if declared > limits.max_unpacked_bytes:
            raise UploadError(413, f"{archive.name} unpacks to {declared / 2**20:.0f} MB; at most "
                                   f"{limits.max_unpacked_bytes / 2**20:.0f} MB are accepted")
        names: list[str] = []
        folders: set[str] = set()
        budget = limits.max_unpacked_bytes
        for info in infos:
            raw = info.filename.replace("\\", "/")
            parts = PurePosixPath(raw).parts
            if raw.startswith("/") or re.match(r"^[A-Za-z]:", raw) or ".." in parts:
                raise UploadError(422, f"{archive.name}: unsafe entry {info.filename!r} (an absolute path or '..'); "
                                       "zip the patient folder itself")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise UploadError(422, f"{archive.name}: entry {info.filename!r} is a symbolic link; links are not "
                                       "accepted")
            if info.is_dir() or not parts or parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts):
                continue
            dicom = kind_of(parts[-1]) == "dicom" or _dicom_entry(zf, info)
            if kind_of(parts[-1]) in ("", "zip") and not dicom:
                continue  # README, data.csv and other strays, as in a kaggle_3m folder
            if dicom:  # a study's series often lie in folders of their own, with names repeated
                budget = _copy_member(zf, info, dest / dicom_name(len(names)), budget, archive.name, limits)
                names.append(dicom_name(len(names)))
                continue
            name = safe_name(parts[-1])
            folders.add("/".join(parts[:-1]))
            if len(folders) > 1:
                shown = ", ".join(sorted(folders))
                raise UploadError(422, f"{archive.name} holds images in several folders ({shown}); upload one "
                                       "patient folder per zip")
            if name in names:
                raise UploadError(422, f"{archive.name}: two files named {name}")
            budget = _copy_member(zf, info, dest / name, budget, archive.name, limits)
            names.append(name)
    return names


def _copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, budget: int, archive: str,
                 limits: Limits) -> int:
    """Copy one entry, counting the bytes actually unpacked against `budget`; returns
    what is left of it."""
    try:
        with zf.open(info) as src, target.open("wb") as out:
            while chunk := src.read(COPY_CHUNK):
                budget -= len(chunk)
                if budget < 0:
                    raise UploadError(413, f"{archive} unpacks to more than {limits.max_unpacked_bytes / 2**20:.0f} "
                                           "MB; a zip of one patient is far smaller")
                out.write(chunk)
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError) as e:
        raise UploadError(422, f"{archive}: entry {info.filename!r} cannot be unpacked ({e})") from None
    return budget


def _dicom_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bool:
    """An entry without a suffix that holds a DICOM file (the "DICM" marker at byte 128):
    exports from scanners often name their files so."""
    if info.file_size < 132 or "." in PurePosixPath(info.filename).name and kind_of(info.filename) != "":
        return False
    try:
        with zf.open(info) as f:
            head = f.read(132)
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError):
        return False
    return head[128:132] == b"DICM"
