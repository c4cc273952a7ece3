"""Inputs as users bring them: label values, slice gaps and stray folders, NIfTI files
without usable geometry or with absurd sizes, sequences on their own grids, unknown
formats and the packed (.webp) copy of the data, and the serve work folder."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import write_rgb
from PIL import Image

from tumorseg.data.formats import check_input_file, check_input_kinds, input_kind, unsupported_message
from tumorseg.data.kaggle import find_patient_dirs, list_slices, read_patient
from tumorseg.data.nifti import (
    MAX_VOLUME_BYTES,
    MAX_VOLUME_ENV,
    NiftiFiles,
    affine_problem,
    find_sequences,
    kaggle_affine,
    kaggle_to_nifti,
    max_volume_bytes,
    pipeline_bytes,
    read_nifti_patient,
    write_kaggle_volume,
    write_nifti,
)
from tumorseg.data.resample import resample_to_grid
from tumorseg.data.slices import describe_numbers, read_mask, read_volume, slice_gaps, slice_images
from tumorseg.errors import ConfigError, DataError
from tumorseg.metrics import confusion_counts, dice_from_counts


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# --------------------------------------------------------------------------- 1. label values

LABELS = np.zeros((3, 16, 16), np.uint8)
LABELS[1, 2:6, 3:9] = 1  # enhancing, say
LABELS[1, 6:9, 3:9] = 2  # oedema: still tumour
LABELS[2, 10:12, 10:14] = 2  # a slice with only label 2 is not empty


def _labelled_patient(root: Path, name: str, masks: np.ndarray) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, m in enumerate(masks, start=1):
        write_rgb(folder / f"{name}_{i}.tif", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
        Image.fromarray(m.astype(np.uint8)).save(folder / f"{name}_{i}_mask.tif")
    return folder


@pytest.mark.parametrize("encoding", ["0/255", "0/1", "0/1/2"])
def test_every_mask_encoding_reads_as_the_same_mask_and_dice(tmp_path, encoding):
    encoded = {"0/255": (LABELS != 0) * 255, "0/1": (LABELS != 0) * 1, "0/1/2": LABELS}[encoding]
    _, _, masks = read_patient(_labelled_patient(tmp_path, "P", encoded))
    assert np.array_equal(masks, (LABELS != 0).astype(np.uint8))
    assert masks[2].sum() == 8  # the slice with label 2 only
    prediction = np.zeros_like(masks)
    prediction[1, 2:9, 3:6] = 1
    # Hand count: 21 predicted, all tumour, of 42 + 8 tumour pixels: 2*21 / (21 + 50).
    assert dice_from_counts(confusion_counts(prediction, masks)) == pytest.approx(42 / 71)


def test_a_nifti_label_map_reads_as_the_same_mask_as_its_slices(tmp_path):
    folder = tmp_path / "N"
    folder.mkdir()
    write_kaggle_volume(folder / "N_flair.nii.gz", np.arange(3 * 16 * 16, dtype=np.int16).reshape(3, 16, 16))
    write_kaggle_volume(folder / "N_seg.nii.gz", LABELS)
    patient = read_nifti_patient(find_sequences(folder))
    _, _, masks = read_patient(_labelled_patient(tmp_path, "P", LABELS))
    assert np.array_equal(patient.label, masks.astype(bool))


@pytest.mark.slow
@pytest.mark.realdata
def test_a_real_patient_reads_the_same_with_0_1_and_label_map_masks(real_data, tmp_path):
    patient = _real_patient(real_data)
    numbers, images, truth = read_patient(patient)
    assert truth is not None and truth.any()
    for encoding in ("0/1", "0/1/2"):
        copy = tmp_path / encoding.replace("/", "") / patient.name
        copy.mkdir(parents=True)
        for n, img, m in zip(numbers, images, truth, strict=True):
            write_rgb(copy / f"{patient.name}_{n}.tif", img)
            values = m.astype(np.uint8)
            if encoding == "0/1/2":  # the lower half of each tumour labelled 2
                values[values.shape[0] // 2:] *= 2
            Image.fromarray(values).save(copy / f"{patient.name}_{n}_mask.tif")
        _, _, masks = read_patient(copy)
        assert np.array_equal(masks, truth), encoding


# --------------------------------------------------------------------------- 2. gaps, stray folders

def test_slice_gaps_by_hand():
    assert slice_gaps([*range(1, 11), *range(12, 21)]) == [11]
    assert slice_gaps([3, 1, 7]) == [2, 4, 5, 6]
    assert slice_gaps([0, 1, 2]) == [] and slice_gaps([]) == []
    assert describe_numbers([11, 14, 15, 16]) == "11, 14-16"


def test_a_gap_in_the_slice_numbers_warns_and_shows_in_the_numbers(kaggle, caplog):
    folder = kaggle.root / "PAT_A_2001"
    for n in (4, 5, 9):
        kaggle.image_path("PAT_A_2001", n).unlink()
        kaggle.mask_path("PAT_A_2001", n).unlink()
    with caplog.at_level(logging.WARNING, logger="tumorseg"):
        numbers, images, _ = read_patient(folder)
    assert slice_gaps(numbers) == [4, 5, 9] and len(images) == 9
    warned = [r.getMessage() for r in caplog.records if r.name == "tumorseg"]
    assert len(warned) == 1 and str(folder) in warned[0] and "4-5, 9 missing between 1 and 12" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tumorseg"):  # the prediction path warns alike
        read_volume(slice_images(folder), "PAT_A_2001")
    assert "4-5, 9 missing" in caplog.text


def test_a_folder_named_like_a_slice_is_refused(kaggle):
    folder = kaggle.root / "PAT_B_2002"
    (folder / "PAT_B_2002_6.tif").mkdir()
    for fn in (list_slices, slice_images):
        msg = error_of(fn, folder)
        assert msg.startswith(f"{folder / 'PAT_B_2002_6.tif'} is a folder named like a slice image"), msg


def test_the_packed_webp_copy_says_to_convert_the_slices(tmp_path):
    folder = tmp_path / "packed" / "PAT_W"
    folder.mkdir(parents=True)
    for n in (1, 2):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / f"PAT_W_{n}.webp")
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / f"PAT_W_{n}_mask.png")
    for fn, arg in ((read_patient, folder), (slice_images, folder), (list_slices, find_patient_dirs(folder.parent)[0])):
        msg = error_of(fn, arg)
        assert "which are not read; convert the .webp slices to .tif/.png" in msg and "mask without" not in msg
    assert "convert the .webp slices to .tif/.png" in unsupported_message(folder / "PAT_W_1.webp")


# --------------------------------------------------------------------------- 3. unusable affines

FLAIR = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)  # stored (i, j, k)


def _nifti(path: Path, *, sform=None, sform_code=0, qform_code=0, pixdim=(2.0, 3.0, 4.0)) -> Path:
    """A NIfTI file with the geometry fields written as given (nibabel would refuse or fix
    some of them, so they are patched in the header bytes)."""
    nib.save(nib.Nifti1Image(FLAIR, np.eye(4)), str(path))
    raw = bytearray(path.read_bytes())
    raw[80:92] = np.asarray(pixdim, "<f4").tobytes()
    raw[252:256] = np.asarray([qform_code, sform_code], "<i2").tobytes()
    raw[280:328] = np.asarray(np.eye(4)[:3] if sform is None else np.asarray(sform)[:3], "<f4").tobytes()
    path.write_bytes(bytes(raw))
    return path


PIXDIM_AFFINE = np.array([[-2.0, 0, 0, 3.0], [0, 3.0, 0, -6.0], [0, 0, 4.0, -10.0], [0, 0, 0, 1]])


@pytest.mark.parametrize(("fields", "why"), [
    ({"sform": np.zeros((4, 4)), "sform_code": 1}, "sform all zero"),
    ({"sform": [[1, 0, 0, 0], [2, 0, 0, 0], [0, 0, 1, 0]], "sform_code": 2}, "sform singular"),
    ({"sform": np.full((4, 4), np.nan), "sform_code": 1}, "sform not finite"),
    ({}, "no orientation (sform_code = qform_code = 0)"),
])
def test_an_unusable_affine_falls_back_to_pixdim_with_a_warning(tmp_path, caplog, fields, why):
    path = _nifti(tmp_path / "p_flair.nii", **fields)
    with caplog.at_level(logging.WARNING, logger="tumorseg"):
        patient = read_nifti_patient(NiftiFiles("p", flair=path))
    assert np.allclose(patient.grid.affine, PIXDIM_AFFINE)
    assert f"{path}: {why}; using the voxel sizes of pixdim (2, 3, 4 mm)" in caplog.text
    # (i, j, k) run (L, A, S): the model's (slice, row, column) = (k, reversed j, i).
    assert np.array_equal(patient.volume[..., 1], FLAIR.transpose(2, 1, 0)[:, ::-1, :])
    assert patient.grid.spacing == (4.0, 3.0, 2.0)
    out = write_nifti(tmp_path / "mask.nii.gz", patient.volume[..., 1] > 60, patient.grid)
    back = nib.load(str(out))
    assert np.allclose(back.affine, PIXDIM_AFFINE) and np.array_equal(np.asarray(back.dataobj), FLAIR > 60)


def test_an_unusable_sform_falls_back_to_a_valid_qform_first(tmp_path, caplog):
    path = _nifti(tmp_path / "q_flair.nii", sform=np.zeros((4, 4)), sform_code=1, qform_code=1)
    with caplog.at_level(logging.WARNING, logger="tumorseg"):
        patient = read_nifti_patient(NiftiFiles("q", flair=path))
    assert np.allclose(patient.grid.affine, np.diag([2.0, 3.0, 4.0, 1.0]))  # identity quaternion, pixdim zooms
    assert "sform all zero; using its qform" in caplog.text


@pytest.mark.parametrize("pixdim", [(0.0, 0.0, 0.0), (1.0, np.nan, 1.0), (1.0, np.inf, 1.0)])
def test_no_affine_and_no_pixdim_is_refused_naming_the_file(tmp_path, pixdim):
    path = _nifti(tmp_path / "x_flair.nii", sform=np.zeros((4, 4)), sform_code=1, pixdim=pixdim)
    msg = error_of(read_nifti_patient, NiftiFiles("x", flair=path))
    assert msg.startswith(f"{path}: the header places no voxel in space (sform all zero; pixdim ")
    assert msg.endswith("set a valid sform or qform (voxel i, j, k -> RAS mm), e.g. with nibabel's set_sform or "
                        "fslcpgeom")


def test_affine_problem_by_hand():
    assert affine_problem(np.eye(4)) is None and affine_problem(np.diag([-0.5, 2, 7, 1])) is None
    assert affine_problem(np.zeros((4, 4))) == "all zero"
    assert affine_problem(np.diag([1.0, 1.0, 0.0, 1.0])) == "singular"
    assert affine_problem(np.diag([1.0, np.inf, 1.0, 1.0])) == "not finite"


# --------------------------------------------------------------------------- 4. oversized headers

def _header_only(path: Path, shape) -> Path:
    """A NIfTI file whose header claims `shape` int16 voxels, with almost no data."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    path.write_bytes(header.binaryblock + b"\0" * 4 + b"\0" * 100)
    return path


def test_pipeline_bytes_by_hand():
    # n = 24 voxels: FLAIR 24 + T1 (2x2x2) 8 + 1 resampled 24 + volume twice 144 + training-scale copies
    # 2*3*24 + probabilities and spread 2*24 at each scale: (24 + 8 + 24 + 144 + 144 + 48 + 48) * 4 bytes.
    assert pipeline_bytes((2, 3, 4), [(2, 2, 2)], resampled=1) == 440 * 4
    assert pipeline_bytes((2, 3, 4), inplane_scale=0.5) == (24 + 144 + 72 + 24 + 48) * 4
    assert pipeline_bytes((30000, 30000, 30000)) == 68 * 30000**3  # 17 float32 copies
    assert pipeline_bytes((3_000_000,) * 3) == 68 * 3_000_000**3 > 2**64  # Python ints: no overflow


def test_a_header_claiming_a_huge_volume_is_refused_before_reading(tmp_path):
    path = _header_only(tmp_path / "big_flair.nii", (30000, 30000, 30000))
    msg = error_of(read_nifti_patient, NiftiFiles("big", flair=path))
    assert msg.startswith(f"{path}: the header claims 30000x30000x30000 voxels, which would take about ")
    gb = float(msg.split("about ")[1].split(" GB")[0])
    assert gb == pytest.approx(pipeline_bytes((30000,) * 3) / 2**30, rel=1e-3)
    assert f"over the limit of 4 GB; if this is the right file, raise the limit with the environment variable " \
           f"{MAX_VOLUME_ENV}=<GB>" in msg


def test_the_limit_comes_from_max_bytes_then_the_environment_then_the_default(tmp_path, monkeypatch):
    path = tmp_path / "s_flair.nii"
    nib.save(nib.Nifti1Image(FLAIR, np.eye(4)), str(path))
    files = NiftiFiles("s", flair=path)
    need = pipeline_bytes(FLAIR.shape)
    monkeypatch.delenv(MAX_VOLUME_ENV, raising=False)
    assert max_volume_bytes() == MAX_VOLUME_BYTES == 4 * 2**30
    assert read_nifti_patient(files, max_bytes=need).volume.shape == (6, 5, 4, 3)
    assert "over the limit" in error_of(read_nifti_patient, files, max_bytes=need - 1)
    monkeypatch.setenv(MAX_VOLUME_ENV, str((need - 1) / 2**30))
    assert "over the limit" in error_of(read_nifti_patient, files)
    assert read_nifti_patient(files, max_bytes=need).name == "s"  # the argument wins
    monkeypatch.setenv(MAX_VOLUME_ENV, "lots")
    with pytest.raises(ConfigError, match=f"{MAX_VOLUME_ENV} must be a positive number of GB, got 'lots'"):
        read_nifti_patient(files)


# --------------------------------------------------------------------------- 5. sequences on their own grids

def test_a_shift_by_whole_voxels_gives_the_shifted_array_exactly():
    src = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    dst_affine = np.eye(4)
    dst_affine[:3, 3] = (1.0, 2.0, 0.0)  # target voxel (0, 0, 0) is source voxel (1, 2, 0)
    out = resample_to_grid(src, np.eye(4), (4, 5, 6), dst_affine, cval=-1.0)
    assert np.array_equal(out[:3, :3], src[1:, 2:])
    assert (out[3:] == -1).all() and (out[:, 3:] == -1).all()
    labels = src.astype(np.int64) % 3 == 0
    assert np.array_equal(resample_to_grid(labels, np.eye(4), (4, 5, 6), dst_affine, order=0)[:3, :3], labels[1:, 2:])


def test_2x_downsampling_of_a_linear_ramp():
    ramp = np.broadcast_to(np.arange(8, dtype=np.float32)[:, None, None], (8, 2, 2)).copy()
    # Voxels twice as large, centred between source voxels 2m and 2m + 1: the mean of the pair.
    dst = np.diag([2.0, 1.0, 1.0, 1.0])
    dst[0, 3] = 0.5
    out = resample_to_grid(ramp, np.eye(4), (4, 2, 2), dst)
    assert np.allclose(out[:, 0, 0], [0.5, 2.5, 4.5, 6.5])
    # Axes permuted by the affine: the target's first axis is the source's third.
    perm = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
    assert np.array_equal(resample_to_grid(ramp, np.eye(4), (2, 2, 8), perm), ramp.transpose(2, 1, 0))
    with pytest.raises(ValueError, match="order must be 0"):
        resample_to_grid(ramp, np.eye(4), (4, 2, 2), dst, order=3)
    with pytest.raises(ValueError, match="singular"):
        resample_to_grid(ramp, np.zeros((4, 4)), (4, 2, 2), dst)


def _ramp(shape, affine) -> np.ndarray:
    """x + 2y + 3z (mm) at each voxel centre of the grid: linear, so linear resampling is exact."""
    idx = np.indices(shape).reshape(3, -1)
    world = affine[:3, :3] @ idx + affine[:3, 3:4]
    return (world[0] + 2 * world[1] + 3 * world[2]).reshape(shape).astype(np.float32)


def test_t1_on_a_finer_grid_is_resampled_onto_flair_with_one_warning(tmp_path, caplog):
    folder = tmp_path / "G"
    folder.mkdir()
    flair_affine = np.diag([2.0, 2.0, 4.0, 1.0])
    flair_affine[:3, 3] = (10.0, 20.0, 30.0)
    fine_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    fine_affine[:3, 3] = (9.0, 19.0, 27.0)  # covers the FLAIR grid with a margin
    nib.save(nib.Nifti1Image(_ramp((6, 5, 4), flair_affine), flair_affine), str(folder / "G_flair.nii.gz"))
    nib.save(nib.Nifti1Image(_ramp((14, 12, 18), fine_affine), fine_affine), str(folder / "G_t1.nii.gz"))
    label = np.zeros((12, 10, 16), np.uint8)
    label[2:6, 4:8, 4:12] = 2
    nib.save(nib.Nifti1Image(label, np.diag([1.0, 1.0, 1.0, 1.0])), str(folder / "G_seg.nii.gz"))
    with caplog.at_level(logging.WARNING, logger="tumorseg"):
        patient = read_nifti_patient(find_sequences(folder))
    assert patient.resampled == ("pre-contrast", "label")
    warned = [r.getMessage() for r in caplog.records if "resampled" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("G: pre-contrast, label on another grid than FLAIR")
    assert "does not correct motion" in warned[0]
    assert np.allclose(patient.volume[..., 0], patient.volume[..., 1], atol=1e-3)  # T1 = FLAIR: the same ramp
    # The label (1 mm grid, origin 0) at the FLAIR voxel centres (10 + 2i, 20 + 2j, 30 + 4k): none inside.
    assert not patient.label.any()
    with pytest.raises(DataError, match="G_t1.nii.gz and G_flair.nii.gz are on different grids"):
        read_nifti_patient(find_sequences(folder), resample=False)


def test_a_label_on_a_finer_grid_is_resampled_by_nearest_neighbour(tmp_path):
    folder = tmp_path / "L"
    folder.mkdir()
    nib.save(nib.Nifti1Image(np.ones((4, 4, 2), np.int16), np.diag([2.0, 2.0, 2.0, 1.0])), str(folder / "L_flair.nii"))
    fine = np.zeros((8, 8, 4), np.uint8)
    fine[2:5, 0:3, 0] = 3  # covers the centres (2, 0, 0) and (4, 0, 0) mm: FLAIR voxels (1, 0, 0) and (2, 0, 0)
    nib.save(nib.Nifti1Image(fine, np.eye(4)), str(folder / "L_seg.nii"))
    patient = read_nifti_patient(find_sequences(folder))
    expected = np.zeros((4, 4, 2), bool)
    expected[1:3, 0:2, 0] = True
    # (i, j, k) run (R, A, S): the model's layout is (k, reversed j, reversed i).
    assert np.array_equal(patient.label, expected.transpose(2, 1, 0)[:, ::-1, ::-1])


def test_a_sequence_far_off_the_flair_grid_is_refused(tmp_path):
    folder = tmp_path / "F"
    folder.mkdir()
    nib.save(nib.Nifti1Image(FLAIR, np.eye(4)), str(folder / "F_flair.nii"))
    moved = np.eye(4)
    moved[2, 3] = 4.0  # two of six slices overlap
    nib.save(nib.Nifti1Image(FLAIR, moved), str(folder / "F_t1ce.nii"))
    assert error_of(read_nifti_patient, find_sequences(folder)).startswith(
        "F_t1ce.nii covers 33% of the FLAIR grid of F_flair.nii through their affines; are they of one session?")


REAL_PATIENT = "TCGA_CS_4941_19960909"


def _real_patient(real_data: Path) -> Path:
    folder = real_data / REAL_PATIENT
    return folder if folder.is_dir() else find_patient_dirs(real_data)[0]


def _iso_copies(converted: Path, name: str, spacing) -> None:
    """Rewrite the converted T1 and T1c of a patient on a 1 mm isotropic grid covering it."""
    for word in ("t1", "t1ce"):
        path = converted / f"{name}_{word}.nii.gz"
        img = nib.load(str(path))
        shape = img.shape
        extent = [(n - 1) * s for n, s in zip(shape, (spacing[2], spacing[1], spacing[0]), strict=True)]
        iso = np.diag([-1.0, -1.0, 1.0, 1.0])
        iso_shape = tuple(int(np.floor(e)) + 2 for e in extent)
        data = resample_to_grid(np.asarray(img.dataobj, np.float32), img.affine, iso_shape, iso)
        nib.save(nib.Nifti1Image(data, iso), str(path))


@pytest.mark.slow
@pytest.mark.realdata
def test_a_real_patient_through_a_1mm_grid_and_back_stays_close(real_data, tmp_path):
    patient_dir = _real_patient(real_data)
    spacing = (1.0, 0.94, 0.94)
    kaggle_to_nifti(patient_dir, tmp_path / "same", spacing=spacing)
    kaggle_to_nifti(patient_dir, tmp_path / "iso", spacing=spacing)
    _iso_copies(tmp_path / "iso" / patient_dir.name, patient_dir.name, spacing)
    same = read_nifti_patient(find_sequences(tmp_path / "same" / patient_dir.name))
    back = read_nifti_patient(find_sequences(tmp_path / "iso" / patient_dir.name))
    assert back.resampled == ("pre-contrast", "post-contrast") and same.resampled == ()
    assert np.array_equal(back.volume[..., 1], same.volume[..., 1])
    diff = np.abs(back.volume[..., [0, 2]] - same.volume[..., [0, 2]])
    assert diff.mean() < 2.0, diff.mean()  # grey levels of 0-255, after two linear interpolations


@pytest.mark.slow
@pytest.mark.realdata
def test_t1_on_1mm_and_flair_on_5mm_predicts_like_the_same_grid(real_data, tmp_path):
    from tumorseg.inference import Predictor

    patient_dir = _real_patient(real_data)
    spacing = (5.0, 0.94, 0.94)
    kaggle_to_nifti(patient_dir, tmp_path / "same", spacing=spacing)
    kaggle_to_nifti(patient_dir, tmp_path / "iso", spacing=spacing)
    _iso_copies(tmp_path / "iso" / patient_dir.name, patient_dir.name, spacing)
    predictor = Predictor.from_checkpoints(None, engine="openvino", precision="fp32")
    dice = {}
    for case in ("same", "iso"):
        patient = read_nifti_patient(find_sequences(tmp_path / case / patient_dir.name), require_label=True)
        mask = predictor.segment(patient.volume).mask
        dice[case] = dice_from_counts(confusion_counts(mask, patient.label))
    assert dice["same"] > 0.5, dice
    assert abs(dice["iso"] - dice["same"]) < 0.02, dice


# --------------------------------------------------------------------------- 6. input formats

def test_input_kind_of_names_and_files(tmp_path):
    assert [input_kind(n) for n in ("a_1.TIF", "a.tiff", "b.png", "c.nii", "d.NII.GZ", "p.zip", "e.dcm",
                                    "f.jpg", "g.webp", "noext", "h.nii.bak")] == \
        ["slice", "slice", "slice", "nifti", "nifti", "zip", "dicom", "", "", "", ""]
    dicom = tmp_path / "IM0001"
    dicom.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")
    other = tmp_path / "IM0002"
    other.write_bytes(b"\0" * 200)
    assert input_kind(dicom) == "dicom" and input_kind(other) == ""


def test_unknown_extensions_name_the_extension_and_the_supported_formats():
    msg = error_of(check_input_file, "scan.jpg")
    assert msg.startswith("scan.jpg: the extension .jpg is not read; supported: .tif/.tiff/.png slices, "
                          ".nii/.nii.gz volumes, DICOM files, or a .zip of a patient folder")
    assert "the extension .mha is not read" in error_of(check_input_file, "brain.mha")
    assert check_input_file("x.dcm") == "dicom"  # DICOM is read (data.dicom)
    assert error_of(check_input_file, "README").startswith("README: a file without an extension is not read")


def test_check_input_kinds_like_an_upload():
    assert check_input_kinds(["a_1.tif", "a_1_mask.tif", "a_2.png"]) == "slice"
    assert check_input_kinds(["p_flair.nii.gz", "p_t1.nii"]) == "nifti"
    assert check_input_kinds(["p.zip"]) == "zip"
    assert check_input_kinds(["IM0001.dcm", "IM0002.dcm"]) == "dicom"
    assert "mix nifti and slice files" in error_of(check_input_kinds, ["a_1.tif", "p_flair.nii.gz"])
    assert "send a zip alone" in error_of(check_input_kinds, ["p.zip", "a_1.tif"])
    assert "no files" in error_of(check_input_kinds, [])
    assert error_of(check_input_kinds, ["a_1.tif", "a_2.webp"]).startswith("a_2.webp: the extension .webp is not read")


# --------------------------------------------------------------------------- 7. the affine describes rows and columns

def test_a_volume_stacked_rows_first_with_a_diagonal_affine_is_read_transposed(tmp_path):
    volume = np.random.default_rng(0).integers(0, 255, (3, 4, 5), dtype=np.uint8)  # (slice, row, column)
    right = write_kaggle_volume(tmp_path / "r_flair.nii", volume)  # stored (column, row, slice), kaggle_affine
    assert np.array_equal(read_nifti_patient(NiftiFiles("r", flair=right)).volume[..., 1], volume)
    wrong = tmp_path / "w_flair.nii"
    nib.save(nib.Nifti1Image(volume.transpose(1, 2, 0), kaggle_affine((1, 1, 1))), str(wrong))  # (row, column, slice)
    read = read_nifti_patient(NiftiFiles("w", flair=wrong)).volume[..., 1]
    assert read.shape == (3, 5, 4) and np.array_equal(read, volume.transpose(0, 2, 1))


# --------------------------------------------------------------------------- 8. serve --work-dir FILE

def test_serve_work_dir_that_is_a_file_is_a_clear_error(tmp_path):
    pytest.importorskip("fastapi")
    from test_nifti import unet_predictor

    from tumorseg.serve.app import create_app

    path = tmp_path / "work"
    path.write_text("a file")
    with pytest.raises(ConfigError, match=f"--work-dir {path} is a file, not a folder; pass a folder"):
        create_app(unet_predictor(), work_dir=path)
    create_app(unet_predictor(), work_dir=tmp_path / "new" / "work")
    assert (tmp_path / "new" / "work").is_dir()


def test_mask_reading_of_read_mask_matches_label_rule(tmp_path):
    path = tmp_path / "m_1_mask.png"
    Image.fromarray(LABELS[1]).save(path)
    assert np.array_equal(read_mask(path), (LABELS[1] != 0).astype(np.uint8))
