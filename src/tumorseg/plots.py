"""Figures and overlays: training curves, Dice distributions, contour overlays.

Matplotlib is used through its object API only (`Figure` + the Agg canvas), imported
lazily inside the figure functions: importing this module never imports pyplot, never
touches rcParams or the backend, and `overlay()` works without matplotlib.
Every file is written atomically (a temporary file in the same folder, then os.replace).

Overlay colours: true contour green (0, 255, 0), predicted contour red (255, 0, 0); where
both lines cross, red (the prediction) is drawn last and wins.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from tumorseg.fileio import atomic_write

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

TRUTH_RGB = (0, 255, 0)
PRED_RGB = (255, 0, 0)
FLAIR_CHANNEL = 1  # raw kaggle_3m slices are (pre-contrast, FLAIR, post-contrast)
_CROSS = ndimage.generate_binary_structure(2, 1)
_DPI = 100


# --------------------------------------------------------------------------- files

def _save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=_DPI))


def _new_figure(figsize: tuple[float, float]) -> Figure:
    """A Figure with its own Agg canvas: no pyplot, no global state, works headless."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# --------------------------------------------------------------------------- overlays

def contour(mask: np.ndarray) -> np.ndarray:
    """Boundary bool (H, W) of a binary mask (H, W): the mask minus its erosion by the
    4-connected cross. Pixels on the image border count as boundary."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"expected a mask (H, W), got shape {m.shape}")
    return m & ~ndimage.binary_erosion(m, structure=_CROSS, border_value=0)


def _line(mask: np.ndarray) -> np.ndarray:
    """The drawn outline of a mask (H, W): its contour thickened outwards by one dilation
    (contour plus the pixels just outside it), 2 pixels wide; the interior stays visible."""
    m = np.asarray(mask, dtype=bool)
    return ndimage.binary_dilation(m, structure=_CROSS) & ~ndimage.binary_erosion(
        m, structure=_CROSS, border_value=0)


def display_image(image: np.ndarray) -> np.ndarray:
    """Grey display uint8 (H, W) of a slice.

    Args:
        image: uint8 (H, W, 3) raw kaggle_3m slice (the FLAIR channel 1 is shown),
            (H, W, 3) raw intensities of another type (NIfTI: FLAIR shown, scaled from its
            1st to its 99th percentile), uint8 (H, W) grey, or float (H, W) in [0, 1]
            (scaled by 255 and rounded).
    """
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[2] == 3 and img.dtype != np.uint8 and np.issubdtype(img.dtype, np.number):
        flair = img[:, :, FLAIR_CHANNEL].astype(np.float64)
        low, high = np.percentile(flair, [1, 99])
        scaled = np.clip((flair - low) / (high - low), 0.0, 1.0) if high > low else np.zeros_like(flair)
        return np.rint(scaled * 255.0).astype(np.uint8)
    if img.dtype == np.uint8:
        if img.ndim == 3 and img.shape[2] == 3:
            return img[:, :, FLAIR_CHANNEL].copy()
        if img.ndim == 2:
            return img.copy()
    elif np.issubdtype(img.dtype, np.floating) and img.ndim == 2:
        lo, hi = float(np.nanmin(img, initial=0.0)), float(np.nanmax(img, initial=0.0))
        if lo < 0.0 or hi > 1.0 or np.isnan(img).any():
            raise ValueError(f"float images must lie in [0, 1], got [{lo:.3g}, {hi:.3g}] "
                             "(or NaN); rescale or pass the raw uint8 slice")
        return np.rint(img * 255.0).astype(np.uint8)
    raise ValueError(f"expected (H, W, 3) raw intensities, uint8 (H, W) or float (H, W) in [0, 1], "
                     f"got {img.dtype} {img.shape}")


def overlay(image: np.ndarray, pred: np.ndarray | None,
            truth: np.ndarray | None = None) -> np.ndarray:
    """Contours of the prediction (red) and the truth (green) on a grey slice.

    Each contour is drawn 2 pixels wide (see `_line`: the mask's boundary plus the
    pixels just outside it); all other pixels keep the grey value. Where both lines
    cover a pixel it is red: the prediction is drawn last.

    Args:
        image: see `display_image`: (H, W, 3) raw slice (FLAIR shown), uint8 (H, W) or
            float (H, W) in [0, 1].
        pred, truth: binary masks (H, W), or None to leave that contour out.

    Returns:
        uint8 RGB (H, W, 3).
    """
    grey = display_image(image)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    for mask, colour, name in ((truth, TRUTH_RGB, "truth"), (pred, PRED_RGB, "pred")):
        if mask is None:
            continue
        m = np.asarray(mask)
        if m.shape != grey.shape:
            raise ValueError(f"{name} shape {m.shape} differs from the image's {grey.shape}")
        rgb[_line(m)] = colour
    return rgb


# --------------------------------------------------------------------------- figures

def _finite(values: Sequence[float] | np.ndarray) -> np.ndarray:
    arr = np.asarray(values, dtype=float).ravel()
    return arr[~np.isnan(arr)]


def plot_training_curves(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Loss (left) and validation per-patient Dice (right) per epoch, best epoch marked.

    Args:
        rows: one record per epoch with keys epoch, train_loss, val_loss, val_dice_mean and
            optionally val_dice_median (other keys such as lr are ignored). NaN values
            leave gaps. The best epoch is the first with the highest val_dice_mean.
        path: the PNG to write.

    Returns:
        `path` as a Path.

    Raises:
        ValueError: no rows, or a required key missing.
    """
    if not rows:
        raise ValueError("no epochs to plot; pass at least one row")
    required = ("epoch", "train_loss", "val_loss", "val_dice_mean")
    for i, row in enumerate(rows):
        missing = [k for k in required if k not in row]
        if missing:
            raise ValueError(f"row {i} lacks {', '.join(missing)}; each row needs {required}")

    def col(key: str) -> np.ndarray:
        return np.array([float(r.get(key, math.nan)) for r in rows])

    epochs = col("epoch")
    mean, median = col("val_dice_mean"), col("val_dice_median")
    few = len(rows) <= 40  # markers keep short runs (one epoch: no line at all) visible
    mk: dict[str, Any] = {"marker": "o", "markersize": 4} if few else {}

    fig = _new_figure((11.0, 4.2))
    ax_loss, ax_dice = fig.subplots(1, 2)
    ax_loss.plot(epochs, col("train_loss"), color="tab:blue", label="train", **mk)
    ax_loss.plot(epochs, col("val_loss"), color="tab:orange", label="validation", **mk)
    ax_loss.set(title="Loss", xlabel="epoch", ylabel="loss")
    ax_dice.plot(epochs, mean, color="tab:green", label="mean", **mk)
    if not np.isnan(median).all():
        ax_dice.plot(epochs, median, color="tab:purple", linestyle="--", label="median", **mk)
    ax_dice.set(title="Validation Dice (per patient)", xlabel="epoch", ylabel="Dice",
                ylim=(-0.02, 1.02))

    if not np.isnan(mean).all():
        b = int(np.nanargmax(mean))
        for ax in (ax_loss, ax_dice):
            ax.axvline(epochs[b], color="grey", linestyle=":", linewidth=1.2)
        ax_dice.plot([epochs[b]], [mean[b]], marker="*", markersize=14, color="gold",
                     markeredgecolor="black", linestyle="none",
                     label=f"best: epoch {epochs[b]:g}, mean {mean[b]:.3f}")

    for ax in (ax_loss, ax_dice):
        _integer_epochs(ax, epochs)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=9)
    try:
        return _save_figure(fig, path)
    finally:
        fig.clear()


def _integer_epochs(ax: Axes, epochs: np.ndarray) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if epochs.size == 1:  # matplotlib would span e.g. 0.94..1.06 around a single epoch
        ax.set_xlim(epochs[0] - 1, epochs[0] + 1)


def plot_dice_distribution(dices: Mapping[str, float] | Sequence[float],
                           path: str | os.PathLike[str],
                           title: str = "Per-patient Dice") -> Path:
    """Histogram (top) and box plot with every value as a dot (bottom) of Dice scores,
    with the mean and the median marked and given in the legend with the count.

    Args:
        dices: {patient: Dice} or a list of Dice values in [0, 1]; NaNs are left out.
        path: the PNG to write.
        title: the figure title; the number of values (NaNs left out) heads the legend.

    Returns:
        `path` as a Path.

    Raises:
        ValueError: no finite value, or a value outside [0, 1].
    """
    values = _finite(list(dices.values()) if isinstance(dices, Mapping) else dices)
    if values.size == 0:
        raise ValueError("no finite Dice values to plot")
    if values.min() < -1e-6 or values.max() > 1 + 1e-6:
        raise ValueError(f"Dice values must lie in [0, 1], got [{values.min():.4g}, "
                         f"{values.max():.4g}]")
    values = np.clip(values, 0.0, 1.0)
    mean, median = float(values.mean()), float(np.median(values))

    fig = _new_figure((7.5, 5.0))
    ax_hist, ax_box = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    ax_hist.hist(values, bins=np.linspace(0.0, 1.0, 21), color="tab:blue", alpha=0.75,
                 edgecolor="white")
    ax_hist.set(ylabel="count", title=title)
    ax_hist.yaxis.get_major_locator().set_params(integer=True)

    _draw_box(ax_box, values)
    # Local generator: the jitter is reproducible and no global RNG is touched.
    jitter = np.random.default_rng(0).uniform(-0.18, 0.18, values.size)
    ax_box.scatter(values, 1 + jitter, s=12, color="tab:blue", alpha=0.6, zorder=3)
    ax_box.set(yticks=[], xlabel="Dice", xlim=(-0.02, 1.02), ylim=(0.5, 1.5))

    for ax in (ax_hist, ax_box):
        ax.axvline(mean, color="tab:red", linewidth=1.5,
                   label=f"mean {mean:.3f}" if ax is ax_hist else None)
        ax.axvline(median, color="tab:orange", linestyle="--", linewidth=1.5,
                   label=f"median {median:.3f}" if ax is ax_hist else None)
        ax.grid(True, axis="x", alpha=0.3)
    ax_hist.legend(loc="upper left", fontsize=9, title=f"n = {values.size}", title_fontsize=9)
    try:
        return _save_figure(fig, path)
    finally:
        fig.clear()


def _draw_box(ax: Axes, values: np.ndarray) -> None:
    """A horizontal box at y = 1: quartiles, whiskers to the furthest values within 1.5 IQR.

    Drawn by hand because Axes.boxplot reads every rcParam, which makes matplotlib
    resolve its backend and import pyplot.
    """
    from matplotlib.patches import Rectangle

    q1, q3 = np.percentile(values, [25, 75])
    lo = values[values >= q1 - 1.5 * (q3 - q1)].min()
    hi = values[values <= q3 + 1.5 * (q3 - q1)].max()
    ax.add_patch(Rectangle((q1, 0.7), q3 - q1, 0.6, facecolor="tab:blue", alpha=0.15,
                           edgecolor="black", linewidth=1.2, zorder=2))
    ax.hlines([1.0, 1.0], [lo, q3], [q1, hi], color="black", linewidth=1.2, zorder=2)
    ax.vlines([lo, hi], 0.85, 1.15, color="black", linewidth=1.2, zorder=2)


def plot_examples(examples: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
                  path: str | os.PathLike[str], ncols: int = 4) -> Path:
    """A grid of `overlay()` images with titles and a colour legend.

    Args:
        examples: (title, image, truth, pred) per panel: the title given by the caller
            (e.g. "TCGA_CS_4944 slice 12, Dice 0.91"), image a uint8 (H, W, 3) raw slice
            (or any `display_image` input), truth and pred binary (H, W).
        path: the PNG to write.
        ncols: panels per row (fewer when there are fewer examples).

    Returns:
        `path` as a Path.

    Raises:
        ValueError: no examples, ncols < 1, or shapes that do not match.
    """
    if not examples:
        raise ValueError("no examples to plot")
    if ncols < 1:
        raise ValueError(f"ncols must be at least 1, got {ncols}")
    from matplotlib.lines import Line2D

    ncols = min(ncols, len(examples))
    nrows = math.ceil(len(examples) / ncols)
    fig = _new_figure((3.2 * ncols, 3.3 * nrows + 0.4))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, (name, image, truth, pred) in zip(axes, examples, strict=False):
        ax.imshow(overlay(image, pred, truth), interpolation="nearest")
        ax.set_title(name, fontsize=9, wrap=True)
    for ax in axes:
        ax.set_axis_off()
    handles = [Line2D([], [], color=np.array(TRUTH_RGB) / 255, linewidth=3, label="truth"),
               Line2D([], [], color=np.array(PRED_RGB) / 255, linewidth=3, label="prediction")]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=10,
               frameon=False)
    try:
        return _save_figure(fig, path)
    finally:
        fig.clear()
