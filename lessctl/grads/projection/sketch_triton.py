"""The Triton kernel behind `sketch.project_triton`: the count sketch as a gather, without atomics.

A module of its own, imported on first use, because the kernel must be defined at a module's top level (Triton
looks it up there, also under TRITON_INTERPRET=1), and importing triton is slow and not possible everywhere.
The definition it computes, and the tables it reads, are in lessctl.grads.projection.sketch's docstring.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["B", "P", "C", "per_split"])  # fewer variants: these only enter arithmetic
def count_sketch(
    x_ptr, seg_ptr, code_ptr, out_ptr, B, P, C, stride_x, dim, nseg, per_split, S: tl.constexpr, BLOCK_M: tl.constexpr
):
    """Program (output block b, row block, chunk split k): out[k, rows, b S .. b S + S - 1] = the sum over the
    chunks c of split k of sign * x[rows, c D + seg[c, b] S + offset], offset and sign from code[c, b, :].

    Each chunk's step reads one S-wide segment of the rows (S = 256: 512 contiguous bytes per float16 row,
    in a permuted order), so across the output blocks every x element is read once per row block. Pointer
    offsets are int64: rows x P exceeds 2**31 at 7B. Coordinates >= P (the last chunk's tail) read as zero.
    """
    b = tl.program_id(0)
    pid_m = tl.program_id(1)
    k = tl.program_id(2)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    u = tl.arange(0, S)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x  # [BLOCK_M, 1]

    c0 = k.to(tl.int64) * per_split
    n = (tl.minimum(c0 + per_split, C) - c0).to(tl.int32)  # chunks of this split
    seg_ptrs = seg_ptr + c0 * nseg + b  # seg[c, b], advanced a chunk per step
    code_ptrs = code_ptr + (c0 * nseg + b) * S + u  # code[c, b, :]
    start = c0 * dim  # the chunk's first coordinate
    acc = tl.zeros((BLOCK_M, S), dtype=tl.float32)
    for _ in range(0, n):
        s = tl.load(seg_ptrs)
        code = tl.load(code_ptrs).to(tl.int32)
        col = start + s * S + (code & 255)  # [S] int64: the coordinate feeding each bucket of the block
        sign = (1 - 2 * (code >> 8)).to(tl.float32)
        xv = tl.load(x_rows + col[None, :], mask=row_ok[:, None] & (col < P)[None, :], other=0.0)
        acc += xv.to(tl.float32) * sign[None, :]
        seg_ptrs += nseg
        code_ptrs += nseg * S
        start += dim

    out_ptrs = out_ptr + (k.to(tl.int64) * B + rows.to(tl.int64))[:, None] * dim + b * S + u[None, :]
    tl.store(out_ptrs, acc, mask=row_ok[:, None])
