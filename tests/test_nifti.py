"""NIfTI patients: conversion round trips, any voxel order gives the same physical mask,
in-plane resampling, outputs on the input's grid, and one-line errors for bad files."""

from __future__ import annotations

import csv
import gzip
import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform
from PIL import Image

from tumorseg.cli import main
from tumorseg.data.nifti import (
    TRAINING_SPACING,
    NiftiFiles,
    find_sequences,
    kaggle_affine,
    kaggle_to_nifti,
    read_nifti_patient,
)
from tumorseg.errors import DataError
from tumorseg.inference import Predictor
from tumorseg.model import UNet
from tumorseg.prediction import predict

PATIENT = "PAT_A_2001"


def unet_predictor() -> Predictor:
    """A random U-Net (a function of the whole slice, not of single pixels), with the last
    bias set so that about a third of the pixels come out as tumour."""
    torch.manual_seed(0)
    model = UNet(n_features=4, depth=3).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, 3, 32, 32))
        model.layers[-1].bias -= torch.quantile(logits, 0.67)
    return Predictor([model], device="cpu", precision="fp32", channels_last=False)


def flair_predictor() -> Predictor:
    from test_prediction import FlairThreshold

    return Predictor([FlairThreshold()], fuse=False, precision="fp32", device="cpu", percentiles=(0.0, 100.0))


@pytest.fixture
def converted(kaggle, tmp_path) -> Path:
    kaggle_to_nifti(kaggle.root / PATIENT, tmp_path / "nii", spacing=(2.0, TRAINING_SPACING, TRAINING_SPACING))
    return tmp_path / "nii" / PATIENT


def _save(img: nib.Nifti1Image, path: Path) -> Path:
    nib.save(img, str(path))
    return path


def test_conversion_round_trip_is_voxel_exact(kaggle, converted):
    names = sorted(p.name for p in converted.iterdir())
    assert names == [f"{PATIENT}_{s}.nii.gz" for s in ("flair", "seg", "t1", "t1ce")]
    files = find_sequences(converted)
    assert (files.flair.name, files.pre.name, files.post.name, files.label.name) == (
        f"{PATIENT}_flair.nii.gz", f"{PATIENT}_t1.nii.gz", f"{PATIENT}_t1ce.nii.gz", f"{PATIENT}_seg.nii.gz")
    patient = read_nifti_patient(files)
    assert np.array_equal(patient.volume, kaggle.images[PATIENT].astype(np.float32))
    assert np.array_equal(patient.label, kaggle.masks[PATIENT] > 0)
    assert patient.grid.spacing == pytest.approx((2.0, TRAINING_SPACING, TRAINING_SPACING)) and patient.filled == []
    assert nib.aff2axcodes(nib.load(str(files.flair)).affine) == ("L", "P", "S")


def test_nifti_patient_gives_the_same_mask_as_its_tiff_folder(kaggle, converted, tmp_path):
    predictor = unet_predictor()
    tiff = predict([kaggle.root / PATIENT], tmp_path / "tiff", predictor=predictor, show_progress=False)
    nii = predict([converted], tmp_path / "nii-out", predictor=predictor, show_progress=False)
    assert [(s.slices, s.tumour_slices, s.tumour_pixels) for s in tiff] == \
        [(s.slices, s.tumour_slices, s.tumour_pixels) for s in nii]
    assert nii[0].tumour_pixels > 0
    pred = nib.load(str(tmp_path / "nii-out" / PATIENT / f"{PATIENT}_pred.nii.gz"))
    flair = nib.load(str(converted / f"{PATIENT}_flair.nii.gz"))
    assert pred.shape == flair.shape and np.array_equal(pred.affine, flair.affine)
    assert pred.get_data_dtype() == np.uint8
    mask = np.asarray(pred.dataobj).transpose(2, 1, 0)  # (x, y, z) -> (slice, row, column)
    for i, n in enumerate(kaggle.slices[PATIENT]):
        png = np.asarray(Image.open(tmp_path / "tiff" / PATIENT / f"{PATIENT}_{n}_pred.png")) > 0
        assert np.array_equal(mask[i] > 0, png), n
    row = next(csv.DictReader((tmp_path / "nii-out" / "summary.csv").open()))
    voxel_ml = 2.0 * TRAINING_SPACING**2 / 1000
    assert float(row["volume_ml"]) == pytest.approx(nii[0].tumour_pixels * voxel_ml, abs=1e-3)
    assert next(csv.DictReader((tmp_path / "tiff" / "summary.csv").open()))["volume_ml"] == ""


ORDERS = [("R", "A", "S"), ("S", "P", "L"), ("A", "I", "R"), ("P", "L", "I")]


@pytest.mark.parametrize("codes", ORDERS)
def test_any_voxel_order_gives_the_same_physical_mask(converted, tmp_path, codes):
    """The patient rewritten in another voxel order (permuted and flipped, with the
    matching affine) gives the same mask in physical space."""
    predictor = unet_predictor()
    predict([converted], tmp_path / "ref", predictor=predictor, show_progress=False)
    ref = nib.load(str(tmp_path / "ref" / PATIENT / f"{PATIENT}_pred.nii.gz"))
    moved = tmp_path / "moved" / PATIENT
    moved.mkdir(parents=True)
    for f in converted.iterdir():
        img = nib.load(str(f))
        ornt = ornt_transform(io_orientation(img.affine), axcodes2ornt(codes))
        _save(img.as_reoriented(ornt), moved / f.name)
    assert nib.aff2axcodes(nib.load(str(moved / f"{PATIENT}_flair.nii.gz")).affine) == codes
    predict([moved], tmp_path / "out", predictor=predictor, show_progress=False)
    out = nib.load(str(tmp_path / "out" / PATIENT / f"{PATIENT}_pred.nii.gz"))
    flair = nib.load(str(moved / f"{PATIENT}_flair.nii.gz"))
    assert out.shape == flair.shape and np.allclose(out.affine, flair.affine, atol=1e-4)
    back = out.as_reoriented(ornt_transform(io_orientation(out.affine), io_orientation(ref.affine)))
    assert np.allclose(back.affine, ref.affine, atol=1e-4)
    assert np.array_equal(np.asarray(back.dataobj), np.asarray(ref.dataobj))


def test_off_scale_slices_are_resampled_and_the_mask_comes_back_on_the_input_grid(tmp_path, caplog):
    """A 64x64 patient at 0.47 mm is segmented at the model's 0.94 mm and its mask returned
    at 64x64: the same tumour as the 32x32 version at 0.94 mm, upsampled."""
    rng = np.random.default_rng(0)
    small = np.zeros((4, 32, 32), dtype=np.float32)
    small[1:3, 8:20, 10:24] = 1.0  # a tumour block
    flair = (small * 200 + rng.uniform(0, 20, small.shape)).astype(np.float32)
    big = np.repeat(np.repeat(flair, 2, axis=1), 2, axis=2)
    folder = tmp_path / "fine"
    folder.mkdir()
    affine = kaggle_affine((3.0, TRAINING_SPACING / 2, TRAINING_SPACING / 2))
    _save(nib.Nifti1Image(np.ascontiguousarray(big.transpose(2, 1, 0)), affine), folder / "fine_flair.nii.gz")
    (summary,) = predict([folder], tmp_path / "out", predictor=flair_predictor(), show_progress=False)
    assert "resampling 64x64 -> 32x32" in caplog.text
    assert "filled with FLAIR" in caplog.text
    out = nib.load(str(tmp_path / "out" / "fine" / "fine_pred.nii.gz"))
    assert out.shape == (64, 64, 4) and np.allclose(out.affine, affine)
    mask = np.asarray(out.dataobj).transpose(2, 1, 0) > 0
    truth = np.repeat(np.repeat(small > 0, 2, axis=1), 2, axis=2)
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.95
    assert summary.volume_ml == pytest.approx(mask.sum() * 3.0 * (TRAINING_SPACING / 2) ** 2 / 1000, rel=1e-3)


def test_save_probabilities_of_an_ensemble_writes_the_mean_and_the_spread(converted, tmp_path):
    torch.manual_seed(0)
    models = [UNet(n_features=4, depth=3).eval() for _ in range(2)]
    predictor = Predictor(models, device="cpu", precision="fp32", channels_last=False)
    predict([converted], tmp_path / "out", predictor=predictor, save_probabilities=True, show_progress=False)
    folder = tmp_path / "out" / PATIENT
    prob = nib.load(str(folder / f"{PATIENT}_prob.nii.gz"))
    spread = nib.load(str(folder / f"{PATIENT}_prob_spread.nii.gz"))
    p, s = np.asarray(prob.dataobj), np.asarray(spread.dataobj)
    assert prob.get_data_dtype() == np.float32 and p.min() >= 0 and p.max() <= 1
    assert s.max() > 0 and np.allclose(prob.affine, nib.load(str(converted / f"{PATIENT}_flair.nii.gz")).affine)
    mask = np.asarray(nib.load(str(folder / f"{PATIENT}_pred.nii.gz")).dataobj)
    assert np.array_equal(mask > 0, p > 0.5)  # no post-processing: the mask is the thresholded mean


def test_explicit_files_and_a_single_flair_file(converted, tmp_path, capsys):
    from tumorseg.data.nifti import patient_name

    assert patient_name(converted / f"{PATIENT}_flair.nii.gz") == PATIENT
    files = NiftiFiles("given", flair=converted / f"{PATIENT}_flair.nii.gz", post=converted / f"{PATIENT}_t1ce.nii.gz")
    patient = read_nifti_patient(files)
    assert patient.filled == ["pre-contrast"]
    assert np.array_equal(patient.volume[..., 0], patient.volume[..., 1])


# --------------------------------------------------------------------------- bad input

def _bad_cases(converted: Path, tmp: Path) -> dict[str, tuple[list[str], str]]:
    flair = nib.load(str(converted / f"{PATIENT}_flair.nii.gz"))
    data = np.asarray(flair.dataobj)
    cases = {}
    four = _save(nib.Nifti1Image(np.stack([data, data], -1), flair.affine), tmp / "four_flair.nii.gz")
    cases["4-D"] = ([str(four)], "is a 4-D series")
    two = _save(nib.Nifti1Image(data[..., 0], np.eye(4)), tmp / "two.nii.gz")
    cases["2-D"] = ([str(two)], "is 2-D")
    fake = tmp / "fake.nii.gz"
    fake.write_bytes(gzip.compress(b"this is not a nifti file at all" * 20))
    cases["not NIfTI"] = ([str(fake)], "not a readable NIfTI file")
    cut = tmp / "cut.nii.gz"
    cut.write_bytes((converted / f"{PATIENT}_flair.nii.gz").read_bytes()[:600])
    cases["truncated"] = ([str(cut)], "not a readable NIfTI file")
    nan = data.astype(np.float32)
    nan[0, 0, 0] = np.nan
    cases["NaN"] = ([str(_save(nib.Nifti1Image(nan, flair.affine), tmp / "nan.nii.gz"))], "has 1 NaN voxels")
    far = tmp / "far"  # another grid, not overlapping: resampling cannot help
    far.mkdir()
    _save(flair, far / "g_flair.nii.gz")
    moved = flair.affine.copy()
    moved[0, 3] += 500.0
    _save(nib.Nifti1Image(data, moved), far / "g_t1.nii.gz")
    cases["far grid"] = ([str(far)], "covers 0% of the FLAIR grid")
    nowhere = tmp / "nowhere_flair.nii"
    _save(nib.Nifti1Image(data, flair.affine), nowhere)
    raw = bytearray(nowhere.read_bytes())
    raw[80:92] = np.zeros(3, "<f4").tobytes()  # pixdim 1-3
    raw[252:256] = np.array([0, 1], "<i2").tobytes()  # qform_code 0, sform_code 1
    raw[280:328] = np.zeros(12, "<f4").tobytes()  # srow_x/y/z all zero
    nowhere.write_bytes(bytes(raw))
    cases["no geometry"] = ([str(nowhere)], "places no voxel in space")
    huge = tmp / "huge_flair.nii"
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 30000))
    header.set_data_dtype(np.int16)
    huge.write_bytes(header.binaryblock + b"\0" * 4 + b"\0" * 64)
    cases["huge"] = ([str(huge)], "TUMORSEG_MAX_VOLUME_GB")
    twice = tmp / "twice"
    twice.mkdir()
    _save(flair, twice / "a_flair.nii.gz")
    _save(flair, twice / "b_flair.nii.gz")
    cases["two FLAIR"] = ([str(twice)], "2 files for FLAIR")
    noflair = tmp / "noflair"
    noflair.mkdir()
    _save(flair, noflair / "n_t1.nii.gz")
    cases["no FLAIR"] = ([str(noflair)], "no FLAIR volume")
    return cases


@pytest.mark.parametrize("case", ["4-D", "2-D", "not NIfTI", "truncated", "NaN", "far grid", "no geometry", "huge",
                                  "two FLAIR", "no FLAIR"])
def test_bad_nifti_input_gets_one_line_and_writes_nothing(converted, tmp_path, capsys, case):
    args, message = _bad_cases(converted, tmp_path)[case]
    out = tmp_path / "out"
    code = main(["predict", *args, "--out", str(out), "--checkpoint", str(_checkpoint(tmp_path)),
                 "--engine", "torch", "--precision", "fp32", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() or not any(p.is_dir() for p in out.iterdir())


def test_a_label_on_another_grid_is_resampled_by_nearest_neighbour_or_refused(converted, tmp_path, caplog):
    seg = nib.load(str(converted / f"{PATIENT}_seg.nii.gz"))
    truth = read_nifti_patient(find_sequences(converted)).label
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in converted.iterdir():
        if "seg" not in f.name:
            _save(nib.load(str(f)), bad / f.name)
    # One column fewer: the same voxels, on a grid of another shape.
    _save(nib.Nifti1Image(np.asarray(seg.dataobj)[:-1], seg.affine), bad / f"{PATIENT}_seg.nii.gz")
    with pytest.raises(DataError, match="label .* is on another grid"):
        read_nifti_patient(find_sequences(bad), resample=False)
    patient = read_nifti_patient(find_sequences(bad))
    assert patient.resampled == ("label",) and "label on another grid than FLAIR" in caplog.text
    # Stored (column, row, slice): the last column is missing, the rest is the label voxel for voxel.
    assert patient.label.dtype == bool
    assert np.array_equal(patient.label[..., :-1], truth[..., :-1]) and not patient.label[..., -1].any()


def _checkpoint(tmp_path: Path) -> Path:
    from tumorseg.checkpoint import Checkpoint, save_checkpoint

    path = tmp_path / "tiny.pt"
    if not path.exists():
        torch.manual_seed(0)
        save_checkpoint(path, Checkpoint.of_model(UNet(n_features=4, depth=3).eval()))
    return path


def test_convert_cli(kaggle, tmp_path, capsys):
    assert main(["convert", str(kaggle.root), "--out", str(tmp_path / "nii"), "--spacing", "3", "0.5", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "3 patients written" in out
    img = nib.load(str(tmp_path / "nii" / PATIENT / f"{PATIENT}_flair.nii.gz"))
    assert img.header.get_zooms() == (0.5, 0.5, 3.0)
    assert list(itertools.islice(sorted((tmp_path / "nii").iterdir()), 1))[0].name == "PAT_A_2001"


def test_convert_back_to_tiff_gives_the_kaggle_folder_file_for_file(kaggle, tmp_path, capsys):
    from tumorseg.data.kaggle import read_patient

    assert main(["convert", str(kaggle.root), "--out", str(tmp_path / "nii")]) == 0
    assert main(["convert", str(tmp_path / "nii"), "--out", str(tmp_path / "back")]) == 0
    assert "3 patients written to" in capsys.readouterr().out
    for patient in kaggle.images:
        original = sorted(p.name for p in (kaggle.root / patient).iterdir() if p.suffix == ".tif" and p.name[0] != ".")
        assert sorted(p.name for p in (tmp_path / "back" / patient).iterdir()) == original
        numbers, images, masks = read_patient(tmp_path / "back" / patient)
        assert numbers == kaggle.slices[patient]
        assert np.array_equal(images, kaggle.images[patient]) and np.array_equal(masks, kaggle.masks[patient])


def test_convert_back_scales_other_intensities_to_8_bits_with_a_warning(tmp_path, caplog):
    from tumorseg.data.nifti import nifti_to_kaggle
    from tumorseg.data.slices import read_image

    flair = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4) * 100 - 500  # -500 .. 2600
    folder = tmp_path / "p"
    folder.mkdir()
    _save(nib.Nifti1Image(np.ascontiguousarray(flair.transpose(2, 1, 0)).astype(np.int16), kaggle_affine((1, 1, 1))),
          folder / "p_flair.nii.gz")
    written = nifti_to_kaggle(find_sequences(folder), tmp_path / "out")
    assert [p.name for p in written] == ["p_1.tif", "p_2.tif"]
    assert "scaled to 8 bits for the TIFFs (pre-contrast -500..2600" in caplog.text
    first = read_image(written[0])
    assert first[0, 0, 1] == 0 and read_image(written[1])[3, 3, 1] == 255
    assert np.array_equal(first[..., 0], first[..., 1])  # FLAIR filled in


def test_convert_refuses_mixed_inputs(kaggle, converted, tmp_path, capsys):
    assert main(["convert", str(kaggle.root / "PAT_B_2002"), str(converted), "--out", str(tmp_path / "x")]) == 2
    assert "mix kaggle_3m and NIfTI" in capsys.readouterr().err
