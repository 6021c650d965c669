"""The fused per-example products against the batched matmuls they replace, for one 7B LoRA layer, on a GPU.

For a batch of B examples of about T tokens (bfloat16 activations, r = 128, 4096 features, Adam features into
float16 rows), times with triton.testing.do_bench (median ms per layer):
- batched: lora_A's output and the gradient there, two bf16 x bf16 -> f32 batched matmuls over all (padded)
  positions, then the Triton Adam transform of each float32 block (the path before the fused kernel);
- fused: the same two small matmuls (transposed), then `segment_products` for both weights, one kernel each,
  over each example's own tokens, for every kernel configuration in the grid;
and checks that both give the same features. Prints one JSON object (--json writes it too).

    python bench/segment_products.py --batch 9 --tokens 420
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=9)
    ap.add_argument("--tokens", type=int, default=420, help="padded length; the examples' lengths spread below it")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--features", type=int, default=4096)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import triton.testing

    from lessctl import kernels
    from lessctl.gradients import AdamState, _transposed_rows

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    B, T, r, d = args.batch, args.tokens, args.rank, args.features
    lens = torch.linspace(T, T * 0.7, B).round().int()
    x = torch.randn(B, T, d, device=dev, generator=gen).bfloat16()
    g = torch.randn(B, T, d, device=dev, generator=gen).bfloat16() * 1e-3
    for i, n in enumerate(lens.tolist()):
        g[i, n:] = 0  # no gradient reaches padding
    a = torch.randn(r, d, device=dev, generator=gen) * 0.01
    b = torch.randn(d, r, device=dev, generator=gen) * 0.001
    s = 4.0
    P = 2 * r * d
    adam = AdamState(torch.randn(P, device=dev, generator=gen) * 1e-4, torch.rand(P, device=dev, generator=gen) * 1e-6,
                     0.9, 0.999, 1e-8)
    seg = (torch.arange(B, dtype=torch.int32, device=dev), torch.zeros(B, dtype=torch.int32, device=dev), lens.to(dev))
    out_ref = torch.empty(B, P, dtype=torch.float16, device=dev)
    out = torch.empty_like(out_ref)

    def batched():
        u = (x @ a.bfloat16().T).mul_(s)
        v = (g @ b.bfloat16()).mul_(s)
        ga = kernels.bmm_f32(v.transpose(1, 2), x)
        gb = kernels.bmm_f32(g.transpose(1, 2), u)
        kernels.adam_into(ga.reshape(B, -1), adam.exp_avg[: r * d], adam.exp_avg_sq[: r * d], 0.9, 0.999, 1e-8, out_ref[:, : r * d])
        kernels.adam_into(gb.reshape(B, -1), adam.exp_avg[r * d :], adam.exp_avg_sq[r * d :], 0.9, 0.999, 1e-8, out_ref[:, r * d :])

    def fused(cfg):
        def run():
            ut = _transposed_rows(a.bfloat16(), x).mul_(s)
            vt = _transposed_rows(b.bfloat16().T, g).mul_(s)
            kernels.launch_segment_products(vt, x, seg, "adam", adam, 0, out, config=cfg)
            kernels.launch_segment_products(ut, g, seg, "adam", adam, r * d, out, trans_out=True, config=cfg)
        return run

    def kernels_only(cfg):
        ut = _transposed_rows(a.bfloat16(), x).mul_(s)
        vt = _transposed_rows(b.bfloat16().T, g).mul_(s)

        def run():
            kernels.launch_segment_products(vt, x, seg, "adam", adam, 0, out, config=cfg)
            kernels.launch_segment_products(ut, g, seg, "adam", adam, r * d, out, trans_out=True, config=cfg)
        return run

    res = {"gpu": torch.cuda.get_device_name(dev), "batch": B, "tokens": T, "real_tokens": int(lens.sum()), "rank": r,
           "features": d, "ms": {}}
    res["ms"]["batched"] = triton.testing.do_bench(batched)
    batched()
    bytes_min = 2 * int(lens.sum()) * d * 2 + B * P * 2 + 2 * P * 4  # x and g once, the rows, m and v once
    res["floor_ms_at_3TBps"] = bytes_min / 3e12 * 1e3
    best = None
    for bn, bk, warps, stages, pre in itertools.product((64, 128), (32, 64), (4, 8), (3,), (False, True)):
        cfg = {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages, "PREFETCH": pre}
        try:
            fused(cfg)()
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - a configuration that does not fit (shared memory)
            res["ms"][json.dumps(cfg)] = f"failed: {str(exc).splitlines()[0][:80]}"
            continue
        rel = ((out.float() - out_ref.float()).norm(dim=1) / out_ref.float().norm(dim=1)).max().item()
        t = triton.testing.do_bench(kernels_only(cfg))
        res["ms"][json.dumps(cfg)] = {"kernels": round(t, 4), "rel_vs_batched": rel}
        if best is None or t < best[0]:
            best = (t, cfg)
    res["best"] = {"kernels_ms": best[0], "config": best[1], "with_matmuls_ms": triton.testing.do_bench(fused(best[1]))}
    res["ms"]["fused default"] = triton.testing.do_bench(fused(None))
    res["ms"]["matmuls only (fused path)"] = triton.testing.do_bench(
        lambda: (_transposed_rows(a.bfloat16(), x).mul_(s), _transposed_rows(b.bfloat16().T, g).mul_(s)))
    res["ms"]["matmuls only (batched path)"] = triton.testing.do_bench(
        lambda: ((x @ a.bfloat16().T).mul_(s), (g @ b.bfloat16()).mul_(s)))
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
