"""Synthetic DICOM MR series written with pydicom, for the DICOM reader and SEG tests.

Positions are LPS (DICOM's patient coordinates) in mm. The patient's name and ID are
deliberately recognisable so that tests can check they never leak into names or errors.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-SECRET-4711"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4.1"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # rows toward the patient's left, columns toward posterior


@dataclass
class Study:
    patient_name: str = PATIENT_NAME
    patient_id: str = PATIENT_ID
    study_uid: str = field(default_factory=generate_uid)
    frame_of_reference: str = field(default_factory=generate_uid)


def tilted(degrees: float) -> tuple[float, ...]:
    """An axial orientation tilted by `degrees` about the left-right axis."""
    a = np.deg2rad(degrees)
    return (1.0, 0.0, 0.0, 0.0, float(np.cos(a)), float(np.sin(a)))


def normal_of(orientation: Sequence[float]) -> np.ndarray:
    return np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))


def _base(study: Study, series_uid: str, description: str, number: int, sop_class: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = study.study_uid
    ds.StudyDate = "20200102"
    ds.StudyTime = "101010"
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC1"
    ds.ReferringPhysicianName = ""
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = number
    ds.SeriesDescription = description
    ds.ProtocolName = description
    ds.Modality = "MR"
    ds.Manufacturer = "synthetic"
    ds.FrameOfReferenceUID = study.frame_of_reference
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return ds


def _save(ds: Dataset, path: Path) -> Path:
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(folder: Path, volume: np.ndarray, *, study: Study | None = None, description: str = "AX FLAIR",
                 number: int = 1, orientation: Sequence[float] = AXIAL, origin: Sequence[float] = (-100, -120, -40),
                 spacing: Sequence[float] = (0.94, 0.94), step: float = 3.0, positions: Sequence[float] | None = None,
                 contrast_agent: str | None = None, image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "M", "ND"),
                 slope: float = 1.0, intercept: float = 0.0, shuffle: bool = True, seed: int = 0,
                 names: str = "random", series_uid: str | None = None,
                 orientations: Sequence[Sequence[float]] | None = None) -> list[Path]:
    """Write `volume` (S, rows, columns; slice k at `origin + positions[k] * normal`, with
    positions k*step by default) as single-frame MR files (uint16 stored values) in `folder`.
    names: "random" (hex names without suffix, written in shuffled order), or "ordered"
    (IM0001.dcm ...). Returns the paths in slice order."""
    study = study or Study()
    series_uid = series_uid or generate_uid()
    volume = np.asarray(volume)
    positions = [k * step for k in range(len(volume))] if positions is None else list(positions)
    rng = random.Random(seed)
    order = list(range(len(volume)))
    if shuffle:
        rng.shuffle(order)
    paths: dict[int, Path] = {}
    for n, k in enumerate(order):
        iop = orientation if orientations is None else orientations[k]
        ds = _base(study, series_uid, description, number, MR_IMAGE)
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = n + 1  # deliberately unrelated to the position
        ds.ImageType = list(image_type)
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in iop]
        ipp = np.asarray(origin, float) + positions[k] * normal_of(iop)
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
        ds.PixelSpacing = [f"{v:g}" for v in spacing]
        ds.SliceThickness = f"{step:g}"
        if contrast_agent is not None:
            ds.ContrastBolusAgent = contrast_agent
        if slope != 1.0 or intercept != 0.0:
            ds.RescaleSlope = f"{slope:g}"
            ds.RescaleIntercept = f"{intercept:g}"
        ds.Rows, ds.Columns = volume.shape[1:3]
        ds.PixelData = np.ascontiguousarray(volume[k].astype(np.uint16)).tobytes()
        name = f"{rng.getrandbits(48):012x}" if names == "random" else f"IM{k + 1:04d}.dcm"
        paths[k] = _save(ds, folder / name)
    return [paths[k] for k in range(len(volume))]


def write_enhanced(path: Path, volume: np.ndarray, *, study: Study | None = None, description: str = "AX FLAIR 3D",
                   number: int = 7, orientation: Sequence[float] = AXIAL, origin: Sequence[float] = (-100, -120, -40),
                   spacing: Sequence[float] = (0.94, 0.94), step: float = 3.0, frame_order: Sequence[int] | None = None,
                   slope: float = 1.0, intercept: float = 0.0) -> Path:
    """Write `volume` (S, rows, columns) as one Enhanced MR file; frame f holds slice
    `frame_order[f]` (default: reversed, so frame order is not slice order)."""
    study = study or Study()
    volume = np.asarray(volume)
    frame_order = list(range(len(volume)))[::-1] if frame_order is None else list(frame_order)
    ds = _base(study, generate_uid(), description, number, ENHANCED_MR_IMAGE)
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.ContentDate, ds.ContentTime, ds.AcquisitionDateTime = "20200102", "101010", "20200102101010"
    ds.NumberOfFrames = len(volume)
    ds.Rows, ds.Columns = volume.shape[1:3]
    shared = Dataset()
    orient = Dataset()
    orient.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
    measures = Dataset()
    measures.PixelSpacing = [f"{v:g}" for v in spacing]
    measures.SliceThickness = f"{step:g}"
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = f"{slope:g}", f"{intercept:g}", "US"
    shared.PlaneOrientationSequence = DicomSequence([orient])
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PixelValueTransformationSequence = DicomSequence([transform])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    normal = normal_of(orientation)
    for k in frame_order:
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = [f"{v:.6f}" for v in np.asarray(origin, float) + k * step * normal]
        item.PlanePositionSequence = DicomSequence([pos])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    ds.PixelData = np.ascontiguousarray(volume[frame_order].astype(np.uint16)).tobytes()
    return _save(ds, path)


def smooth(points_lps: np.ndarray) -> np.ndarray:
    """A smooth test function of position (mm), values in about 100..900."""
    x, y, z = points_lps[..., 0], points_lps[..., 1], points_lps[..., 2]
    return 500 + 200 * np.sin(x / 25.0) * np.cos(y / 30.0) + 150 * np.cos(z / 20.0)


def sample_grid(shape: tuple[int, int, int], orientation: Sequence[float], origin: Sequence[float],
                spacing: Sequence[float], step: float) -> np.ndarray:
    """The LPS positions (S, rows, columns, 3) of the voxels of a series written by `write_series`."""
    row_dir, col_dir = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    s, r, c = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return (np.asarray(origin, float) + s[..., None] * step * normal_of(orientation)
            + r[..., None] * spacing[0] * col_dir + c[..., None] * spacing[1] * row_dir)
