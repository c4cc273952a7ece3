"""Quality control of one prediction: features that tell how far a patient's mask can be
trusted, and a small calibrated rule that flags the patient for review.

Features are computed for each model of an ensemble on its own probabilities
(`member_features`) and then averaged over the models (`patient_features`). Averaging the
probabilities first would shift them (the mean of five confident models is less extreme
than each), and the rule is calibrated on out-of-fold predictions, where each patient is
predicted by the one model that never saw it: single-model features. The mean of the
per-model features is on that same scale.

A `QCRule` is one or two thresholds on named features ("review when mean_prob < a"), with
an optional logistic score, the estimated probability that the patient's Dice is below
`bad_below`. `calibrate` fits it on labelled out-of-fold features and estimates how it
does out of sample (leave one fold out). An empty mask is always "review" ("no tumour
found"): nothing was found, or the model missed the tumour; no feature can tell which.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from tumorseg.config import InferenceConfig
from tumorseg.errors import ConfigError
from tumorseg.postprocess import binarize, components

RULE_FORMAT = "tumorseg-qc-rule"
RULE_VERSION = 1
AMBIGUOUS = (0.2, 0.8)  # a voxel with a probability strictly between these is ambiguous
DISAGREEMENT_FLOOR = 0.1  # disagreement is averaged over voxels where some model says more than this
BAD_BELOW = 0.7  # a patient whose Dice is below this is one the flag should catch
MIN_SPECIFICITY = 0.9
# The features a rule may use, with the direction that means "worse", fixed beforehand
# so that calibration chooses only thresholds. Disagreement is not among them: out of
# fold each patient has one model, so it cannot be calibrated there.
CANDIDATES: dict[str, str] = {
    "mean_prob": "<",
    "ambiguity": ">",
    "removed_fraction": ">",
    "removed_components": ">",
}
Z95 = 1.959963984540054  # the 97.5th percentile of the standard normal


# --------------------------------------------------------------------------- features


@dataclass(frozen=True)
class QCFeatures:
    """The quality features of one patient's prediction.

    The first eight are per-model features (see `member_features`) averaged over the
    models whose value is defined (NaN where none is); `touches_edge` is then the
    fraction of models whose mask touches the first or last slice. The `final_*` ones
    describe the mask actually delivered (of the averaged probabilities).
    """

    mean_prob: float  # mean probability inside the mask
    ambiguity: float  # voxels with 0.2 < p < 0.8, per voxel of the mask
    removed_fraction: float  # of the voxels above the threshold, the fraction post-processing removed
    removed_components: float  # components above the threshold that post-processing removed
    components: float  # 3-D components of the mask
    touches_edge: float  # the mask reaches the first or last slice (0/1; a fraction of models)
    volume_voxels: float
    volume_ml: float  # NaN without a spacing
    disagreement: float  # mean std of the models' probabilities where some model says > 0.1; 0 for one model
    members: int  # models averaged
    empty_members: int  # models whose own mask is empty
    final_components: int
    final_touches_edge: int
    final_volume_voxels: int
    final_volume_ml: float  # NaN without a spacing

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _volume(probs: Any, what: str) -> np.ndarray:
    p = np.asarray(probs)
    if p.ndim != 3:
        raise ConfigError(f"expected {what} (S, H, W), got shape {p.shape}")
    return p


def _voxel_ml(spacing: Sequence[float] | None) -> float:
    """The volume of one voxel in mL for a spacing (mm between slices, rows, columns)."""
    if spacing is None:
        return math.nan
    values = [float(v) for v in spacing]
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ConfigError(f"spacing must be three positive numbers (mm between slices, rows, columns), got {spacing}")
    return values[0] * values[1] * values[2] / 1000.0


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box (one slice per axis) holding every True voxel of `mask`; an empty
    box at the origin when there is none."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1) if hit.size else slice(0, 0))
    return tuple(box)


def _touches_edge(mask: np.ndarray) -> int:
    return int(bool(mask[0].any() or mask[-1].any()))


def member_features(probs: np.ndarray, inference: InferenceConfig,
                    spacing: Sequence[float] | None = None) -> dict[str, float]:
    """The quality features of one model's probabilities of one patient.

    The mask is `postprocess.binarize(probs, inference)` (threshold, then post-processing).

    Args:
        probs: float (S, H, W) probabilities of one model (float16 is fine).
        inference: the threshold and post-processing of the model.
        spacing: mm between slices, rows, columns; None: volume_ml is NaN.

    Returns:
        {"mean_prob": mean p inside the mask, "ambiguity": count(0.2 < p < 0.8) / mask
        voxels (over the whole volume), "removed_fraction": voxels above the threshold
        removed by post-processing / voxels above the threshold, "removed_components":
        components above the threshold with no voxel kept, "components": 3-D
        (26-connected) components of the mask, "touches_edge": 1 when the mask has a
        voxel in the first or last slice, else 0, "volume_voxels", "volume_ml"}.
        With an empty mask, mean_prob and ambiguity are NaN; with nothing above the
        threshold, removed_fraction is NaN.

    Raises:
        ConfigError: probabilities not (S, H, W), or a bad spacing.
    """
    p = _volume(probs, "one model's probabilities")
    voxel_ml = _voxel_ml(spacing)
    if p.dtype != np.float32 and p.dtype != np.float64:
        p = p.astype(np.float32, copy=False)
    slices = p.shape[0]
    above = p > inference.threshold
    ambiguous = int(np.count_nonzero((p > AMBIGUOUS[0]) & (p < AMBIGUOUS[1])))
    # Post-processing and labelling look only at the box around the voxels above the
    # threshold (components are the same there; labelling the whole volume dominated the cost).
    box = _bounding_box(above)
    p, above = p[box], above[box]
    mask = binarize(p, inference)
    n_above = int(np.count_nonzero(above))
    n_mask = int(np.count_nonzero(mask))
    labels_above, count_above = components(above)
    # Every post-processing keeps or drops whole components of the thresholded mask, so
    # the mask's components are the kept ones (no second labelling).
    kept = int(np.unique(labels_above[mask]).size)
    touches = n_mask > 0 and ((box[0].start == 0 and mask[0].any()) or (box[0].stop == slices and mask[-1].any()))
    return {
        "mean_prob": float(p[mask].mean(dtype=np.float64)) if n_mask else math.nan,
        "ambiguity": ambiguous / n_mask if n_mask else math.nan,
        "removed_fraction": (n_above - n_mask) / n_above if n_above else math.nan,
        "removed_components": float(count_above - kept),
        "components": float(kept),
        "touches_edge": float(bool(touches)),
        "volume_voxels": float(n_mask),
        "volume_ml": n_mask * voxel_ml,
    }


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def patient_features(member_probs: np.ndarray, final_mask: np.ndarray, inference: InferenceConfig,
                     spacing: Sequence[float] | None = None) -> QCFeatures:
    """The quality features of one patient: each model's `member_features` averaged over
    the models (NaN-aware), the models' disagreement, and the final mask's own shape.

    Args:
        member_probs: float (M, S, H, W) probabilities of each model (float16 is fine;
            M = 1 for a single model). With TTA, each model's flip-averaged ones.
        final_mask: bool (S, H, W), the mask delivered (of the averaged probabilities).
        inference: the threshold and post-processing of the models.
        spacing: mm between slices, rows, columns; None: the volumes in mL are NaN.

    Returns:
        QCFeatures. disagreement: the mean over the voxels where some model's
        probability exceeds 0.1 of the standard deviation (population) across the
        models; 0 for one model; NaN when no voxel exceeds 0.1.

    Raises:
        ConfigError: shapes that are not (M, S, H, W) and (S, H, W) of the same volume,
            or a bad spacing.
    """
    probs = np.asarray(member_probs)
    mask = np.asarray(final_mask, dtype=bool)
    if probs.ndim != 4 or probs.shape[0] < 1:
        raise ConfigError(f"expected the models' probabilities (M, S, H, W), got shape {probs.shape}")
    if mask.shape != probs.shape[1:]:
        raise ConfigError(f"final mask shape {mask.shape} does not match the probabilities {probs.shape[1:]}")
    voxel_ml = _voxel_ml(spacing)
    per_member = []
    where = np.zeros(mask.shape, dtype=bool)  # some model says more than DISAGREEMENT_FLOOR
    for m in range(probs.shape[0]):
        p = probs[m].astype(np.float32, copy=False)  # once per model: float16 arithmetic is slow
        per_member.append(member_features(p, inference, spacing))
        where |= p > DISAGREEMENT_FLOOR
    averaged = {k: _nanmean([f[k] for f in per_member]) for k in per_member[0]}
    if probs.shape[0] == 1:
        disagreement = 0.0
    else:
        if where.any():
            chosen = probs[:, where].astype(np.float32)  # (M, K): only the voxels that count
            disagreement = float(chosen.std(axis=0).mean(dtype=np.float64))
        else:
            disagreement = math.nan
    n_final = int(np.count_nonzero(mask))
    return QCFeatures(
        **averaged, disagreement=disagreement, members=int(probs.shape[0]),
        empty_members=sum(1 for f in per_member if f["volume_voxels"] == 0),
        final_components=int(components(mask[_bounding_box(mask)])[1]) if n_final else 0,
        final_touches_edge=_touches_edge(mask), final_volume_voxels=n_final, final_volume_ml=n_final * voxel_ml,
    )


# --------------------------------------------------------------------------- the rule


_WORDS = {  # how a condition reads in a reason: (what it says, the feature's name in words)
    "mean_prob": ("low confidence inside the mask", "mean probability"),
    "ambiguity": ("many uncertain voxels", "voxels with 0.2 < p < 0.8 per mask voxel"),
    "removed_fraction": ("post-processing removed much of the thresholded mask", "fraction removed"),
    "removed_components": ("post-processing removed several candidate regions", "regions removed"),
    "components": ("a fragmented mask", "components"),
    "disagreement": ("the models disagree", "mean spread"),
    "touches_edge": ("the mask reaches the first or last slice", "touches edge"),
}


@dataclass(frozen=True)
class Condition:
    """One threshold: the patient is flagged when `feature` `direction` `threshold`
    holds ("<": below, ">": above)."""

    feature: str
    direction: str
    threshold: float

    def __post_init__(self) -> None:
        if self.direction not in ("<", ">"):
            raise ConfigError(f"a QC condition's direction must be '<' or '>', got {self.direction!r}")
        if not isinstance(self.feature, str) or not self.feature:
            raise ConfigError(f"a QC condition needs a feature name, got {self.feature!r}")
        object.__setattr__(self, "threshold", float(self.threshold))

    def holds(self, value: float) -> bool:
        return value < self.threshold if self.direction == "<" else value > self.threshold

    def describe(self, value: float, held: bool) -> str:
        what, name = _WORDS.get(self.feature, (self.feature, self.feature))
        op = self.direction if held else (">=" if self.direction == "<" else "<=")
        digits = next((d for d in range(3, 7) if f"{value:.{d}g}" != f"{self.threshold:.{d}g}"), 7)
        text = f"{name} {value:.{digits}g} {op} {self.threshold:.{digits}g}"
        return f"{what} ({text})" if held else text


@dataclass(frozen=True)
class LogisticScore:
    """P(bad) = 1 / (1 + exp(-(intercept + sum(coef * feature)))), on the raw features."""

    features: tuple[str, ...]
    coef: tuple[float, ...]
    intercept: float

    def probability(self, values: Mapping[str, float]) -> float:
        z = self.intercept + sum(c * float(values[f]) for f, c in zip(self.features, self.coef, strict=True))
        return float(1.0 / (1.0 + math.exp(-z))) if z > -700 else 0.0


@dataclass(frozen=True)
class QCResult:
    """The flag of one patient. `score`: with a calibrated rule, the estimated probability
    that the Dice is below the rule's `bad_below`; without one, the largest relative
    margin by which a condition holds (positive: flagged). 1.0 when the mask is empty or
    a feature the rule needs is undefined."""

    flag: str  # "ok" or "review"
    score: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class QCRule:
    """Flag a patient for review when any condition holds (an OR of one or two
    thresholds), when its mask is empty, or when a feature the rule needs is undefined.

    `score`, when calibrated, estimates P(Dice < bad_below); `notes` says what the rule
    was calibrated on.
    """

    conditions: tuple[Condition, ...]
    score: LogisticScore | None = None
    bad_below: float = BAD_BELOW
    notes: str = ""

    def __post_init__(self) -> None:
        if not self.conditions:
            raise ConfigError("a QC rule needs at least one condition")

    @property
    def features(self) -> tuple[str, ...]:
        names = [c.feature for c in self.conditions] + list(self.score.features if self.score else [])
        return tuple(dict.fromkeys(names))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dictionary (`from_dict` reads it back)."""
        return {
            "format": RULE_FORMAT,
            "version": RULE_VERSION,
            "conditions": [asdict(c) for c in self.conditions],
            "score": (None if self.score is None else
                      {"kind": "logistic", "features": list(self.score.features), "coef": list(self.score.coef),
                       "intercept": self.score.intercept}),
            "bad_below": self.bad_below,
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QCRule:
        """Read `to_dict`'s dictionary.

        Raises:
            ConfigError: not a QC rule, a newer version, or a damaged one.
        """
        if not isinstance(d, Mapping) or d.get("format") != RULE_FORMAT:
            raise ConfigError("not a tumorseg QC rule (no 'format': 'tumorseg-qc-rule')")
        version = d.get("version")
        if not isinstance(version, int) or version > RULE_VERSION:
            raise ConfigError(f"QC rule version {version!r} is newer than the {RULE_VERSION} this tumorseg reads; "
                              "upgrade tumorseg")
        try:
            conditions = tuple(Condition(str(c["feature"]), str(c["direction"]), float(c["threshold"]))
                               for c in d["conditions"])
            s = d.get("score")
            score = None if s is None else LogisticScore(tuple(str(f) for f in s["features"]),
                                                          tuple(float(c) for c in s["coef"]), float(s["intercept"]))
            if score is not None and len(score.features) != len(score.coef):
                raise ValueError("score features and coefficients differ in number")
            return cls(conditions, score, float(d.get("bad_below", BAD_BELOW)), str(d.get("notes", "")))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"damaged QC rule ({type(e).__name__}: {e})") from e

    def apply(self, features: QCFeatures | Mapping[str, float]) -> QCResult:
        """The flag of one patient's features (`patient_features`, or its `to_dict`).

        Raises:
            ConfigError: a feature the rule needs is missing.
        """
        values = features.to_dict() if isinstance(features, QCFeatures) else dict(features)
        missing = [f for f in self.features if f not in values]
        if missing:
            raise ConfigError(f"QC features lack {', '.join(missing)}; compute them with qc.patient_features")
        volume = values.get("final_volume_voxels", values.get("volume_voxels"))
        if volume is not None and not volume > 0:
            return QCResult("review", 1.0, "no tumour found")
        undefined = [f for f in self.features if math.isnan(float(values[f]))]
        if undefined:
            return QCResult("review", 1.0, f"{', '.join(undefined)} could not be computed")
        held = [c for c in self.conditions if c.holds(float(values[c.feature]))]
        if self.score is not None:
            score = self.score.probability(values)
        else:
            score = max((1 if c.direction == ">" else -1) * (float(values[c.feature]) - c.threshold)
                        / max(abs(c.threshold), 1e-12) for c in self.conditions)
        if held:
            return QCResult("review", score, "; ".join(c.describe(float(values[c.feature]), True) for c in held))
        return QCResult("ok", score, "within calibrated limits (" + ", ".join(
            c.describe(float(values[c.feature]), False) for c in self.conditions) + ")")


# --------------------------------------------------------------------------- calibration


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval (95% by default) of a proportion successes / n; None
    when n is 0."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def auc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """The area under the ROC curve of `scores` (higher: more likely positive), ties
    counted half (the Mann-Whitney U / (n_pos n_neg)); NaN scores are left out; None
    without both classes."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(positive, dtype=bool)
    keep = ~np.isnan(s)
    s, y = s[keep], y[keep]
    pos, neg = s[y], s[~y]
    if not pos.size or not neg.size:
        return None
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def _is_review(flag: Any) -> bool:
    if isinstance(flag, str):
        if flag not in ("ok", "review"):
            raise ConfigError(f"a QC flag is 'ok' or 'review', got {flag!r}")
        return flag == "review"
    return bool(flag)


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def flag_performance(flags: Sequence[Any], dices: Sequence[float], bad_below: float = BAD_BELOW) -> dict[str, Any]:
    """How a flag did on labelled patients: "review" (or True) is a positive, Dice below
    `bad_below` a patient that should be caught.

    Returns:
        {"patients", "bad", "tp", "fp", "tn", "fn", "sensitivity", "sensitivity_ci95",
        "specificity", "specificity_ci95" (Wilson), "flagged", "dice_mean_unflagged",
        "dice_mean_flagged", "dice_mean_all"}; None where undefined (e.g. no bad patient).

    Raises:
        ConfigError: flags and Dice of different lengths, or a flag that is not ok/review.
    """
    if len(flags) != len(dices):
        raise ConfigError(f"{len(flags)} flags but {len(dices)} Dice values")
    review = np.array([_is_review(f) for f in flags], dtype=bool)
    d = np.asarray(dices, dtype=float)
    bad = d < bad_below
    tp, fp = int((review & bad).sum()), int((review & ~bad).sum())
    fn, tn = int((~review & bad).sum()), int((~review & ~bad).sum())
    return {
        "patients": int(d.size), "bad": int(bad.sum()), "bad_below": bad_below,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "sensitivity": tp / (tp + fn) if tp + fn else None, "sensitivity_ci95": wilson_interval(tp, tp + fn),
        "specificity": tn / (tn + fp) if tn + fp else None, "specificity_ci95": wilson_interval(tn, tn + fp),
        "flagged": int(review.sum()),
        "dice_mean_unflagged": _mean(d[~review]), "dice_mean_flagged": _mean(d[review]), "dice_mean_all": _mean(d),
    }


def _cuts(values: np.ndarray) -> np.ndarray:
    """Candidate thresholds of one feature: the midpoints between its sorted distinct
    finite values, and one beyond each end (flag none / flag all)."""
    v = np.unique(values[np.isfinite(values)])
    if not v.size:
        return np.array([0.0])
    return np.concatenate([[v[0] - 1.0], (v[:-1] + v[1:]) / 2, [v[-1] + 1.0]])


def _flags(values: np.ndarray, direction: str, cuts: np.ndarray) -> np.ndarray:
    """bool (T, N): patient n flagged by threshold t (NaN is flagged: it cannot be checked)."""
    v = values[None, :]
    held = v < cuts[:, None] if direction == "<" else v > cuts[:, None]
    return held | np.isnan(v)


def _best(flags: np.ndarray, bad: np.ndarray, min_specificity: float) -> tuple[int, float, float] | None:
    """(index, sensitivity, specificity) of the best flag vector among flags (..., N) that
    reaches min_specificity: the highest sensitivity, then the highest specificity; the
    first such index (C order) on ties. None when none reaches it."""
    flat = flags.reshape(-1, flags.shape[-1])
    good = ~bad
    sens = flat[:, bad].mean(axis=1) if bad.any() else np.zeros(len(flat))
    spec = 1.0 - flat[:, good].mean(axis=1) if good.any() else np.ones(len(flat))
    ok = spec >= min_specificity - 1e-12
    if not ok.any():
        return None
    key = np.where(ok, sens * 1e3 + spec, -np.inf)  # sensitivity first (steps of 1/N > 1e-3), then specificity
    i = int(np.argmax(key))
    return i, float(sens[i]), float(spec[i])


def fit_rule(table: Mapping[str, np.ndarray], dices: np.ndarray, *, bad_below: float = BAD_BELOW,
             min_specificity: float = MIN_SPECIFICITY, candidates: Mapping[str, str] | None = None,
             empty: np.ndarray | None = None, notes: str = "") -> QCRule:
    """The rule with the highest sensitivity at a specificity of at least `min_specificity`
    on these patients: one threshold on one candidate feature, or an OR of two when that
    catches strictly more bad patients (fewer parameters are preferred), with a logistic
    score on the rule's features.

    Args:
        table: {feature: float (N,)} over the patients (NaN where undefined).
        dices: float (N,) Dice of each patient.
        candidates: {feature: "<" or ">"}, the direction that means worse (default CANDIDATES).
        empty: bool (N,) patients whose mask is empty (always flagged).

    Raises:
        ConfigError: a candidate feature missing from `table`, or no patients.
    """
    candidates = dict(CANDIDATES if candidates is None else candidates)
    d = np.asarray(dices, dtype=float)
    if not d.size:
        raise ConfigError("no patients to calibrate the QC rule on")
    missing = [f for f in candidates if f not in table]
    if missing:
        raise ConfigError(f"QC features lack {', '.join(missing)}")
    bad = d < bad_below
    forced = np.zeros(d.size, bool) if empty is None else np.asarray(empty, dtype=bool)
    names = list(candidates)
    cuts = {f: _cuts(np.asarray(table[f], float)) for f in names}
    flags = {f: _flags(np.asarray(table[f], float), candidates[f], cuts[f]) | forced for f in names}
    best_single: tuple[float, float, QCRule] | None = None
    for f in names:
        found = _best(flags[f], bad, min_specificity)
        if found and (best_single is None or (found[1], found[2]) > best_single[:2]):
            best_single = (found[1], found[2], QCRule((Condition(f, candidates[f], cuts[f][found[0]]),)))
    best_pair: tuple[float, float, QCRule] | None = None
    for i, f in enumerate(names):
        for g in names[i + 1:]:
            both = flags[f][:, None, :] | flags[g][None, :, :]
            found = _best(both, bad, min_specificity)
            if found and (best_pair is None or (found[1], found[2]) > best_pair[:2]):
                a, b = divmod(found[0], len(cuts[g]))
                best_pair = (found[1], found[2], QCRule((Condition(f, candidates[f], cuts[f][a]),
                                                          Condition(g, candidates[g], cuts[g][b]))))
    chosen = best_single
    if best_pair is not None and (chosen is None or best_pair[0] > chosen[0] + 1e-12):
        chosen = best_pair
    if chosen is None:  # nothing reaches the specificity (e.g. many empty masks): flag only what is forced
        f = names[0]
        chosen = (0.0, 0.0, QCRule((Condition(f, candidates[f], cuts[f][0 if candidates[f] == "<" else -1]),)))
    rule = chosen[2]
    used = [c.feature for c in rule.conditions]
    score = fit_logistic(np.column_stack([np.asarray(table[f], float) for f in used]), bad, used)
    return QCRule(rule.conditions, score, bad_below, notes)


def fit_logistic(x: np.ndarray, y: np.ndarray, names: Sequence[str], *, ridge: float = 1.0,
                 iterations: int = 50) -> LogisticScore | None:
    """A logistic regression of y (bool (N,)) on x (float (N, K)), with an L2 penalty
    `ridge` on the standardised coefficients (out-of-fold data with few bad patients is
    often separable, where plain maximum likelihood diverges); rows with NaN are left
    out. None without both classes."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=bool)
    keep = np.isfinite(x).all(axis=1)
    x, y = x[keep], y[keep].astype(float)
    if not x.size or y.min() == y.max():
        return None
    mu, sd = x.mean(axis=0), x.std(axis=0)
    sd[sd == 0] = 1.0
    xs = np.column_stack([np.ones(len(x)), (x - mu) / sd])
    w = np.zeros(xs.shape[1])
    penalty = np.full(xs.shape[1], ridge)
    penalty[0] = 0.0  # the intercept is not shrunk
    for _ in range(iterations):  # Newton's method on the penalised log-likelihood
        p = 1.0 / (1.0 + np.exp(-np.clip(xs @ w, -500, 500)))
        grad = xs.T @ (p - y) + penalty * w
        hess = (xs * (p * (1 - p))[:, None]).T @ xs + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    coef = w[1:] / sd
    intercept = float(w[0] - (coef * mu).sum())
    return LogisticScore(tuple(names), tuple(float(c) for c in coef), intercept)


def _spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    from scipy.stats import spearmanr

    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 3 or np.ptp(x[keep]) == 0:
        return None
    return float(spearmanr(x[keep], y[keep]).statistic)


def _json_float(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def calibrate(features: Sequence[Mapping[str, float]], dices: Sequence[float], folds: Sequence[int], *,
              bad_below: float = BAD_BELOW, min_specificity: float = MIN_SPECIFICITY,
              patients: Sequence[str] | None = None, candidates: Mapping[str, str] | None = None,
              notes: str = "") -> tuple[QCRule, dict[str, Any]]:
    """Fit the QC rule on labelled out-of-fold features, and estimate how it does out of
    sample by leaving one fold out: the whole procedure (`fit_rule`) is refitted on the
    other folds and applied to the held-out fold, for each fold in turn.

    Args:
        features: per patient, `patient_features(...).to_dict()` (one model's, out of fold).
        dices: per patient, the Dice of that model's mask.
        folds: per patient, the fold that held it out (the model that predicted it).
        patients: names for the per-patient table (default: their indices).
        candidates: {feature: direction meaning worse} (default CANDIDATES).

    Returns:
        (the rule fitted on all patients, the report: "rule", "in_sample" and
        "out_of_fold" (`flag_performance`, plus the AUC of the score and each fold's
        refitted rule), "features" (Spearman of each feature with Dice and its AUC for
        bad patients), "patients" (the per-patient table)). JSON-safe (NaN -> None).

    Raises:
        ConfigError: lists of different lengths, no patients, a missing feature.
    """
    n = len(features)
    if not (n == len(dices) == len(folds)):
        raise ConfigError(f"features, dices and folds differ in length: {n}, {len(dices)}, {len(folds)}")
    if not n:
        raise ConfigError("no patients to calibrate the QC rule on")
    names = list(patients) if patients is not None else [str(i) for i in range(n)]
    candidates = dict(CANDIDATES if candidates is None else candidates)
    d = np.asarray(dices, dtype=float)
    fold = np.asarray(folds)
    keys = [k for k in features[0] if all(k in f for f in features)]
    table = {k: np.array([float(f[k]) for f in features]) for k in keys}
    empty_key = "final_volume_voxels" if "final_volume_voxels" in table else "volume_voxels"
    empty = ~(table[empty_key] > 0) if empty_key in table else np.zeros(n, bool)
    bad = d < bad_below

    rule = fit_rule(table, d, bad_below=bad_below, min_specificity=min_specificity, candidates=candidates,
                    empty=empty, notes=notes)
    in_sample = [rule.apply(f) for f in features]

    oof: list[QCResult | None] = [None] * n
    fold_rules = []
    for k in sorted(set(fold.tolist())):
        held = fold == k
        train = ~held
        sub = {f: v[train] for f, v in table.items()}
        r = fit_rule(sub, d[train], bad_below=bad_below, min_specificity=min_specificity, candidates=candidates,
                     empty=empty[train])
        fold_rules.append({"fold": k, "rule": r.to_dict()})
        for i in np.flatnonzero(held):
            oof[i] = r.apply(features[i])
    oof_results = [r for r in oof if r is not None]

    perf = flag_performance([r.flag for r in oof_results], d, bad_below)
    perf["auc_score"] = auc([r.score for r in oof_results], bad)
    perf["folds"] = fold_rules
    perf_in = flag_performance([r.flag for r in in_sample], d, bad_below)
    perf_in["auc_score"] = auc([r.score for r in in_sample], bad)
    feature_stats = {}
    for f, v in table.items():
        if f in ("members", "disagreement") or np.ptp(np.nan_to_num(v)) == 0:
            continue
        direction = candidates.get(f, ">")  # for the other features, the AUC of "higher is worse"
        sign = -1.0 if direction == "<" else 1.0
        feature_stats[f] = {"spearman_dice": _spearman(v, d), "direction": direction,
                            "auc_bad": auc(sign * np.nan_to_num(v, nan=np.inf if sign > 0 else -np.inf), bad)}
    rows = []
    for i in range(n):
        rows.append({"patient": names[i], "fold": int(fold[i]), "dice": float(d[i]), "bad": bool(bad[i]),
                     "flag": in_sample[i].flag, "score": in_sample[i].score,
                     "flag_oof": oof_results[i].flag, "score_oof": oof_results[i].score,
                     "reason": in_sample[i].reason,
                     **{f: _json_float(float(v[i])) for f, v in table.items()}})
    report = {
        "bad_below": bad_below, "min_specificity": min_specificity, "candidates": candidates,
        "rule": rule.to_dict(), "in_sample": perf_in, "out_of_fold": perf,
        "features": feature_stats, "patients": rows,
        "method": ("thresholds chosen for the highest sensitivity at specificity >= min_specificity (one feature, "
                   "or two OR-ed when that catches more bad patients); out_of_fold: the whole fit refitted without "
                   "each fold and applied to it; score: logistic regression (L2 1 on standardised features) of "
                   "Dice < bad_below on the rule's features"),
    }
    return rule, _json_safe(report)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return _json_float(float(obj))
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in fields(QCFeatures))


# --------------------------------------------------------------------------- one prediction

FLAG_FIELDS = ("qc", "qc_score", "qc_reason")
# The features a summary row shows (all of them are in `QCFeatures`).
SHOWN_FEATURES = ("mean_prob", "ambiguity", "removed_fraction", "removed_components", "components",
                  "touches_edge", "disagreement")


def assess(member_probs: np.ndarray, final_mask: np.ndarray, inference: InferenceConfig,
           spacing: Sequence[float] | None = None, rule: QCRule | None = None) -> dict[str, Any]:
    """The quality record of one prediction: {"features": QCFeatures as a dict} and, with
    a `rule`, "qc" ("ok"/"review"), "qc_score" and "qc_reason" (see `QCRule.apply`).
    Without a rule (a model file from before rules were stored, an exported graph) the
    features come without a flag. Arguments as in `patient_features`."""
    features = patient_features(member_probs, final_mask, inference, spacing)
    record: dict[str, Any] = {"features": features.to_dict()}
    if rule is not None:
        result = rule.apply(features)
        record.update(qc=result.flag, qc_score=result.score, qc_reason=result.reason)
    return record
