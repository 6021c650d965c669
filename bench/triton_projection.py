"""TRAK's CUDA projection (Rademacher, the LESS projection) at LESS's 7B shape: lessctl's Triton kernel
against fast_jl (TRAK's CudaProjector, in the tile-aligned chunks lessctl calls it with), rows per call
32 to 256, milliseconds per row and the largest difference relative to fast_jl's output.

    python bench/triton_projection.py --grad-dim 134217728 --dim 8192 --rows 32,64,128 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def timed(fn, reps: int):
    out = fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        out = fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grad-dim", type=int, default=2**27)
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--rows", default="32,64,128")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--configs", default="[{}]", help="JSON list of kernel settings to try (block_m, block_n, ...)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from lessctl.grads.projection import rademacher as rm
    from lessctl.grads.projection.trak import TrakCudaProjector

    P, D = args.grad_dim, args.dim
    rows_list = [int(r) for r in args.rows.split(",")]
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(max(rows_list), P, device="cuda", dtype=torch.float16, generator=gen)
    fj = TrakCudaProjector(P, D, "cuda", engine="fast_jl")
    tr = TrakCudaProjector(P, D, "cuda", engine="triton")
    report = {"gpu": torch.cuda.get_device_name(), "grad_dim": P, "dim": D, "n_tiles": tr.n_tiles, "runs": []}
    for rows in rows_list:
        xb = x[:rows]
        t_fj, ref = timed(lambda: fj.project(xb), 1)
        for cfg in json.loads(args.configs):
            t_tr, got = timed(lambda: rm.project(xb, D, tr.fast_jl_seed, tr.n_tiles, **cfg), args.reps)
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            run = {
                "rows": rows,
                "config": cfg,
                "fast_jl_ms_per_row": 1e3 * t_fj / rows,
                "triton_ms_per_row": 1e3 * t_tr / rows,
                "ratio": t_fj / t_tr,
                "max_rel_diff": err,
            }
            report["runs"].append(run)
            print(
                f"rows {rows:3d} {cfg}: fast_jl {run['fast_jl_ms_per_row']:7.2f} ms/row  triton "
                f"{run['triton_ms_per_row']:7.2f} ms/row  x{run['ratio']:.1f}  max rel diff {err:.1e}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
