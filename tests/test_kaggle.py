"""Reading the kaggle_3m layout: order, stray files, metadata, and every error path."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
from conftest import write_mask, write_rgb
from PIL import Image

from tumorseg.data.kaggle import (
    find_patient_dirs,
    list_slices,
    read_metadata,
    read_patient,
)
from tumorseg.data.slices import read_image, read_mask
from tumorseg.errors import DataError


def test_find_patient_dirs_ignores_strays(kaggle):
    dirs = find_patient_dirs(kaggle.root)
    assert [d.name for d in dirs] == ["PAT_A_2001", "PAT_B_2002", "PAT_C_2003"]


@pytest.mark.parametrize("wrap", [("kaggle_3m",), ("lgg-mri-segmentation", "kaggle_3m")])
def test_find_patient_dirs_accepts_the_download_folder(make_kaggle, tmp_path, wrap):
    data = make_kaggle(name=os.path.join("download", *wrap), patients={"PAT_Z_1": 2})
    assert find_patient_dirs(tmp_path / "download") == [data.root / "PAT_Z_1"]


def test_find_patient_dirs_accepts_a_single_patient_folder(kaggle):
    pdir = kaggle.root / "PAT_B_2002"
    assert find_patient_dirs(pdir) == [pdir]


def test_slices_are_in_numeric_order(kaggle):
    files = list_slices(kaggle.root / "PAT_A_2001")
    assert [f.number for f in files] == list(range(1, 13))  # string order: 1, 10, 11, 12, 2
    assert [f.image.name for f in files][:3] == ["PAT_A_2001_1.tif", "PAT_A_2001_2.tif",
                                                 "PAT_A_2001_3.tif"]
    assert all(f.mask.name == f"PAT_A_2001_{f.number}_mask.tif" for f in files)


def test_read_patient_returns_what_was_written_in_order(kaggle):
    numbers, images, masks = read_patient(kaggle.root / "PAT_A_2001")
    assert numbers == list(range(1, 13))
    assert images.dtype == np.uint8 and images.shape == (12, 32, 32, 3)
    assert masks.dtype == np.uint8 and masks.shape == (12, 32, 32)
    assert np.array_equal(images, kaggle.images["PAT_A_2001"])
    assert np.array_equal(masks, kaggle.masks["PAT_A_2001"])
    assert set(np.unique(masks)) == {0, 1}


@pytest.mark.parametrize("size", [(48, 40), (17, 256), (300, 300)])
def test_non_256_sizes_are_accepted(make_kaggle, size):
    data = make_kaggle(patients={"PAT_S_1": 3}, size=size, strays=False)
    numbers, images, masks = read_patient(data.root / "PAT_S_1")
    assert images.shape == (3, *size, 3) and masks.shape == (3, *size)
    assert np.array_equal(images, data.images["PAT_S_1"])


def test_png_slices_are_read(tmp_path):
    pdir = tmp_path / "PAT_P_1"
    pdir.mkdir()
    img = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    Image.fromarray(img).save(pdir / "PAT_P_1_1.png")
    Image.fromarray(np.full((4, 5), 255, np.uint8)).save(pdir / "PAT_P_1_1_mask.png")
    numbers, images, masks = read_patient(pdir)
    assert numbers == [1] and np.array_equal(images[0], img) and masks.sum() == 20


def test_metadata_from_data_csv(kaggle):
    meta = read_metadata(kaggle.root)
    assert sorted(meta) == ["PAT_A_2001", "PAT_B_2002", "PAT_C_2003"]
    assert meta["PAT_B_2002"]["RNASeqCluster"] == "2"
    assert meta["PAT_C_2003"]["age_at_initial_pathologic"] == "42"


def test_metadata_absent_is_empty(make_kaggle):
    data = make_kaggle(patients={"PAT_Z_1": 1})
    (data.root / "data.csv").unlink()
    assert read_metadata(data.root) == {}


def test_unlabelled_folder_without_masks(make_kaggle):
    data = make_kaggle(patients={"PAT_U_1": 3}, strays=False)
    for n in (1, 2, 3):
        data.mask_path("PAT_U_1", n).unlink()
    numbers, images, masks = read_patient(data.root / "PAT_U_1", require_masks=False)
    assert numbers == [1, 2, 3] and masks is None
    assert np.array_equal(images, data.images["PAT_U_1"])


# ------------------------------------------------------------------------------ errors


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about truncated files too
        fn(*args, **kwargs)
    return str(info.value)


def test_image_without_mask(kaggle):
    kaggle.mask_path("PAT_B_2002", 4).unlink()
    msg = error_of(read_patient, kaggle.root / "PAT_B_2002")
    assert str(kaggle.image_path("PAT_B_2002", 4)) in msg
    assert "image without its mask PAT_B_2002_4_mask.tif" in msg


def test_mask_without_image(kaggle):
    kaggle.image_path("PAT_B_2002", 3).unlink()
    msg = error_of(list_slices, kaggle.root / "PAT_B_2002")
    assert str(kaggle.mask_path("PAT_B_2002", 3)) in msg
    assert "mask without its image PAT_B_2002_3.tif" in msg
    # Not even unlabelled reading accepts an orphan mask.
    error_of(list_slices, kaggle.root / "PAT_B_2002", require_masks=False)


def test_two_files_for_one_slice(kaggle):
    write_rgb(kaggle.root / "PAT_B_2002" / "PAT_B_2002_2.tiff", kaggle.images["PAT_B_2002"][1])
    msg = error_of(list_slices, kaggle.root / "PAT_B_2002")
    assert "two files for slice 2" in msg and "PAT_B_2002_2.tiff" in msg


@pytest.mark.parametrize("keep", [0.5, 0.95, 0.02])
def test_truncated_tiff(kaggle, keep):
    path = kaggle.image_path("PAT_C_2003", 2)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    msg = error_of(read_patient, kaggle.root / "PAT_C_2003")
    assert str(path) in msg and "unreadable or truncated image" in msg


def test_truncated_mask(kaggle):
    path = kaggle.mask_path("PAT_C_2003", 5)
    path.write_bytes(path.read_bytes()[:-40])
    msg = error_of(read_patient, kaggle.root / "PAT_C_2003")
    assert str(path) in msg and "unreadable or truncated image" in msg


def test_non_image_file_named_like_a_slice(kaggle):
    path = kaggle.root / "PAT_C_2003" / "PAT_C_2003_6.tif"
    path.write_text("this is not a TIFF\n")
    write_mask(kaggle.mask_path("PAT_C_2003", 6), np.zeros((32, 32)))
    msg = error_of(read_patient, kaggle.root / "PAT_C_2003")
    assert str(path) in msg and "unreadable or truncated image" in msg


TO_8_BIT = ("rescale each sequence linearly to 0-255 with one scale for all slices of the volume, "
            "e.g. numpy: (x * 255.0 / x.max()).astype('uint8'), and save 8-bit")


@pytest.mark.parametrize(
    ("array", "mode", "depth"),
    [(np.full((32, 32), 1000, dtype=np.uint16), "I;16", "16-bit"),
     (np.full((32, 32), 0.5, dtype=np.float32), "F", "32-bit float")],
)
def test_other_bit_depths_say_how_to_convert(kaggle, array, mode, depth):
    path = kaggle.image_path("PAT_B_2002", 2)
    Image.fromarray(array).save(path)
    assert Image.open(path).mode == mode
    msg = error_of(read_patient, kaggle.root / "PAT_B_2002")
    assert msg == f"{path}: {depth} pixels (mode {mode}), expected 8-bit (uint8); {TO_8_BIT}"


def test_16_bit_label_map_mask_is_read_any_non_zero_as_tumour(kaggle):
    path = kaggle.mask_path("PAT_B_2002", 2)
    labels = np.zeros((32, 32), dtype=np.uint16)
    labels[3, 4], labels[5, 6], labels[7, 8] = 1, 2, 65535
    Image.fromarray(labels).save(path)
    assert Image.open(path).mode.startswith("I;16")
    _, _, masks = read_patient(kaggle.root / "PAT_B_2002")
    assert np.array_equal(masks[1], (labels != 0).astype(np.uint8))


def test_float_mask_is_refused(kaggle):
    path = kaggle.mask_path("PAT_B_2002", 2)
    Image.fromarray(np.full((32, 32), 0.5, dtype=np.float32)).save(path)
    msg = error_of(read_patient, kaggle.root / "PAT_B_2002")
    assert msg == (f"{path}: expected a grey mask (8- or 16-bit, or RGB), got mode F; save masks as 8-bit grey "
                   "images, 0 for background and 255 (any non-zero value) for tumour")


def test_wrong_channel_count(kaggle):
    path = kaggle.image_path("PAT_B_2002", 5)
    Image.fromarray(np.zeros((32, 32, 4), np.uint8)).save(path)
    msg = error_of(read_patient, kaggle.root / "PAT_B_2002")
    assert msg == (f"{path}: expected 3 channels (pre-contrast, FLAIR, post-contrast) or FLAIR alone, got 4 "
                   "(mode RGBA); save the three sequences as the channels of an 8-bit RGB image")


def test_single_channel_slices_are_flair_copied_into_every_channel(kaggle):
    path = kaggle.image_path("PAT_B_2002", 5)
    grey = np.arange(32 * 32, dtype=np.uint32).reshape(32, 32).astype(np.uint8)
    Image.fromarray(grey).save(path)
    with pytest.warns(UserWarning, match=r"1 of 5 slices have one channel; read as FLAIR"):
        _, images, _ = read_patient(kaggle.root / "PAT_B_2002")
    assert all(np.array_equal(images[4, ..., c], grey) for c in range(3))
    assert np.array_equal(read_image(path), np.repeat(grey[..., None], 3, axis=2))


def test_palette_image_is_named_as_such(kaggle):
    path = kaggle.image_path("PAT_B_2002", 5).with_suffix(".png")
    kaggle.image_path("PAT_B_2002", 5).unlink()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).convert("P").save(path)
    msg = error_of(read_patient, kaggle.root / "PAT_B_2002")
    assert msg == (f"{path}: a palette image (mode P), not an MRI slice; save the three sequences "
                   "(pre-contrast, FLAIR, post-contrast) as the channels of an 8-bit RGB image")


def test_rgb_masks_grey_or_coloured_are_read_and_rgba_is_refused(kaggle):
    path = kaggle.mask_path("PAT_B_2002", 1)
    grey = np.zeros((32, 32, 3), np.uint8)
    grey[2:5, 3:9] = 255
    write_rgb(path, grey)
    assert np.array_equal(read_mask(path), grey[..., 0] // 255)
    green = np.zeros((32, 32, 3), np.uint8)
    green[2:5, 3:9, 1] = 200  # a label drawn in green on black
    write_rgb(path, green)
    assert np.array_equal(read_mask(path), grey[..., 0] // 255)
    Image.fromarray(np.zeros((32, 32, 4), np.uint8)).save(path)
    assert error_of(read_mask, path).startswith(f"{path}: expected a grey mask (8- or 16-bit, or RGB), got mode RGBA")


def test_slices_of_different_sizes(kaggle):
    path = kaggle.image_path("PAT_B_2002", 3)
    write_rgb(path, np.zeros((32, 40, 3), np.uint8))
    write_mask(kaggle.mask_path("PAT_B_2002", 3), np.zeros((32, 40)))
    msg = error_of(read_patient, kaggle.root / "PAT_B_2002")
    assert str(path) in msg and "size 40x32 differs from 32x32" in msg


def test_mask_of_other_size_than_image(kaggle):
    path = kaggle.mask_path("PAT_B_2002", 3)
    write_mask(path, np.zeros((16, 32)))
    msg = error_of(read_patient, kaggle.root / "PAT_B_2002")
    assert str(path) in msg and "size 32x16 differs from its image 32x32" in msg


def test_empty_folder(tmp_path):
    empty = tmp_path / "kaggle_3m"
    empty.mkdir()
    msg = error_of(find_patient_dirs, empty)
    assert str(empty) in msg and "holds no patient folder" in msg


def test_folder_with_only_strays(tmp_path):
    root = tmp_path / "kaggle_3m"
    (root / "docs").mkdir(parents=True)
    (root / "README.md").write_text("x")
    (root / "docs" / ".PAT_1_1.tif").write_text("hidden")
    msg = error_of(find_patient_dirs, root)
    assert "holds no patient folder" in msg


def test_empty_patient_folder(tmp_path):
    pdir = tmp_path / "PAT_E_1"
    pdir.mkdir()
    (pdir / "README.md").write_text("x")
    msg = error_of(list_slices, pdir)
    assert str(pdir) in msg and "holds no slice files" in msg


def test_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "nowhere"
    msg = error_of(find_patient_dirs, missing)
    assert msg.startswith(f"data folder {missing} does not exist")
    msg = error_of(list_slices, missing)
    assert msg == f"patient folder {missing} does not exist"


def test_file_instead_of_folder(tmp_path):
    path = tmp_path / "kaggle_3m.zip"
    path.write_bytes(b"PK")
    msg = error_of(find_patient_dirs, path)
    assert msg == f"{path} is a file; pass the kaggle_3m folder"


#END
