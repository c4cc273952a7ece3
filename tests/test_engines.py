"""Engines and export: ONNX/OpenVINO graphs match PyTorch, carry their metadata, and are
chosen by measurement; bad files and options get clear errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import tumorseg.engines as engines
import tumorseg.runtime as runtime
from tumorseg import Predictor
from tumorseg.checkpoint import Checkpoint, load_checkpoint, load_members, save_checkpoint, weights_digest
from tumorseg.cli import main
from tumorseg.config import InferenceConfig
from tumorseg.engines import OnnxRuntimeEngine, OpenVinoEngine, TorchEngine, engine_installed
from tumorseg.errors import CheckpointError, ConfigError
from tumorseg.export import export_model
from tumorseg.graphs import read_graph_info
from tumorseg.model import UNet

needs_onnx = pytest.mark.skipif(not (engine_installed("onnxruntime") and engine_installed("openvino")),
                                reason="onnxruntime and openvino are installed by pip install -e '.[dev]'")
pytestmark = needs_onnx


def _trained_like(seed: int) -> UNet:
    """A small U-Net whose BatchNorm statistics are not the defaults (folding must matter)."""
    torch.manual_seed(seed)
    model = UNet(n_features=4, depth=3).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(4, 3, 32, 32) * 3)
    return model.eval()


SPLITS = [{"fold": 0, "train": ["PAT_A_2001", "PAT_B_2002"], "val": ["PAT_C_2003"]},
          {"fold": 1, "train": ["PAT_A_2001", "PAT_C_2003"], "val": ["PAT_B_2002"]}]


@pytest.fixture
def checkpoints(tmp_path) -> list[Path]:
    paths = []
    for i in range(2):
        path = tmp_path / f"m{i}.pt"
        save_checkpoint(path, Checkpoint.of_model(_trained_like(i), inference=InferenceConfig(0.4, "lcc"),
                                                  notes=f"model {i}",
                                                  split=SPLITS[i]))
        paths.append(path)
    return paths


def _logits(models, x):
    with torch.no_grad():
        return torch.cat([m(x) for m in models], dim=1)


@pytest.mark.parametrize("suffix", [".onnx", ".xml"])
def test_exported_ensemble_matches_pytorch_with_dynamic_sizes(checkpoints, tmp_path, suffix):
    from tumorseg.checkpoint import export_ensemble

    out = tmp_path / "new" / f"ens{suffix}"  # into a folder that does not exist yet
    ensemble = tmp_path / "ens.pt"
    export_ensemble(checkpoints, ensemble)
    written = export_model(ensemble, out)
    assert written == ([out] if suffix == ".onnx" else [out, out.with_suffix(".bin")])
    info = read_graph_info(out)
    assert info.members == 2 and info.precision == "fp32" and info.inference == InferenceConfig(0.4, "lcc")
    assert info.channels == ("pre-contrast", "FLAIR", "post-contrast") and info.percentiles == (10.0, 99.0)
    models = [ck.build_model() for ck in load_members(ensemble)]  # the float16-stored weights
    engines = [OpenVinoEngine(out, 2, divisor=4)] + ([OnnxRuntimeEngine(out, 2, divisor=4)] if suffix == ".onnx"
                                                      else [])
    # Batch, height and width all dynamic; sizes that are no multiple of the divisor (4) are padded.
    for shape in [(1, 3, 32, 32), (5, 3, 48, 64), (2, 3, 30, 35)]:
        x = torch.rand(shape)
        expected = _logits(models, x)
        for engine in engines:
            got = engine(x)
            assert got.shape == (shape[0], 2, *shape[2:])
            assert torch.allclose(got, expected, atol=1e-3), (engine.name, (got - expected).abs().max())


@pytest.mark.parametrize("size", [(32, 32), (30, 35)])
def test_every_engine_gives_the_same_probabilities_and_masks(checkpoints, size):
    vol = np.random.default_rng(0).integers(0, 255, (6, *size, 3), dtype=np.uint8)
    results = {}
    for engine in ["torch", "onnxruntime", "openvino"]:
        p = Predictor.from_checkpoints(checkpoints[0], engine=engine, device="cpu", precision="fp32",
                                       postprocess="none", threshold=0.5)
        assert p.engine.name == engine and p.members == 1 and p.precision == "fp32"
        results[engine] = p.segment(vol)
    ref = results["torch"]
    for engine, seg in results.items():
        assert np.abs(seg.probabilities - ref.probabilities).max() < 1e-4, engine
        assert np.array_equal(seg.mask, ref.mask), engine


def test_tta_and_ensembles_average_the_same_way_on_every_engine(checkpoints):
    x = torch.rand(3, 3, 32, 32)
    models = [ck.build_model() for p in checkpoints for ck in load_members(p)]
    with torch.no_grad():
        p = torch.stack([0.5 * (torch.sigmoid(m(x)) + torch.sigmoid(m(x.flip(-1))).flip(-1)) for m in models]).mean(0)
    for engine in ["torch", "onnxruntime", "openvino"]:
        pred = Predictor.from_checkpoints(checkpoints, engine=engine, device="cpu", precision="fp32", tta=True)
        assert pred.members == 2
        assert torch.allclose(pred.predict(x).probabilities, p, atol=1e-4), engine


def test_auto_engine_is_measured_once_and_cached(checkpoints, monkeypatch, tmp_path):
    monkeypatch.setenv("TUMORSEG_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def fake(candidates, **kw):
        calls.append(sorted(candidates))
        for run in candidates.values():
            run()  # every candidate really runs
        return {name: (0.001 if name == "openvino" else 0.002) for name in candidates}

    monkeypatch.setattr(runtime, "time_candidates", fake)
    p = Predictor.from_checkpoints(checkpoints[0], device="cpu", precision="fp32")
    assert isinstance(p.engine, OpenVinoEngine)
    again = Predictor.from_checkpoints(checkpoints[0], device="cpu", precision="fp32")
    assert isinstance(again.engine, OpenVinoEngine)
    assert calls == [["onnxruntime", "openvino", "torch"]]
    (entry,) = json.loads((tmp_path / "cache" / "engine.json").read_text()).values()
    assert entry["choice"] == "openvino"


def test_int8_export_calibrates_on_training_patients_only(checkpoints, kaggle, tmp_path):
    out = tmp_path / "int8.xml"
    export_model(checkpoints[0], out, int8=True, calibration=kaggle.root, calibration_slices=16, progress=False)
    info = read_graph_info(out)
    assert info.precision == "int8" and info.members == 1
    assert info.calibration["patients"] == ["PAT_A_2001", "PAT_B_2002"]  # not the validation patient
    assert info.calibration["slices"] == 16
    p = Predictor.from_checkpoints(out)
    assert p.engine.name == "openvino" and p.precision == "int8"
    x = torch.rand(2, 3, 32, 32)
    fp32 = Predictor.from_checkpoints(checkpoints[0], engine="torch", precision="fp32").predict(x).probabilities
    assert (p.predict(x).probabilities - fp32).abs().mean() < 0.05  # close, not equal: int8


def test_graph_errors_are_clear(checkpoints, tmp_path):
    onnx_file = tmp_path / "m.onnx"
    export_model(checkpoints[0], onnx_file)
    with pytest.raises(ConfigError, match="it runs on onnxruntime or openvino, not torch"):
        Predictor.from_checkpoints(onnx_file, engine="torch")
    with pytest.raises(ConfigError, match="pass it alone"):
        Predictor.from_checkpoints([onnx_file, checkpoints[0]])
    fake = tmp_path / "fake.onnx"
    fake.write_bytes(b"not a protobuf at all")
    with pytest.raises(CheckpointError, match=r"fake.onnx: not a readable onnx model"):
        Predictor.from_checkpoints(fake)
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(onnx_file.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"cut.onnx: not a readable onnx model"):
        read_graph_info(truncated)
    xml = tmp_path / "m.xml"
    export_model(checkpoints[0], xml)
    xml.with_suffix(".bin").unlink()
    with pytest.raises(CheckpointError, match=r"m.bin is missing"):
        read_graph_info(xml)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_graph_info(tmp_path / "none.onnx")


def test_a_graph_without_tumorseg_metadata_is_refused(tmp_path):
    import onnx

    from tumorseg.graphs import onnx_bytes

    path = tmp_path / "plain.onnx"
    path.write_bytes(onnx_bytes(UNet(n_features=2, depth=2).eval(), torch.zeros(1, 3, 8, 8)))
    onnx.checker.check_model(str(path))
    with pytest.raises(CheckpointError, match="no tumorseg metadata in this graph"):
        read_graph_info(path)


@pytest.mark.parametrize(("args", "message"), [
    (["--out", "{t}/m.onnx", "--int8", "--calibration", "{t}"], "int8 models are written as OpenVINO IR"),
    (["--out", "{t}/m.xml", "--int8"], "--int8 needs --calibration DATA"),
    (["--out", "{t}/m.xml", "--calibration", "{t}"], "--calibration is for --int8 exports only"),
    (["--out", "{t}/m.onnx", "--format", "openvino"], "an openvino model is written to a .xml file"),
    (["--out", "{t}/m.xml", "--format", "pt"], "names an openvino file; pass --format openvino"),
])
def test_export_option_errors(checkpoints, tmp_path, capsys, args, message):
    code = main(["export", str(checkpoints[0]), *[a.format(t=tmp_path) for a in args]])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("m.*"))  # nothing half-written


def test_export_cli_writes_a_graph_that_predict_reads(checkpoints, tmp_path, capsys, kaggle):
    assert main(["export", str(checkpoints[0]), "--out", str(tmp_path / "m.onnx")]) == 0
    assert f"wrote {tmp_path / 'm.onnx'}" in capsys.readouterr().out
    out = tmp_path / "pred"
    assert main(["predict", str(kaggle.root / "PAT_B_2002"), "--checkpoint", str(tmp_path / "m.onnx"),
                 "--engine", "onnxruntime", "--out", str(out), "--no-progress"]) == 0
    ref = tmp_path / "ref"
    assert main(["predict", str(kaggle.root / "PAT_B_2002"), "--checkpoint", str(checkpoints[0]),
                 "--engine", "torch", "--precision", "fp32", "--out", str(ref), "--no-progress"]) == 0
    for png in sorted((ref / "PAT_B_2002").glob("*_pred.png")):
        assert png.read_bytes() == (out / "PAT_B_2002" / png.name).read_bytes()


def test_torch_engine_switches_eval_mode_only_while_predicting():
    model = _trained_like(0).train()
    engine = TorchEngine([model], torch.device("cpu"), None, channels_last=False)
    x = torch.rand(2, 3, 16, 16)
    got = engine(x)
    assert model.training
    model.eval()
    assert torch.allclose(got, _logits([model], x))


def test_precision_asked_for_is_honoured(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "time_candidates", lambda *a, **k: pytest.fail("nothing to choose between"))
    p = Predictor.from_checkpoints(checkpoints[0], precision="bf16", device="cpu")
    assert p.engine.name == "torch" and p.precision == "bf16"  # bf16 is PyTorch's: no other engine is timed
    with pytest.raises(ConfigError, match="bf16 is PyTorch's"):
        Predictor.from_checkpoints(checkpoints[0], precision="bf16", engine="openvino")
    with pytest.raises(ConfigError, match="precision must be one of auto, bf16, fp32, got 'fp16'"):
        Predictor.from_checkpoints(checkpoints[0], precision="fp16", engine="openvino")
    xml = tmp_path / "m.xml"
    export_model(checkpoints[0], xml)
    with pytest.raises(ConfigError, match="is an fp32 model; drop --precision bf16"):
        Predictor.from_checkpoints(xml, precision="bf16")
    assert Predictor.from_checkpoints(xml, precision="fp32").precision == "fp32"


@pytest.mark.slow
def test_an_int8_variant_is_used_only_beside_the_weights_it_was_made_from(checkpoints, tmp_path, caplog,
                                                                          monkeypatch):
    """A variant records the digest of its source weights. The engine choice takes it
    beside those weights only; beside other weights of the same architecture (a replaced
    model), without a digest (an older export) or unreadable, it is left out with a
    warning, and the model still runs."""
    a, b = load_checkpoint(checkpoints[0]), load_checkpoint(checkpoints[1])
    xml = tmp_path / "variant.xml"
    export_model(checkpoints[0], xml)  # an fp32 graph stands in for the int8 file
    assert read_graph_info(xml).weights == weights_digest([a]) != weights_digest([b])
    candidates: list[list[str]] = []

    def measured(kind, key, runs):
        candidates.append(sorted(runs))
        return "torch"

    monkeypatch.setattr(engines, "cached_choice", lambda *args, **kwargs: None)
    monkeypatch.setattr(engines, "measured_choice", measured)
    no_digest = tmp_path / "old.xml"
    export_model(checkpoints[0], no_digest)
    text = no_digest.read_text()
    no_digest.write_text(text.replace(f', &quot;weights&quot;: &quot;{weights_digest([a])}&quot;', ""))
    broken = tmp_path / "broken.xml"
    broken.write_text("<net>")
    with caplog.at_level(logging.WARNING, logger="tumorseg"):
        assert engines.choose_engine("auto", [a], None, device="cpu", variants=[xml]).name == "torch"
        for variant in (xml, no_digest, broken):
            engines.choose_engine("auto", [b], None, device="cpu", variants=[variant])
        engines.choose_engine("auto", [a, b], None, device="cpu", variants=[xml])  # no variant of an ensemble
    assert candidates[0] == ["onnxruntime", "openvino", "openvino-int8", "torch"]
    assert candidates[1:] == [["onnxruntime", "openvino", "torch"]] * 4
    assert f"{xml} was not quantised from the weights of {b.path}; left out" in caplog.text
    assert f"{no_digest} records no digest of the weights it was made from; left out" in caplog.text
    assert f"{broken} could not be read and is left out" in caplog.text


def test_an_ensemble_file_keeps_each_members_split(checkpoints, tmp_path):
    """Each member knows which patients it never saw (its out-of-fold patients); the file
    as a whole lists the union of their training patients, what int8 calibration draws on."""
    from tumorseg.checkpoint import export_ensemble, read_payload

    export_ensemble(checkpoints, tmp_path / "ens.pt")
    members = load_members(tmp_path / "ens.pt")
    assert [m.split for m in members] == SPLITS
    payload = read_payload(tmp_path / "ens.pt")
    assert payload["split"] == {"train": ["PAT_A_2001", "PAT_B_2002", "PAT_C_2003"]}
    del payload["member_splits"]  # a file written before members kept their splits
    torch.save(payload, tmp_path / "old.pt")
    assert [m.split for m in load_members(tmp_path / "old.pt")] == [payload["split"]] * 2
    payload["member_splits"] = SPLITS[:1]  # one split for two members
    torch.save(payload, tmp_path / "damaged.pt")
    with pytest.raises(CheckpointError, match="damaged ensemble .2 members, member_splits does not match"):
        load_members(tmp_path / "damaged.pt")
    assert payload["sources"] == ["m0.pt", "m1.pt"]  # no paths of the exporting machine
    assert payload["best"] == {} and payload["history"] == [] and payload["training"] is None


@pytest.mark.slow
def test_ctrl_c_after_openvino_engines_come_and_go_is_handled():
    """OpenVINO's CPU plugin swaps the thread's alternate signal stack; with one Core per
    engine, a Ctrl-C in training after engines had been chosen (built, timed, freed) in the
    same process crashed it (SIGSEGV). The two tests that showed it run in a child pytest,
    so that a crash fails this test and not the whole suite."""
    import subprocess
    import sys

    tests = Path(__file__).resolve().parent
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"{tests / 'test_engines.py'}::test_auto_engine_is_measured_once_and_cached",
         f"{tests / 'test_training.py'}::test_ctrl_c_inside_an_optimiser_step_stops_after_it_and_resumes_exactly"],
        capture_output=True, text=True, timeout=600, cwd=tests.parent)
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "2 passed" in proc.stdout


def test_a_2_5d_model_runs_alike_on_every_engine_and_its_graph_keeps_the_channels(tmp_path):
    channels = ("pre-contrast", "FLAIR", "post-contrast", "FLAIR-1", "FLAIR+1")
    torch.manual_seed(5)
    model = UNet(in_channels=5, n_features=4, depth=3).eval()
    save_checkpoint(tmp_path / "m.pt", Checkpoint.of_model(model, channels=channels))
    export_model(tmp_path / "m.pt", tmp_path / "m.onnx")
    assert read_graph_info(tmp_path / "m.onnx").channels == channels
    vol = np.random.default_rng(1).integers(0, 255, (9, 32, 32, 3), dtype=np.uint8)
    results = {}
    for engine, path in [("torch", tmp_path / "m.pt"), ("onnxruntime", tmp_path / "m.onnx"),
                         ("openvino", tmp_path / "m.onnx")]:
        p = Predictor.from_checkpoints(path, engine=engine, device="cpu", precision="fp32", postprocess="none")
        assert p.channels == channels
        results[engine] = p.segment(vol, spacing=(1.0, 1.0, 1.0))
    for engine, seg in results.items():
        assert np.abs(seg.probabilities - results["torch"].probabilities).max() < 1e-4, engine
