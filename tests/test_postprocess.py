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
        assert postprocess(m, choice).shape == m.shape
    with pytest.raises(ConfigError, match="postprocess must be one of none, lcc, got 'biggest'"):
        postprocess(m, "biggest")
