"""The count sketch (`--projector sketch`) on a GPU: the gather kernel against the scatter-add it replaced.

For --rows float16 rows of --grad-dim parameters (default: 63 rows of 2**27, what one projection call takes at
7B on an H100), times with triton.testing.do_bench (median ms per call, and per row):
- scatter-add: the previous sketch's method (index_add_ of the rows times random signs, in chunks of 2**24);
- gather (Triton): `CountSketchProjector.project`, lessctl's kernel, for each launch configuration in a grid;
- a plain read of the rows (x.sum(dim=0) in float32 over the same bytes), the memory-speed yardstick;
and checks the kernel against the torch gather on a slice. Prints one JSON object (--json writes it too).

    python bench/sketch_projection.py --rows 63 --grad-dim 134217728 --dim 8192
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=63)
    ap.add_argument("--grad-dim", type=int, default=1 << 27)
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import triton.testing

    from lessctl.grads.projection import sketch
    from lessctl.grads.projection.sketch import CountSketchProjector

    dev = torch.device("cuda")
    B, P, D = args.rows, args.grad_dim, args.dim
    x = torch.randn(B, P, device=dev, dtype=torch.float16)
    res: dict = {"gpu": torch.cuda.get_device_name(dev), "rows": B, "grad_dim": P, "dim": D, "ms_per_call": {}}
    t0 = time.perf_counter()
    proj = CountSketchProjector(P, D, dev)
    res["tables_s"] = round(time.perf_counter() - t0, 2)
    res["engine"] = proj.engine_for(dev)

    chunk = 1 << 24
    gen = torch.Generator(device=dev).manual_seed(0)
    old = [
        (
            s,
            torch.randint(0, D, (min(chunk, P - s),), device=dev, generator=gen),
            torch.randint(0, 2, (min(chunk, P - s),), device=dev, generator=gen).float() * 2 - 1,
        )
        for s in range(0, P, chunk)
    ]

    def scatter_add():
        out = torch.zeros(B, D, device=dev)
        for s, bucket, sign in old:
            out.index_add_(1, bucket, x[:, s : s + len(bucket)].float() * sign)
        return out

    ms = res["ms_per_call"]
    ms["read (x.sum(0), float32)"] = triton.testing.do_bench(lambda: x.sum(0, dtype=torch.float32))
    ms["scatter-add (previous sketch)"] = triton.testing.do_bench(scatter_add)
    ms["gather (default launch)"] = triton.testing.do_bench(lambda: proj.project(x))
    best = None
    C, nseg, S = proj.code.shape
    for block_m, programs, warps, stages in itertools.product((16, 32, 64), (256, 512, 1024), (4, 8), (2, 3)):
        others = nseg * -(-B // block_m)
        ksplit = max(1, min(C, round(programs / others)))
        kw = dict(block_m=block_m, ksplit=ksplit, num_warps=warps, num_stages=stages)
        try:
            t = triton.testing.do_bench(lambda: sketch.project_triton(x, proj.seg, proj.code, P, D, **kw))
        except Exception as exc:  # noqa: BLE001 - a configuration that does not fit
            ms[json.dumps(kw)] = f"failed: {str(exc).splitlines()[0][:80]}"
            continue
        ms[json.dumps(kw)] = t
        if best is None or t < best[0]:
            best = (t, kw)
    res["best"] = {"ms": best[0], "launch": best[1], "ms_per_row": best[0] / B}
    n = min(P, 1 << 22)
    small = CountSketchProjector(n, D, dev)
    got = sketch.project_triton(x[:, :n].contiguous(), small.seg, small.code, n, D, **best[1])
    ref = sketch.project_torch(x[:, :n].contiguous(), small.seg, small.code, n, D)
    res["best_vs_torch_gather_rel"] = float((got - ref).abs().max() / ref.abs().max())
    read = ms["read (x.sum(0), float32)"]
    res["ratios"] = {
        "scatter_add_over_best": ms["scatter-add (previous sketch)"] / best[0],
        "best_over_read": best[0] / read,
        "default_over_read": ms["gather (default launch)"] / read,
    }
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
