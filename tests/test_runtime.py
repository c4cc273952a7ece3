"""Device choice, precision, autocast and stop signals."""

from __future__ import annotations

import os
import signal

import pytest
import torch

import tumorseg.runtime as runtime
from tumorseg.errors import ConfigError
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


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, None)])
def test_resolve_precision_auto_on_cpu_follows_native_bf16(native, expected, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    assert resolve_precision("auto", CPU) is expected


@pytest.mark.parametrize(("bf16", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_resolve_precision_auto_on_cuda(bf16, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    assert resolve_precision("auto", torch.device("cuda")) is expected


def test_resolve_precision_auto_on_mps_is_fp32(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", torch.device("mps")) is None


@pytest.mark.parametrize("name", ["fp16", "BF16", ""])
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
    with pytest.raises(KeyboardInterrupt):
        request(signal.SIGTERM, None)


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
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C stops at once
            signal.getsignal(sig)(sig, None)
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
