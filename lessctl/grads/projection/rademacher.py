"""TRAK's CUDA Rademacher projection (the fast_jl extension) recomputed: a CPU reference and a Triton kernel.

fast_jl (0.1.3) multiplies float16 rows by a +-1 matrix R [F, D] that it generates on the fly, and shares
the generation across at most 32 rows per call; its cost is the generation, so at 2**27 features it spends
as long on 32 rows as on 1. `project` here computes the very same product for up to a few hundred rows at
once: each program of its Triton kernel (`rademacher_triton`) runs fast_jl's generators for a block of
columns over one feature tile, once for a block of up to 128 rows, and multiplies on the tensor cores
(float16 inputs, float32 accumulation). `lessctl._reference` has plain numpy/torch
versions of fast_jl's definition, for tests on a CPU; `check_against_fast_jl` is the known-answer test that
decides whether lessctl uses the kernel on a GPU.

The definition, read from fast_jl's source (fast_jl_kernel.cuh, random.cuh, data_loading.cuh):
- the F features are cut into n = min(F, num_feature_tiles) tiles of ceil(F / n); TRAK passes the GPU's SM
  count as num_feature_tiles and seed + 10000 * model_id as the seed;
- the D output columns are cut into warps of 32; in warp w, the thread with lane = tx + 16 * ty
  (tx < 16, ty < 2) runs cuRAND's XORWOW generator, seeded by curand_init(seed + 658105236 * (lane + 32 w)
  + 359124577 * t, 0, 0) in feature tile t (uint32 arithmetic);
- its k-th 32-bit word gives rows 16 k .. 16 k + 15 of the tile: row 16 k + r, column 32 w + j is +1 when bit
  2 * (r // 2) + j % 2 of the word of thread tx = j // 2, ty = r % 2 is set, else -1;
- output[b] = sum over tiles of (float32 sum over the tile's features of half(x[b, f]) * R[f]).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from lessctl.grads.projection.kernel_check import cached, compare, first_line, triton_problem

log = logging.getLogger(__name__)

FAST_JL_TILE_SEED = 359124577  # fast_jl seeds the random stream of feature tile t with seed + 359124577 * t

U32 = 0xFFFFFFFF
COLUMN_SEED = 658105236  # fast_jl: thread (column) c of feature tile t starts from seed + 658105236 c + 359124577 t
# curand_init(seed, 0, 0) for a seed below 2**32: the high word's part (t1 = 2591861531 * (0 ^ 0xf7dcefdd))
# is the same for every thread; the low word's part is t0 = 1099087573 * (seed ^ 0xaad26b49).
XORWOW_SEED_SALT = 0xAAD26B49
XORWOW_SEED_MUL = 1099087573
_T1 = (2591861531 * 0xF7DCEFDD) & U32
XORWOW_V2 = (521288629 + _T1) & U32
XORWOW_V3 = 88675123 ^ _T1
XORWOW_D = (6615241 + _T1) & U32
XORWOW_WEYL = 362437

# `project`'s defaults (see `default_config`), from timings on an H100 (bench/RESULTS.md): 256 columns per
# program; at most 128 rows per program (128 x 256 float32 accumulators fill 8 warps' registers), more rows
# take several row blocks; the loop unrolled 5 times has its loads pipelined.
BLOCK_N = 256  # output columns per program
MAX_BLOCK_M = 128  # rows per program at most
NUM_STAGES = 3
UNROLL = 5


def tile_size(grad_dim: int, n_tiles: int) -> tuple[int, int]:
    """(tiles, features per tile) as fast_jl cuts `grad_dim` features for `n_tiles` requested tiles."""
    n = min(grad_dim, n_tiles)
    return n, -(-grad_dim // n)


def thread_seeds(seed: int, tile: int, dim: int):
    """fast_jl's curand_init seed of each of the `dim` threads of feature tile `tile` ([dim] uint32)."""
    import numpy as np

    base = np.uint32((seed + FAST_JL_TILE_SEED * tile) & U32)
    return np.arange(dim, dtype=np.uint32) * np.uint32(COLUMN_SEED) + base  # wraps modulo 2**32


def xorwow_words(seeds, n: int):
    """The first `n` outputs of curand() after curand_init(seed, 0, 0), for each seed: [n, len(seeds)] uint32."""
    import numpy as np

    u = np.uint32
    t0 = (np.asarray(seeds, dtype=u) ^ u(XORWOW_SEED_SALT)) * u(XORWOW_SEED_MUL)
    v = [
        t0 + u(123456789),
        t0 ^ u(362436069),
        np.full_like(t0, XORWOW_V2),
        np.full_like(t0, XORWOW_V3),
        t0 + u(5783321),
    ]
    d = t0 + u(XORWOW_D)
    out = np.empty((n, len(t0)), dtype=u)
    for k in range(n):
        t = v[0] ^ (v[0] >> u(2))
        v = v[1:] + [(v[4] ^ (v[4] << u(4))) ^ (t ^ (t << u(1)))]
        d = d + u(XORWOW_WEYL)
        out[k] = v[4] + d
    return out


def factor_rows(words):
    """The +-1 rows [16 n, D] float32 that fast_jl makes from its threads' words [n, D] (thread = column index)."""
    import numpy as np

    n, dim = words.shape
    w = words.reshape(n, dim // 32, 2, 16)  # chunk, warp, ty, tx (thread lane = tx + 16 ty)
    shift = 2 * np.arange(8, dtype=np.uint32)[:, None] + np.arange(2, dtype=np.uint32)[None, :]  # [x, j % 2]
    bits = (w[..., None, None] >> shift) & np.uint32(1)  # chunk, warp, ty, tx, x, j % 2
    bits = bits.transpose(0, 4, 2, 1, 3, 5)  # row 16 k + 2 x + ty, column 32 warp + 2 tx + j % 2
    return bits.reshape(16 * n, dim).astype(np.float32) * 2 - 1


def _triton_kernel():
    """(triton, the kernel), imported on first use: importing triton is slow, and it is absent on some machines."""
    import triton

    from lessctl.grads.projection.rademacher_triton import fast_jl_rademacher

    return triton, fast_jl_rademacher


def default_config(rows: int) -> dict:
    """`project`'s launch settings for `rows` rows: one row block for up to MAX_BLOCK_M rows (the matrix is
    generated once per row block), 4 warps up to 64 rows and 8 above (the fastest choices measured on an H100:
    bench/RESULTS.md, Triton projection)."""
    block_m = min(MAX_BLOCK_M, max(16, 1 << (max(rows, 1) - 1).bit_length()))
    return {
        "block_m": block_m,
        "block_n": BLOCK_N,
        "num_warps": 4 if block_m <= 64 else 8,
        "num_stages": NUM_STAGES,
        "unroll": UNROLL,
    }


def project(
    x,
    dim: int,
    seed: int,
    n_tiles: int,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    unroll: int | None = None,
):
    """fast_jl.project_rademacher_*(x, dim, seed, n_tiles) for any number of rows, in one Triton kernel.

    x: [B, F] float16, contiguous, on a CUDA device (or the CPU under TRITON_INTERPRET=1). Returns [B, dim]
    float32, fast_jl's result up to the order of float32 additions. A program covers block_m rows x block_n
    columns (a multiple of 32 dividing dim) of one feature tile and writes that tile's product; the [tiles, B,
    dim] float32 partial products (0.55 GB for 128 rows x 8192 dims x 132 tiles) are summed afterwards.
    `unroll` windows of 16 features per loop iteration: a multiple of 5 (the XORWOW state's length) lets
    Triton pipeline the loads. Defaults: `default_config(B)`.
    """
    import torch

    if x.dim() != 2 or x.dtype != torch.float16 or not x.is_contiguous():
        raise ValueError(
            f"rademacher.project: expected a contiguous [B, F] float16 tensor, got {tuple(x.shape)} "
            f"{x.dtype}{'' if x.is_contiguous() else ' (not contiguous)'}"
        )
    B, F = x.shape
    cfg = default_config(B)
    block_m, block_n = block_m or cfg["block_m"], block_n or cfg["block_n"]
    if block_n % 32 or dim % block_n:
        raise ValueError(
            f"rademacher.project: dim {dim} must be a multiple of block_n {block_n}, "
            "itself a multiple of 32 (fast_jl's warp width)"
        )
    n, tile = tile_size(F, n_tiles)
    if tile >= 2**31 - 32:
        raise ValueError(
            f"rademacher.project: tiles of {tile} features overflow the kernel's 32-bit counters; use more tiles"
        )
    if B == 0:
        return torch.zeros(0, dim, dtype=torch.float32, device=x.device)
    triton, kernel = _triton_kernel()
    parts = torch.empty(n, B, dim, dtype=torch.float32, device=x.device)
    grid = (dim // block_n, n, triton.cdiv(B, block_m))  # column blocks first: programs running together share x
    with (
        torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    ):  # Triton launches on the current device
        kernel[grid](
            x,
            parts,
            B,
            F,
            x.stride(0),
            tile,
            dim,
            seed & U32,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            UNROLL=unroll or cfg["unroll"],
            num_warps=num_warps or cfg["num_warps"],
            num_stages=num_stages or cfg["num_stages"],
        )
    return parts.sum(0)


CHECK_FEATURES = 4099  # odd: tiles start at every offset mod 8, and most tiles' last window is partial
CHECK_RTOL = 1e-5  # max |triton - fast_jl| / max |fast_jl|; one wrong sign costs ~1e-2
_checks: dict[tuple, tuple[bool, str]] = {}


def check_against_fast_jl(device: Any, dim: int, seed: int, n_tiles: int, rows: int = MAX_BLOCK_M) -> tuple[bool, str]:
    """(ok, detail): does `project` give fast_jl's result on this GPU, for this dim, seed and tile count?

    Known-answer test on random float16 inputs: `rows` rows (the largest launch configuration) and 5 rows
    (the smallest) of CHECK_FEATURES features in min(CHECK_FEATURES, n_tiles) tiles, and 5 rows of 3 long
    tiles (thousands of generator steps), each against fast_jl.project_rademacher_32. Cached per
    (device, dim, seed, n_tiles, rows); never raises (a missing triton or a failed compilation is a no).
    """
    return cached(
        _checks, (str(device), dim, seed & U32, n_tiles, rows), lambda: _check(device, dim, seed & U32, n_tiles, rows)
    )


def _check(device, dim, seed, n_tiles, rows) -> tuple[bool, str]:
    import torch

    problem = triton_problem()
    if problem:
        return False, problem
    try:
        import fast_jl
    except Exception as exc:  # noqa: BLE001
        return False, f"cannot import fast_jl to check against ({first_line(exc)})"
    gen = torch.Generator(device="cpu").manual_seed(0)

    def pairs():
        for r, features, tiles in ((rows, CHECK_FEATURES, n_tiles), (5, CHECK_FEATURES, n_tiles), (5, 3 * 4096 + 5, 3)):
            x = torch.randn(r, features, generator=gen).to(device, torch.float16)
            ref = torch.cat(
                [fast_jl.project_rademacher_32(x[i : i + 32].contiguous(), dim, seed, tiles) for i in range(0, r, 32)]
            )
            yield (lambda x=x, tiles=tiles: project(x, dim, seed, tiles)), ref

    return compare(pairs(), "fast_jl", CHECK_RTOL, " expected")
