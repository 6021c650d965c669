"""The Triton kernel behind `lessctl.rademacher.project`: fast_jl's Rademacher projection for many rows.

A module of its own, imported on first use, because the kernel and the functions it calls must be defined at
a module's top level (Triton looks them up there, also under TRITON_INTERPRET=1), and importing triton is slow
and not possible everywhere. The definition it reproduces is in lessctl.rademacher's docstring.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def xorwow(v0, v1, v2, v3, v4, d):
    """One curand() step of XORWOW states (uint32 tensors): the new state and the word it returns."""
    t = v0 ^ (v0 >> 2)
    v5 = (v4 ^ (v4 << 4)) ^ (t ^ (t << 1))
    d += 362437
    return v1, v2, v3, v4, v5, d, v5 + d


@triton.jit
def window(acc, x_ptrs, x_mask, w_prev, w_cur, from_prev, shift, BLOCK_N: tl.constexpr):
    """acc + X [M, 16] @ R [16, BLOCK_N] for one window of 16 features; R from the words of two chunks."""
    w = tl.where(from_prev, w_prev[None, :, :], w_cur[None, :, :])  # [8, 2, Q]: the word behind each entry
    sign = ((w[:, :, :, None] << shift) & 0x8000) ^ 0xBC00  # the float16 bits of +1 (bit set) or -1
    r = tl.reshape(sign.to(tl.uint16), (16, BLOCK_N)).to(tl.float16, bitcast=True)
    x = tl.load(x_ptrs, mask=x_mask, other=0.0)
    return tl.dot(x, r, acc)


@triton.jit(do_not_specialize=["B", "seed"])  # fewer variants: both only enter arithmetic
def fast_jl_rademacher(
    x_ptr, out_ptr, B, F, stride_x, tile, dim, seed, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr
):
    """Program (column block, feature tile t, row block): out[t, rows, cols] = the tile's float32 product.

    The program runs the XORWOW generators of fast_jl's BLOCK_N threads for these columns, as [2, Q]
    uint32 tensors (Q = BLOCK_N / 2 column pairs), one step per 16 features. The features are read in
    windows of 16 that start at multiples of 8 (aligned, vectorisable loads) whereas fast_jl's chunks start
    at the tile's first feature: window g holds the tile's features 16 g - o .. 16 g - o + 15 (o = tile
    start mod 8), whose factors come from chunks g - 1 and g. Which word and which bit each window row
    takes is the same for the whole tile (`from_prev`, `shift`). The first and the last window are masked
    to the tile; the windows between need only the row mask, which keeps their loads vectorised.
    """
    Q: tl.constexpr = BLOCK_N // 2
    pid_n = tl.program_id(0)
    t = tl.program_id(1)
    pid_m = tl.program_id(2)

    start = t.to(tl.int64) * tile
    length = tl.maximum(tl.minimum(F - start, tile), 0).to(tl.int32)  # features of this tile
    o = (start % 8).to(tl.int32)
    n_win = tl.cdiv(length + o, 16)

    # window row i = 2 x + a is the tile's row (i - o) mod 16 of chunk g, or of chunk g - 1 when i < o; its
    # thread has ty = (i - o) % 2 = a ^ (o % 2), so axis a of the states holds the threads ty = a ^ (o % 2)
    xa = tl.arange(0, 8)[:, None] * 2 + tl.arange(0, 2)[None, :]  # [8, 2]: window row i
    local = (xa - o + 16) % 16
    from_prev = (xa < o)[:, :, None]  # [8, 2, 1]
    shift = (15 - (local // 2) * 2)[:, :, None, None] - tl.arange(0, 2)[None, None, None, :]
    shift = shift.to(tl.uint32)  # [8, 2, 1, 2]: brings the entry's bit 2 (r // 2) + j % 2 to bit 15

    q = pid_n * Q + tl.arange(0, Q)  # column pair: columns 2 q and 2 q + 1 come from thread tx = q % 16
    ty = tl.arange(0, 2) ^ (o % 2)
    thread = (32 * (q // 16) + q % 16)[None, :] + 16 * ty[:, None]  # [2, Q]: lane + 32 * warp
    my_seed = seed.to(tl.uint32) + thread.to(tl.uint32) * 658105236 + t.to(tl.uint32) * 359124577
    # curand_init(my_seed, 0, 0); the constants are XORWOW_V2, XORWOW_V3 and XORWOW_D
    t0 = (my_seed ^ 0xAAD26B49) * 1099087573
    v0 = t0 + 123456789
    v1 = t0 ^ 362436069
    v2 = tl.full((2, Q), 4171507460, tl.uint32)
    v3 = tl.full((2, Q), 3705206908, tl.uint32)
    v4 = t0 + 5783321
    d = t0 + 3656834072

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows[:, None] < B
    cols = tl.arange(0, 16)[None, :]
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_x + tl.multiple_of(start - o, 8) + cols
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # window 0: its rows before the tile (from chunk -1) are masked, so w_prev is a placeholder
    v0, v1, v2, v3, v4, d, w = xorwow(v0, v1, v2, v3, v4, d)
    edge = row_ok & (cols >= o) & (cols < o + length)
    acc = window(acc, x_ptrs, edge, w, w, from_prev, shift, BLOCK_N)
    w_prev = w
    # the state shifts by one word per step: unrolled 5 times, no value passes unchanged from one iteration
    # to the next, which Triton (3.9) needs to pipeline the loads (cp.async into shared memory)
    for _ in tl.range(1, n_win - 1, loop_unroll_factor=UNROLL):
        x_ptrs += 16
        v0, v1, v2, v3, v4, d, w = xorwow(v0, v1, v2, v3, v4, d)
        acc = window(acc, x_ptrs, row_ok, w_prev, w, from_prev, shift, BLOCK_N)
        w_prev = w
    if n_win > 1:
        x_ptrs += 16
        v0, v1, v2, v3, v4, d, w = xorwow(v0, v1, v2, v3, v4, d)
        edge = row_ok & (cols < o + length - (n_win - 1) * 16)
        acc = window(acc, x_ptrs, edge, w_prev, w, from_prev, shift, BLOCK_N)

    out_cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ptrs = out_ptr + (t.to(tl.int64) * B + rows.to(tl.int64))[:, None] * dim + out_cols[None, :]
    tl.store(out_ptrs, acc, mask=row_ok)
