"""qc: features by hand on small volumes, the rule, its calibration on synthetic features
with a known separation, the rule stored in a model file; on real data, the shipped rule
on a patient the model got wrong."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from tumorseg.config import InferenceConfig, ModelConfig
from tumorseg.errors import CheckpointError, ConfigError
from tumorseg.qc import (
    Condition,
    LogisticScore,
    QCFeatures,
    QCRule,
    auc,
    calibrate,
    fit_rule,
    flag_performance,
    member_features,
    patient_features,
    wilson_interval,
)

NONE = InferenceConfig(threshold=0.5, postprocess="none")
LCC = InferenceConfig(threshold=0.5, postprocess="lcc")


def _volume() -> np.ndarray:
    """A: (0,0,0) 0.9, (0,0,1) 0.6 and (1,1,1) 0.7, one 26-connected component of 3 voxels;
    B: (2,3,3) 0.95 alone in the last slice; below the threshold, (1,3,0) 0.3 and (0,3,3)
    0.25 (ambiguous) and (2,0,3) 0.1 (not)."""
    p = np.zeros((3, 4, 4), dtype=np.float32)
    p[0, 0, 0], p[0, 0, 1], p[1, 1, 1] = 0.9, 0.6, 0.7
    p[2, 3, 3] = 0.95
    p[1, 3, 0], p[0, 3, 3], p[2, 0, 3] = 0.3, 0.25, 0.1
    return p


def test_member_features_by_hand_with_the_largest_component():
    f = member_features(_volume(), LCC, spacing=(2.0, 0.5, 0.5))
    assert f["volume_voxels"] == 3  # A kept, B removed
    assert f["mean_prob"] == pytest.approx((0.9 + 0.6 + 0.7) / 3)
    assert f["ambiguity"] == pytest.approx(4 / 3)  # 0.6, 0.7, 0.3, 0.25 per mask voxel
    assert f["removed_fraction"] == pytest.approx(1 / 4)
    assert f["removed_components"] == 1
    assert f["components"] == 1
    assert f["touches_edge"] == 1  # A reaches the first slice
    assert f["volume_ml"] == pytest.approx(3 * 0.5 / 1000)


def test_member_features_by_hand_without_post_processing():
    f = member_features(_volume(), NONE)
    assert f["volume_voxels"] == 4 and f["components"] == 2
    assert f["mean_prob"] == pytest.approx((0.9 + 0.6 + 0.7 + 0.95) / 4)
    assert f["ambiguity"] == pytest.approx(1.0)
    assert f["removed_fraction"] == 0 and f["removed_components"] == 0
    assert math.isnan(f["volume_ml"])


def test_member_features_inner_slices_and_empty_mask():
    p = np.zeros((4, 3, 3), dtype=np.float16)
    p[1:3, 1, 1] = 0.9
    f = member_features(p, LCC)
    assert f["touches_edge"] == 0 and f["components"] == 1 and f["ambiguity"] == 0
    assert f["mean_prob"] == pytest.approx(0.9, abs=1e-3)  # float16
    empty = member_features(np.full((2, 3, 3), 0.3, dtype=np.float32), LCC)
    assert math.isnan(empty["mean_prob"]) and math.isnan(empty["ambiguity"])
    assert math.isnan(empty["removed_fraction"])  # nothing above the threshold
    assert empty["volume_voxels"] == 0 and empty["components"] == 0 and empty["touches_edge"] == 0


def test_member_features_refuse_bad_shapes_and_spacing():
    with pytest.raises(ConfigError, match=r"expected one model's probabilities \(S, H, W\), got shape \(3, 3\)"):
        member_features(np.zeros((3, 3)), LCC)
    with pytest.raises(ConfigError, match="spacing must be three positive numbers"):
        member_features(np.zeros((1, 3, 3)), LCC, spacing=(1.0, 0.0, 1.0))


def test_patient_features_average_over_members_and_disagreement():
    # member 0: mask {(0,0)} with p 0.9, 0.4 ambiguous; member 1: nothing above 0.5 (0.5 is not).
    probs = np.array([[[[0.9, 0.05], [0.0, 0.4]]],
                      [[[0.5, 0.05], [0.2, 0.0]]]], dtype=np.float32)  # (M=2, S=1, 2, 2)
    final = np.array([[[True, False], [False, False]]])
    f = patient_features(probs, final, NONE, spacing=(1.0, 1.0, 1.0))
    assert isinstance(f, QCFeatures) and f.members == 2 and f.empty_members == 1
    assert f.mean_prob == pytest.approx(0.9)  # the empty member's NaN is left out
    assert f.ambiguity == pytest.approx(1.0)
    assert f.volume_voxels == pytest.approx(0.5) and f.touches_edge == pytest.approx(0.5)
    # std across members where some member says > 0.1: (0,0) 0.2, (1,0) 0.1, (1,1) 0.2; (0,1) left out
    assert f.disagreement == pytest.approx(0.5 / 3)
    assert (f.final_volume_voxels, f.final_components, f.final_touches_edge) == (1, 1, 1)
    assert f.final_volume_ml == pytest.approx(0.001)
    one = patient_features(probs[:1], final, NONE)
    assert one.disagreement == 0 and one.members == 1 and math.isnan(one.final_volume_ml)
    nothing = patient_features(np.full((2, 1, 2, 2), 0.05, np.float16), np.zeros((1, 2, 2), bool), NONE)
    assert math.isnan(nothing.disagreement) and nothing.empty_members == 2 and math.isnan(nothing.mean_prob)


def test_patient_features_refuse_mismatched_shapes():
    with pytest.raises(ConfigError, match=r"expected the models' probabilities \(M, S, H, W\)"):
        patient_features(np.zeros((1, 2, 2)), np.zeros((1, 2, 2), bool), NONE)
    with pytest.raises(ConfigError, match=r"final mask shape \(1, 2, 3\) does not match"):
        patient_features(np.zeros((1, 1, 2, 2)), np.zeros((1, 2, 3), bool), NONE)


# --------------------------------------------------------------------------- the rule

RULE = QCRule((Condition("mean_prob", "<", 0.72),))


def test_rule_flags_with_a_reason_in_words():
    r = RULE.apply({"mean_prob": 0.61, "final_volume_voxels": 100})
    assert r.flag == "review"
    assert r.reason == "low confidence inside the mask (mean probability 0.61 < 0.72)"
    assert r.score == pytest.approx((0.72 - 0.61) / 0.72)  # uncalibrated: the relative margin
    ok = RULE.apply({"mean_prob": 0.9, "final_volume_voxels": 100})
    assert ok.flag == "ok" and ok.reason == "within calibrated limits (mean probability 0.9 >= 0.72)"
    assert ok.score == pytest.approx(-0.18 / 0.72)
    close = RULE.apply({"mean_prob": 0.7199, "final_volume_voxels": 100})  # as many digits as tell them apart
    assert close.reason == "low confidence inside the mask (mean probability 0.7199 < 0.72)"


def test_rule_with_two_conditions_names_those_that_hold():
    rule = QCRule((Condition("mean_prob", "<", 0.72), Condition("ambiguity", ">", 0.6)))
    r = rule.apply({"mean_prob": 0.8, "ambiguity": 0.75, "final_volume_voxels": 10})
    assert r.flag == "review"
    assert r.reason == "many uncertain voxels (voxels with 0.2 < p < 0.8 per mask voxel 0.75 > 0.6)"


def test_empty_mask_is_review_no_tumour_found():
    r = RULE.apply({"mean_prob": math.nan, "final_volume_voxels": 0})
    assert (r.flag, r.reason, r.score) == ("review", "no tumour found", 1.0)
    f = patient_features(np.zeros((1, 2, 3, 3), np.float32), np.zeros((2, 3, 3), bool), LCC)
    assert RULE.apply(f).reason == "no tumour found"


def test_undefined_or_missing_feature():
    r = RULE.apply({"mean_prob": math.nan, "final_volume_voxels": 5})
    assert (r.flag, r.reason) == ("review", "mean_prob could not be computed")
    with pytest.raises(ConfigError, match="QC features lack mean_prob"):
        RULE.apply({"ambiguity": 0.2, "final_volume_voxels": 5})


def test_calibrated_score_is_the_logistic_probability():
    rule = QCRule((Condition("mean_prob", "<", 0.5),), LogisticScore(("mean_prob",), (-4.0,), 2.0))
    assert rule.apply({"mean_prob": 0.5, "final_volume_voxels": 1}).score == pytest.approx(0.5)
    assert rule.apply({"mean_prob": 1.0, "final_volume_voxels": 1}).score == pytest.approx(1 / (1 + math.exp(2)))


def test_rule_round_trips_through_json():
    rule = QCRule((Condition("mean_prob", "<", 0.72), Condition("ambiguity", ">", 0.61)),
                  LogisticScore(("mean_prob", "ambiguity"), (-3.5, 2.25), 1.5), bad_below=0.7, notes="88 patients")
    d = json.loads(json.dumps(rule.to_dict()))
    assert d["format"] == "tumorseg-qc-rule" and d["version"] == 1
    assert QCRule.from_dict(d) == rule
    assert QCRule.from_dict(RULE.to_dict()) == RULE


def test_rule_from_dict_refuses_other_versions_and_damage():
    with pytest.raises(ConfigError, match="not a tumorseg QC rule"):
        QCRule.from_dict({"conditions": []})
    with pytest.raises(ConfigError, match="QC rule version 2 is newer than the 1 this tumorseg reads; upgrade"):
        QCRule.from_dict({**RULE.to_dict(), "version": 2})
    with pytest.raises(ConfigError, match="damaged QC rule"):
        QCRule.from_dict({**RULE.to_dict(), "conditions": [{"feature": "mean_prob"}]})
    with pytest.raises(ConfigError, match="direction must be '<' or '>'"):
        Condition("mean_prob", "<=", 0.5)


# --------------------------------------------------------------------------- statistics


def test_wilson_interval_by_hand():
    lo, hi = wilson_interval(6, 6)
    assert lo == pytest.approx(0.6097, abs=1e-4) and hi == 1.0
    assert wilson_interval(0, 6) == (0.0, pytest.approx(0.3903, abs=1e-4))
    assert wilson_interval(5, 10) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert wilson_interval(0, 0) is None


def test_auc_counts_ties_half():
    assert auc([0.9, 0.8, 0.3, 0.8], [True, False, False, True]) == pytest.approx(3.5 / 4)
    assert auc([0.1, 0.2], [True, True]) is None


def test_flag_performance_counts():
    perf = flag_performance(["review", "ok", "review", "ok"], [0.5, 0.6, 0.9, 0.95], 0.7)
    assert (perf["tp"], perf["fn"], perf["fp"], perf["tn"]) == (1, 1, 1, 1)
    assert perf["sensitivity"] == 0.5 and perf["specificity"] == 0.5 and perf["flagged"] == 2
    assert perf["dice_mean_unflagged"] == pytest.approx((0.6 + 0.95) / 2)
    assert perf["sensitivity_ci95"] == wilson_interval(1, 2)
    with pytest.raises(ConfigError, match="2 flags but 1 Dice values"):
        flag_performance([True, False], [0.5])
    with pytest.raises(ConfigError, match="a QC flag is 'ok' or 'review', got 'maybe'"):
        flag_performance(["maybe"], [0.5])


# --------------------------------------------------------------------------- calibration


def _synthetic(seed: int = 0, n: int = 40, bad_per_fold: int = 2) -> tuple[list[dict], list[float], list[int]]:
    """5 folds of 8; bad patients (Dice 0.3) have mean_prob in [0.5, 0.6], good ones (0.9)
    in [0.8, 0.95]; the other features are noise."""
    rng = np.random.default_rng(seed)
    folds = [i % 5 for i in range(n)]
    bad = [i // 5 < bad_per_fold for i in range(n)]
    feats, dices = [], []
    for b in bad:
        feats.append({"mean_prob": rng.uniform(0.5, 0.6) if b else rng.uniform(0.8, 0.95),
                      "ambiguity": rng.uniform(0.2, 0.6), "removed_fraction": rng.uniform(0, 0.2),
                      "removed_components": float(rng.integers(0, 4)), "final_volume_voxels": 500.0})
        dices.append(0.3 if b else 0.9)
    return feats, dices, folds


def test_calibration_recovers_the_threshold_of_a_separable_set():
    feats, dices, folds = _synthetic()
    rule, report = calibrate(feats, dices, folds, patients=[f"P{i}" for i in range(40)])
    worst_good = min(f["mean_prob"] for f, d in zip(feats, dices, strict=True) if d > 0.7)
    best_bad = max(f["mean_prob"] for f, d in zip(feats, dices, strict=True) if d < 0.7)
    assert rule.conditions == (Condition("mean_prob", "<", (worst_good + best_bad) / 2),)
    assert rule.score is not None and rule.score.coef[0] < 0  # lower confidence, more likely bad
    oof = report["out_of_fold"]
    assert oof["sensitivity"] == 1.0 and oof["specificity"] >= 0.9
    assert (oof["tp"], oof["fn"]) == (10, 0) and oof["tp"] + oof["fp"] + oof["tn"] + oof["fn"] == 40
    assert oof["auc_score"] == 1.0 and oof["dice_mean_unflagged"] == pytest.approx(0.9)
    assert oof["sensitivity_ci95"] == pytest.approx(wilson_interval(10, 10))
    assert len(oof["folds"]) == 5
    assert report["features"]["mean_prob"]["auc_bad"] == 1.0  # low mean_prob: bad, without exception
    assert report["features"]["mean_prob"]["spearman_dice"] > 0.7  # two Dice values: ties cap it
    assert report["patients"][0]["patient"] == "P0" and report["patients"][0]["flag_oof"] == "review"
    json.dumps(report, allow_nan=False)  # JSON-safe


def test_calibration_takes_two_conditions_only_when_one_misses_bad_patients():
    feats, dices, folds = _synthetic(seed=1)
    # Half of the bad patients look confident but ambiguous: mean_prob alone misses them.
    for i, (f, d) in enumerate(zip(feats, dices, strict=True)):
        if d < 0.7 and i % 2:
            f["mean_prob"], f["ambiguity"] = 0.9, 0.9
    table = {k: np.array([f[k] for f in feats]) for k in feats[0]}
    rule = fit_rule(table, np.array(dices))
    assert [(c.feature, c.direction) for c in rule.conditions] == [("mean_prob", "<"), ("ambiguity", ">")]
    flags = [rule.apply(f).flag for f in feats]
    assert flag_performance(flags, dices)["sensitivity"] == 1.0


def test_calibration_refuses_mismatched_lists():
    with pytest.raises(ConfigError, match="features, dices and folds differ in length: 1, 2, 1"):
        calibrate([{"mean_prob": 0.5}], [0.1, 0.2], [0])


# --------------------------------------------------------------------------- in the model file


def test_rule_stored_in_a_model_file_reads_back(tmp_path):
    from tumorseg.calibration import read_qc_rule, store_rule
    from tumorseg.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, store_qc_entry
    from tumorseg.model import UNet

    path = tmp_path / "model.pt"
    save_checkpoint(path, Checkpoint.of_model(UNet.from_config(ModelConfig(3, 1, 4, 2))))
    before = load_checkpoint(path).state_dict
    assert read_qc_rule(path) is None  # a file without a rule
    store_rule(path, RULE, {"data": "kaggle_3m", "out_of_fold": {"sensitivity": 0.5, "folds": []}, "patients": []})
    assert read_qc_rule(path) == RULE
    after = load_checkpoint(path)
    assert all(np.array_equal(before[k].numpy(), v.numpy()) for k, v in after.state_dict.items())
    store_qc_entry(path, None)
    assert read_qc_rule(path) is None
    other = tmp_path / "other.pt"
    import torch

    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="is not a tumorseg checkpoint; only those hold a QC rule"):
        store_rule(other, RULE)


# --------------------------------------------------------------------------- real data


def _shipped_member_of(patient_prefix: str, cache):
    from tumorseg.checkpoint import load_members
    from tumorseg.inference import default_checkpoint_path

    members = load_members(default_checkpoint_path())
    patient = next(p for p in cache.patients if p.startswith(patient_prefix))
    k = next(i for i, m in enumerate(members) if patient in m.split["val"])
    return members[k], patient


@pytest.mark.slow
@pytest.mark.realdata
def test_shipped_rule_flags_the_patient_its_fold_model_got_wrong(real_cache):
    """TCGA_CS_5395: out of fold, `lcc` keeps a wrong region (Dice 0)."""
    from tumorseg.calibration import read_qc_rule
    from tumorseg.evaluation import segment_cached
    from tumorseg.inference import Predictor, default_checkpoint_path
    from tumorseg.metrics import confusion_counts, dice_from_counts

    rule = read_qc_rule(default_checkpoint_path())
    assert rule is not None, "the shipped model carries no QC rule (tumorseg.calibration.store_rule)"
    member, patient = _shipped_member_of("TCGA_CS_5395", real_cache)
    predictor = Predictor([member.build_model()], channels=member.channels, percentiles=member.percentiles,
                          inference=member.inference, device="cpu", precision="fp32")
    seg = segment_cached(predictor, real_cache, patient)
    assert dice_from_counts(confusion_counts(seg.mask, np.asarray(real_cache.masks(patient)) > 0)) < 0.7
    result = rule.apply(patient_features(seg.probabilities[None], seg.mask, member.inference))
    assert result.flag == "review", result


@pytest.mark.slow
@pytest.mark.realdata
def test_model_file_without_a_rule_gives_features_but_no_flag(real_cache, tmp_path):
    from tumorseg.calibration import read_qc_rule
    from tumorseg.checkpoint import store_qc_entry
    from tumorseg.inference import Predictor, default_checkpoint_path

    old = tmp_path / "old.pt"
    shutil.copy(default_checkpoint_path(), old)
    store_qc_entry(old, None)  # as written before rules were stored
    assert read_qc_rule(old) is None
    predictor = Predictor.from_checkpoints(old, device="cpu", precision="fp32", engine="torch")
    patient = min(real_cache.patients, key=lambda p: len(real_cache.records[p].slices))
    rec = real_cache.records[patient]
    images = np.asarray(real_cache.images(patient))
    seg = predictor.segment(images, rec.low, rec.high)
    probs = seg.member_probabilities()
    assert probs.shape == (5, len(rec.slices), 256, 256)
    # the mean of the members' probabilities is the ensemble's (float16 rounding aside)
    assert np.abs(probs.astype(np.float32).mean(0) - seg.probabilities).max() < 2e-3
    f = patient_features(probs, seg.mask, predictor.inference)
    assert f.members == 5 and f.final_volume_voxels == int(seg.mask.sum())
    assert f.final_volume_voxels == 0 or 0 < f.mean_prob <= 1
