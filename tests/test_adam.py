"""lessctl.grads.adam and fast_paths: LESS's optimizer-state transforms and their GPU kernels."""

from __future__ import annotations

import pytest
import torch
from grads_helpers import _checkpoint, _model

from lessctl.grads.adam import AdamState, load_adam_state, transform


def test_adam_transform_matches_hand_computation():
    g = torch.tensor([[0.5, -2.0, 0.0, 1e-3]])
    m = torch.tensor([0.1, 0.2, -0.3, 0.0])
    v = torch.tensor([0.01, 0.04, 0.09, 0.0])
    state = AdamState(m, v, 0.9, 0.999, 1e-8)
    got = transform(g, "adam", state)[0].tolist()
    for i in range(4):
        m1 = 0.9 * m[i].item() + 0.1 * g[0, i].item()
        v1 = 0.999 * v[i].item() + 0.001 * g[0, i].item() ** 2
        assert got[i] == pytest.approx(m1 / (v1 + 1e-8) ** 0.5, rel=1e-5)
    assert transform(g, "sgd") is g
    assert transform(g, "sign")[0].tolist() == [1.0, -1.0, 0.0, 1.0]


def test_optimizer_state_by_position_and_by_name_agree(tiny_ws):
    model, _ = _model(tiny_ws)
    ckpt, _ = _checkpoint(tiny_ws)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    by_pos = load_adam_state(ckpt, params, "cpu")
    sd = torch.load(ckpt / "optimizer.pt", weights_only=False)
    assert all(isinstance(k, int) for k in sd["state"])  # a plain Trainer run keys by position
    names = [n for n, _ in params]
    sd["state"] = {names[k]: v for k, v in sd["state"].items()}  # the FSDP layout: keyed by name
    sd["param_groups"] = [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
    by_name_dir = tiny_ws / "by-name"
    by_name_dir.mkdir()
    torch.save(sd, by_name_dir / "optimizer.pt")
    by_name = load_adam_state(by_name_dir, params, "cpu")
    assert torch.equal(by_pos.exp_avg, by_name.exp_avg) and torch.equal(by_pos.exp_avg_sq, by_name.exp_avg_sq)
    assert (by_pos.beta1, by_pos.beta2, by_pos.eps) == (0.9, 0.999, 1e-8)
    assert by_pos.exp_avg.numel() == sum(p.numel() for _, p in params)


def test_transform_into_equals_transform():
    from lessctl.grads.adam import transform_into

    gen = torch.Generator().manual_seed(0)
    P = 300
    adam = AdamState(torch.randn(P, generator=gen) * 1e-4, torch.rand(P, generator=gen) * 1e-6, 0.9, 0.999, 1e-8)
    g = torch.randn(5, 120, generator=gen) * 1e-3
    for kind in ("adam", "sgd", "sign"):
        out = torch.zeros(5, P, dtype=torch.float16)
        transform_into(g.clone(), kind, adam if kind == "adam" else None, 100, out[:, 100:220])
        full = torch.zeros(5, P)
        full[:, 100:220] = g
        expected = transform(full, kind, adam)[:, 100:220].to(torch.float16)
        assert torch.equal(out[:, :100], torch.zeros(5, 100, dtype=torch.float16))
        assert torch.allclose(out[:, 100:220].float(), expected.float(), rtol=1e-3, atol=1e-6), kind


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fast_paths_equal_the_torch_ops():
    """The Triton Adam kernel and the bf16 x bf16 -> f32 bmm give what the plain torch ops give."""
    from lessctl.grads import fast_paths as kernels
    from lessctl.grads.adam import transform_into

    gen = torch.Generator(device="cuda").manual_seed(0)
    P, n, off = 5000, 3000, 1500
    adam = AdamState(
        torch.randn(P, device="cuda", generator=gen) * 1e-4,
        torch.rand(P, device="cuda", generator=gen) * 1e-6,
        0.9,
        0.999,
        1e-8,
    )
    g = torch.randn(6, n, device="cuda", generator=gen) * 1e-3
    fused = torch.zeros(6, P, dtype=torch.float16, device="cuda")
    transform_into(g.clone(), "adam", adam, off, fused[:, off : off + n])
    assert kernels.fast_paths()["triton"] is True
    full = torch.zeros(6, P, device="cuda")
    full[:, off : off + n] = g
    ref = transform(full, "adam", adam)[:, off : off + n].half()
    assert torch.allclose(fused[:, off : off + n].float(), ref.float(), rtol=1e-3, atol=1e-5)
    assert not fused[:, :off].any() and not fused[:, off + n :].any()

    a = torch.randn(3, 40, 70, device="cuda", generator=gen).bfloat16()
    b = torch.randn(3, 70, 50, device="cuda", generator=gen).bfloat16()
    if kernels.has_bmm_f32("cuda"):  # this torch supports out_dtype
        got = kernels.bmm_f32(a, b)
        assert got.dtype == torch.float32
        assert torch.allclose(got, torch.bmm(a.float(), b.float()), rtol=1e-4, atol=1e-4)
