"""lessctl.grads.projection.trak: TRAK's projectors as LESS uses them, fast_jl chunking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from grads_helpers import _checkpoint, _encoded, _model

from lessctl._reference import naive_gradients
from lessctl.grads.adam import load_adam_state, transform
from lessctl.grads.store.reader import open_store


def test_stored_row_equals_trak_basic_projector_on_fp16_feature(tiny_grads_template):
    from trak.projectors import BasicProjector, ProjectionType

    ws = tiny_grads_template
    ckpt, step = _checkpoint(ws)
    model, tok = _model(ws)
    enc = _encoded(ws, tok, 3)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    adam = load_adam_state(ckpt, params, "cpu")
    g = naive_gradients(model, [e.input_ids for e in enc], [e.labels for e in enc], tok.pad_token_id)
    feats = transform(g, "adam", adam).to(torch.float16)
    with open_store(ws / "out" / "grads", "synth_a", step, "adam") as r:
        for dim in (64, 128):
            proj = BasicProjector(
                grad_dim=g.shape[1],
                proj_dim=dim,
                seed=0,
                proj_type=ProjectionType.rademacher,
                device=torch.device("cpu"),
                block_size=128,
                dtype=torch.float32,
                model_id=0,
            )
            expected = proj.project(feats, model_id=0).float()
            expected = (expected / expected.norm(dim=1, keepdim=True)).numpy()
            stored = r.read(dim)[:3].astype(np.float32)
            cos = (stored * expected).sum(1) / np.linalg.norm(stored, axis=1)
            assert cos.min() > 0.9999, cos
            np.testing.assert_allclose(stored, expected, atol=2e-3)
        assert r.projector["kind"] == "basic" and r.projector["seed"] == 0 and r.projector["block_size"] == 128
        assert r.attrs["grad_type"] == "adam" and r.attrs["step"] == step


def test_basic_projector_records_a_gpu_generator():
    """TRAK's BasicProjector draws its matrix on its device: a CUDA-made matrix differs, and its stores say so."""
    from lessctl.grads.projection.base import same_projection
    from lessctl.grads.projection.choose import make_projector

    cpu = make_projector("basic", 1000, 64, "cpu")
    assert "generator" not in cpu.attrs  # as every store made before the key existed
    if torch.cuda.is_available():
        gpu = make_projector("basic", 1000, 64, "cuda")
        assert gpu.attrs["generator"] == "cuda" and same_projection(cpu.attrs, gpu.attrs) == [
            "generator: None vs 'cuda'"
        ]
        x = torch.randn(3, 1000)
        assert not torch.allclose(cpu.project(x), gpu.project(x.cuda()).cpu(), atol=1e-2)


def test_cached_blocks_equal_trak_regeneration():
    """Our block cache (several blocks) gives exactly what TRAK's BasicProjector computes itself."""
    from trak.projectors import BasicProjector, ProjectionType

    from lessctl.grads.projection.trak import TrakBasicProjector

    x = torch.randn(5, 3000)
    ours = TrakBasicProjector(3000, 300, "cpu", block_size=128)
    assert ours.blocks is not None and len(ours.blocks) == 3
    theirs = BasicProjector(
        grad_dim=3000,
        proj_dim=300,
        seed=0,
        proj_type=ProjectionType.rademacher,
        device=torch.device("cpu"),
        block_size=128,
        dtype=torch.float32,
    )
    assert torch.equal(ours.project(x), theirs.project(x.half(), model_id=0).float())


def test_count_sketch_equals_its_dense_matrix_and_is_deterministic(monkeypatch):
    from lessctl._reference import dense_matrix
    from lessctl.grads.projection import sketch
    from lessctl.grads.projection.choose import make_projector

    monkeypatch.setattr(sketch, "GROUP_COORDINATES", 700)  # several generator groups (of 10 chunks)
    p = make_projector("sketch", 2000, 64, "cpu", seed=5)
    assert p.seg.shape == (32, 1) and p.code.shape == (32, 1, 64)  # chunks of 64, one segment of 64 each
    assert p.attrs["kind"] == "sketch" and p.attrs["seed"] == 5 and p.attrs["hash"] == "segment-permutation"
    dense = dense_matrix(p.seg, p.code, 2000, 64)
    assert (dense.abs().sum(1) == 1).all()  # one +-1 per parameter
    assert (dense[:1984].view(31, 64, 64).abs().sum(1) == 1).all()  # a full chunk fills every output once
    x = torch.randn(6, 2000)
    torch.testing.assert_close(p.project(x), x @ dense, rtol=1e-5, atol=1e-5)
    again = make_projector("sketch", 2000, 64, "cpu", seed=5)
    assert torch.equal(p.project(x), again.project(x))
    other = make_projector("sketch", 2000, 64, "cpu", seed=6)
    assert not torch.equal(p.project(x), other.project(x))


def test_fast_jl_chunks_follow_its_tiles():
    from lessctl.grads.projection.trak import fast_jl_chunks

    assert fast_jl_chunks(2**27, 132, 16) == [(0, 2**27, 0, 132)]  # 16 x 2**27 fits the 32-bit indexing
    for grad_dim, tiles in ((2**27, 132), (2**27, 108), (3 * 2**27, 132), (2**27 + 12345, 114)):
        chunks = fast_jl_chunks(grad_dim, tiles, 32)
        assert chunks is not None and len(chunks) > 1
        tile = -(-grad_dim // tiles)
        assert chunks[0][0] == 0 and chunks[-1][1] == grad_dim and sum(m for *_, m in chunks) == tiles
        for (start, stop, t0, m), nxt in zip(chunks, chunks[1:] + [None]):
            assert start == t0 * tile and 32 * (stop - start) < 2**32
            assert -(-(stop - start) // m) == tile  # fast_jl will cut this chunk into m tiles of the same width
            if nxt:
                assert nxt[0] == stop and nxt[2] == t0 + m
    assert fast_jl_chunks(2**33, 132, 32) is None  # one tile alone is too wide for 32 rows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with fast_jl")
def test_chunked_fast_jl_equals_trak_cuda_projector():
    """32 rows of 2**27 features: lessctl's chunked calls give TRAK's CudaProjector result (batches of 16)."""
    from trak.projectors import CudaProjector, ProjectionType

    from lessctl.grads.projection.trak import TrakCudaProjector

    P, D = 2**27, 1024
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(32, P, device="cuda", generator=gen) * 1e-3).half()
    ours = TrakCudaProjector(P, D, "cuda", engine="fast_jl")  # the chunked fast_jl path itself
    assert ours.max_rows == 32 and len(ours.chunks) > 1
    got = ours.project(x)
    trak = CudaProjector(
        grad_dim=P, proj_dim=D, seed=0, proj_type=ProjectionType.rademacher, device="cuda", max_batch_size=16
    )
    ref = torch.cat([trak.project(x[i : i + 16], model_id=0) for i in (0, 16)])
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
