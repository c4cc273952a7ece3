"""`evaluate` from Python with models whose output is known, so that every score in the
report can be computed by hand from the synthetic masks."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import write_rgb
from torch import nn

from tumorseg.config import CHANNELS, InferenceConfig
from tumorseg.data import prepare
from tumorseg.errors import ConfigError, TumorsegError
from tumorseg.evaluation import EMPTY_MASK_RULE, PATIENT_FIELDS, check_spacing, evaluate
from tumorseg.inference import Predictor

PIXELS = 32 * 32  # per slice of the synthetic data

POSTPROCESS_ERROR = ("postprocess must be none, lcc, top_mass, min_size:N (N >= 1) or confident:P (0 < P < 1), "
                     "got 'biggest'")


class Constant(nn.Module):
    """The same logit everywhere: +10 = all tumour, -10 = nothing."""

    def __init__(self, logit: float):
        super().__init__()
        self.logit = logit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 1, *x.shape[-2:]), self.logit)


class FlairThreshold(nn.Module):
    """Logit +10 where the normalised FLAIR channel is above 0.5, else -10; counts its calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.where(x[:, 1:2] > 0.5, 10.0, -10.0)


def make_predictor(*models: nn.Module, **kwargs) -> Predictor:
    return Predictor(list(models), fuse=False, precision="fp32", device="cpu", **kwargs)


def flair_predictor(model: nn.Module | None = None, **kwargs) -> Predictor:
    """Percentiles 0 and 100 are the volume's min and max: a 0/255 FLAIR normalises to 0/1,
    so `FlairThreshold` predicts exactly the pixels that are 255 in the FLAIR channel."""
    return make_predictor(model or FlairThreshold(), percentiles=(0.0, 100.0), **kwargs)


def paint_flair(kaggle, patient: str, mask: np.ndarray) -> None:
    """Rewrite the image slices of `patient` with FLAIR = 255 where `mask`, else 0."""
    for i, n in enumerate(kaggle.slices[patient]):
        img = kaggle.images[patient][i].copy()
        img[..., 1] = np.where(mask[i] > 0, 255, 0)
        write_rgb(kaggle.image_path(patient, n), img)


def read_csv(path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def run(cache, out, predictor, **kwargs):
    return evaluate(cache, out, predictor=predictor, show_progress=False, plots=False, **kwargs)


@pytest.fixture
def cache(kaggle, tmp_path):
    return prepare(kaggle.root, tmp_path / "cache", progress=False)


def never_segment(self, *args, **kwargs):
    raise AssertionError("prediction ran before the settings were checked")


# --------------------------------------------------------------------------- scores


QC_FIELDS = ["qc", "qc_score", "qc_reason", "mean_prob", "ambiguity", "removed_fraction", "removed_components",
             "components", "touches_edge", "disagreement"]
NO_RULE = {"rule": None, "trained_on": [],
           "note": "this model has no calibrated rule: features only (see `tumorseg calibrate-qc`)"}


def qc_of(mean_prob, components, touches_edge=1.0) -> dict:
    """The quality columns of a one-model prediction without a rule whose probabilities
    are all 0 or `mean_prob` (so nothing is ambiguous) and whose post-processing is none."""
    defined = mean_prob is not None
    return {"qc": "", "qc_score": None, "qc_reason": "", "mean_prob": mean_prob, "ambiguity": 0.0 if defined else None,
            "removed_fraction": 0.0 if defined else None, "removed_components": 0.0, "components": components,
            "touches_edge": touches_edge, "disagreement": 0.0}


SIGMOID_10 = pytest.approx(1 / (1 + np.exp(-10.0)), rel=1e-6)


def test_everything_tumour(kaggle, cache, tmp_path):
    out = tmp_path / "report"
    report = run(cache, out, make_predictor(Constant(10.0), source="all-tumour"))

    assert {k: v for k, v in report.items() if k not in ("summary", "patients")} == {
        "checkpoint": "all-tumour", "checkpoint_kind": "tumorseg", "models": 1, "engine": "torch", "threshold": 0.5,
        "postprocess": "none", "tta": False, "precision": "fp32", "channels": list(CHANNELS), "spacing": None,
        "empty_mask_rule": EMPTY_MASK_RULE, "qc": NO_RULE,
    }
    expected, tumour_slice_dices = [], []
    for pid in kaggle.patients:  # sorted: PAT_A, PAT_B, PAT_C
        s = len(kaggle.slices[pid])
        t, n = int(kaggle.masks[pid].sum()), s * PIXELS
        # Every pixel predicted: TP = T, FP = N - T, FN = 0.
        expected.append({"patient": pid, "slices": s, "dice": 2 * t / (t + n), "iou": t / n, "precision": t / n,
                         "recall": 1.0, "true_voxels": t, "pred_voxels": n} | qc_of(SIGMOID_10, 1.0))
        tumour_slice_dices += [2 * int(m.sum()) / (int(m.sum()) + PIXELS) for m in kaggle.masks[pid] if m.any()]
    records = report["patients"]
    assert [{k: v for k, v in r.items() if k != "hd95"} for r in records] == expected
    assert all(r["hd95"] > 0 for r in records)
    assert [r["slices"] for r in records] == [12, 5, 5]

    dices = [e["dice"] for e in expected]
    assert report["summary"] == {
        "patients": 3,
        "dice_mean": pytest.approx(np.mean(dices), rel=1e-12),
        "dice_median": pytest.approx(np.median(dices), rel=1e-12),
        "dice_std": pytest.approx(np.std(dices), rel=1e-12),
        "iou_mean": pytest.approx(np.mean([e["iou"] for e in expected]), rel=1e-12),
        "precision_mean": pytest.approx(np.mean([e["precision"] for e in expected]), rel=1e-12),
        "recall_mean": 1.0,
        "hd95_mean": pytest.approx(np.mean([r["hd95"] for r in records]), rel=1e-12),
        "hd95_mm_mean": None,  # kaggle_3m without --spacing: no mm
        "tumor_slice_dice_mean": pytest.approx(np.mean(tumour_slice_dices), rel=1e-12),
        "empty_slice_fp_rate": 1.0,  # every tumour-free slice has predicted pixels
    }

    assert json.loads((out / "report.json").read_text()) == report
    header, rows = read_csv(out / "per_patient.csv")
    assert header == [*PATIENT_FIELDS, *QC_FIELDS]
    for row, rec in zip(rows, records, strict=True):
        assert {k: row[k] for k in ("patient", "slices", "true_voxels", "pred_voxels")} == {
            k: str(rec[k]) for k in ("patient", "slices", "true_voxels", "pred_voxels")}
        assert {k: float(row[k]) for k in ("dice", "iou", "precision", "recall", "hd95")} == {
            k: rec[k] for k in ("dice", "iou", "precision", "recall", "hd95")}
    assert sorted(p.name for p in out.iterdir()) == ["per_patient.csv", "report.json"]  # plots=False


def test_nothing_predicted_follows_the_empty_mask_rule(make_kaggle, tmp_path):
    # PAT_E has one slice and no tumour; PAT_A has tumours on slices 2 and 4.
    data = make_kaggle(patients={"PAT_A_2001": 4, "PAT_E_2005": 1})
    cache = prepare(data.root, tmp_path / "cache", progress=False)
    out = tmp_path / "report"
    report = run(cache, out, make_predictor(Constant(-10.0)))

    t = int(data.masks["PAT_A_2001"].sum())
    assert t > 0 and not data.masks["PAT_E_2005"].any()
    assert report["patients"] == [
        # One empty (the prediction): Dice 0, HD95 undefined (null).
        {"patient": "PAT_A_2001", "slices": 4, "dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0,
         "hd95": None, "true_voxels": t, "pred_voxels": 0} | qc_of(None, 0.0, 0.0),
        # Both empty: Dice 1, HD95 0.
        {"patient": "PAT_E_2005", "slices": 1, "dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0,
         "hd95": 0.0, "true_voxels": 0, "pred_voxels": 0} | qc_of(None, 0.0, 0.0),
    ]
    assert report["summary"] == {
        "patients": 2, "dice_mean": 0.5, "dice_median": 0.5, "dice_std": 0.5, "iou_mean": 0.5,
        "precision_mean": 0.5, "recall_mean": 0.5,
        "hd95_mean": 0.0,  # PAT_A's undefined HD95 is left out of the mean
        "hd95_mm_mean": None, "tumor_slice_dice_mean": 0.0, "empty_slice_fp_rate": 0.0,
    }
    _, rows = read_csv(out / "per_patient.csv")
    assert [(r["patient"], r["dice"], r["hd95"]) for r in rows] == [("PAT_A_2001", "0.0", ""),
                                                                    ("PAT_E_2005", "1.0", "0.0")]


def test_patients_subset_in_the_order_given(cache, tmp_path):
    report = run(cache, tmp_path / "r", make_predictor(Constant(-10.0)), patients=["PAT_C_2003", "PAT_A_2001"])
    assert [(r["patient"], r["slices"], r["dice"]) for r in report["patients"]] == [
        ("PAT_C_2003", 5, 0.0), ("PAT_A_2001", 12, 0.0)]
    s = report["summary"]
    assert (s["patients"], s["dice_mean"], s["empty_slice_fp_rate"]) == (2, 0.0, 0.0)
    assert s["hd95_mean"] is None  # every HD95 undefined: no mean, not NaN in the JSON
    text = (tmp_path / "r" / "report.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"report.json holds {c}, not strict JSON"))


def test_shifted_prediction_hd95_in_pixels_and_mm(kaggle, tmp_path):
    """The prediction is the truth moved one slice down: no overlap, and every surface
    voxel is one slice away from the other mask (tumours lie on every other slice)."""
    for pid in kaggle.patients:
        m = kaggle.masks[pid]
        paint_flair(kaggle, pid, np.concatenate([m[1:], np.zeros_like(m[:1])]))
    cache = prepare(kaggle.root, tmp_path / "cache", progress=False)

    report = run(cache, tmp_path / "mm", flair_predictor(), spacing=(3, 1, 1))
    for pid, rec in zip(kaggle.patients, report["patients"], strict=True):
        t = int(kaggle.masks[pid].sum())
        assert {k: v for k, v in rec.items() if k not in QC_FIELDS} == {
            "patient": pid, "slices": len(kaggle.slices[pid]), "dice": 0.0, "iou": 0.0, "precision": 0.0,
            "recall": 0.0, "hd95": 1.0, "true_voxels": t, "pred_voxels": t, "hd95_mm": 3.0}
        assert rec["mean_prob"] == SIGMOID_10 and rec["ambiguity"] == 0.0 and rec["qc"] == ""
    assert report["summary"]["hd95_mean"] == 1.0
    header, rows = read_csv(tmp_path / "mm" / "per_patient.csv")
    assert header == [*PATIENT_FIELDS, "hd95_mm", *QC_FIELDS]
    assert [(r["hd95"], r["hd95_mm"]) for r in rows] == [("1.0", "3.0")] * 3

    plain = run(cache, tmp_path / "px", flair_predictor())
    assert all("hd95_mm" not in r for r in plain["patients"])
    assert read_csv(tmp_path / "px" / "per_patient.csv")[0] == [*PATIENT_FIELDS, *QC_FIELDS]


def test_hd95_mm_is_null_where_hd95_is_undefined(make_kaggle, tmp_path):
    data = make_kaggle(patients={"PAT_A_2001": 4, "PAT_E_2005": 1})
    cache = prepare(data.root, tmp_path / "cache", progress=False)
    report = run(cache, tmp_path / "r", make_predictor(Constant(-10.0)), spacing=[2.5, 0.5, 0.5])
    assert [(r["hd95"], r["hd95_mm"]) for r in report["patients"]] == [(None, None), (0.0, 0.0)]


def test_inference_settings_of_the_predictor_are_used_and_reported(kaggle, tmp_path):
    for pid in kaggle.patients:
        paint_flair(kaggle, pid, kaggle.masks[pid])  # the model predicts the truth exactly
    cache = prepare(kaggle.root, tmp_path / "cache", progress=False)
    model = FlairThreshold()
    inference = InferenceConfig(threshold=0.4, postprocess="lcc", tta=True)
    report = run(cache, tmp_path / "r", flair_predictor(model, inference=inference, source="flair"))

    assert (report["threshold"], report["postprocess"], report["tta"]) == (0.4, "lcc", True)
    assert model.calls == 2 * 3  # one chunk per patient, twice with TTA (the flipped slices)
    for pid, rec in zip(kaggle.patients, report["patients"], strict=True):
        # The tumours lie on every other slice, so each is its own 3-D component and
        # lcc keeps only the largest square.
        t = int(kaggle.masks[pid].sum())
        largest = max(int(m.sum()) for m in kaggle.masks[pid])
        assert largest < t
        assert (rec["pred_voxels"], rec["true_voxels"], rec["precision"]) == (largest, t, 1.0)
        assert (rec["dice"], rec["recall"]) == (2 * largest / (t + largest), largest / t)

    without = run(cache, tmp_path / "r2", flair_predictor())
    assert [(r["dice"], r["hd95"]) for r in without["patients"]] == [(1.0, 0.0)] * 3
    assert (without["threshold"], without["postprocess"], without["tta"]) == (0.5, "none", False)


def test_ensemble_is_reported(cache, tmp_path):
    # Mean probability of sigmoid(10) and sigmoid(-10) is 0.5: above a threshold of 0.4.
    predictor = make_predictor(Constant(10.0), Constant(-10.0), inference=InferenceConfig(threshold=0.4))
    report = run(cache, tmp_path / "r", predictor, patients=["PAT_B_2002"])
    assert (report["models"], report["checkpoint_kind"], report["threshold"]) == (2, "ensemble", 0.4)
    assert report["patients"][0]["pred_voxels"] == 5 * PIXELS


# --------------------------------------------------------------------------- checks before work


@pytest.mark.parametrize(
    ("patients", "message"),
    [
        (["PAT_A_2001", "PAT_X_9999"], "patient(s) not in the data: PAT_X_9999"),
        ([f"X{i}" for i in range(7)], "patient(s) not in the data: X0, X1, X2, X3, X4"),
        ([], "no patients to evaluate"),
        (["PAT_A_2001", "PAT_B_2002", "PAT_A_2001"], "patient(s) listed twice: PAT_A_2001"),
    ],
)
def test_bad_patients(patients, message, cache, tmp_path, monkeypatch):
    monkeypatch.setattr(Predictor, "segment", never_segment)
    with pytest.raises(TumorsegError) as e:
        run(cache, tmp_path / "r", make_predictor(Constant(10.0)), patients=patients)
    assert str(e.value) == message
    assert not (tmp_path / "r").exists()


def test_unlabelled_patient(kaggle, tmp_path, monkeypatch):
    for n in kaggle.slices["PAT_B_2002"]:
        kaggle.mask_path("PAT_B_2002", n).unlink()
    cache = prepare(kaggle.root, tmp_path / "cache", require_masks=False, progress=False)
    monkeypatch.setattr(Predictor, "segment", never_segment)
    with pytest.raises(TumorsegError) as e:
        run(cache, tmp_path / "r", make_predictor(Constant(10.0)))
    assert str(e.value) == ("patient(s) without masks cannot be evaluated: PAT_B_2002; "
                            "use `tumorseg predict` for unlabelled data")
    monkeypatch.undo()
    report = run(cache, tmp_path / "r", make_predictor(Constant(10.0)), patients=["PAT_A_2001", "PAT_C_2003"])
    assert report["summary"]["patients"] == 2


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"threshold": 5}, "threshold must be between 0 and 1, got 5"),
        ({"threshold": 0.0}, "threshold must be between 0 and 1, got 0.0"),
        ({"postprocess": "biggest"}, POSTPROCESS_ERROR),
        ({"tta": "yes"}, "tta must be true or false, got 'yes'"),
    ],
)
def test_bad_inference_settings_fail_in_the_library(option, message, cache, tmp_path, monkeypatch):
    monkeypatch.setattr(Predictor, "segment", never_segment)
    with pytest.raises(ConfigError) as e:
        evaluate(cache, tmp_path / "r", show_progress=False, plots=False, **option)  # the shipped model
    assert str(e.value) == message


SPACING_MESSAGE = "spacing must be three positive numbers (mm between slices, rows, columns), got {}"


@pytest.mark.parametrize(
    ("spacing", "shown"),
    [
        ((-1, -1, -1), "[-1, -1, -1]"),
        ((0, 1, 1), "[0, 1, 1]"),
        ((float("nan"), 1, 1), "[nan, 1, 1]"),
        ((float("inf"), 1, 1), "[inf, 1, 1]"),
        ((1.0, 1.0), "[1.0, 1.0]"),
        ((1, 1, 1, 1), "[1, 1, 1, 1]"),
        (("a", 1, 1), "['a', 1, 1]"),
        (3, "3"),
    ],
)
def test_check_spacing_rejects(spacing, shown):
    with pytest.raises(ConfigError) as e:
        check_spacing(spacing)
    assert str(e.value) == SPACING_MESSAGE.format(shown)


def test_check_spacing_accepts():
    assert check_spacing(None) is None
    assert check_spacing((3, 1, 1)) == (3.0, 1.0, 1.0)
    assert check_spacing([2.5, 0.5, "0.5"]) == (2.5, 0.5, 0.5)


def test_bad_spacing_fails_before_any_work(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(Predictor, "segment", never_segment)
    with pytest.raises(ConfigError) as e:
        run(cache, tmp_path / "r", make_predictor(Constant(10.0)), spacing=(0, 1, 1))
    assert str(e.value) == SPACING_MESSAGE.format("[0, 1, 1]")
    assert not (tmp_path / "r").exists()


def test_out_dir_that_is_a_file_fails_before_prediction(cache, tmp_path, monkeypatch):
    out = tmp_path / "report"
    out.write_text("not a folder")
    monkeypatch.setattr(Predictor, "segment", never_segment)
    with pytest.raises(TumorsegError) as e:
        run(cache, out, make_predictor(Constant(10.0)))
    assert str(e.value) == f"output {out} is a file; pass a folder to --out"

    def never_load(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before out_dir was checked")

    monkeypatch.setattr(Predictor, "from_checkpoints", never_load)
    with pytest.raises(TumorsegError) as e:
        evaluate(cache, out, show_progress=False, plots=False)
    assert str(e.value) == f"output {out} is a file; pass a folder to --out"
    assert out.read_text() == "not a folder"



def test_model_settings_next_to_a_predictor_are_refused(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(Predictor, "segment", never_segment)
    with pytest.raises(ConfigError) as e:
        run(cache, tmp_path / "r", make_predictor(Constant(10.0)), threshold=0.3, postprocess="lcc")
    assert str(e.value) == ("pass either a predictor or threshold, postprocess, not both; "
                            "set them on the Predictor (Predictor.from_checkpoints)")
    assert not (tmp_path / "r").exists()
