"""data.slices: the slice reader and writer shared by the data and prediction paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tumorseg.data.slices import read_image, read_mask, read_volume, slice_images, write_image, write_mask
from tumorseg.errors import DataError

SQUARE = np.zeros((8, 8), dtype=bool)
SQUARE[2:6, 3:7] = True


def error_of(fn, *args) -> str:
    with pytest.raises(DataError) as info:
        fn(*args)
    return str(info.value)


def test_read_mask_any_non_zero_pixel_is_tumour(tmp_path):
    path = tmp_path / "m_1_mask.tif"
    Image.fromarray(np.array([[0, 1, 2, 127, 128, 255]], dtype=np.uint8)).save(path)
    assert read_mask(path).tolist() == [[0, 1, 1, 1, 1, 1]]


def test_read_mask_accepts_1_bit(tmp_path):
    path = tmp_path / "m_1_mask.tif"
    Image.fromarray(np.array([[0, 255, 255, 0]], dtype=np.uint8)).convert("1").save(path)
    assert read_mask(path).tolist() == [[0, 1, 1, 0]]


def test_read_image_of_missing_file(tmp_path):
    msg = error_of(read_image, tmp_path / "PAT_1_1.tif")
    assert str(tmp_path / "PAT_1_1.tif") in msg


def test_write_png_and_mask_png_round_trip(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    write_image(tmp_path / "rgb" / "a.png", rgb)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "rgb" / "a.png")), rgb)
    assert sorted(p.name for p in (tmp_path / "rgb").iterdir()) == ["a.png"]

    write_mask(tmp_path / "m.png", SQUARE)
    m = Image.open(tmp_path / "m.png")
    assert m.mode == "L"
    np.testing.assert_array_equal(np.asarray(m), np.where(SQUARE, 255, 0))


def test_write_png_rejects_float(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        write_image(tmp_path / "x.png", np.zeros((4, 4, 3)))
    assert list(tmp_path.iterdir()) == []


def test_slice_images_in_numeric_order_without_masks_outputs_or_hidden_files(tmp_path):
    for name in ["s_10.tif", "s_2.tif", "s_1.png", "s_2_mask.tif", "s_3_pred.png", "s_4_overlay.png",
                 ".s_5.tif", "notes.txt", "extra.tif"]:
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in slice_images(tmp_path)] == ["s_1.png", "s_2.tif", "s_10.tif", "extra.tif"]


def test_read_volume_stacks_in_order_and_rejects_mixed_sizes(tmp_path):
    a = np.full((4, 5, 3), 7, np.uint8)
    b = np.full((4, 5, 3), 9, np.uint8)
    Image.fromarray(a).save(tmp_path / "v_1.tif")
    Image.fromarray(b).save(tmp_path / "v_2.tif")
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "v_3.tif")
    vol = read_volume([tmp_path / "v_2.tif", tmp_path / "v_1.tif"], "v")
    assert vol.shape == (2, 4, 5, 3) and vol[0, 0, 0, 0] == 9 and vol[1, 0, 0, 0] == 7
    msg = error_of(read_volume, [tmp_path / "v_1.tif", tmp_path / "v_3.tif"], "v")
    assert msg.startswith(f"{tmp_path / 'v_3.tif'}: size 5x5 differs from 5x4 of the other slices of v")


def _write_volume(folder: Path, volume: np.ndarray) -> list[Path]:
    folder.mkdir()
    files = []
    for i, img in enumerate(volume, start=1):
        Image.fromarray(img).save(folder / f"v_{i}.tif")
        files.append(folder / f"v_{i}.tif")
    return files


def test_a_sequence_missing_from_a_volume_is_filled_with_flair_and_warned(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.integers(0, 255, (3, 6, 6, 3), dtype=np.uint8)
    vol[..., 0] = 0  # pre-contrast missing, filled with zeros by another tool
    files = _write_volume(tmp_path / "v", vol)
    with pytest.warns(UserWarning, match="P1: pre-contrast constant over all 3 slices .* filled with FLAIR"):
        out = read_volume(files, "P1")
    assert np.array_equal(out[..., 0], vol[..., 1]) and np.array_equal(out[..., 1:], vol[..., 1:])


def test_one_slice_may_lack_a_sequence(tmp_path, recwarn):
    img = np.random.default_rng(1).integers(0, 255, (1, 6, 6, 3), dtype=np.uint8)
    img[..., 2] = 0  # the top of the head: no post-contrast signal on this slice
    files = _write_volume(tmp_path / "one", img)
    assert np.array_equal(read_volume(files, "one"), img)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
