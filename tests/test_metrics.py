"""Metrics: counts, ratios, the empty-mask rule, HD95, per-patient
aggregation. Every expected value is worked out by hand in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tumorseg.errors import TumorsegError
from tumorseg.metrics import (
    Counts,
    confusion_counts,
    dice_from_counts,
    hd95,
    iou_from_counts,
    nanmean,
    precision_from_counts,
    recall_from_counts,
    score_patient,
    slice_scores,
)


def a(rows) -> np.ndarray:
    return np.array(rows, dtype=bool)


def test_confusion_counts_by_hand():
    pred = a([[1, 1, 0], [0, 1, 0]])
    truth = a([[1, 0, 0], [1, 1, 1]])
    # TP: (0,0), (1,1); FP: (0,1); FN: (1,0), (1,2); TN: (0,2)
    assert confusion_counts(pred, truth) == Counts(tp=2, fp=1, fn=2, tn=1)


def test_counts_accept_0_1_integers_and_add():
    c = confusion_counts(np.array([0, 1, 1, 0], np.uint8), np.array([1, 1, 0, 0], np.uint8))
    assert c == Counts(1, 1, 1, 1)
    assert c + Counts(2, 0, 3, 4) == Counts(3, 1, 4, 5)


def test_counts_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(2, 2\) vs \(2, 3\)"):
        confusion_counts(np.zeros((2, 2)), np.zeros((2, 3)))


@pytest.mark.parametrize(
    "c, dice, iou, precision, recall",
    [
        # 2*2/(4+1+2) = 4/7; 2/5; 2/3; 2/4
        (Counts(2, 1, 2), 4 / 7, 2 / 5, 2 / 3, 1 / 2),
        (Counts(5, 0, 0), 1.0, 1.0, 1.0, 1.0),
        # no overlap: all 0
        (Counts(0, 3, 4), 0.0, 0.0, 0.0, 0.0),
        # 2*3/(6+0+3) = 2/3; 3/6; 3/3; 3/6
        (Counts(3, 0, 3), 2 / 3, 1 / 2, 1.0, 1 / 2),
        # both empty (only TN): everything 1 by the rule
        (Counts(0, 0, 0, 100), 1.0, 1.0, 1.0, 1.0),
        # truth empty, something predicted: Dice/IoU/precision 0, recall 0
        (Counts(0, 4, 0, 10), 0.0, 0.0, 0.0, 0.0),
        # nothing predicted, truth not empty: precision 0, recall 0
        (Counts(0, 0, 4, 10), 0.0, 0.0, 0.0, 0.0),
    ],
)
def test_ratios_from_counts(c, dice, iou, precision, recall):
    assert dice_from_counts(c) == pytest.approx(dice)
    assert iou_from_counts(c) == pytest.approx(iou)
    assert precision_from_counts(c) == pytest.approx(precision)
    assert recall_from_counts(c) == pytest.approx(recall)


def test_empty_both_scores_one_and_hd95_zero():
    empty = np.zeros((2, 6, 6), dtype=bool)
    s = score_patient("P", empty, empty)
    assert (s.dice, s.iou, s.precision, s.recall, s.hd95) == (1.0, 1.0, 1.0, 1.0, 0.0)
    assert (s.slices, s.true_voxels, s.pred_voxels) == (2, 0, 0)


@pytest.mark.parametrize("empty_side", ["pred", "truth"])
def test_one_empty_scores_zero_and_hd95_nan(empty_side):
    full = np.zeros((1, 6, 6), dtype=bool)
    full[0, 2:4, 2:4] = True
    empty = np.zeros_like(full)
    pred, truth = (empty, full) if empty_side == "pred" else (full, empty)
    s = score_patient("P", pred, truth)
    assert s.dice == 0.0 and s.iou == 0.0
    assert math.isnan(s.hd95)
    assert math.isnan(hd95(pred, truth))


def squares(k: int, side: int = 4, size: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Truth: a side x side square at rows/cols 1..side; pred: the same moved k columns right."""
    truth = np.zeros((size, size), dtype=bool)
    truth[1 : 1 + side, 1 : 1 + side] = True
    pred = np.zeros_like(truth)
    pred[1 : 1 + side, 1 + k : 1 + side + k] = True
    return pred, truth


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_hd95_of_shifted_squares(k):
    # Surfaces (mask minus its 4-connected erosion) of a 4x4 square: its 12 border pixels.
    # Shift by k = 3 (truth cols 0..3, pred cols 3..6 in local coordinates), pred surface
    # to nearest truth surface: top row 0,1,2,3; bottom row 0,1,2,3; left col (rows 1,2)
    # 0,0; right col (rows 1,2) 3,3 -> {0:4, 1:2, 2:2, 3:4}; the same from the truth side.
    # 24 distances, 8 of them 3 at the top: the 95th percentile (index 21.85) is 3.
    # k = 1 gives {0: 12, 1: 12} -> 1; k = 2 gives {0: 8, 1: 8, 2: 8} -> 2; k = 0 -> 0.
    pred, truth = squares(k)
    assert hd95(pred, truth) == pytest.approx(float(k))
    assert hd95(truth, pred) == pytest.approx(float(k))


def test_hd95_is_a_percentile_not_the_maximum():
    # Truth: a 3x3 square (surface: 8 pixels). Pred: the same square plus one stray pixel
    # 10 columns right of the square's right edge. Distances: 16 zeros (8 each way) and
    # the stray pixel's 10. Sorted 17 values, 95th percentile at index 0.95*16 = 15.2:
    # 0 + 0.2 * (10 - 0) = 2.0 (the Hausdorff distance would be 10).
    truth = np.zeros((9, 20), dtype=bool)
    truth[3:6, 2:5] = True
    pred = truth.copy()
    pred[4, 14] = True
    assert hd95(pred, truth) == pytest.approx(2.0)
    # Spacing scales the distances: columns 3 mm apart -> 0.2 * 30 = 6.0.
    assert hd95(pred, truth, spacing=(1.0, 3.0)) == pytest.approx(6.0)
    # Rows' spacing does not matter for a purely horizontal offset.
    assert hd95(pred, truth, spacing=(7.0, 1.0)) == pytest.approx(2.0)


def test_hd95_spacing_scales_shifted_squares():
    pred, truth = squares(2)
    assert hd95(pred, truth, spacing=(2.0, 2.0)) == pytest.approx(4.0)


def test_hd95_in_3d_counts_slice_offsets():
    # Two 3x3x3 cubes, one shifted by 2 slices; slice spacing 5 -> a 2-slice shift is 10.
    truth = np.zeros((8, 5, 5), dtype=bool)
    truth[1:4, 1:4, 1:4] = True
    pred = np.zeros_like(truth)
    pred[3:6, 1:4, 1:4] = True
    # Surfaces: the 26 voxels around each centre. Pred slices 3, 4, 5 lie at 0, 1, 2
    # slices from truth's surface (9, 8 and 9 voxels), and the same from the truth side:
    # 52 distances {0: 18, 1: 16, 2: 18}; index 0.95*51 = 48.45 falls among the 2s.
    assert hd95(pred, truth) == pytest.approx(2.0)
    assert hd95(pred, truth, spacing=(5.0, 1.0, 1.0)) == pytest.approx(10.0)


def test_hd95_shape_mismatch():
    with pytest.raises(ValueError, match="shapes differ"):
        hd95(np.ones((3, 3)), np.ones((3, 4)))





def test_patient_dice_pools_counts_over_slices():
    # Slice 0: truth 1 pixel, predicted exactly -> slice Dice 1.
    # Slice 1: truth 3 pixels, 1 of them predicted -> slice Dice 2*1/(2+0+2) = 1/2.
    # Mean of slice Dice: 3/4. Per patient: TP 2, FP 0, FN 2 -> 4/6 = 2/3.
    truth = np.zeros((2, 4, 4), dtype=bool)
    pred = np.zeros_like(truth)
    truth[0, 0, 0] = pred[0, 0, 0] = True
    truth[1, 2, 0:3] = True
    pred[1, 2, 0] = True
    s = score_patient("PAT_X", pred, truth)
    assert s.patient == "PAT_X" and s.slices == 2
    assert s.dice == pytest.approx(2 / 3)
    assert s.iou == pytest.approx(2 / 4)
    assert s.precision == 1.0 and s.recall == pytest.approx(0.5)
    assert (s.true_voxels, s.pred_voxels) == (4, 2)
    dices, fp_slices, empty = slice_scores(pred, truth)
    assert dices == pytest.approx([1.0, 0.5])
    assert float(np.mean(dices)) == pytest.approx(0.75)  # not the per-patient 2/3
    assert (fp_slices, empty) == (0, 0)


def test_slice_scores_by_hand():
    truth = np.zeros((4, 3, 3), dtype=bool)
    pred = np.zeros_like(truth)
    # slice 0: empty truth, empty pred -> tumour-free, no FP
    # slice 1: empty truth, 1 predicted pixel -> tumour-free FP slice
    pred[1, 0, 0] = True
    # slice 2: truth 2 pixels, pred 2 pixels, 1 shared -> 2/(2+1+1) = 1/2
    truth[2, 0, 0:2] = True
    pred[2, 0, 1:3] = True
    # slice 3: truth 1 pixel, nothing predicted -> 0
    truth[3, 1, 1] = True
    dices, fp_slices, empty = slice_scores(pred, truth)
    assert dices == [0.5, 0.0]
    assert (fp_slices, empty) == (1, 2)


def test_slice_scores_length_mismatch():
    with pytest.raises(ValueError):
        slice_scores(np.zeros((2, 3, 3)), np.zeros((3, 3, 3)))


def test_nanmean_skips_nan():
    assert nanmean([1.0, math.nan, 3.0]) == 2.0
    assert math.isnan(nanmean([math.nan]))
    assert math.isnan(nanmean([]))


@pytest.mark.parametrize("spacing", [(-1.0, 1.0, 1.0), (0.0, 1.0, 1.0), (math.nan, 1.0, 1.0), (1.0, 1.0)])
def test_hd95_refuses_spacing_that_is_not_one_positive_step_per_axis(spacing):
    m = np.zeros((2, 4, 4), dtype=bool)
    with pytest.raises(ValueError, match="spacing must give one positive step per axis"):
        hd95(m, m, spacing)


def test_paired_comparison_by_hand():
    from tumorseg.metrics import paired_comparison

    base = {"a": 0.9, "b": 0.5, "c": 0.8, "d": 0.6, "e": 0.7, "f": 0.95}
    cand = {"a": 0.92, "b": 0.6, "c": 0.85, "d": 0.61, "e": 0.7, "f": 0.97}
    r = paired_comparison(base, cand, resamples=2000)
    assert r["patients"] == 6
    assert r["mean_difference"] == pytest.approx((0.02 + 0.1 + 0.05 + 0.01 + 0 + 0.02) / 6)
    assert r["median"] == {"baseline": pytest.approx(0.75), "candidate": pytest.approx(0.775)}
    assert (r["better"], r["worse"], r["same"]) == (5, 0, 1)
    assert r["sign_test_p"] == pytest.approx(2 * 0.5**5)  # 5 of 5 better: two-sided binomial
    lo, hi = r["bootstrap_ci95"]
    assert 0 <= lo < r["mean_difference"] < hi <= 0.1  # resampled means lie between the extremes
    assert r["below"] == {"baseline": ["b", "d"], "candidate": ["b", "d"]}
    assert [p["patient"] for p in r["per_patient"]] == list("abcdef")
    same = paired_comparison(base, base)
    assert same["bootstrap_ci95"] == [0.0, 0.0] and same["sign_test_p"] == 1.0 and same["same"] == 6


def test_paired_comparison_refuses_different_patients():
    from tumorseg.metrics import paired_comparison

    with pytest.raises(TumorsegError, match=r"different patients \(2 in one only, e.g. x, y\)"):
        paired_comparison({"a": 1.0, "x": 0.5}, {"a": 1.0, "y": 0.5})
    with pytest.raises(TumorsegError, match="no patients"):
        paired_comparison({}, {})
