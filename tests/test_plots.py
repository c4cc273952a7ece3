"""Figures write valid PNGs atomically; overlay() and contour() are pixel-exact."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tumorseg.plots import (
    contour,
    overlay,
    plot_dice_distribution,
    plot_examples,
    plot_training_curves,
)


def _grid(text: str) -> np.ndarray:
    """Bool (H, W) from rows of '#' (True) and '.' (False)."""
    return np.array([[c == "#" for c in row] for row in text.split()], dtype=bool)


def _check_png(path: Path, min_w: int = 300, min_h: int = 200) -> Image.Image:
    """`path` is a valid PNG of at least min_w x min_h and no temporary file is left."""
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as img:
        img.verify()
    img = Image.open(path)
    assert img.format == "PNG"
    assert img.width >= min_w and img.height >= min_h
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    return img


def _rows(n: int, median: bool = True) -> list[dict[str, float]]:
    rows = []
    for e in range(1, n + 1):
        row = {"epoch": e, "train_loss": 1 / e, "val_loss": 1.1 / e + 0.02 * (e > 6),
               "val_dice_mean": 0.9 - 0.8 / e - 0.02 * (e > 6), "lr": 1e-4, "seconds": 3.0}
        if median:
            row["val_dice_median"] = row["val_dice_mean"] + 0.03
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- contour

@pytest.mark.parametrize("mask, expected", [
    ("..... .###. .###. .###. .....",
     "..... .###. .#.#. .###. ....."),
    # On the image border: pixels outside count as background, so the border is contour.
    ("##### ##### ##### ##### #####",
     "##### #...# #...# #...# #####"),
    # Erosion by the 4-connected cross: a plus shape erodes to its centre.
    ("..... ..#.. .###. ..#.. .....",
     "..... ..#.. .#.#. ..#.. ....."),
    ("..... ..... ..... ..... .....",
     "..... ..... ..... ..... ....."),
])
def test_contour_exact(mask: str, expected: str) -> None:
    np.testing.assert_array_equal(contour(_grid(mask)), _grid(expected))


def test_contour_rejects_non_2d() -> None:
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        contour(np.zeros((2, 5, 5), bool))


# --------------------------------------------------------------------------- overlay

SQUARE = _grid("""
........
........
..####..
..####..
..####..
..####..
........
........""")
# The drawn line: the square's contour plus the pixels just outside (cross dilation).
SQUARE_LINE = _grid("""
........
..####..
.######.
.##..##.
.##..##.
.######.
..####..
........""")


def test_overlay_truth_is_green_and_rest_keeps_grey() -> None:
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    out = overlay(grey, None, SQUARE)
    assert out.dtype == np.uint8 and out.shape == (8, 8, 3)
    assert (out[SQUARE_LINE] == (0, 255, 0)).all()
    for c in range(3):  # the interior and the outside keep their grey value
        np.testing.assert_array_equal(out[~SQUARE_LINE, c], grey[~SQUARE_LINE])


def test_overlay_pred_red_and_red_wins_where_both() -> None:
    grey = np.full((8, 8), 100, np.uint8)
    pred = np.roll(SQUARE, 1, axis=1)  # the same square one pixel to the right
    pred_line = np.roll(SQUARE_LINE, 1, axis=1)
    out = overlay(grey, pred, SQUARE)
    assert (out[pred_line] == (255, 0, 0)).all()  # including where both lines cover
    assert (out[SQUARE_LINE & ~pred_line] == (0, 255, 0)).all()
    assert (out[~SQUARE_LINE & ~pred_line] == 100).all()
    assert (SQUARE_LINE & pred_line).any() and (SQUARE_LINE & ~pred_line).any()


def test_overlay_raw_slice_shows_flair_channel() -> None:
    raw = np.zeros((8, 8, 3), np.uint8)
    raw[..., 0], raw[..., 1], raw[..., 2] = 10, 77, 200
    out = overlay(raw, np.zeros((8, 8), bool))
    assert (out == 77).all()


def test_overlay_float_image_scaled() -> None:
    img = np.array([[0.0, 1.0], [0.5, 0.2]])
    out = overlay(img, None)
    np.testing.assert_array_equal(out[..., 0], [[0, 255], [128, 51]])
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


@pytest.mark.parametrize("image, pred, match", [
    (np.zeros((8, 8), np.uint8), np.zeros((8, 7), bool), "pred shape"),
    (np.zeros((8, 8), np.float32) + 2.0, None, r"\[0, 1\]"),
    (np.zeros((8, 8), np.int64), None, r"expected \(H, W, 3\) raw intensities, uint8 \(H, W\)"),
    (np.zeros((3, 8, 8), np.uint8), None, r"expected \(H, W, 3\) raw intensities"),
])
def test_overlay_bad_input(image: np.ndarray, pred: np.ndarray | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        overlay(image, pred)


# --------------------------------------------------------------------------- figures

@pytest.mark.parametrize("n, median", [(12, True), (1, True), (3, False)])
def test_training_curves(tmp_path: Path, n: int, median: bool) -> None:
    out = plot_training_curves(_rows(n, median), tmp_path / "curves.png")
    assert out == tmp_path / "curves.png"
    _check_png(out, 800, 300)


def test_training_curves_bad_rows(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one row"):
        plot_training_curves([], tmp_path / "c.png")
    with pytest.raises(ValueError, match="row 1 lacks val_loss"):
        plot_training_curves([_rows(1)[0], {"epoch": 2, "train_loss": 0.5,
                                            "val_dice_mean": 0.5}], tmp_path / "c.png")


def test_dice_distribution(tmp_path: Path) -> None:
    dices = {f"P{i:02d}": float(v) for i, v in
             enumerate(np.random.default_rng(1).beta(8, 2, size=22))}
    dices["P99"] = 0.0
    _check_png(plot_dice_distribution(dices, tmp_path / "dist.png"), 500, 350)


def test_dice_distribution_ignores_nan(tmp_path: Path) -> None:
    values = [0.91, 0.85, 0.0, 0.77, 1.0]
    plot_dice_distribution(values, tmp_path / "a" / "clean.png")
    plot_dice_distribution([math.nan, *values[:2], math.nan, *values[2:]],
                           tmp_path / "b" / "nan.png")
    _check_png(tmp_path / "b" / "nan.png")
    a = np.asarray(Image.open(tmp_path / "a" / "clean.png"))
    b = np.asarray(Image.open(tmp_path / "b" / "nan.png"))
    np.testing.assert_array_equal(a, b)  # the NaNs change nothing, not even the count


@pytest.mark.parametrize("values, match", [([math.nan, math.nan], "no finite"),
                                           ([0.5, 1.5], r"\[0, 1\]")])
def test_dice_distribution_bad_values(tmp_path: Path, values: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plot_dice_distribution(values, tmp_path / "d.png")
    assert list(tmp_path.iterdir()) == []


def _example(i: int) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:64, :64]
    raw = np.stack([xx * 2, (xx + yy) * 2, yy * 2], axis=-1).astype(np.uint8)
    truth = (yy - 32) ** 2 + (xx - 30) ** 2 < 12**2
    pred = (yy - 34) ** 2 + (xx - 30 - i) ** 2 < 11**2
    return f"TCGA_CS_{4941 + i}_19960909 slice {12 + i}, Dice 0.9{i}", raw, truth, pred


@pytest.mark.parametrize("n, ncols, size", [(5, 4, (1000, 500)), (1, 4, (250, 250))])
def test_examples(tmp_path: Path, n: int, ncols: int, size: tuple[int, int]) -> None:
    out = plot_examples([_example(i) for i in range(n)], tmp_path / "ex.png", ncols=ncols)
    _check_png(out, *size)


def test_examples_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no examples"):
        plot_examples([], tmp_path / "ex.png")
    with pytest.raises(ValueError, match="ncols"):
        plot_examples([_example(0)], tmp_path / "ex.png", ncols=0)


# --------------------------------------------------------------------------- side effects

@pytest.mark.slow
def test_no_pyplot_and_no_global_matplotlib_state(tmp_path: Path) -> None:
    code = f"""
import sys
import tumorseg.plots as plots
assert "matplotlib" not in sys.modules, "importing tumorseg.plots loaded matplotlib"
import matplotlib
before = matplotlib.rcParams.copy()  # copy(): dict() would resolve the backend
plots.plot_training_curves([{{"epoch": 1, "train_loss": 1.0, "val_loss": 1.0,
                             "val_dice_mean": 0.5}}], {str(tmp_path / "c.png")!r})
plots.plot_dice_distribution([0.5, 0.7], {str(tmp_path / "d.png")!r})
assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
assert matplotlib.rcParams.copy() == before, "rcParams changed"
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
