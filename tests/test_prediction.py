"""`find_inputs` and `predict` from Python, with a model whose masks are known."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tumorseg.data.inputs import InputRef, find_inputs
from tumorseg.data.slices import slice_images
from tumorseg.errors import DataError, TumorsegError
from tumorseg.inference import Predictor
from tumorseg.plots import overlay
from tumorseg.prediction import predict
from tumorseg.writers import SUMMARY_FIELDS, VolumeSummary


class FlairThreshold(nn.Module):
    """Logit +10 where the normalised FLAIR channel is above 0.5, else -10."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x[:, 1:2] > 0.5, 10.0, -10.0)


def flair_predictor() -> Predictor:
    """Percentiles 0 and 100 are each volume's min and max: a 0/255 FLAIR normalises to
    0/1, so the mask is exactly where FLAIR is 255."""
    return Predictor([FlairThreshold()], fuse=False, precision="fp32", device="cpu", percentiles=(0.0, 100.0))


def slice_with_flair(mask: np.ndarray, seed: int) -> np.ndarray:
    """uint8 (H, W, 3): random pre/post-contrast, FLAIR 255 where `mask`, else 0."""
    img = np.random.default_rng(seed).integers(0, 256, size=(*mask.shape, 3), dtype=np.uint8)
    img[..., 1] = np.where(mask, 255, 0)
    return img


def box(rows: slice, cols: slice, shape=(8, 8)) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[rows, cols] = True
    return m


# Three slices of a folder "scan": a 2x3 block, nothing, one pixel -> 2 tumour slices, 7 pixels.
SCAN = {1: box(slice(2, 4), slice(1, 4)), 2: box(slice(0, 0), slice(0, 0)), 10: box(slice(7, 8), slice(0, 1))}
# A single slice file "single": a 2x2 block -> 1 tumour slice, 4 pixels.
SINGLE = box(slice(5, 7), slice(5, 7))


@pytest.fixture
def inputs(tmp_path):
    scan = tmp_path / "in" / "scan"
    scan.mkdir(parents=True)
    for n, m in SCAN.items():
        Image.fromarray(slice_with_flair(m, n)).save(scan / f"scan_{n}.png")
    single = tmp_path / "in" / "single.tif"
    Image.fromarray(slice_with_flair(SINGLE, 99)).save(single)
    return scan, single


def basic(s: VolumeSummary) -> VolumeSummary:
    """The summary row without its notes and quality columns."""
    return VolumeSummary(s.volume, s.slices, s.tumour_slices, s.tumour_pixels, s.removed_pixels, s.volume_ml)


def read_summary(path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


def never_segment(self, *args, **kwargs):
    raise AssertionError("prediction ran before the inputs and --out were checked")


# --------------------------------------------------------------------------- find_inputs


def test_patient_folder_is_one_volume_of_its_images(kaggle):
    folder = kaggle.root / "PAT_B_2002"
    # Masks, hidden files (._*.tif), README.md and notes.txt are not slices.
    assert find_inputs([folder]) == [InputRef("PAT_B_2002", "slices", [kaggle.image_path("PAT_B_2002", n)
                                                               for n in range(1, 6)])]


def test_slices_are_ordered_by_number(kaggle):
    files = slice_images(kaggle.root / "PAT_A_2001")
    assert [f.name for f in files] == [f"PAT_A_2001_{n}.tif" for n in range(1, 13)]  # 2 before 10
    (volume,) = find_inputs([kaggle.root / "PAT_A_2001"])
    assert volume.files == files


def test_folder_of_slices(inputs, monkeypatch):
    scan, _ = inputs
    (scan / "scan_1_pred.png").write_bytes(b"an output of an earlier run")
    (scan / "scan_1_overlay.png").write_bytes(b"an output of an earlier run")
    assert find_inputs([scan]) == [InputRef("scan", "slices", [scan / "scan_1.png", scan / "scan_2.png",
                                                       scan / "scan_10.png"])]
    # The folder's own name, also when given as "." from inside it.
    monkeypatch.chdir(scan)
    assert find_inputs(["."])[0].name == "scan"


def test_kaggle_root_is_one_volume_per_patient(kaggle):
    volumes = find_inputs([kaggle.root])
    assert [(v.name, len(v.files)) for v in volumes] == [("PAT_A_2001", 12), ("PAT_B_2002", 5), ("PAT_C_2003", 5)]
    assert volumes[1].files == [kaggle.image_path("PAT_B_2002", n) for n in range(1, 6)]
    # The folder holding kaggle_3m works too.
    assert find_inputs([kaggle.root.parent]) == volumes


def test_single_files_and_mixed_inputs(kaggle, inputs):
    scan, single = inputs
    one = kaggle.image_path("PAT_A_2001", 3)
    assert find_inputs([one]) == [InputRef("PAT_A_2001_3", "slices", [one])]
    assert [v.name for v in find_inputs([scan, single, one])] == ["scan", "single", "PAT_A_2001_3"]


SUPPORTED = ".tif/.tiff/.png slices, .nii/.nii.gz volumes, DICOM files, or a .zip of a patient folder"
NOT_READ = "{p}: the extension .txt is not read; supported: " + SUPPORTED
JPEG = ("{p}: the extension .jpg is not read; supported: " + SUPPORTED
        + "; JPEG loses detail and is not read; export the slices as .tif/.png")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda t: t / "missing", "{p} does not exist; pass a patient folder, a folder of slices or .tif/.png files"),
        (lambda t: t / "missing.tif",
         "{p} does not exist; pass a patient folder, a folder of slices or .tif/.png files"),
        (lambda t: _write(t / "notes.txt", b"text"), NOT_READ),
        (lambda t: _write(t / "scan.jpg", b"jpeg"), JPEG),
        (lambda t: _mkdir(t / "empty"), "{p} holds no .tif/.png slices, no NIfTI volumes and no patient folders"),
    ],
)
def test_find_inputs_errors(make, message, tmp_path):
    path = make(tmp_path)
    with pytest.raises(DataError) as e:
        find_inputs([path])
    assert str(e.value) == message.format(p=path)


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _mkdir(path):
    path.mkdir()
    return path


def test_folder_with_only_masks(kaggle):
    patient = kaggle.root / "PAT_B_2002"
    for n in range(1, 6):
        kaggle.image_path("PAT_B_2002", n).unlink()
    for path in (patient, kaggle.root):
        with pytest.raises(DataError) as e:
            find_inputs([path])
        assert str(e.value) == f"{patient} holds only masks, no image slices to predict on"


def test_duplicate_names(kaggle, tmp_path):
    with pytest.raises(DataError) as e:
        find_inputs([kaggle.root / "PAT_B_2002", kaggle.root])
    assert str(e.value) == "two inputs have the same name 'PAT_B_2002'; their outputs would collide"
    other = tmp_path / "other"
    other.mkdir()
    copy = other / "PAT_A_2001_3.tif"
    copy.write_bytes(kaggle.image_path("PAT_A_2001", 3).read_bytes())
    with pytest.raises(DataError) as e:
        find_inputs([kaggle.image_path("PAT_A_2001", 3), copy])
    assert str(e.value) == "two inputs have the same name 'PAT_A_2001_3'; their outputs would collide"


# --------------------------------------------------------------------------- predict


def test_predict_writes_masks_and_summary(inputs, tmp_path):
    scan, single = inputs
    out = tmp_path / "out"
    summaries = predict([scan, single], out, predictor=flair_predictor(), show_progress=False)

    assert [basic(s) for s in summaries] == [VolumeSummary("scan", 3, 2, 7), VolumeSummary("single", 1, 1, 4)]
    # Quality features of a one-model prediction whose probabilities are sigmoid(+-10): no
    # voxel is ambiguous, nothing is removed, no flag without a calibrated rule.
    scan_row = summaries[0]
    assert scan_row.mean_prob == pytest.approx(1 / (1 + np.exp(-10.0)), rel=1e-6)
    assert (scan_row.ambiguity, scan_row.removed_fraction, scan_row.disagreement, scan_row.qc) == (0.0, 0.0, 0.0, "")
    rows = read_summary(out / "summary.csv")
    assert rows[0] == SUMMARY_FIELDS
    assert [r[:6] for r in rows[1:]] == [["scan", "3", "2", "7", "0", ""], ["single", "1", "1", "4", "0", ""]]
    assert [r[SUMMARY_FIELDS.index("mean_prob")] for r in rows[1:]] == ["1", "1"]  # 0.99995 written as .4g
    assert sorted(p.name for p in out.iterdir()) == ["scan", "single", "summary.csv"]
    assert sorted(p.name for p in (out / "scan").iterdir()) == ["scan_10_pred.png", "scan_1_pred.png",
                                                                "scan_2_pred.png"]
    assert [p.name for p in (out / "single").iterdir()] == ["single_pred.png"]
    for n, m in SCAN.items():
        png = Image.open(out / "scan" / f"scan_{n}_pred.png")
        assert png.mode == "L"
        np.testing.assert_array_equal(np.asarray(png), np.where(m, 255, 0).astype(np.uint8))
    np.testing.assert_array_equal(np.asarray(Image.open(out / "single" / "single_pred.png")),
                                  np.where(SINGLE, 255, 0).astype(np.uint8))


def test_predict_overlay(inputs, tmp_path):
    scan, _ = inputs
    out = tmp_path / "out"
    predict([scan], out, predictor=flair_predictor(), overlay=True, show_progress=False)
    assert sorted(p.name for p in (out / "scan").iterdir()) == [
        "scan_10_overlay.png", "scan_10_pred.png", "scan_1_overlay.png", "scan_1_pred.png",
        "scan_2_overlay.png", "scan_2_pred.png"]
    for n, m in SCAN.items():
        raw = np.asarray(Image.open(scan / f"scan_{n}.png"))
        got = np.asarray(Image.open(out / "scan" / f"scan_{n}_overlay.png"))
        assert got.shape == (8, 8, 3)
        np.testing.assert_array_equal(got, overlay(raw, m))
    # Slice 2 has no tumour: its overlay is the grey FLAIR (all 0 here) without contour.
    np.testing.assert_array_equal(np.asarray(Image.open(out / "scan" / "scan_2_overlay.png")),
                                  np.zeros((8, 8, 3), np.uint8))


def test_predict_kaggle_patient_ignores_its_masks(kaggle, tmp_path):
    out = tmp_path / "out"
    summaries = predict([kaggle.root / "PAT_C_2003"], out, predictor=flair_predictor(), show_progress=False)
    # Random FLAIR values 0..255 normalise to v/255; the mask is FLAIR >= 128.
    raw = kaggle.images["PAT_C_2003"][..., 1]
    assert (raw.min(), raw.max()) == (0, 255)
    flair = raw >= 128
    assert [basic(s) for s in summaries] == [
        VolumeSummary("PAT_C_2003", 5, int(flair.reshape(5, -1).any(1).sum()), int(flair.sum()))]
    for i in range(5):
        got = np.asarray(Image.open(out / "PAT_C_2003" / f"PAT_C_2003_{i + 1}_pred.png"))
        np.testing.assert_array_equal(got, np.where(flair[i], 255, 0).astype(np.uint8))


def test_out_that_is_a_file_fails_before_prediction(inputs, tmp_path, monkeypatch):
    scan, _ = inputs
    out = tmp_path / "out.png"
    out.write_bytes(b"a file")
    monkeypatch.setattr(Predictor, "segment", never_segment)
    with pytest.raises(TumorsegError) as e:
        predict([scan], out, predictor=flair_predictor(), show_progress=False)
    assert str(e.value) == f"output {out} is a file; pass a folder to --out"
    assert out.read_bytes() == b"a file"


def test_bad_input_fails_before_out_is_made(inputs, tmp_path, monkeypatch):
    scan, _ = inputs
    monkeypatch.setattr(Predictor, "segment", never_segment)
    with pytest.raises(DataError) as e:
        predict([scan, tmp_path / "missing"], tmp_path / "out", predictor=flair_predictor(), show_progress=False)
    assert str(e.value).startswith(f"{tmp_path / 'missing'} does not exist")
    assert not (tmp_path / "out").exists()


def _merge_many(args):
    from tumorseg.writers import VolumeSummary, merge_summary

    path, prefix, n = args
    for i in range(n):
        merge_summary(Path(path), [VolumeSummary(f"{prefix}{i:03d}", i, 0, 0)])


@pytest.mark.slow
def test_concurrent_summary_merges_lose_no_row(tmp_path):
    import multiprocessing

    path = tmp_path / "summary.csv"
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        pool.map(_merge_many, [(str(path), p, 40) for p in ("a", "b", "c")])
    rows = read_summary(path)
    assert rows[0] == SUMMARY_FIELDS
    assert [r[0] for r in rows[1:]] == sorted(f"{p}{i:03d}" for p in "abc" for i in range(40))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.csv"]


@pytest.mark.slow
def test_two_predict_runs_into_one_folder_keep_every_row(kaggle, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    runs = [subprocess.Popen([sys.executable, "-m", "tumorseg", "predict", str(kaggle.root / p), "--out", str(out),
                              "--no-progress", "--precision", "fp32", "--engine", "torch"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
            for p in ("PAT_A_2001", "PAT_B_2002")]
    for r in runs:
        _, err = r.communicate(timeout=300)
        assert r.returncode == 0, err.decode()
    # and a third run, afterwards, on one of the same patients and a new one
    predict([kaggle.root / "PAT_B_2002", kaggle.root / "PAT_C_2003"], out, show_progress=False, precision="fp32")
    assert [r[:2] for r in read_summary(out / "summary.csv")[1:]] == [
        ["PAT_A_2001", "12"], ["PAT_B_2002", "5"], ["PAT_C_2003", "5"]]


def test_a_failure_on_a_later_volume_keeps_what_was_done(inputs, tmp_path):
    scan, single = inputs
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "b_1.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    with pytest.raises(DataError, match="unreadable or truncated image"):
        predict([scan, single, broken], out, predictor=flair_predictor(), show_progress=False)
    assert [r[0] for r in read_summary(out / "summary.csv")[1:]] == ["scan", "single"]
    assert sorted(p.name for p in out.iterdir()) == ["scan", "single", "summary.csv"]
