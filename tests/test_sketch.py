"""grads.projection.sketch: the segment-permutation count sketch, its tables, its torch gather and its Triton kernel.

On the CPU: the tables against the definition (an explicit dense matrix built entry by entry), the projector
against that matrix, determinism and independence from how the tables are generated (threads, blocking),
inner products preserved in expectation (with the variance the definition predicts), and the Triton kernel
under TRITON_INTERPRET=1 (in a subprocess) against the torch gather.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lessctl import _reference as reference
from lessctl.grads.projection import sketch as sk
from lessctl.grads.projection.choose import make_projector
from lessctl.grads.projection.sketch import CountSketchProjector

HAS_TRITON = importlib.util.find_spec("triton") is not None
REPO = Path(__file__).resolve().parents[1]


def test_segment_size():
    assert [sk.segment_size(d) for d in (8192, 4096, 1024, 512, 256)] == [256] * 5
    assert [sk.segment_size(d) for d in (1000, 7, 96, 2, 1, 128)] == [8, 1, 32, 2, 1, 128]
    assert sk.chunks_per_group(8192) == 512 and sk.chunks_per_group(2**23) == 1


def explicit_matrix(seg, code, P: int, D: int) -> torch.Tensor:
    """The sketch's [P, D] matrix, entry by entry from the tables as the module docstring defines them, checking
    on the way that each chunk sends its coordinates to distinct buckets (all D of them for a full chunk)."""
    S = sk.segment_size(D)
    nseg, C = D // S, -(-P // D)
    assert seg.shape == (C, nseg) and seg.dtype == torch.int32
    assert code.shape == (C, nseg, S) and code.dtype == torch.int16
    M = torch.zeros(P, D)
    for c in range(C):
        sources = set()
        for b in range(nseg):
            s = int(seg[c, b])
            assert 0 <= s < nseg
            for u in range(S):
                v = int(code[c, b, u])
                assert 0 <= v < 512 and (v & 255) < S
                coord = c * D + s * S + (v & 255)
                assert coord not in sources  # bucket b S + u takes a coordinate no other bucket of the chunk takes
                sources.add(coord)
                if coord < P:
                    M[coord, b * S + u] = -1.0 if v >> 8 else 1.0
        assert sources == set(range(c * D, c * D + D))  # every coordinate of the chunk feeds one bucket
    assert (M.abs().sum(1) == 1).all()  # one +-1 per coordinate
    return M


# (P, D): P not a multiple of D; S = 8 (D = 1000); S = 1 (odd D); P < D; several full 256-segments
CASES = [(1000, 64), (2500, 1000), (40, 7), (50, 64), (3 * 512 + 100, 512)]


@pytest.mark.parametrize("P, D", CASES, ids=["D64", "S8", "S1", "P<D", "S256"])
def test_projection_is_the_defined_sketch(P, D, monkeypatch):
    proj = make_projector("sketch", P, D, "cpu", seed=5)
    assert isinstance(proj, CountSketchProjector)
    M = explicit_matrix(proj.seg, proj.code, P, D)
    assert torch.equal(reference.dense_matrix(proj.seg, proj.code, P, D), M)
    x = torch.randn(6, P, generator=torch.Generator().manual_seed(P))
    torch.testing.assert_close(proj.project(x), x @ M, rtol=1e-5, atol=1e-5)
    xh = x.half()  # what the collector passes
    got = proj.project(xh)
    assert got.dtype == torch.float32 and got.shape == (6, D)
    torch.testing.assert_close(got, xh.float() @ M, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(sk, "TORCH_STEP_ELEMENTS", 1)  # a chunk per step: the same sums
    torch.testing.assert_close(proj.project(xh), got, rtol=1e-6, atol=1e-6)
    assert proj.project(x[:0]).shape == (0, D)


def test_tables_use_both_signs_and_every_offset():
    seg, code = sk.make_tables(3 * 8192 + 17, 8192, seed=1)
    signs = (code >> 8).float().mean()
    assert abs(float(signs) - 0.5) < 0.01
    assert torch.equal((code & 255).sort(-1).values[1, 3], torch.arange(256, dtype=torch.int16))
    assert torch.equal(seg.sort(-1).values, torch.arange(32, dtype=torch.int32).expand(4, 32))


def test_sketch_is_deterministic_and_seeded():
    P, D = 3000, 256
    x = torch.randn(3, P, generator=torch.Generator().manual_seed(0))
    p = make_projector("sketch", P, D, "cpu", seed=5)
    assert torch.equal(p.project(x), make_projector("sketch", P, D, "cpu", seed=5).project(x))
    assert not torch.equal(p.project(x), make_projector("sketch", P, D, "cpu", seed=6).project(x))
    assert not torch.equal(p.project(x), CountSketchProjector(P, D, "cpu", seed=5, model_id=1).project(x))
    assert p.attrs == {
        "kind": "sketch",
        "type": "count-sketch",
        "hash": "segment-permutation",
        "seed": 5,
        "model_id": 0,
        "grad_dim": P,
    }


def test_tables_do_not_depend_on_threads_or_blocking(monkeypatch):
    monkeypatch.setattr(sk, "GROUP_COORDINATES", 4 * 256)  # groups of 4 chunks: 5 groups
    ref = sk.make_tables(19 * 256 + 3, 256, seed=2, model_id=3)
    monkeypatch.setattr(sk, "GENERATION_THREADS", 1)
    monkeypatch.setattr(sk, "SHUFFLE_COLUMNS", 3)  # the Fisher-Yates shuffles in blocks of 3 permutations
    got = sk.make_tables(19 * 256 + 3, 256, seed=2, model_id=3)
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])


def test_tables_are_pinned():
    """The tables of a small sketch, fixed: stores made with the sketch are comparable only as long as this
    holds (a change of torch's generators or of the definition breaks it, and then needs a new `hash` attr)."""
    seg, code = sk.make_tables(5000, 1024, seed=0)
    assert seg[0, :4].tolist() == [0, 2, 1, 3] and code[0, 0, :6].tolist() == [211, 441, 156, 472, 154, 408]
    assert hashlib.sha256(seg.numpy().tobytes() + code.numpy().tobytes()).hexdigest()[:16] == "6ec866a1200712e2"


def test_permutations_are_uniform():
    """All 24 permutations of 4 come out about equally often (chi-square, 23 degrees of freedom)."""
    perms = sk.permutations(torch.Generator().manual_seed(0), 24_000, 4)
    codes = (perms.long() * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(codes, minlength=256)[codes.unique()]
    assert len(counts) == 24
    chi2 = float(((counts - 1000.0) ** 2 / 1000.0).sum())
    assert chi2 < 60  # P(chi2_23 > 60) ~ 4e-5


def _pair_sum(a, b, chunk):
    """Sum over ordered pairs (i, k) of coordinates in different chunks of a_i b_k."""
    return float(a.sum() * b.sum() - (a.view(-1, chunk).sum(1) * b.view(-1, chunk).sum(1)).sum())


def test_inner_products_are_preserved_in_expectation():
    """Over seeds, <Sx, Sy> and |Sx|^2 average to <x, y> and |x|^2, and vary as the definition predicts: a
    coordinate pair collides with probability 1/D when in different chunks and never within one, so
    Var <Sx, Sy> = (1/D) sum over pairs in different chunks of (x_i^2 y_k^2 + x_i y_i x_k y_k). x has a
    component periodic in the chunk, which a sketch reusing one hash for every chunk would add coherently."""
    P, D, n = 2**16, 1024, 64
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(D, generator=gen).repeat(P // D) + 0.5 * torch.randn(P, generator=gen)
    y = 0.6 * x + 0.8 * torch.randn(P, generator=gen)
    xy, xx = float(x @ y), float(x @ x)
    var_xy = (_pair_sum(x * x, y * y, D) + _pair_sum(x * y, x * y, D)) / D
    var_xx = 2 * _pair_sum(x * x, x * x, D) / D
    rows = torch.stack([x, y])
    ip, sq = [], []
    for seed in range(n):
        s = make_projector("sketch", P, D, "cpu", seed=seed).project(rows).double()
        ip.append(float(s[0] @ s[1]))
        sq.append(float(s[0] @ s[0]))
    for got, exact, var in ((ip, xy, var_xy), (sq, xx, var_xx)):
        got = torch.tensor(got, dtype=torch.float64)
        assert abs(float(got.mean()) - exact) < 4 * math.sqrt(var / n), (float(got.mean()), exact, var)
        assert 0.4 < float(got.var()) / var < 2.0, (float(got.var()), var)  # ~ chi2_63 / 63: sd 0.18


def test_engine_choice_is_logged_once(monkeypatch, caplog):
    proj = make_projector("sketch", 500, 64, "cpu")
    seen = []
    monkeypatch.setattr(sk, "check_triton", lambda dev, dim: seen.append((str(dev), dim)) or (True, "matches"))
    with caplog.at_level(logging.INFO, logger="lessctl.grads.projection"):
        assert proj.engine_for(torch.device("cpu")) == "torch"
        assert (
            proj.engine_for(torch.device("cuda", 0)) == "triton"
            and proj.engine_for(torch.device("cuda", 0)) == "triton"
        )
    assert seen == [("cuda:0", 64)]
    assert caplog.text.count("Triton kernel") == 1 and caplog.text.count("torch gathers") == 1
    monkeypatch.setattr(sk, "check_triton", lambda dev, dim: (False, "cannot import triton (no module)"))
    with caplog.at_level(logging.WARNING, logger="lessctl.grads.projection"):
        assert proj.engine_for(torch.device("cuda", 1)) == "torch"
    assert "cannot import triton" in caplog.text


def test_launch_config():
    cfg = sk.launch_config(63, 8192, 16384)
    assert cfg["block_m"] == 16 and cfg["ksplit"] == 8  # 32 blocks x 4 row blocks x 8 splits: 1024 programs
    assert sk.launch_config(1, 8192, 16384) == {**cfg, "block_m": 1, "ksplit": 32}
    assert sk.launch_config(256, 8192, 16384)["ksplit"] == 2
    assert sk.launch_config(5, 64, 1)["ksplit"] == 1


# (rows, P, D, launch settings, dtype): S = 256 with a partial row block and a partial last chunk; S = 8; S = 1;
# P < D with more splits asked than chunks; several splits and row blocks; bfloat16 and float32 rows
INTERPRETER_CASES = [
    (19, 3 * 512 + 100, 512, {}, "float16"),
    (5, 100, 24, {}, "float16"),
    (3, 50, 7, {"ksplit": 2}, "float16"),
    (4, 40, 64, {"ksplit": 5}, "float16"),
    (33, 4 * 256 + 7, 256, {"block_m": 8, "ksplit": 3}, "bfloat16"),
    (2, 3 * 64 + 1, 64, {}, "float32"),
]

_INTERPRETER_SCRIPT = """
import json, sys
import torch
from lessctl import _reference as reference
from lessctl.grads.projection import sketch as sk
out = []
for B, P, D, cfg, dtype in json.loads(sys.argv[1]):
    seg, code = sk.make_tables(P, D, seed=B)
    x = torch.randn(B, P, generator=torch.Generator().manual_seed(P)).to(getattr(torch, dtype))
    got = sk.project_triton(x, seg, code, P, D, **cfg)
    ref = sk.project_torch(x, seg, code, P, D)
    dense = x.float() @ reference.dense_matrix(seg, code, P, D)
    out.append([list(got.shape), float((got - ref).abs().max() / ref.abs().max()),
                float((got - dense).abs().max() / dense.abs().max())])
ok, detail = sk.check_triton("cpu", 512)
print(json.dumps({"cases": out, "check": [ok, detail]}))
"""


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (the dev extra installs it on Linux x86_64)")
@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="a GPU is here: the compiled kernel is tested instead (and older "
    "Triton interpreters, such as 3.6's, cannot run a loop bound loaded from memory)",
)
def test_triton_kernel_under_the_interpreter_equals_the_torch_gather():
    """The kernel, run by Triton's interpreter on CPU tensors (TRITON_INTERPRET must be set before triton is
    imported, hence the subprocess), gives the torch gather's result and the dense matrix's."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _INTERPRETER_SCRIPT, json.dumps(INTERPRETER_CASES)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for (B, P, D, *_), (shape, err_torch, err_dense) in zip(INTERPRETER_CASES, res["cases"]):
        assert shape == [B, D]
        assert err_torch < 1e-6 and err_dense < 1e-5, (B, P, D, err_torch, err_dense)
    assert res["check"][0] is True, res["check"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_kernel_on_the_gpu_equals_the_torch_gather():
    """The compiled kernel, default launch and a few others, against the torch gather on the GPU."""
    from lessctl.grads.projection.sketch import CountSketchProjector

    P, D = 3 * 8192 * 7 + 1000, 8192
    proj = CountSketchProjector(P, D, "cuda")
    assert proj.engine_for(torch.device("cuda")) == "triton"
    x = torch.randn(37, P, device="cuda").half()
    ref = sk.project_torch(x, proj.seg, proj.code, P, D)
    for cfg in ({}, {"block_m": 32, "ksplit": 3}, {"block_m": 8, "ksplit": 1, "num_warps": 4}):
        got = sk.project_triton(x, proj.seg, proj.code, P, D, **cfg)
        assert float((got - ref).abs().max() / ref.abs().max()) < 1e-6, cfg
    assert torch.allclose(proj.project(x), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
