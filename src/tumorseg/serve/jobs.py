"""Jobs of the web app: one uploaded patient each, segmented by `tumorseg predict`'s own
flow (`prediction.predict_each`) in a bounded pool of worker threads with one model loaded
once. The viewer's volumes and the Dice come from the values that flow yields (the
input volume, its label and the `PatientResult`), never from files read back.

A job's folder, `<root>/<id>/`:
    input/<patient>/    the uploaded files (flat); removed when the job ends
    output/             what `predict` writes: masks, summary.csv (and the download zip)
    view/               image.nii.gz, mask.nii.gz, uncertain.nii.gz (voxels with 0.2 < p < 0.8)
                        (and truth.nii.gz) for the viewer

Finished jobs are deleted, folder and all, `keep_minutes` after they end; the whole root
goes when the app shuts down.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from tumorseg.config import CHANNELS, ServeConfig
from tumorseg.data.dicom import find_dicom_sessions, session_bytes
from tumorseg.data.inputs import find_inputs
from tumorseg.data.nifti import (
    DEFAULT_SPACING,
    SEQUENCE_WORDS,
    find_sequences,
    nifti_stem,
    read_nifti_patient,
    resample_slices,
    to_input_order,
    write_kaggle_volume,
)
from tumorseg.data.slices import read_volume, slice_images
from tumorseg.errors import DataError, TumorsegError
from tumorseg.inference import Predictor
from tumorseg.metrics import score_patient
from tumorseg.prediction import Predicted, predict_each
from tumorseg.serve.uploads import (
    Limits,
    UploadError,
    check_decoded_size,
    check_kinds,
    dicom_name,
    patient_folder_name,
    safe_name,
    too_large,
    unpack_zip,
)

log = logging.getLogger("tumorseg")

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
VIEW_FILES = ("image.nii.gz", "mask.nii.gz", "truth.nii.gz", "uncertain.nii.gz")
AMBIGUOUS = (0.2, 0.8)  # the uncertainty overlay shows voxels with a probability strictly between these
FLAIR = CHANNELS.index("FLAIR")


@dataclass
class Job:
    id: str
    folder: Path
    status: str = "queued"  # queued, running, done, failed
    stage: str = "queued"
    progress: float = 0.0
    error: str | None = None
    result: dict[str, Any] | None = None
    download: Path | None = None
    finished: float | None = None  # time.monotonic() when it ended
    created: float = field(default_factory=time.monotonic)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "stage": self.stage, "progress": round(self.progress, 4),
                "error": self.error, "result": self.result}


@dataclass
class PatientInput:
    """An upload checked and laid out as one patient folder."""

    kind: str  # "nifti", "slice" or "dicom"
    folder: Path
    name: str


class JobStore:
    """The jobs of one app: created by uploads, run by the pool, found by id, swept."""

    def __init__(self, root: Path, predictor: Predictor, config: ServeConfig):
        self.root = root
        self.predictor = predictor
        self.config = config
        self.limits = Limits(max_files=config.max_files, max_unpacked_bytes=config.max_unpacked_mb * 2**20)
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._model_lock = threading.Lock()  # the model's threads already fill the CPU: one prediction at a time
        self._pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="tumorseg-job")

    # ------------------------------------------------------------------ lifecycle

    def new_job(self) -> Job:
        """A new queued job with its folder.

        Raises:
            UploadError (429): `max_queued` jobs are already waiting or running.
        """
        self.sweep()
        with self._lock:
            active = sum(j.status in ("queued", "running") for j in self._jobs.values())
            if active >= self.config.max_queued:
                raise UploadError(429, f"{active} jobs are already waiting or running; try again in a minute")
            job_id = uuid.uuid4().hex
            job = Job(id=job_id, folder=self.root / job_id)
            job.folder.mkdir(parents=True)
            self._jobs[job.id] = job
        return job

    def discard(self, job: Job) -> None:
        """Forget a job whose upload was refused, and delete its files."""
        with self._lock:
            self._jobs.pop(job.id, None)
        shutil.rmtree(job.folder, ignore_errors=True)

    def get(self, job_id: str) -> Job | None:
        """The job of this id, or None (also for anything that is not a job id)."""
        if not JOB_ID.match(job_id or ""):
            return None
        self.sweep()
        with self._lock:
            return self._jobs.get(job_id)

    def sweep(self, now: float | None = None) -> int:
        """Delete the jobs that ended more than `keep_minutes` ago; returns how many."""
        now = time.monotonic() if now is None else now
        keep = self.config.keep_minutes * 60
        with self._lock:
            old = [j for j in self._jobs.values() if j.finished is not None and now - j.finished > keep]
            for j in old:
                del self._jobs[j.id]
        for j in old:
            shutil.rmtree(j.folder, ignore_errors=True)
        return len(old)

    def close(self) -> None:
        """Stop taking work, drop queued jobs, let a running one end, and delete every
        job's files."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._jobs.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ input

    def accept(self, job: Job, uploads: list[tuple[str | None, BinaryIO]]) -> PatientInput:
        """Lay the uploaded files out as one patient folder and read it once, so that bad
        input is refused now, with the reason, rather than failing later in the pool.

        Raises:
            UploadError: 422 for names, kinds, zips or images that cannot be used, 413 for
                uploads or zips over the limits.
        """
        if len(uploads) > self.config.max_files:
            raise UploadError(413, f"{len(uploads)} files uploaded; at most {self.config.max_files} are accepted")
        names = [safe_name(name) for name, _ in uploads]
        staging = job.folder / "upload"
        staging.mkdir()
        # Written under their index first: DICOM files are told by their content (many have
        # no suffix), and the files of several series may share a name (IM0001).
        written = []
        for i, (name, (_, stream)) in enumerate(zip(names, uploads, strict=True)):
            path = staging / f"{i:05d}_{name}"
            with path.open("wb") as out:
                shutil.copyfileobj(stream, out, 1 << 20)
            written.append(path)
        kind = check_kinds(written)
        if kind == "dicom":
            names = [dicom_name(i) for i in range(len(written))]
        else:
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise UploadError(422, f"two files named {repeated[0]}")
        for path, name in zip(written, names, strict=True):
            path.replace(staging / name)
        fallback = "patient"
        if kind == "zip":
            archive = staging / names[0]
            fallback = names[0][: -len(".zip")] or fallback
            unpacked = staging / "unpacked"
            unpacked.mkdir()
            names = unpack_zip(archive, unpacked, self.limits)
            kind = check_kinds([unpacked / n for n in names])
            staging = unpacked
        patient = patient_folder_name(names, fallback)
        folder = job.folder / "input" / patient
        folder.mkdir(parents=True)
        for name in names:
            (staging / name).replace(folder / name)
        shutil.rmtree(job.folder / "upload", ignore_errors=True)
        check_decoded_size(folder, names, kind, self.limits.max_unpacked_bytes)
        if kind == "nifti" and len(names) == 1 and not _names_a_sequence(names[0]):  # one volume alone: FLAIR
            suffix = ".nii.gz" if names[0].lower().endswith(".gz") else ".nii"
            (folder / names[0]).replace(folder / f"{patient}_flair{suffix}")
        try:
            if kind == "dicom":
                sessions = find_dicom_sessions(folder)
                if len(sessions) != 1:
                    raise DataError(f"the upload holds {len(sessions)} studies; send one patient's study per upload")
                name, study, wanted = sessions[0]
                size = session_bytes(study, name, wanted)
                if size > self.limits.max_unpacked_bytes:
                    raise too_large(self.limits.max_unpacked_bytes, f"{size / 2**20:.0f} MB as float32")
            elif kind == "nifti":
                read_nifti_patient(find_sequences(folder))
            else:
                files = slice_images(folder)
                if not files:
                    raise DataError("the upload holds only masks, no image slices")
                read_volume(files, patient)
        except DataError as e:
            raise UploadError(422, _without_folder(str(e), job.folder)) from None
        return PatientInput(kind, folder, patient)

    def submit(self, job: Job, patient: PatientInput) -> None:
        self._pool.submit(self._run, job, patient)

    # ------------------------------------------------------------------ work

    def _run(self, job: Job, patient: PatientInput) -> None:
        job.status, job.stage = "running", "waiting for the model"
        # The outcome is published last, after the clean-up: a client that sees "done" or
        # "failed" never finds the input still on disk or a job the sweep cannot expire.
        outcome: tuple[str, str | None] = ("failed", "internal error; see the log")
        try:
            out = job.folder / "output"

            def progress(done: int, total: int) -> None:
                job.stage, job.progress = f"predicting slice {done} of {total}", 0.9 * done / max(total, 1)

            with self._model_lock:
                job.stage = "reading"
                (done,) = predict_each(find_inputs([patient.folder]), out, self.predictor, show_progress=False,
                                       progress=progress, labels=True)
            job.stage, job.progress = "preparing the viewer", 0.95
            view = job.folder / "view"
            details = _slice_view(done, out, view) if patient.kind == "slice" else _grid_view(done, view)
            job.download = details.pop("download_path")
            summary, mask = done.summary, done.result.mask
            per_slice = mask.reshape(len(mask), -1).sum(1)
            job.result = {
                "name": patient.name, "input": {"slice": "slices"}.get(patient.kind, patient.kind),
                "slices": summary.slices, "tumour_slices": summary.tumour_slices,
                "tumour_pixels": summary.tumour_pixels,
                "volume_ml": summary.volume_ml, "removed_pixels": summary.removed_pixels,
                "tumour_slice": int(per_slice.argmax()) if per_slice.any() else len(mask) // 2,
                "viewer": {"image": self._url(job, "image.nii.gz"), "mask": self._url(job, "mask.nii.gz"),
                           "uncertain": self._url(job, "uncertain.nii.gz"),
                           "truth": self._url(job, "truth.nii.gz") if details["has_label"] else None},
                "qc": _qc_of(done), "quality": _features_of(done),
                "download": f"/api/jobs/{job.id}/mask", **details,
            }
            outcome = ("done", None)
        except TumorsegError as e:
            outcome = ("failed", _without_folder(str(e), job.folder))
        except Exception as e:  # noqa: BLE001 (a job must end, and the user must learn why)
            log.exception(f"job {job.id} failed")
            outcome = ("failed", f"internal error ({type(e).__name__}); see the log")
        except BaseException:  # the server is stopping: the job ends failed, and the log says why
            log.exception(f"job {job.id} stopped")
            raise
        finally:
            shutil.rmtree(job.folder / "input", ignore_errors=True)
            job.finished = time.monotonic()
            status, job.error = outcome
            job.stage = status
            if status == "done":
                job.progress = 1.0
            job.status = status

    @staticmethod
    def _url(job: Job, name: str) -> str:
        return f"/api/jobs/{job.id}/files/{name}"


def _names_a_sequence(name: str) -> bool:
    word = re.split(r"[_\-]", nifti_stem(name).lower())[-1]
    return any(word in words for words in SEQUENCE_WORDS.values())


def _without_folder(message: str, folder: Path) -> str:
    """A message without the server's own paths (the user knows their files by name)."""
    return re.sub(re.escape(str(folder)) + r"/(input/|upload/(unpacked/)?)?([^/\s]+/)?", "", message)


def _qc_of(done: Predicted) -> dict[str, Any] | None:
    """The flag of a result ({"flag", "score", "reason"}), or None for a model without a
    calibrated rule."""
    qc = done.result.qc
    if not qc.get("qc"):
        return None
    return {"flag": qc["qc"], "score": _json_number(qc.get("qc_score")), "reason": qc.get("qc_reason", "")}


def _features_of(done: Predicted) -> dict[str, float | None]:
    return {k: _json_number(v) for k, v in done.result.qc.get("features", {}).items()}


def _json_number(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if np.isfinite(value) else None


def _uncertain(done: Predicted) -> np.ndarray:
    p = done.result.probabilities
    return ((p > AMBIGUOUS[0]) & (p < AMBIGUOUS[1])).astype(np.uint8)


def _dice(done: Predicted) -> float | None:
    label = done.volume.label
    return score_patient(done.volume.name, done.result.mask, label, surface=False).dice if label is not None else None


def _grid_view(done: Predicted, view: Path) -> dict[str, Any]:
    """Viewer volumes of a NIfTI or DICOM patient on its own grid, reoriented to the closest
    canonical (RAS) voxel order so that voxel axis 2 runs from the feet to the head as the
    model's slices do; Dice against its label on that grid."""
    import nibabel as nib

    volume, result = done.volume, done.result
    grid = volume.grid
    assert grid is not None
    flair = volume.images[..., FLAIR]
    if flair.shape[1:] != result.mask.shape[1:]:  # resampled for the model: back to the input's grid
        flair = resample_slices(flair.astype(np.float32), result.mask.shape[1:])
    volumes = {"image.nii.gz": flair.astype(np.float32), "mask.nii.gz": result.mask.astype(np.uint8),
               "uncertain.nii.gz": _uncertain(done)}
    if volume.label is not None:
        volumes["truth.nii.gz"] = volume.label.astype(np.uint8)
    view.mkdir(parents=True, exist_ok=True)
    for name, array in volumes.items():
        img = nib.as_closest_canonical(nib.Nifti1Image(to_input_order(array, grid), grid.affine))
        img.header.set_xyzt_units("mm")
        nib.save(img, str(view / name))
    # The download: the DICOM SEG of a DICOM input, the NIfTI mask of a NIfTI input.
    pred = next((f for f in done.files if f.name.endswith("_seg.dcm")), None) or \
        next(f for f in done.files if f.name.endswith("_pred.nii.gz"))
    return {"has_label": volume.label is not None, "dice": _dice(done), "download_path": pred,
            "download_name": pred.name}


def _slice_view(done: Predicted, out: Path, view: Path) -> dict[str, Any]:
    """Viewer volumes of slice images (spacing unknown: 1 x 0.94 x 0.94 mm is shown), the
    predicted PNGs zipped for download, and Dice against the masks when every slice has one."""
    volume, mask = done.volume, done.result.mask
    view.mkdir(parents=True, exist_ok=True)
    write_kaggle_volume(view / "image.nii.gz", volume.images[..., FLAIR], DEFAULT_SPACING)
    write_kaggle_volume(view / "mask.nii.gz", mask.astype(np.uint8), DEFAULT_SPACING)
    write_kaggle_volume(view / "uncertain.nii.gz", _uncertain(done), DEFAULT_SPACING)
    if volume.label is not None:
        write_kaggle_volume(view / "truth.nii.gz", volume.label.astype(np.uint8), DEFAULT_SPACING)
    archive = out / f"{volume.name}_masks.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for p in done.files:
            if p.name.endswith("_pred.png"):
                zf.write(p, arcname=f"{volume.name}/{p.name}")
    return {"has_label": volume.label is not None, "dice": _dice(done), "download_path": archive,
            "download_name": archive.name}
