"""inference.Predictor: one model or an ensemble, chunking, TTA, logits, normalisation,
whole-volume segmentation, and loading from checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tumorseg.checkpoint import Checkpoint, save_checkpoint
from tumorseg.config import InferenceConfig
from tumorseg.errors import CheckpointError, ConfigError
from tumorseg.inference import Predictor
from tumorseg.model import UNet


class Constant(nn.Module):
    """Logits equal to `value` everywhere: (B, C, H, W) -> (B, 1, H, W)."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 1, *x.shape[-2:]), self.value) + 0 * self.dummy


class LeftHalf(nn.Module):
    """Logit +4 on the left half of the image, -4 on the right (not flip-invariant)."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.full((x.shape[0], 1, *x.shape[-2:]), -4.0)
        z[..., : x.shape[-1] // 2] = 4.0
        return z + 0 * self.dummy


class CountCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.batches: list[int] = []
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        return x[:, :1] * 2 - 1 + 0 * self.dummy


def predictor(*models: nn.Module, **kw) -> Predictor:
    return Predictor(list(models), fuse=False, device="cpu", precision="fp32", channels_last=False, **kw)


def test_probabilities_and_logits_of_one_model():
    out = predictor(Constant(2.0)).predict(torch.rand(3, 3, 5, 7), logits=True)
    assert out.probabilities.shape == out.logits.shape == (3, 1, 5, 7)
    assert torch.allclose(out.probabilities, torch.full((3, 1, 5, 7), 1 / (1 + np.exp(-2.0))))
    assert torch.equal(out.logits, torch.full((3, 1, 5, 7), 2.0))
    assert predictor(Constant(2.0)).predict(torch.rand(1, 3, 4, 4)).logits is None


def test_ensemble_averages_probabilities_not_logits():
    # sigmoid(+3) = 0.9526, sigmoid(-1) = 0.2689: mean 0.6107 (mean logit 1 would give 0.7311)
    out = predictor(Constant(3.0), Constant(-1.0)).predict(torch.rand(2, 3, 4, 4), logits=True)
    expected = (torch.sigmoid(torch.tensor(3.0)) + torch.sigmoid(torch.tensor(-1.0))) / 2
    assert torch.allclose(out.probabilities, expected.expand(2, 1, 4, 4))
    assert torch.allclose(out.logits, torch.logit(expected).expand(2, 1, 4, 4), atol=1e-5)


def test_tta_averages_with_the_flipped_image():
    x = torch.rand(1, 3, 2, 4)
    plain = predictor(LeftHalf()).predict(x).probabilities
    assert plain[0, 0, 0].tolist() == pytest.approx([0.982, 0.982, 0.018, 0.018], abs=1e-3)
    tta = predictor(LeftHalf(), inference=InferenceConfig(tta=True)).predict(x).probabilities
    # The flipped prediction has tumour on the right: the mean is 0.5 everywhere.
    assert torch.allclose(tta, torch.full_like(tta, 0.5))


def test_chunks_of_batch_size_and_the_same_result_for_any_size():
    model = CountCalls()
    x = torch.rand(10, 3, 4, 4)
    out = predictor(model, batch_size=4).predict(x)
    assert model.batches == [4, 4, 2]
    assert torch.equal(out.probabilities, predictor(CountCalls(), batch_size=10).predict(x).probabilities)


def test_training_mode_is_restored_after_predicting():
    model = UNet(n_features=2, depth=2).train()
    predictor(model).predict(torch.rand(2, 3, 8, 8))
    assert model.training
    model.eval()
    predictor(model).predict(torch.rand(2, 3, 8, 8))
    assert not model.training


def test_fused_predictor_matches_the_model_and_leaves_it_alone():
    torch.manual_seed(0)
    model = UNet(n_features=4, depth=3)
    model.train()
    model(torch.rand(4, 3, 16, 16))  # BatchNorm statistics that are not the defaults
    model.eval()
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        expected = torch.sigmoid(model(x))
    fused = Predictor([model], device="cpu", precision="fp32")
    (copy,) = fused.engine.models
    assert copy is not model and not any(isinstance(m, nn.BatchNorm2d) for m in copy.modules())
    assert torch.allclose(fused.predict(x).probabilities, expected, atol=1e-5)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_normalize_volume_selects_channels_and_uses_percentiles():
    vol = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    vol[..., 0] = 10
    vol[0, 0, 0, 0] = 20  # not constant: a real sequence
    vol[..., 1] = np.arange(16, dtype=np.uint8).reshape(4, 4) * 10  # FLAIR 0..150
    vol[..., 2] = 200
    vol[1, 3, 3, 2] = 100
    p = predictor(Constant(0.0), channels=("FLAIR",), percentiles=(0.0, 100.0))
    x = p.normalize_volume(vol)
    assert x.shape == (2, 1, 4, 4)
    assert torch.allclose(x[0, 0], torch.arange(16, dtype=torch.float32).reshape(4, 4) / 15)
    # Given statistics (of all three channels) replace the volume's own.
    y = p.normalize_volume(vol, low=[0, 0, 0], high=[255, 300, 255])
    assert torch.allclose(y[1, 0], torch.arange(16, dtype=torch.float32).reshape(4, 4) * 10 / 300)
    with pytest.raises(ConfigError, match=r"expected a volume \(S, H, W, 3\)"):
        p.normalize_volume(vol[..., :2])


def test_segment_thresholds_post_processes_and_counts_removed_voxels():
    class TwoBlobs(nn.Module):
        def forward(self, x):
            z = torch.full((x.shape[0], 1, *x.shape[-2:]), -5.0)
            z[:, :, 0:3, 0:3] = 5.0  # 9 voxels per slice
            z[:, :, 6, 6] = 5.0  # 1 voxel per slice, not connected
            return z

    vol = np.random.default_rng(0).integers(0, 255, (2, 8, 8, 3), dtype=np.uint8)
    seg = predictor(TwoBlobs()).segment(vol)
    assert seg.mask.shape == seg.probabilities.shape == (2, 8, 8) and seg.mask.dtype == bool
    assert int(seg.mask.sum()) == 20 and seg.removed_voxels == 0
    seg = predictor(TwoBlobs(), inference=InferenceConfig(postprocess="lcc")).segment(vol)
    assert int(seg.mask.sum()) == 18 and seg.removed_voxels == 2


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="at least one model"):
        Predictor([], device="cpu")
    with pytest.raises(ConfigError, match="batch size must be >= 1, got 0"):
        predictor(Constant(0.0), batch_size=0)
    with pytest.raises(ConfigError, match=r"expected images \(N, 3, H, W\), got \(2, 1, 4, 4\)"):
        predictor(Constant(0.0)).predict(torch.rand(2, 1, 4, 4))
    with pytest.raises(ConfigError, match="precision must be one of auto, bf16, fp32"):
        Predictor([Constant(0.0)], fuse=False, device="cpu", precision="fp8")


def _save(path, model: UNet, **fields) -> None:
    save_checkpoint(path, Checkpoint.of_model(model, **fields))


@pytest.mark.slow
def test_from_checkpoints_one_or_an_ensemble_with_overrides(tmp_path):
    torch.manual_seed(0)
    a, b = UNet(n_features=4, depth=2).eval(), UNet(n_features=4, depth=2).eval()
    _save(tmp_path / "a.pt", a, inference=InferenceConfig(threshold=0.4, postprocess="lcc"))
    _save(tmp_path / "b.pt", b)
    one = Predictor.from_checkpoints(tmp_path / "a.pt", device="cpu", precision="fp32")
    assert one.members == 1 and one.inference == InferenceConfig(0.4, "lcc") and one.kind == "tumorseg"
    both = Predictor.from_checkpoints([tmp_path / "a.pt", tmp_path / "b.pt"], threshold=0.6, tta=True,
                                      device="cpu", precision="fp32")
    assert both.members == 2 and both.inference == InferenceConfig(0.6, "lcc", True)
    assert both.source == f"{tmp_path / 'a.pt'}, {tmp_path / 'b.pt'}"
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        pa = 0.5 * (torch.sigmoid(a(x)) + torch.sigmoid(a(x.flip(-1))).flip(-1))
        pb = 0.5 * (torch.sigmoid(b(x)) + torch.sigmoid(b(x.flip(-1))).flip(-1))
    assert torch.allclose(both.predict(x).probabilities, (pa + pb) / 2, atol=1e-5)
    with pytest.raises(ConfigError, match="threshold must be between 0 and 1, got 5"):
        Predictor.from_checkpoints(tmp_path / "a.pt", threshold=5, device="cpu")


def test_an_ensemble_needs_one_input_convention(tmp_path):
    _save(tmp_path / "three.pt", UNet(n_features=2, depth=2))
    _save(tmp_path / "flair.pt", UNet(in_channels=1, n_features=2, depth=2), channels=("FLAIR",))
    with pytest.raises(CheckpointError, match="an ensemble needs one input"):
        Predictor.from_checkpoints([tmp_path / "three.pt", tmp_path / "flair.pt"], device="cpu")


@pytest.mark.slow
def test_shipped_model_is_the_default(tmp_path):
    p = Predictor.from_checkpoints(device="cpu", precision="fp32", engine="torch")  # the engine choice: test_cli
    assert p.source.endswith("tumorseg_lgg.pt") and p.inference.postprocess == "lcc"
    assert p.members == 5




# --------------------------------------------------------------------------- PatientResult values


def test_an_ensemble_result_keeps_each_models_probabilities_and_their_mean():
    vol = np.random.default_rng(0).integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    result = predictor(Constant(3.0), Constant(-1.0)).segment(vol)
    p3, pm1 = 1 / (1 + np.exp(-3.0)), 1 / (1 + np.exp(1.0))
    assert result.members.dtype == np.float16 and result.members.shape == (2, 3, 8, 8)
    assert np.allclose(result.members[0], p3, atol=1e-3) and np.allclose(result.members[1], pm1, atol=1e-3)
    assert np.allclose(result.probabilities, (p3 + pm1) / 2, atol=1e-6)
    assert np.allclose(result.spread, (p3 - pm1) / 2, atol=1e-6)  # population std of two values
    assert result.member_probabilities().shape == (2, 3, 8, 8)
    assert result.mask.all() and result.tumour_voxels == 192 and result.tumour_slices == 3
    single = predictor(Constant(3.0)).segment(vol)
    assert single.members is None and single.spread is None
    assert np.array_equal(single.member_probabilities(), single.probabilities[None])


def test_predict_volume_brings_probabilities_back_to_the_inputs_grid():
    from tumorseg.data.inputs import InputVolume

    images = np.random.default_rng(1).integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    volume = InputVolume("p", "nifti", images, [], native_shape=(16, 12))
    result = predictor(LeftHalf(), Constant(-10.0)).predict_volume(volume)
    assert result.name == "p" and result.probabilities.shape == result.mask.shape == (2, 16, 12)
    assert result.members.shape == (2, 2, 16, 12)
    # LeftHalf's probability sigmoid(4) on the left, sigmoid(-4) on the right, at both sizes.
    assert np.allclose(result.members[0][:, :, 0], 1 / (1 + np.exp(-4.0)), atol=1e-3)
    assert np.allclose(result.members[0][:, :, -1], 1 / (1 + np.exp(4.0)), atol=1e-3)


def test_segment_records_what_post_processing_removed():
    from tumorseg.inference import finish

    probs = np.zeros((1, 6, 6), dtype=np.float32)
    probs[0, :3, :3] = 0.9  # 9 voxels, the largest region
    probs[0, 5, 5] = 0.8  # 1 voxel, removed by lcc
    result = finish(probs, InferenceConfig(threshold=0.5, postprocess="lcc"))
    assert (result.removed_voxels, result.removed_components, result.tumour_voxels) == (1, 1, 9)
    kept = finish(probs, InferenceConfig(threshold=0.5, postprocess="none"))
    assert (kept.removed_voxels, kept.removed_components, kept.tumour_voxels) == (0, 0, 10)


def test_a_model_files_quality_rule_and_training_patients_come_with_the_predictor(tmp_path, monkeypatch):
    from tumorseg.checkpoint import store_qc_entry
    from tumorseg.qc import Condition, QCRule

    torch.manual_seed(0)
    _save(tmp_path / "a.pt", UNet(n_features=4, depth=2).eval(),
          split={"fold": 0, "train": ["P1", "P2"], "val": ["P3"]})
    plain = Predictor.from_checkpoints(tmp_path / "a.pt", device="cpu", precision="fp32", engine="torch")
    assert plain.qc_rule is None and plain.trained_on == {"P1", "P2"}
    rule = QCRule((Condition("mean_prob", "<", 0.9),), notes="test")
    store_qc_entry(tmp_path / "a.pt", {"rule": rule.to_dict(), "calibration": None})
    reads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: reads.append(a[0]) or real_load(*a, **k))
    assert Predictor.from_checkpoints(tmp_path / "a.pt", device="cpu", precision="fp32", engine="torch").qc_rule == rule
    assert [str(r) for r in reads] == [str(tmp_path / "a.pt")], reads  # weights and rule: one read
    # A rule belongs to its own file's weights: a set of several files carries none.
    _save(tmp_path / "b.pt", UNet(n_features=4, depth=2).eval())
    both = Predictor.from_checkpoints([tmp_path / "a.pt", tmp_path / "b.pt"], device="cpu", precision="fp32",
                                      engine="torch")
    assert both.qc_rule is None


def test_a_damaged_quality_entry_is_named_where_the_rule_is_used_and_does_not_stop_loading(tmp_path):
    from tumorseg.checkpoint import QC_KEY, load_members, read_payload

    _save(tmp_path / "a.pt", UNet(n_features=4, depth=2).eval())
    payload = read_payload(tmp_path / "a.pt")
    torch.save({**payload, QC_KEY: "not a rule"}, tmp_path / "a.pt")
    assert len(load_members(tmp_path / "a.pt")) == 1  # calibrate-qc can still read it and write a new rule
    with pytest.raises(CheckpointError, match=f"a.pt: damaged {QC_KEY} entry \\(str, not a mapping\\)"):
        Predictor.from_checkpoints(tmp_path / "a.pt", device="cpu", precision="fp32", engine="torch")
