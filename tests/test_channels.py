"""2.5-D input: neighbouring-slice channels (`FLAIR-1`, `FLAIR+1`), the same in training and
inference, and a 2.5-D model started from a 2-D one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tumorseg.config import Channel, TrainConfig, neighbour_step, parse_channels, replace_config
from tumorseg.data.cache import prepare
from tumorseg.data.channels import select_channels
from tumorseg.data.dataset import load_arrays
from tumorseg.inference import Predictor
from tumorseg.model import UNet
from tumorseg.training import map_input_channels

CONTEXT = ("pre-contrast", "FLAIR", "post-contrast", "FLAIR-1", "FLAIR+1")


def test_channel_names_parse_to_sequence_and_offset():
    assert parse_channels(["FLAIR+1", "pre-contrast", "Pre-Contrast-2", " flair-1 ", "post-contrast"]) == [
        Channel(1, 1), Channel(0, 0), Channel(0, -2), Channel(1, -1), Channel(2, 0)]


@pytest.mark.parametrize("spacing, step", [(None, 1), (5.0, 1), (7.0, 1), (1.0, 5), (2.4, 2), (0.9, 6),
                                           (0.0, 1), (math.nan, 1), (-3.0, 1)])
def test_neighbour_step_is_the_slice_nearest_five_mm_away(spacing, step):
    assert neighbour_step(spacing) == step


def test_neighbours_are_chosen_by_distance_where_the_spacing_is_known():
    volume = np.zeros((12, 2, 2, 3), dtype=np.float32)
    volume[..., 1] = np.arange(12)[:, None, None]  # FLAIR of slice s holds s
    volume[..., 0] = 100 + np.arange(12)[:, None, None]
    names = ["FLAIR-1", "FLAIR", "FLAIR+1", "pre-contrast"]
    # 1 mm slices: the neighbour is 5 slices away; past the ends the edge slice repeats.
    out = select_channels(volume, names, slice_spacing=1.0)
    assert out.shape == (12, 2, 2, 4) and out.dtype == np.float32
    assert out[:, 0, 0, 0].tolist() == [0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6]
    assert out[:, 0, 0, 2].tolist() == [5, 6, 7, 8, 9, 10, 11, 11, 11, 11, 11, 11]
    assert out[:, 0, 0, 1].tolist() == list(range(12)) and out[:, 0, 0, 3].tolist() == list(range(100, 112))
    # unknown spacing (kaggle_3m): the adjacent slices
    assert select_channels(volume, names)[:, 0, 0, 2].tolist() == list(range(1, 12)) + [11]
    # some slices only: the same rows
    np.testing.assert_array_equal(select_channels(volume, names, 1.0, slices=[9, 0]), out[[9, 0]])
    # without neighbours: plain channel selection
    np.testing.assert_array_equal(select_channels(volume, ["post-contrast", "FLAIR"]), volume[..., [2, 1]])


def test_inference_builds_the_inputs_training_builds(kaggle, tmp_path):
    cache = prepare(kaggle.root, tmp_path / "cache", progress=False)
    model = UNet(in_channels=5, n_features=4, depth=3).eval()
    predictor = Predictor([model], channels=CONTEXT, device="cpu", precision="fp32")
    patient = "PAT_A_2001"
    rec = cache.records[patient]
    arrays = load_arrays(cache, [patient], CONTEXT)
    trained_on, _ = arrays.patient_batch(0)
    served = predictor.normalize_volume(np.asarray(cache.images(patient)), rec.low, rec.high)
    assert served.shape == (12, 5, 32, 32)
    torch.testing.assert_close(served, trained_on, rtol=0, atol=0)
    # with a spacing of 1 mm between slices the neighbours move 5 slices away
    far = predictor.normalize_volume(np.asarray(cache.images(patient)), rec.low, rec.high, spacing=(1.0, 1.0, 1.0))
    torch.testing.assert_close(far[2, 4], trained_on[7, 1], rtol=0, atol=0)
    torch.testing.assert_close(far[2, 3], trained_on[0, 1], rtol=0, atol=0)


def test_a_2_5d_model_started_from_a_2d_one_computes_what_the_2d_one_did():
    torch.manual_seed(0)
    flat = UNet(in_channels=3, n_features=4, depth=3).eval()
    state = flat.state_dict()
    deep = UNet(in_channels=5, n_features=4, depth=3).eval()
    weights = dict(state)
    weights["layers.0.conv1.weight"] = map_input_channels(state["layers.0.conv1.weight"], CONTEXT[:3], CONTEXT)
    deep.load_state_dict(weights)
    x = torch.rand(2, 5, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(deep(x), flat(x[:, :3]), rtol=0, atol=0)
    # channels are matched by name, not by position
    w = state["layers.0.conv1.weight"]
    moved = map_input_channels(w, CONTEXT[:3], ["FLAIR+1", "post-contrast", "FLAIR"])
    assert torch.equal(moved[:, 0], torch.zeros_like(w[:, 0]))
    assert torch.equal(moved[:, 1], w[:, 2]) and torch.equal(moved[:, 2], w[:, 1])


def test_a_2_5d_run_trains_saves_its_channels_and_predicts(kaggle, tmp_path):
    from tumorseg.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from tumorseg.evaluation import segment_cached
    from tumorseg.training import fit, initial_weights

    cache = prepare(kaggle.root, tmp_path / "cache", progress=False)
    base = replace_config(TrainConfig(), dict(
        n_features=4, depth=3, features=None, epochs=1, batch_size=4, folds=2, crop=16, samples_per_epoch=8,
        precision="fp32", channels_last=False, lr=1e-2))
    flat = UNet.from_config(base.model_config()).eval()
    save_checkpoint(tmp_path / "flat.pt", Checkpoint.of_model(flat, train_config=base))
    cfg = replace_config(base, {"channels": CONTEXT, "init": str(tmp_path / "flat.pt")})
    start = initial_weights(cfg)["layers.0.conv1.weight"]
    old = flat.state_dict()["layers.0.conv1.weight"]
    assert torch.equal(start[:, :3], old) and not start[:, 3:].any()  # old channels copied, new ones at zero
    fit(cfg, cache, tmp_path / "run", show_progress=False)
    ck = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ck.channels == CONTEXT and ck.model_config.in_channels == 5
    result = segment_cached(Predictor.from_checkpoints(tmp_path / "run" / "last.pt", device="cpu"), cache,
                            "PAT_B_2002")
    assert result.mask.shape == (5, 32, 32) and np.isfinite(result.probabilities).all()


def test_predict_volume_chooses_neighbours_by_the_inputs_slice_spacing():
    from tumorseg.data.inputs import InputVolume
    from tumorseg.data.nifti import Grid

    torch.manual_seed(2)
    predictor = Predictor([UNet(in_channels=5, n_features=4, depth=3).eval()], channels=CONTEXT, device="cpu",
                          precision="fp32")
    images = np.random.default_rng(0).integers(0, 255, (12, 32, 32, 3)).astype(np.float32)
    grid = Grid(shape=(32, 32, 12), affine=np.eye(4), header=None, to_model=np.zeros((3, 2)),
                spacing=(1.0, 0.9, 0.9))
    thin = predictor.predict_volume(InputVolume(name="p", kind="nifti", images=images, files=[], grid=grid))
    np.testing.assert_array_equal(thin.probabilities, predictor.segment(images, spacing=(1.0, 0.9, 0.9)).probabilities)
    adjacent = predictor.segment(images).probabilities  # what it would be with the adjacent slices
    assert np.abs(thin.probabilities - adjacent).max() > 1e-4


def test_a_cached_patient_with_a_known_spacing_gets_the_neighbours_training_gave_it(kaggle, tmp_path, monkeypatch):
    from tumorseg.evaluation import segment_cached

    cache = prepare(kaggle.root, tmp_path / "cache", progress=False)
    patient = "PAT_A_2001"
    monkeypatch.setattr(cache.records[patient], "spacing", [1.0, 0.9, 0.9])  # as a NIfTI patient's record
    trained_on, _ = load_arrays(cache, [patient], CONTEXT).patient_batch(0)
    assert torch.equal(trained_on[2, 4], trained_on[7, 1])  # 5 slices away at 1 mm
    predictor = Predictor([UNet(in_channels=5, n_features=4, depth=3).eval()], channels=CONTEXT, device="cpu",
                          precision="fp32")
    seen = []
    real = predictor.predict
    monkeypatch.setattr(predictor, "predict", lambda x, **k: seen.append(x) or real(x, **k))
    segment_cached(predictor, cache, patient)
    torch.testing.assert_close(seen[0], trained_on, rtol=0, atol=0)
