"""grads.projection.rademacher: fast_jl's Rademacher projection emulated on the CPU and computed by a Triton kernel.

On the CPU: the vectorised XORWOW against a scalar one written from cuRAND's definition, the emulated matrix
against a literal transcription of fast_jl's CUDA loops, and the Triton kernel (under TRITON_INTERPRET=1, in
a subprocess) against the emulation. On a GPU: the emulation and the kernel against fast_jl itself, which is
what proves the emulation, and TrakCudaProjector's Triton engine against TRAK's CudaProjector.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from lessctl import _reference as reference
from lessctl.grads.projection import rademacher as rm

M32 = 0xFFFFFFFF
HAS_TRITON = importlib.util.find_spec("triton") is not None
REPO = Path(__file__).resolve().parents[1]


def _has_fast_jl() -> bool:
    if not torch.cuda.is_available():
        return False
    from lessctl.grads.projection.trak import fast_jl_status

    return fast_jl_status("cuda")[0]


needs_fast_jl = pytest.mark.skipif(not _has_fast_jl(), reason="needs a CUDA GPU with a working fast_jl")


class ScalarXorwow:
    """cuRAND's curandStateXORWOW: curand_init(seed, 0, 0) and curand(), one generator in Python ints."""

    def __init__(self, seed: int):
        s0 = (seed & M32) ^ 0xAAD26B49
        s1 = ((seed >> 32) & M32) ^ 0xF7DCEFDD
        t0 = (1099087573 * s0) & M32
        t1 = (2591861531 * s1) & M32
        self.d = (6615241 + t1 + t0) & M32
        self.v = [(123456789 + t0) & M32, 362436069 ^ t0, (521288629 + t1) & M32, 88675123 ^ t1, (5783321 + t0) & M32]

    def __call__(self) -> int:
        v = self.v
        t = v[0] ^ (v[0] >> 2)
        new = ((v[4] ^ (v[4] << 4)) ^ (t ^ (t << 1))) & M32
        self.v = [v[1], v[2], v[3], v[4], new]
        self.d = (self.d + 362437) & M32
        return (new + self.d) & M32


def slow_fast_jl_matrix(F: int, N: int, seed: int, num_feature_tiles: int) -> np.ndarray:
    """fast_jl's matrix, transcribed loop by loop from its CUDA source (fast_jl.cu, fast_jl_kernel.cuh,
    random.cuh): blocks of 16 warps x 32 columns, each thread writing the half2 pairs of its word into the
    warp's [16][32] factor tile; rows past the tile or past F are never used."""
    tiles = min(F, num_feature_tiles)
    tile = (F - 1) // tiles + 1
    R = np.zeros((F, N), dtype=np.float32)
    for block_y in range(tiles):  # feature tile
        for block_x in range(N // 512):
            for tz in range(16):  # warp of the block
                for ty in range(2):
                    for tx in range(16):
                        lane = tx + 16 * ty
                        col_output = lane + 32 * tz + 512 * block_x
                        rng = ScalarXorwow((seed + 658105236 * col_output + 359124577 * block_y) & M32)
                        for chunk in range((tile + 15) // 16):
                            bits = rng()
                            for x in range(8):  # dst2[tx + 16 ty] = (bit 2x, bit 2x + 1); dst2 += 32
                                for half in range(2):
                                    flat = 2 * (32 * x + tx + 16 * ty) + half  # in the warp's [16][32] tile
                                    row, col = divmod(flat, 32)
                                    p = 16 * chunk + row
                                    f = block_y * tile + p
                                    if p < tile and f < F:
                                        R[f, 512 * block_x + 32 * tz + col] = (
                                            1.0 if (bits >> (2 * x + half)) & 1 else -1.0
                                        )
    return R


# the first four curand() outputs after curand_init(seed, 0, 0), from ScalarXorwow; the last seed cancels
# the salts, which gives Marsaglia's published initial xorwow state (123456789, 362436069, ...)
KNOWN_WORDS = {
    0: [3179217846, 1883133293, 2220552389, 674260989],
    1: [2898200796, 3111669439, 2179589753, 379598403],
    12345: [1283759346, 1636376615, 1239293409, 1726449579],
    0xF7DCEFDDAAD26B49: [246875399, 3690007200, 1264581005, 3906711041],
}


def test_scalar_xorwow_known_answers():
    for seed, words in KNOWN_WORDS.items():
        rng = ScalarXorwow(seed)
        assert [rng() for _ in words] == words, seed
    assert ScalarXorwow(0xF7DCEFDDAAD26B49).v == [123456789, 362436069, 521288629, 88675123, 5783321]


def test_vectorised_xorwow_equals_the_scalar_one():
    seeds = [0, 1, 12345, M32, 2**31, 987654321]
    words = rm.xorwow_words(np.array(seeds, dtype=np.uint32), 40)
    assert words.dtype == np.uint32 and words.shape == (40, len(seeds))
    for j, seed in enumerate(seeds):
        rng = ScalarXorwow(seed)
        assert [int(w) for w in words[:, j]] == [rng() for _ in range(40)], seed
    # fast_jl's per-thread seeds wrap modulo 2**32
    got = rm.thread_seeds(2**32 - 3, 131, 1024)
    assert [int(s) for s in got[[0, 1, 1023]]] == [
        (2**32 - 3 + 658105236 * c + 359124577 * 131) & M32 for c in (0, 1, 1023)
    ]


@pytest.mark.parametrize(
    "F, N, seed, tiles",
    [
        (1000, 512, 0, 7),  # 143 features per tile: not a multiple of 16, and F is not a multiple of the tiles
        (1000, 512, 2**32 - 1, 7),
        (333, 1024, 12345, 132),  # more requested tiles than features/3: tiles of 3, the last ones empty
        (200, 512, 7, 1000),  # more tiles than features: fast_jl uses F tiles of one feature
    ],
    ids=["tiles7", "seed-max", "wide", "tiles>F"],
)
def test_emulated_matrix_equals_fast_jl_loops(F, N, seed, tiles):
    ref = slow_fast_jl_matrix(F, N, seed, tiles)
    got = reference.fast_jl_matrix(F, N, seed, tiles)
    assert got.dtype == torch.float32 and got.shape == (F, N)
    assert np.array_equal(got.numpy(), ref)
    part = reference.fast_jl_matrix(F, N, seed, tiles, rows=slice(137, 611))
    assert np.array_equal(part.numpy(), ref[137:611])


def test_reference_projection_sums_tile_products():
    F, N, tiles = 1000, 512, 7
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, F, generator=gen)
    R = reference.fast_jl_matrix(F, N, 5, tiles)
    got = reference.reference_project(x, N, 5, tiles)
    ref = x.half().float() @ R
    assert got.shape == (3, N) and torch.allclose(got, ref, rtol=1e-5, atol=1e-4)


def test_project_rejects_bad_inputs():
    x = torch.zeros(4, 100, dtype=torch.float16)
    with pytest.raises(ValueError, match="float16"):
        rm.project(x.float(), 512, 0, 4)
    with pytest.raises(ValueError, match="contiguous"):
        rm.project(torch.zeros(100, 4, dtype=torch.float16).t(), 512, 0, 4)
    with pytest.raises(ValueError, match="multiple of block_n"):
        rm.project(x, 500, 0, 4)
    assert rm.default_config(5)["block_m"] == 16 and rm.default_config(100)["block_m"] == 128
    assert rm.default_config(1000)["block_m"] == rm.MAX_BLOCK_M


# (rows, features, dim, tiles, seed, launch settings): tiles starting at every offset mod 8; tiles of one
# window of 16 features (3 features), of two (20), and long ones (the loop); empty tiles (100 features in
# 40 tiles of 3); several row blocks with a partial one; column blocks of 64, 128 and 256
INTERPRETER_CASES = [
    (1, 700, 512, 3, 0, {}),
    (2, 100, 512, 5, 9, {}),
    (5, 100, 512, 40, 3, {"block_n": 256}),
    (40, 2999, 512, 7, 2**32 - 5, {}),
    (37, 701, 512, 5, 10000, {"block_m": 16, "block_n": 64, "unroll": 1}),
    (3, 333, 1024, 2, 1, {"block_n": 256}),
]

_INTERPRETER_SCRIPT = """
import json, sys
import torch
from lessctl import _reference as reference
from lessctl.grads.projection import rademacher as rm
out = []
for B, F, dim, tiles, seed, cfg in json.loads(sys.argv[1]):
    x = torch.randn(B, F, generator=torch.Generator().manual_seed(B + F)).half()
    got = rm.project(x, dim, seed, tiles, **cfg)
    ref = reference.reference_project(x, dim, seed, tiles)
    out.append([list(got.shape), float((got - ref).abs().max() / ref.abs().max())])
print(json.dumps(out))
"""


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (the dev extra installs it on Linux x86_64)")
@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="a GPU is here: the compiled kernel is tested against fast_jl "
    "instead (and older Triton interpreters, such as 3.6's, cannot run a loop bound loaded from memory)",
)
def test_triton_kernel_under_the_interpreter_equals_the_emulation():
    """The kernel, run by Triton's interpreter on CPU tensors (TRITON_INTERPRET must be set before triton is
    imported, hence the subprocess), gives the emulated fast_jl projection."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _INTERPRETER_SCRIPT, json.dumps(INTERPRETER_CASES)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for (B, F, dim, *_), (shape, err) in zip(INTERPRETER_CASES, results):
        assert shape == [B, dim]
        assert err < 1e-5, (B, F, dim, err)


def _fake_cuda_projector(monkeypatch, check):
    """TrakCudaProjector's surroundings without a GPU: fast_jl 'works', TRAK's CudaProjector is a stub with
    132 SMs, and the Triton check answers `check`; returns the calls made to rademacher.project."""
    import trak.projectors

    from lessctl.grads.projection import trak as projection

    class StubCudaProjector:
        def __init__(self, grad_dim, proj_dim, seed, proj_type, device, max_batch_size):
            self.seed, self.num_sms = seed, 132

    calls = []

    def fake_project(x, dim, seed, n_tiles):
        calls.append((x.shape[0], dim, seed, n_tiles, x.dtype, x.is_contiguous()))
        return torch.full((x.shape[0], dim), float(len(calls)))

    monkeypatch.setattr(trak.projectors, "CudaProjector", StubCudaProjector)
    monkeypatch.setattr(projection, "fast_jl_status", lambda device="cuda": (True, "ok"))
    monkeypatch.setattr(rm, "check_against_fast_jl", check)
    monkeypatch.setattr(rm, "project", fake_project)
    return calls


def test_cuda_projector_uses_the_triton_kernel_when_its_check_passes(monkeypatch):
    from lessctl.grads.projection.trak import TRITON_MAX_ROWS, TrakCudaProjector

    seen = []
    calls = _fake_cuda_projector(monkeypatch, lambda *a: seen.append(a) or (True, "matches fast_jl (1e-07 relative)"))
    proj = TrakCudaProjector(2**27, 1024, "cpu", seed=3, model_id=1)
    assert proj.engine == "triton" and proj.max_rows == TRITON_MAX_ROWS
    assert seen == [("cpu", 1024, 10003, 132, TRITON_MAX_ROWS)]  # its own dim, TRAK's seed, the tile count
    assert proj.attrs == {
        "kind": "cuda",
        "type": "rademacher",
        "seed": 3,
        "model_id": 1,
        "grad_dim": 2**27,
        "dtype": "float16",
        "sm_count": 132,
    }  # the same store attributes as with fast_jl
    out = proj.project(torch.zeros(64, 600).t())  # float32, not contiguous: rows go as contiguous float16
    assert out.shape == (600, 1024) and out[-1, 0] == 3
    assert [c[0] for c in calls] == [256, 256, 88]
    assert all(c[1:] == (1024, 10003, 132, torch.float16, True) for c in calls)


def test_cuda_projector_falls_back_to_fast_jl_with_a_warning(monkeypatch, caplog):
    from lessctl.errors import ConfigError
    from lessctl.grads.projection.trak import TrakCudaProjector

    _fake_cuda_projector(monkeypatch, lambda *a: (False, "the Triton kernel failed (out of resources)"))
    with caplog.at_level(logging.WARNING, logger="lessctl.grads.projection"):
        proj = TrakCudaProjector(2**27, 1024, "cpu")
    assert proj.engine == "fast_jl" and proj.max_rows == 32 and len(proj.chunks) > 1
    assert "out of resources" in caplog.text and "fast_jl" in caplog.text
    with pytest.raises(ConfigError, match="out of resources"):
        TrakCudaProjector(2**27, 1024, "cpu", engine="triton")
    checked = []
    _fake_cuda_projector(monkeypatch, lambda *a: checked.append(a) or (True, "ok"))
    assert TrakCudaProjector(2**27, 1024, "cpu", engine="fast_jl").engine == "fast_jl" and not checked
    with pytest.raises(ConfigError, match="engine"):
        TrakCudaProjector(2**27, 1024, "cpu", engine="cuda")


def test_check_reports_a_missing_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setattr(rm, "_checks", {})
    ok, detail = rm.check_against_fast_jl("cpu", 512, 0, 132)
    assert ok is False and "cannot import triton" in detail


# ---- on a GPU: against fast_jl itself ----


@pytest.mark.gpu
@needs_fast_jl
def test_emulation_equals_fast_jl():
    """What proves the emulation (and so the Triton kernel's definition): fast_jl's own matrix, read off
    the identity rows, is the emulated one, for a long tile and for the GPU's tile count."""
    import fast_jl

    n_sms = torch.cuda.get_device_properties(0).multi_processor_count
    for F, N, seed, tiles in ((1000, 512, 0, n_sms), (3000, 1024, 2**32 - 7, 2), (2051, 512, 12345, 5)):
        eye = torch.eye(F, device="cuda", dtype=torch.float16)
        got = torch.cat(
            [fast_jl.project_rademacher_32(eye[i : i + 32].contiguous(), N, seed, tiles) for i in range(0, F, 32)]
        ).cpu()
        assert torch.equal(got, reference.fast_jl_matrix(F, N, seed, tiles)), (F, N, seed, tiles)
    x = torch.randn(7, 2000, device="cuda").half()
    ref = fast_jl.project_rademacher_8(x, 512, 99, n_sms).cpu()
    got = reference.reference_project(x, 512, 99, n_sms)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.gpu
@needs_fast_jl
def test_triton_kernel_equals_fast_jl():
    import fast_jl
    from trak.projectors import CudaProjector, ProjectionType

    n_sms = torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator(device="cuda").manual_seed(0)
    F, D = 1_000_003, 1024
    x = torch.randn(96, F, device="cuda", generator=gen).half()
    got = rm.project(x, D, 0, n_sms)
    ref = torch.cat([fast_jl.project_rademacher_32(x[i : i + 32].contiguous(), D, 0, n_sms) for i in (0, 32, 64)])
    assert _rel(got, ref) < 1e-5
    assert _rel(rm.project(x[:32].contiguous(), D, 0, n_sms), ref[:32]) < 1e-5
    trak = CudaProjector(
        grad_dim=F, proj_dim=D, seed=0, proj_type=ProjectionType.rademacher, device="cuda", max_batch_size=32
    )
    assert _rel(got[:32], trak.project(x[:32], model_id=0)) < 1e-5
    # another seed, an aligned width (vectorised loads), several row blocks and column widths
    F2 = 2**20 + 4096
    x2 = torch.randn(70, F2, device="cuda", generator=gen).half()
    ref2 = torch.cat(
        [fast_jl.project_rademacher_32(x2[i : i + 32].contiguous(), 512, 10000, n_sms) for i in (0, 32, 64)]
    )
    for cfg in ({}, {"block_m": 32}, {"block_n": 256, "num_warps": 8}, {"unroll": 1}):
        assert _rel(rm.project(x2, 512, 10000, n_sms, **cfg), ref2) < 1e-5, cfg
    ok, detail = rm.check_against_fast_jl("cuda", 8192, 0, n_sms)
    assert ok, detail


@pytest.mark.gpu
@needs_fast_jl
def test_cuda_projector_triton_engine_equals_trak():
    """TrakCudaProjector picks the Triton engine here, and its 2**27-feature rows equal TRAK's CudaProjector's."""
    from trak.projectors import CudaProjector, ProjectionType

    from lessctl.grads.projection.trak import TRITON_MAX_ROWS, TrakCudaProjector

    P, D = 2**27, 1024
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(40, P, device="cuda", generator=gen, dtype=torch.float16).mul_(1e-3)
    ours = TrakCudaProjector(P, D, "cuda", model_id=1)
    assert ours.engine == "triton" and ours.max_rows == TRITON_MAX_ROWS
    got = ours.project(x)
    trak = CudaProjector(
        grad_dim=P, proj_dim=D, seed=0, proj_type=ProjectionType.rademacher, device="cuda", max_batch_size=16
    )
    ref = torch.cat([trak.project(x[i : i + 16], model_id=1) for i in (0, 16, 32)])  # 16 x 2**27 fits fast_jl
    assert _rel(got, ref) < 1e-5
    fj = TrakCudaProjector(P, D, "cuda", model_id=1, engine="fast_jl")
    assert fj.engine == "fast_jl" and fj.attrs == ours.attrs
    assert _rel(fj.project(x), ref) < 1e-4


# ---- lessctl doctor's line for the Triton kernel ----


def test_doctor_reports_the_triton_kernel_without_a_gpu(cli, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rep = json.loads(cli("doctor", "--json").out)
    tp = rep["triton_projection"]
    assert tp["ok"] is None and tp["imports"] is HAS_TRITON
    assert ("not run: no CUDA GPU" in tp["detail"]) if HAS_TRITON else ("cannot import triton" in tp["detail"])
    assert rep["problems"] == [] and not any("Triton" in n for n in rep["notes"])
    assert rep["sketch_kernel"] == {
        "ok": None,
        "detail": "not run: no CUDA GPU is visible (the CPU uses torch gathers)",
    }
    out = cli("doctor").out
    assert "Triton projection" in out and "count sketch kernel" in out


def _fake_gpu_with_fast_jl(monkeypatch):
    """A CPU stand-in for an H100 whose fake fast_jl passes doctor's fast_jl test."""
    from lessctl import doctor as doc

    R = (
        torch.randint(0, 2, (doc.CHECK_GRAD_DIM, doc.CHECK_PROJ_DIM), generator=torch.Generator().manual_seed(1)) * 2.0
        - 1
    )
    fake = types.ModuleType("fast_jl")
    for b in (8, 16, 32):
        setattr(fake, f"project_rademacher_{b}", lambda x, n, seed, sms: x.float() @ R[:, :n])
    monkeypatch.setitem(sys.modules, "fast_jl", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda dev=None: None)
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda dev: types.SimpleNamespace(
            multi_processor_count=132, name="Fake H100", major=9, minor=0, total_memory=80 * 2**30
        ),
    )
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("ok", [True, False])
def test_doctor_runs_the_triton_check_against_fast_jl(cli, monkeypatch, ok):
    from lessctl.grads.projection.trak import TRITON_MAX_ROWS

    _fake_gpu_with_fast_jl(monkeypatch)
    seen = []
    detail = "matches fast_jl (2e-07 relative)" if ok else "the Triton kernel differs from fast_jl by 3.1e-02"
    monkeypatch.setattr(rm, "check_against_fast_jl", lambda *a: seen.append(a) or (ok, detail))
    from lessctl.grads.projection import sketch

    sk_detail = "matches the torch gather (0e+00 relative)" if ok else "the Triton kernel failed (out of resources)"
    monkeypatch.setattr(sketch, "check_triton", lambda dev, dim: seen.append(("sketch", dev, dim)) or (ok, sk_detail))
    rep = json.loads(cli("doctor", "--json", "--device", "cpu").out)
    assert rep["fast_jl"]["ok"] is True, rep["fast_jl"]["detail"]
    assert rep["triton_projection"]["ok"] is ok and rep["triton_projection"]["detail"] == detail
    assert seen[0] == ("cpu", 8192, 0, 132, TRITON_MAX_ROWS)
    # the count sketch's kernel is checked against the torch gather at D = 8192; a failure is a note, not a problem
    assert ("sketch", "cpu", 8192) in seen
    assert rep["sketch_kernel"] == {"ok": ok, "detail": sk_detail}
    assert any("torch gathers" in n for n in rep["notes"]) is (not ok)
    assert rep["problems"] == []  # without the kernel, projection still works (on fast_jl)
    assert any("32 rows per call" in n for n in rep["notes"]) is (not ok)
    out = " ".join(cli("doctor", "--device", "cpu").out.split())
    assert ("ok (matches fast_jl" in out) if ok else ("not used: the Triton kernel differs" in out)
    assert ("ok (matches the torch gather" in out) if ok else ("not used: the Triton kernel failed" in out)
