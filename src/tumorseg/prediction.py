"""`tumorseg predict`: masks for new images, no ground truth needed.

One flow for every input format: the inputs are found (`data.inputs.find_inputs`), then
each patient in turn is read, predicted by the `Predictor` into a `PatientResult`, written
by `tumorseg.writers` (in its input's format) and released, so a folder of hundreds of
patients never holds more than one in memory. `predict_each` yields the values for
callers that use them (the web app); `predict` writes a summary.csv row per patient (see
`tumorseg.writers`). Each result carries its quality record (`tumorseg.qc.assess`): the
features, and with a model that has a calibrated rule the flag; a flagged patient is
named in a warning.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tumorseg.data.inputs import InputRef, InputVolume, find_inputs, nifti_ref
from tumorseg.data.nifti import NiftiFiles
from tumorseg.errors import ConfigError, DataError
from tumorseg.fileio import check_output_dir, prepare_output_dir
from tumorseg.inference import BATCH_SIZE, PatientResult, Predictor, Progress, check_model_arguments
from tumorseg.qc import assess
from tumorseg.writers import (
    VolumeSummary,
    merge_summary,
    read_summary,
    summary_from_row,
    summary_of,
    write_result,
)

log = logging.getLogger("tumorseg")


@dataclass
class Predicted:
    """One patient done: its input, its result, its summary row and the files written."""

    volume: InputVolume
    result: PatientResult
    summary: VolumeSummary
    files: list[Path]


def predict_each(
    refs: Sequence[InputRef],
    out: Path,
    predictor: Predictor,
    *,
    overlay: bool = False,
    save_probabilities: bool = False,
    summary_name: str = "summary.csv",
    show_progress: bool = True,
    progress: Progress | None = None,
    labels: bool = False,
) -> Iterator[Predicted]:
    """Read, predict and write each patient of `refs` in turn, adding its row to
    `out/summary_name` at once (a later failure loses no row), and yield it; with
    `labels`, each input's label is read too (`InputRef.read`)."""
    bar = None if show_progress and len(refs) > 1 else True  # None: only on a terminal
    for ref in tqdm(refs, desc="predicting", unit="volume", disable=bar):
        volume = ref.read(labels=labels)
        result = predictor.predict_volume(volume, progress=progress)
        result.qc = assess(result.member_probabilities(), result.mask, result.inference, volume.spacing,
                           predictor.qc_rule)
        if result.qc.get("qc") == "review":
            log.warning(f"{volume.name}: review this result: {result.qc['qc_reason']}")
        files = write_result(out, volume, result, overlay=overlay, probabilities=save_probabilities)
        summary = summary_of(volume, result)
        merge_summary(out / summary_name, [summary])
        yield Predicted(volume, result, summary, files)


def predict(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    checkpoint: str | Path | Sequence[str | Path] | None = None,
    threshold: float | None = None,
    postprocess: str | None = None,
    overlay: bool = False,
    tta: bool | None = None,
    precision: str = "auto",
    device: str | torch.device = "auto",
    engine: str = "auto",
    batch_size: int = BATCH_SIZE,
    show_progress: bool = True,
    predictor: Predictor | None = None,
    save_probabilities: bool = False,
    nifti: NiftiFiles | None = None,
    progress: Progress | None = None,
    shard: tuple[int, int] | None = None,
    dicom_series: dict[str, str] | None = None,
    resample: bool = True,
) -> list[VolumeSummary]:
    """Predict tumour masks for `inputs` (and the NIfTI patient `nifti`, given by its
    files) and write them under `out_dir`; `save_probabilities` also writes the
    probability maps (and, for an ensemble, their spread across the models).
    `progress(done, total)` follows the slices of each volume. With `shard` (k, n) only
    the k-th of n disjoint parts of the volumes is predicted (`shard_volumes`), and its
    rows go to `summary.shard-<k>-of-<n>.csv`, for `merge_shard_summaries` to join.

    The model is `predictor`, or `Predictor.from_checkpoints(checkpoint, ...)` (None: the
    shipped model) with threshold/postprocess/tta overriding its stored settings.
    `dicom_series` and `resample` choose DICOM series and how sequences on other grids
    are handled (`data.inputs.find_inputs`).

    Raises:
        TumorsegError: bad inputs (paths, formats, names), settings or checkpoint, or an
            unusable out_dir, checked before any prediction runs; a patient whose files
            cannot be read stops the run at that patient with its one-line error, the
            rows of the patients before it kept in the summary.
    """
    check_model_arguments(predictor, checkpoint=checkpoint, threshold=threshold, postprocess=postprocess, tta=tta)
    refs = find_inputs(inputs, dicom_series=dicom_series, resample=resample)
    if nifti is not None:
        refs.append(nifti_ref(nifti, resample))
    if not refs:
        raise DataError("nothing to predict: pass INPUT paths or --flair")
    summary_name = "summary.csv"
    if shard is not None:
        refs = shard_volumes(refs, *shard)
        summary_name = f"summary.shard-{shard[0]}-of-{shard[1]}.csv"
    out = check_output_dir(out_dir)
    read_summary(out / summary_name)  # a table we could not merge into fails now, not after the work
    if not refs:  # a shard with nothing to do (more array tasks than inputs) still reports
        prepare_output_dir(out)
        merge_summary(out / summary_name, [])
        return []
    if predictor is None:
        predictor = Predictor.from_checkpoints(checkpoint, threshold=threshold, postprocess=postprocess, tta=tta,
                                               device=device, precision=precision, engine=engine,
                                               batch_size=batch_size)
    done = predict_each(refs, out, predictor, overlay=overlay, save_probabilities=save_probabilities,
                        summary_name=summary_name, show_progress=show_progress, progress=progress)
    return [p.summary for p in done]


def parse_shard(text: str) -> tuple[int, int]:
    """"K/N" -> (K, N), 0 <= K < N.

    Raises:
        ConfigError: anything else.
    """
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ConfigError(f"--shard must be K/N with 0 <= K < N (e.g. 0/4 for the first of 4 parts), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def shard_volumes(volumes: list[InputRef], k: int, n: int) -> list[InputRef]:
    """The k-th of n parts of `volumes`: every n-th volume in name order from the k-th.
    The parts are disjoint and together complete, whatever order the inputs came in."""
    return sorted(volumes, key=lambda v: v.name)[k::n]


def merge_shard_summaries(out_dir: str | Path) -> tuple[int, list[str]]:
    """Join the `summary.shard-K-of-N.csv` tables of `out_dir` into its summary.csv (rows
    merged by volume, as one run's); returns (rows in summary.csv, missing shards as
    "K/N").

    Raises:
        DataError: no shard tables, tables of different N, or an unreadable table.
    """
    out = Path(out_dir)
    found: dict[tuple[int, int], Path] = {}
    for path in sorted(out.glob("summary.shard-*-of-*.csv")):
        m = re.fullmatch(r"summary\.shard-(\d+)-of-(\d+)\.csv", path.name)
        if m:
            found[(int(m.group(1)), int(m.group(2)))] = path
    if not found:
        raise DataError(f"{out} holds no summary.shard-K-of-N.csv; run `tumorseg predict ... --shard K/N --out {out}` "
                        "first")
    sizes = sorted({n for _, n in found})
    if len(sizes) > 1:
        raise DataError(f"{out} holds shard tables of {' and '.join(map(str, sizes))} parts; keep one --shard N")
    n = sizes[0]
    rows: dict[str, dict[str, str]] = {}
    for path in found.values():
        rows.update(read_summary(path))
    summaries = [summary_from_row(r) for r in rows.values()]
    merge_summary(out / "summary.csv", summaries)
    missing = [f"{k}/{n}" for k in range(n) if (k, n) not in found]
    return len(read_summary(out / "summary.csv")), missing
