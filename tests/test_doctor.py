"""`lessctl doctor`: a clean report without a GPU, --strict, and the fast_jl known-answer test's logic."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from lessctl import doctor as doc

KEYS = {
    "python",
    "torch",
    "torch_cuda_build",
    "cuda_available",
    "gpu_name",
    "sm_count",
    "bf16_supported",
    "traker",
    "fast_jl",
    "fast_jl_fix",
    "projector_auto",
    "projector_auto_reason",
    "problems",
    "notes",
}


def test_doctor_json_reports_cpu_cleanly(cli, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = cli("doctor", "--json")
    assert r.code == 0, r
    rep = json.loads(r.out)
    assert KEYS <= set(rep), KEYS - set(rep)
    assert rep["cuda_available"] is False and rep["gpu_name"] is None and rep["sm_count"] is None
    assert rep["traker"] is True
    assert rep["projector_auto"] == "basic" and "no GPU" in rep["projector_auto_reason"]
    assert rep["fast_jl"]["ok"] is None and rep["fast_jl_fix"] is None
    assert rep["problems"] == []
    assert set(rep["fast_jl"]) >= {"imports", "ok", "detail", "sm_count", "linearity_rel_err", "deterministic"}


def test_doctor_table_and_strict_without_problems(cli, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = cli("doctor", "--strict")
    assert r.code == 0, r
    assert "--projector auto" in r.out and "basic" in r.out and "Traceback" not in r.err


def test_doctor_strict_exits_1_when_traker_is_broken(cli, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "trak", None)  # `import trak` now raises ImportError
    r = cli("doctor", "--json", "--strict")
    assert r.code == 1, r
    rep = json.loads(r.out)
    assert rep["traker"] is False and any("traker" in p for p in rep["problems"])
    assert cli("doctor", "--json").code == 0  # without --strict: always 0


def _fake_gpu(monkeypatch, project):
    """A CPU stand-in for a GPU with 132 SMs and a fake fast_jl whose kernels call `project(x, n, seed, sms)`."""
    fake = types.ModuleType("fast_jl")
    for b in (8, 16, 32):
        setattr(fake, f"project_rademacher_{b}", project)
    monkeypatch.setitem(sys.modules, "fast_jl", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda dev: types.SimpleNamespace(multi_processor_count=132)
    )
    monkeypatch.setattr(torch.cuda, "synchronize", lambda dev=None: None)


def test_known_answer_test_accepts_a_rademacher_projection(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    R = torch.randint(0, 2, (doc.CHECK_GRAD_DIM, doc.CHECK_PROJ_DIM), generator=gen).float() * 2 - 1
    _fake_gpu(monkeypatch, lambda x, n, seed, sms: x.float() @ R[:, :n])
    res = doc.check_fast_jl("cpu")
    assert res.ok is True, res.detail
    assert res.imports and res.sm_count == 132 and res.entry_magnitude == 1.0
    assert 0.45 < res.positive_share < 0.55 and res.linearity_rel_err < 1e-5 and res.deterministic


SIGNS = (
    torch.randint(0, 2, (doc.CHECK_GRAD_DIM, doc.CHECK_PROJ_DIM), generator=torch.Generator().manual_seed(2)) * 2.0 - 1
)


@pytest.mark.parametrize(
    "bad, fragment",
    [
        (lambda x, n, s, m: x.float() @ torch.ones(x.shape[1], n), "positive"),
        (lambda x, n, s, m: x.float().abs() @ SIGNS[:, :n], "differs from x @ M"),
        (lambda x, n, s, m: x.float() @ SIGNS[:, :n] + 0.01 * torch.rand(x.shape[0], n), "one magnitude"),
    ],
    ids=["all-plus", "not-linear", "noisy"],
)
def test_known_answer_test_rejects_wrong_kernels(monkeypatch, bad, fragment):
    _fake_gpu(monkeypatch, bad)
    res = doc.check_fast_jl("cpu")
    assert res.ok is False and fragment in res.detail, res.detail


def test_broken_kernel_is_reported_with_the_fix(monkeypatch):
    def boom(x, n, seed, sms):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    _fake_gpu(monkeypatch, boom)
    res = doc.check_fast_jl("cpu")
    assert res.ok is False and "no kernel image" in res.detail
    fix = doc.fast_jl_fix("9.0", res.detail)
    assert "7.0+PTX" in fix and "'9.0' on this GPU" in fix and "--no-build-isolation" in fix


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_doctor_on_a_gpu(cli):
    rep = json.loads(cli("doctor", "--json").out)
    assert rep["cuda_available"] and rep["sm_count"] > 0
    if rep["fast_jl"]["imports"]:
        assert rep["fast_jl"]["ok"], rep["fast_jl"]["detail"]
        assert rep["projector_auto"] == "cuda"
    else:
        assert rep["fast_jl_fix"] and rep["projector_auto"] == "basic"


def test_doctor_prints_the_fix_verbatim(cli, monkeypatch):
    """The fix names `pip install lessctl[cuda]`: brackets must survive the console's markup."""

    def boom(x, n, seed, sms):
        raise RuntimeError("no kernel image is available")

    _fake_gpu(monkeypatch, boom)
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda dev: types.SimpleNamespace(
            multi_processor_count=132, name="Fake H100", major=9, minor=0, total_memory=80 * 2**30
        ),
    )
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(
        "lessctl.grads.projection.trak.fast_jl_status", lambda device="cuda": (False, "its kernel failed")
    )
    r = cli("doctor", "--strict", "--device", "cpu")
    assert r.code == 1, r
    assert "lessctl[cuda]" in r.err and "'9.0' on this GPU" in " ".join(r.err.split()), r.err
    rep = json.loads(cli("doctor", "--json", "--device", "cpu").out)
    assert rep["gpu_name"] == "Fake H100" and rep["sm_count"] == 132 and rep["fast_jl"]["ok"] is False
    assert rep["projector_auto"] == "basic" and any("fast_jl" in p for p in rep["problems"])
