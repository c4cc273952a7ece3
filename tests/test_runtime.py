"""Device choice, precision, autocast and stop signals."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

import tumorseg.runtime as runtime
from tumorseg.errors import ConfigError
from tumorseg.model import UNet
from tumorseg.runtime import (
    StopRequest,
    StopTraining,
    autocast,
    graceful_stop,
    precision_name,
    resolve_precision,
    select_device,
)

CPU = torch.device("cpu")


@pytest.fixture
def no_accelerator(monkeypatch):
    """A machine without CUDA and without MPS, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


# --------------------------------------------------------------------------- precision


def test_resolve_precision_explicit():
    assert resolve_precision("fp32", CPU) is None
    assert resolve_precision("bf16", CPU) is torch.bfloat16
    assert resolve_precision("fp32", torch.device("cuda")) is None
    assert resolve_precision("bf16", torch.device("mps")) is torch.bfloat16


def _timings(fastest: str):
    """A stand-in for `time_candidates` that makes `fastest` win and counts its calls."""
    calls = []

    def fake(candidates, **kw):
        calls.append(sorted(candidates))
        return {name: (0.001 if name == fastest else 0.002) for name in candidates}
    return fake, calls


@pytest.mark.parametrize(("fastest", "expected"), [("bf16", torch.bfloat16), ("fp32", None)])
def test_auto_precision_is_measured_once_and_cached(fastest, expected, monkeypatch, tmp_path):
    monkeypatch.setenv("TUMORSEG_CACHE_DIR", str(tmp_path))
    fake, calls = _timings(fastest)
    monkeypatch.setattr(runtime, "time_candidates", fake)
    model = UNet(n_features=2, depth=2)
    assert resolve_precision("auto", CPU, model) is expected
    assert resolve_precision("auto", CPU, model) is expected
    assert calls == [["bf16", "fp32"]]  # the second call read the cache
    table = json.loads((tmp_path / "precision-inference.json").read_text())
    (entry,) = table.values()
    assert entry["choice"] == fastest and set(entry["seconds"]) == {"fp32", "bf16"}
    # Training is timed on its own, and so is another model shape.
    resolve_precision("auto", CPU, model, train=True)
    resolve_precision("auto", CPU, UNet(n_features=4, depth=2))
    assert len(calls) == 3


def test_auto_precision_without_a_model_or_on_mps_is_fp32(monkeypatch):
    monkeypatch.setattr(runtime, "time_candidates", lambda *a, **k: pytest.fail("nothing to time"))
    assert resolve_precision("auto", CPU) is None
    assert resolve_precision("auto", torch.device("mps"), UNet(n_features=2, depth=2)) is None


@pytest.mark.parametrize(("bf16", "names"), [(True, ["bf16", "fp32"]), (False, ["fp16", "fp32"])])
def test_auto_precision_on_cuda_times_the_half_type_it_has(bf16, names, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    assert sorted(runtime.precision_candidates(torch.device("cuda"))) == names


def test_timing_leaves_the_model_untouched(monkeypatch, tmp_path):
    monkeypatch.setenv("TUMORSEG_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    model = UNet(n_features=2, depth=2).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    resolve_precision("auto", CPU, model, train=True, sample=(2, 3, 16, 16))
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BatchNorm statistics too
    assert torch.equal(rng, torch.get_rng_state())


def test_an_unwritable_cache_is_measured_around(monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("TUMORSEG_CACHE_DIR", str(blocker / "sub"))
    fake, calls = _timings("fp32")
    monkeypatch.setattr(runtime, "time_candidates", fake)
    assert resolve_precision("auto", CPU, UNet(n_features=2, depth=2)) is None
    assert "could not cache the precision-inference choice" in caplog.text


def test_time_candidates_gives_up_on_a_much_slower_candidate(monkeypatch):
    clock = [0.0]  # a fake clock that only the candidates advance: the machine's load cannot
    monkeypatch.setattr(runtime.time, "perf_counter", lambda: clock[0])
    runs: dict[str, int] = {}

    def candidate(name: str, warm_up: float, then: float):
        def run():
            runs[name] = runs.get(name, 0) + 1
            clock[0] += warm_up if runs[name] == 1 else then
        return run

    timings = runtime.time_candidates({"fast": candidate("fast", 0.002, 0.001),
                                       "slow": candidate("slow", 0.0061, 0.0055)}, repeats=3)
    assert runs == {"fast": 4, "slow": 1}  # warm-up over 3x the fastest warm-up: not repeated
    assert timings == {"fast": pytest.approx(0.001), "slow": pytest.approx(0.0061)}
    runs.clear()
    timings = runtime.time_candidates({"fast": candidate("fast", 0.002, 0.001),
                                       "near": candidate("near", 0.0059, 0.0055)}, repeats=3)
    assert runs == {"fast": 4, "near": 4}  # under 3x: measured in full, best of the repeats
    assert timings == {"fast": pytest.approx(0.001), "near": pytest.approx(0.0055)}


def test_measured_choice_reads_only_known_choices(monkeypatch, tmp_path):
    monkeypatch.setenv("TUMORSEG_CACHE_DIR", str(tmp_path))
    (tmp_path / "engine.json").write_text(json.dumps({json.dumps({"k": 1}): {"choice": "gone"}}))
    assert runtime.cached_choice("engine", {"k": 1}, ["a", "b"]) is None
    fake, calls = _timings("b")
    monkeypatch.setattr(runtime, "time_candidates", fake)
    (tmp_path / "engine.json").write_text("not json")  # a damaged cache is measured around and rewritten
    assert runtime.measured_choice("engine", {"k": 1}, {"a": lambda: None, "b": lambda: None}) == "b"
    assert calls == [["a", "b"]]
    assert runtime.cached_choice("engine", {"k": 1}, ["a", "b"]) == "b"
    assert runtime.measured_choice("engine", {"k": 2}, {"a": lambda: None}) == "a"  # one candidate: no timing
    assert len(calls) == 1


def test_the_default_stays_unless_another_is_clearly_faster(monkeypatch, tmp_path):
    monkeypatch.setenv("TUMORSEG_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(runtime, "time_candidates", lambda c, **k: {"fp32": 1.0, "bf16": 0.97})
    assert runtime.measured_choice("precision-x", {"k": 1}, {"fp32": lambda: None, "bf16": lambda: None}) == "fp32"
    monkeypatch.setattr(runtime, "time_candidates", lambda c, **k: {"fp32": 1.0, "bf16": 0.9})
    assert runtime.measured_choice("precision-x", {"k": 2}, {"fp32": lambda: None, "bf16": lambda: None}) == "bf16"


def test_fp16_is_not_timed_for_training_and_resolves_by_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert list(runtime.precision_candidates(torch.device("cuda"), train=True)) == ["fp32"]
    assert resolve_precision("fp16", CPU) is torch.float16  # the name precision_name gives back


@pytest.mark.parametrize("name", ["fp8", "BF16", ""])
def test_resolve_precision_unknown(name):
    with pytest.raises(ConfigError) as e:
        resolve_precision(name, CPU)
    assert str(e.value) == f"precision must be one of auto, bf16, fp32, got {name!r}"


def test_precision_name():
    assert precision_name(torch.bfloat16) == "bf16"
    assert precision_name(torch.float16) == "fp16"
    assert precision_name(None) == "fp32"
    assert precision_name(torch.float32) == "fp32"


# --------------------------------------------------------------------------- cpuinfo


@pytest.mark.parametrize(
    ("cpuinfo", "expected"),
    [
        ("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 avx2\n", True),
        ("processor\t: 0\nflags\t\t: fpu amx_tile amx_bf16\n", True),
        ("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_vnni\n", False),
        # Only the first flags line is read; a later CPU's line does not count.
        ("flags\t: fpu\nprocessor\t: 1\nflags\t: avx512_bf16\n", False),
        # aarch64 says "Features", and bf16 there is not these x86 instructions.
        ("processor\t: 0\nFeatures\t: fp asimd bf16\n", False),
        ("", False),
    ],
)
def test_cpu_has_native_bf16_reads_cpuinfo(cpuinfo, expected, tmp_path, monkeypatch):
    fake = tmp_path / "cpuinfo"
    fake.write_text(cpuinfo)
    opened = []

    def fake_open(path, *args, **kwargs):
        opened.append(path)
        return open(fake, *args, **kwargs)

    monkeypatch.setattr(runtime, "open", fake_open, raising=False)
    assert runtime.cpu_has_native_bf16() is expected
    assert opened == ["/proc/cpuinfo"]


def test_cpu_has_native_bf16_without_cpuinfo(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "open", lambda path: open(tmp_path / "missing"), raising=False)
    assert runtime.cpu_has_native_bf16() is False


# --------------------------------------------------------------------------- devices


def test_select_device_cpu():
    assert select_device("cpu") == CPU
    assert select_device("cpu:0") == torch.device("cpu:0")
    given = torch.device("cpu")
    assert select_device(given) is given


def test_select_device_auto(no_accelerator, monkeypatch):
    assert select_device("auto") == CPU
    assert select_device() == CPU
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert select_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("auto") == torch.device("cuda")  # CUDA before MPS


def test_select_device_cuda_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("cuda") == torch.device("cuda")
    assert select_device("cuda:1") == torch.device("cuda", 1)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("tpu", "unknown device 'tpu'; use cpu, cuda, cuda:N, mps or auto"),
        ("nonsense", "unknown device 'nonsense'; use cpu, cuda, cuda:N, mps or auto"),
        ("CPU", "unknown device 'CPU'; use cpu, cuda, cuda:N, mps or auto"),
        ("meta", "unsupported device 'meta'; use cpu, cuda, mps or auto"),
        ("xpu", "unsupported device 'xpu'; use cpu, cuda, mps or auto"),
        ("cuda", "device cuda asked for, but PyTorch sees no CUDA GPU here; use --device cpu"),
        ("cuda:0", "device cuda asked for, but PyTorch sees no CUDA GPU here; use --device cpu"),
        ("mps", "device mps asked for, but it is not available here; use --device cpu"),
    ],
)
def test_select_device_errors(name, message, no_accelerator):
    with pytest.raises(ConfigError) as e:
        select_device(name)
    assert str(e.value) == message


# --------------------------------------------------------------------------- autocast


def test_autocast_none_is_a_null_context():
    a = torch.ones(2, 3)
    with autocast(CPU, None):
        assert (a @ a.T).dtype == torch.float32
        assert not torch.is_autocast_enabled("cpu")


def test_autocast_bf16_on_cpu():
    a = torch.ones(2, 3)
    with autocast(CPU, torch.bfloat16):
        assert (a @ a.T).dtype == torch.bfloat16
        assert (a + a).dtype == torch.float32  # only the autocast ops run in bf16
    assert (a @ a.T).dtype == torch.float32


# --------------------------------------------------------------------------- stop signals


def test_stop_request_by_hand():
    request = StopRequest()
    request.check()  # nothing requested: no-op
    request(signal.SIGTERM, None)
    assert request.requested
    with pytest.raises(StopTraining):
        request.check()
    request(signal.SIGTERM, None)  # a repeated SIGTERM (scheduler and torchrun both send one) is no abort
    assert request.requested
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C is
        request(signal.SIGINT, None)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_graceful_stop_routes_signals(sig, capsys):
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with graceful_stop() as request:
        # Checked before sending: without the handler the signal would end the test run.
        assert signal.getsignal(signal.SIGINT) is request and signal.getsignal(signal.SIGTERM) is request
        assert not request.requested
        request.check()
        os.kill(os.getpid(), sig)
        assert request.requested
        with pytest.raises(StopTraining):
            request.check()
        if sig == signal.SIGINT:
            with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C stops at once
                signal.getsignal(sig)(sig, None)
        else:
            signal.getsignal(sig)(sig, None)  # a second SIGTERM changes nothing
            assert request.requested
    assert {s: signal.getsignal(s) for s in previous} == previous
    assert "stopping after this step" in capsys.readouterr().out


def test_graceful_stop_restores_previous_handlers_after_an_error():
    seen = []

    def mine(signum, frame):
        seen.append(signum)

    old_int = signal.signal(signal.SIGINT, mine)
    old_term = signal.signal(signal.SIGTERM, mine)
    try:
        with pytest.raises(StopTraining):
            with graceful_stop() as request:
                request(signal.SIGINT, None)
                request.check()
        assert signal.getsignal(signal.SIGINT) is mine and signal.getsignal(signal.SIGTERM) is mine
        os.kill(os.getpid(), signal.SIGINT)
        assert seen == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


def test_graceful_stop_outside_the_main_thread():
    import threading

    result = {}

    def work():
        with graceful_stop() as request:
            result["handler"] = signal.getsignal(signal.SIGINT)
            request(signal.SIGINT, None)
            result["requested"] = request.requested

    before = signal.getsignal(signal.SIGINT)
    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert result == {"handler": before, "requested": True}
    assert signal.getsignal(signal.SIGINT) is before
