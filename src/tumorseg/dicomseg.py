"""Masks as DICOM SEG (binary Segmentation Storage, written with highdicom) referencing
the FLAIR series they were predicted on, so PACS viewers overlay them on it.

One segment, "FLAIR abnormality" (category Morphologically abnormal structure, type
Neoplasm, SNOMED CT; algorithm type AUTOMATIC). The SEG has one frame per source image
(or per frame of an enhanced source), with the source's geometry: each frame refers to
its source image and carries its ImagePositionPatient. A quality flag other than "ok"
goes into the SeriesDescription ("tumorseg FLAIR abnormality [REVIEW]") and, with its
reason, into a JSON file beside the SEG.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tumorseg.data.dicom import DicomPatient
from tumorseg.errors import DataError
from tumorseg.fileio import atomic_write, atomic_write_text
from tumorseg.version import __version__

SERIES_DESCRIPTION = "tumorseg FLAIR abnormality"
SEGMENT_LABEL = "FLAIR abnormality"
SERIES_NUMBER = 900


def seg_description(series_description: str, qc: dict | None) -> str:
    """The SeriesDescription: `series_description`, plus "[FLAG]" when `qc["qc"]` is set
    and not "ok" (64 characters at most, the DICOM limit)."""
    flag = str((qc or {}).get("qc", "") or "").strip()
    text = series_description if not flag or flag.lower() == "ok" else f"{series_description} [{flag.upper()}]"
    return text[:64]


def write_dicom_seg(path: str | Path, mask: np.ndarray, source_datasets: Sequence, *,
                    series_description: str = SERIES_DESCRIPTION, qc: dict | None = None,
                    series_number: int = SERIES_NUMBER) -> Path:
    """Write a binary DICOM SEG of `mask` on the source series' images, atomically; with
    `qc`, also `<path stem>.json` (the qc values and the SEG's UIDs).

    Args:
        mask: bool (F, rows, columns), one plane per source image in `source_datasets`
            order, or per frame of a single multi-frame source (`DicomPatient.to_source`
            gives this order).
        source_datasets: pydicom Datasets (headers suffice) of the source series.
        qc: e.g. {"qc": "review", "qc_reason": "..."}.

    Returns:
        The SEG's path.

    Raises:
        DataError: a mask whose shape does not match the source images.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = list(source_datasets)
    if not sources:
        raise DataError("no source images to reference in the DICOM SEG")
    mask = np.asarray(mask).astype(bool)
    frames = int(sources[0].get("NumberOfFrames", 1) or 1) if len(sources) == 1 else len(sources)
    expected = (frames, int(sources[0].Rows), int(sources[0].Columns))
    if mask.shape != expected:
        raise DataError(f"mask of shape {mask.shape} for a DICOM SEG on {frames} source images of "
                        f"{expected[1]}x{expected[2]}; expected {expected}")
    algorithm = hd.AlgorithmIdentificationSequence(name="tumorseg", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
        anatomic_regions=[codes.SCT.Brain])
    description = seg_description(series_description, qc)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[segment],
        series_instance_uid=hd.UID(), series_number=series_number, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="tumorseg", manufacturer_model_name="tumorseg U-Net", software_versions=__version__,
        device_serial_number="none", series_description=description, omit_empty_frames=False)
    buf = io.BytesIO()
    seg.save_as(buf)
    path = atomic_write(path, lambda f: f.write(buf.getvalue()))
    if qc is not None:
        sidecar = {**qc, "series_description": description, "series_instance_uid": str(seg.SeriesInstanceUID),
                   "sop_instance_uid": str(seg.SOPInstanceUID),
                   "referenced_series_instance_uid": str(sources[0].SeriesInstanceUID)}
        atomic_write_text(path.with_suffix(".json"), json.dumps(sidecar, indent=1, default=str) + "\n")
    return path


def write_patient_seg(path: str | Path, patient: DicomPatient, mask: np.ndarray, *,
                      series_description: str = SERIES_DESCRIPTION, qc: dict | None = None) -> Path:
    """`write_dicom_seg` for a mask bool (S, H, W) in the model's layout of `patient`
    (as `Predictor.segment` returns it): mapped back to the FLAIR images first."""
    return write_dicom_seg(path, patient.to_source(np.asarray(mask, dtype=bool)), patient.flair_sources,
                           series_description=series_description, qc=qc)
