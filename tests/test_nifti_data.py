"""NIfTI patients as data: the cache keeps them exactly (any integer or float type, the
header spacing, any non-zero label voxel as tumour), `evaluate` scores them with HD95 in
mm from the headers, and `train` runs on a folder of them, also of mixed sizes."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_nifti import PATIENT, _save, unet_predictor

from tumorseg.checkpoint import load_checkpoint
from tumorseg.cli import main
from tumorseg.data.cache import prepare
from tumorseg.data.nifti import TRAINING_SPACING, exact_dtype, kaggle_affine, kaggle_to_nifti
from tumorseg.errors import DataError
from tumorseg.evaluation import evaluate
from tumorseg.plots import display_image

SPACING = (2.0, TRAINING_SPACING, TRAINING_SPACING)


@pytest.fixture
def nifti_root(kaggle, tmp_path) -> Path:
    """The synthetic kaggle_3m patients converted to a folder of NIfTI patient folders."""
    for patient in kaggle.images:
        kaggle_to_nifti(kaggle.root / patient, tmp_path / "nii", spacing=SPACING)
    return tmp_path / "nii"


def _write_patient(folder: Path, name: str, flair: np.ndarray, label: np.ndarray | None,
                   spacing=SPACING, dtype=np.int16) -> Path:
    """A patient of FLAIR (and label) given in the model's (slice, row, column) layout."""
    folder = folder / name
    folder.mkdir(parents=True)
    affine = kaggle_affine(spacing)
    _save(nib.Nifti1Image(np.ascontiguousarray(flair.transpose(2, 1, 0)).astype(dtype), affine),
          folder / f"{name}_flair.nii.gz")
    if label is not None:
        _save(nib.Nifti1Image(np.ascontiguousarray(label.transpose(2, 1, 0)).astype(np.uint8), affine),
              folder / f"{name}_seg.nii.gz")
    return folder


@pytest.mark.parametrize(("values", "dtype"), [
    (np.array([0, 17, 255]), np.uint8),
    (np.array([-1024, 0, 3071]), np.int16),
    (np.array([0.0, 40000.0]), np.float32),
    (np.array([0.5, 3.0]), np.float32),
    (np.array([], dtype=np.float32), np.float32),
])
def test_exact_dtype_is_the_smallest_that_holds_the_values(values, dtype):
    assert exact_dtype(values.astype(np.float32)) is dtype
    assert np.array_equal(values.astype(dtype).astype(np.float32), values.astype(np.float32))


def test_a_nifti_folder_is_cached_exactly_with_its_spacing(kaggle, nifti_root, tmp_path):
    nii = prepare(nifti_root, tmp_path / "nii-cache", progress=False)
    tif = prepare(kaggle.root, tmp_path / "tif-cache", progress=False)
    assert nii.patients == tif.patients == sorted(kaggle.images)
    for p in nii.patients:
        a, b = nii.records[p], tif.records[p]
        assert np.array_equal(nii.images(p), kaggle.images[p]) and nii.images(p).dtype == np.uint8
        assert np.array_equal(nii.masks(p), kaggle.masks[p])
        assert (a.low, a.high, a.tumour_pixels, a.tumour_slices) == (b.low, b.high, b.tumour_pixels, b.tumour_slices)
        assert a.spacing == pytest.approx(list(SPACING)) and b.spacing is None
        assert a.slices == list(range(1, len(kaggle.images[p]) + 1))
    again = prepare(nifti_root, tmp_path / "nii-cache", progress=False)  # nothing changed: nothing decoded
    assert (tmp_path / "nii-cache" / "manifest.json").read_text() == json.dumps(
        json.loads((again.root / "manifest.json").read_text()), indent=1)


def test_integer_scanner_values_stay_int16_and_any_nonzero_label_is_tumour(tmp_path):
    rng = np.random.default_rng(0)
    flair = rng.integers(-200, 3000, size=(3, 16, 16)).astype(np.float32)
    label = np.zeros((3, 16, 16), dtype=np.uint8)
    label[1, 4:8, 4:8] = 2  # BraTS-style label values
    label[2, 9:11, 9:12] = 4
    _write_patient(tmp_path / "data", "P1", flair, label)
    cache = prepare(tmp_path / "data", tmp_path / "cache", progress=False)
    rec = cache.records["P1"]
    assert rec.dtype == "int16" and np.array_equal(cache.images("P1")[..., 1], flair)
    assert np.array_equal(cache.images("P1")[..., 0], flair)  # filled with FLAIR
    assert np.array_equal(cache.masks("P1"), (label > 0).astype(np.uint8)) and rec.tumour_pixels == 16 + 6
    low, high = np.percentile(flair, [10, 99])
    assert rec.low == pytest.approx([low] * 3) and rec.high == pytest.approx([high] * 3)


def test_an_off_scale_patient_is_cached_at_the_training_scale(tmp_path):
    flair = np.zeros((2, 64, 64), dtype=np.float32)
    flair[:, 16:48, 16:48] = 100.0
    label = np.zeros((2, 64, 64), dtype=np.uint8)
    label[:, 20:40, 24:44] = 1
    _write_patient(tmp_path / "data", "fine", flair, label, spacing=(3.0, TRAINING_SPACING / 2, TRAINING_SPACING / 2))
    rec = prepare(tmp_path / "data", tmp_path / "cache", progress=False).records["fine"]
    assert (rec.height, rec.width) == (32, 32)
    assert rec.spacing == pytest.approx([3.0, TRAINING_SPACING, TRAINING_SPACING])
    assert rec.tumour_pixels == 2 * 10 * 10  # the 20x20 square at half the resolution


def test_evaluate_on_nifti_equals_the_tiff_folder_with_the_same_spacing(kaggle, nifti_root, tmp_path):
    predictor = unet_predictor()
    nii = evaluate(prepare(nifti_root, tmp_path / "c1", progress=False), tmp_path / "r1", predictor=predictor,
                   show_progress=False, plots=False)
    tif = evaluate(prepare(kaggle.root, tmp_path / "c2", progress=False), tmp_path / "r2", predictor=predictor,
                   spacing=SPACING, show_progress=False, plots=False)
    assert nii["spacing"] == "NIfTI headers" and tif["spacing"] == "--spacing 2 0.94 0.94"
    # the header keeps the spacing as float32: mm agree to float32 precision, the rest exactly
    mm = [r.pop("hd95_mm") for r in nii["patients"]]
    assert mm == pytest.approx([r.pop("hd95_mm") for r in tif["patients"]], rel=1e-6) and None not in mm
    assert nii["patients"] == tif["patients"]
    assert nii["summary"] == pytest.approx(tif["summary"], rel=1e-6) and nii["summary"]["hd95_mm_mean"] is not None
    assert "hd95_mm" in (tmp_path / "r1" / "per_patient.csv").read_text().splitlines()[0]
    unit = evaluate(prepare(nifti_root, tmp_path / "c1", progress=False), tmp_path / "r3", predictor=predictor,
                    spacing=(1.0, 1.0, 1.0), show_progress=False, plots=False)
    assert [r["hd95_mm"] for r in unit["patients"]] == [r["hd95"] for r in unit["patients"]]  # unit steps


def _tumour_checkpoint(tmp_path: Path) -> Path:
    """The model of `unet_predictor` (a third of the pixels tumour) as a checkpoint."""
    import torch

    from tumorseg.checkpoint import Checkpoint, save_checkpoint
    from tumorseg.model import UNet

    torch.manual_seed(0)
    model = UNet(n_features=4, depth=3).eval()
    with torch.no_grad():
        model.layers[-1].bias -= torch.quantile(model(torch.rand(2, 3, 32, 32)), 0.67)
    save_checkpoint(tmp_path / "tumour.pt", Checkpoint.of_model(model))
    return tmp_path / "tumour.pt"


def test_evaluate_cli_on_one_nifti_patient_by_its_files(kaggle, nifti_root, tmp_path, capsys):
    folder = nifti_root / PATIENT
    checkpoint = str(_tumour_checkpoint(tmp_path))
    files = [str(folder / f"{PATIENT}_{s}.nii.gz") for s in ("flair", "t1", "t1ce", "seg")]
    code = main(["evaluate", "--flair", files[0], "--t1", files[1], "--t1c", files[2], "--mask", files[3],
                 "--out", str(tmp_path / "report"), "--checkpoint", checkpoint, "--engine", "torch",
                 "--precision", "fp32", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "1 patient: per-patient Dice" in out and " mm);" in out, out
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [r["patient"] for r in report["patients"]] == [PATIENT] and report["spacing"] == "NIfTI headers"
    folder_code = main(["evaluate", "--data", str(nifti_root), "--out", str(tmp_path / "all"), "--checkpoint",
                        checkpoint, "--engine", "torch", "--precision", "fp32", "--no-progress"])
    assert folder_code == 0
    every = json.loads((tmp_path / "all" / "report.json").read_text())
    assert next(r for r in every["patients"] if r["patient"] == PATIENT) == report["patients"][0]


@pytest.mark.parametrize(("args", "message"), [
    (["--flair", "F.nii.gz"], "--flair needs --mask"),
    (["--mask", "M.nii.gz"], "--mask describe a --flair patient; pass --flair too"),
    (["--flair", "F.nii.gz", "--mask", "M.nii.gz", "--data", "D"], "--flair names one patient to evaluate"),
    ([], "--data is required"),
])
def test_evaluate_cli_file_options_are_checked(args, message, tmp_path, capsys):
    code = main(["evaluate", *args, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_folder_that_is_neither_layout_names_both(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no patient folder .* or a folder of NIfTI patient folders"):
        prepare(tmp_path / "empty", tmp_path / "cache", progress=False)


def test_train_on_a_folder_of_nifti_patients_of_mixed_sizes_and_types(nifti_root, tmp_path, capsys):
    rng = np.random.default_rng(1)
    flair = rng.integers(0, 2000, size=(6, 40, 36)).astype(np.float32)
    label = np.zeros((6, 40, 36), dtype=np.uint8)
    label[2:4, 10:20, 12:22] = 1
    flair[label > 0] += 1500
    _write_patient(nifti_root, "PAT_D_2004", flair, label)
    run = tmp_path / "run"
    code = main(["train", "--data", str(nifti_root), "--out", str(run), "--epochs", "1", "--depth", "3",
                 "--features", "4,8,16", "--batch-size", "4", "--crop", "16", "--samples-per-epoch", "8",
                 "--precision", "fp32", "--channels-last", "false", "--folds", "2", "--no-progress"])
    assert code == 0, capsys.readouterr()
    ck = load_checkpoint(run / "last.pt")
    assert sorted(ck.split["train"] + ck.split["val"]) == ["PAT_A_2001", "PAT_B_2002", "PAT_C_2003", "PAT_D_2004"]
    model = ck.build_model()
    assert model.config.features == (4, 8, 16)


def test_display_image_scales_raw_nifti_intensities():
    image = np.zeros((4, 4, 3), dtype=np.float32)
    image[..., 1] = np.arange(16, dtype=np.float32).reshape(4, 4) * 100  # FLAIR, 0..1500
    grey = display_image(image)
    assert grey.dtype == np.uint8 and grey[0, 0] == 0 and grey[3, 3] == 255
    assert np.all(np.diff(grey.ravel().astype(int)) >= 0)
