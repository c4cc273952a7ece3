"""postprocess: thresholding and connected components on hand-made volumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tumorseg.config import POSTPROCESS_CHOICES, InferenceConfig
from tumorseg.errors import ConfigError
from tumorseg.postprocess import binarize, largest_component, postprocess


def a(rows) -> np.ndarray:
    return np.array(rows, dtype=bool)


def test_largest_component_uses_26_connectivity():
    m = np.zeros((3, 8, 8), dtype=bool)
    # A: three voxels touching only at corners across slices (26-connected: size 3).
    m[0, 0, 0] = m[1, 1, 1] = m[2, 2, 2] = True
    # B: two face-connected voxels (size 2). With 6-connectivity B would win.
    m[0, 6, 6] = m[0, 6, 7] = True
    out = largest_component(m)
    expected = np.zeros_like(m)
    expected[0, 0, 0] = expected[1, 1, 1] = expected[2, 2, 2] = True
    assert out.dtype == bool
    assert np.array_equal(out, expected)


def test_largest_component_2d_uses_8_connectivity():
    m = a([[1, 0, 0, 0, 1],
           [0, 1, 0, 0, 1],
           [0, 0, 1, 0, 0]])
    expected = a([[1, 0, 0, 0, 0],
                  [0, 1, 0, 0, 0],
                  [0, 0, 1, 0, 0]])
    assert np.array_equal(largest_component(m), expected)


@pytest.mark.parametrize("n_components", [0, 1])
def test_largest_component_keeps_zero_or_one_component(n_components):
    m = np.zeros((2, 4, 4), dtype=np.uint8)
    if n_components:
        m[0, 1:3, 1:3] = 1
        m[1, 0, 0] = 1
    assert np.array_equal(largest_component(m), m.astype(bool))

def test_binarize_thresholds_strictly_then_post_processes():
    probs = np.zeros((2, 1, 4, 4), dtype=np.float32)
    probs[0, 0, 0, 0] = 0.5  # not above 0.5
    probs[0, 0, 1, 1] = 0.51
    probs[1, 0, 3, 3] = 0.9  # another component, one voxel
    probs[1, 0, 0:2, 0:2] = 0.7  # joins (0, 1, 1) diagonally across slices: 5 voxels
    out = binarize(probs)
    assert out.shape == (2, 4, 4) and out.dtype == bool
    assert int(out.sum()) == 6 and not out[0, 0, 0]
    lcc = binarize(torch.from_numpy(probs), InferenceConfig(postprocess="lcc"))
    assert int(lcc.sum()) == 5 and not lcc[1, 3, 3]
    assert int(binarize(probs[:, 0], InferenceConfig(threshold=0.8)).sum()) == 1


def test_every_choice_is_implemented_and_unknown_ones_are_refused():
    m = np.ones((1, 2, 2), dtype=bool)
    for choice in POSTPROCESS_CHOICES:
        method = choice.replace(":N", ":2").replace(":P", ":0.5")
        assert postprocess(m, method, np.full(m.shape, 0.9)).shape == m.shape
        InferenceConfig(postprocess=method)
    for bad in ["biggest", "min_size:0", "min_size:x", "confident:1", "confident:0", "lcc:2", "top_mass:1", 3]:
        with pytest.raises(ConfigError) as e:
            postprocess(m, bad) if isinstance(bad, str) else InferenceConfig(postprocess=bad)
        assert str(e.value) == ("postprocess must be none, lcc, top_mass, min_size:N (N >= 1) or "
                                f"confident:P (0 < P < 1), got {bad!r}")


def test_top_mass_keeps_the_component_with_the_highest_summed_probability():
    probs = np.zeros((2, 5, 5), dtype=np.float32)
    probs[0, 0, 0:3] = 0.55  # C: 3 voxels, the largest, mass 1.65
    probs[1, 4, 3:5] = 0.95  # D: 2 voxels, mass 1.9
    probs[1, 2, 0] = 0.6  # E: 1 voxel, mass 0.6
    mask = probs > 0.5
    lcc = postprocess(mask, "lcc")
    top = postprocess(mask, "top_mass", probs)
    assert int(lcc.sum()) == 3 and lcc[0, 0, 0:3].all()
    assert int(top.sum()) == 2 and top[1, 4, 3:5].all()
    assert np.array_equal(binarize(probs, InferenceConfig(postprocess="top_mass")), top)
    # one component (or none): kept as it is
    assert np.array_equal(postprocess(probs > 0.9, "top_mass", probs), probs > 0.9)
    assert not postprocess(probs > 0.99, "top_mass", probs).any()
    with pytest.raises(ConfigError, match="postprocess top_mass needs the probabilities"):
        postprocess(mask, "top_mass")


def _three_components() -> tuple[np.ndarray, np.ndarray]:
    """A 5-voxel component (peak 0.95), a 3-voxel one (peak 0.9) and a 1-voxel one (0.6)."""
    probs = np.zeros((2, 6, 6), dtype=np.float32)
    probs[0, 0, 0:3] = 0.7
    probs[1, 0, 0:2] = 0.95
    probs[0, 4, 3:6] = 0.9
    probs[1, 5, 0] = 0.6
    return probs > 0.5, probs


def test_min_size_drops_small_components_and_keeps_every_large_one():
    mask, probs = _three_components()
    assert int(postprocess(mask, "min_size:1").sum()) == 9
    assert int(postprocess(mask, "min_size:3").sum()) == 8
    kept = postprocess(mask, "min_size:4")
    assert int(kept.sum()) == 5 and kept[1, 0, 0] and not kept[0, 4, 4]
    assert not postprocess(mask, "min_size:6").any()


def test_confident_keeps_components_by_their_peak_probability():
    mask, probs = _three_components()
    assert int(postprocess(mask, "confident:0.6", probs).sum()) == 9
    assert int(postprocess(mask, "confident:0.9", probs).sum()) == 8  # both foci of a multifocal tumour
    assert int(postprocess(mask, "confident:0.95", probs).sum()) == 5
    assert int(binarize(probs, InferenceConfig(postprocess="confident:0.9")).sum()) == 8
    with pytest.raises(ConfigError, match="needs the probabilities"):
        postprocess(mask, "confident:0.9")
