"""The Triton kernel behind `lessctl.kernels.segment_products_into`: per-example LoRA gradients, transformed.

A module of its own, imported on first use (as lessctl.rademacher_triton, for the same reasons). One program
computes one [BLOCK_M, BLOCK_N] tile of one example's weight gradient C = L^T R, summed over that example's
tokens only (L [tokens, M], R [tokens, N]: for lora_A, L is the gradient at lora_A's output and R the layer
input; for lora_B, L is lora_A's output and R the layer's output gradient, and the weight is C^T), applies LESS's transform to the
float32 tile and writes it as float16 straight into the example's feature row. The programs of one tile for
all the batch's examples are neighbours in the launch order, so the tile's Adam moments are read from
memory once and then from the L2 cache.
"""

import triton
import triton.language as tl


@triton.jit
def segment_products(l_ptr, r_ptr, row_ptr, tok_ptr, len_ptr, m_ptr, v_ptr, out_ptr, raw_ptr,
                     M, N, stride_lb, stride_lm, stride_lt, stride_rb, stride_rt, out_stride, out_offset, b1, b2, eps,
                     TRANS_OUT: tl.constexpr, GRAD_TYPE: tl.constexpr, WRITE_RAW: tl.constexpr, IEEE: tl.constexpr,
                     PREFETCH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (example i, tile): C = sum over the example's tokens t of L[t, m] R[t, n] (row `row[i]` of the
    batch, positions tok[i] .. tok[i] + len[i] - 1; L is addressed through its strides, so it may be stored
    token-major [B, T, M] or, better for the loads, transposed [B, M, T]), transformed and stored at
    out[i, offset + m N + n], or at offset + n M + m with TRANS_OUT (the weight is C^T). GRAD_TYPE: 0 adam,
    1 sgd, 2 sign; with WRITE_RAW the untransformed tile also goes to raw (float16)."""
    i = tl.program_id(0)
    tile = tl.program_id(1)
    tiles_n = tl.cdiv(N, BLOCK_N)
    pm = tile // tiles_n
    pn = tile % tiles_n
    row = tl.load(row_ptr + i).to(tl.int64)
    tok0 = tl.load(tok_ptr + i).to(tl.int64)
    length = tl.load(len_ptr + i)

    offs_m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    l_ptrs = l_ptr + row * stride_lb + offs_m[:, None] * stride_lm + (tok0 + offs_k)[None, :] * stride_lt  # [M, K]
    r_ptrs = r_ptr + row * stride_rb + (tok0 + offs_k)[:, None] * stride_rt + offs_n[None, :]  # [K, N]
    m_ok = offs_m < M
    n_ok = offs_n < N
    if TRANS_OUT:
        idx = offs_n[None, :].to(tl.int64) * M + offs_m[:, None]
    else:
        idx = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if PREFETCH and GRAD_TYPE == 0:  # the moments' loads start before the sums, their latency hidden behind them
        m = tl.load(m_ptr + idx, mask=mask, other=0.0)
        v = tl.load(v_ptr + idx, mask=mask, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, length, BLOCK_K):
        k_ok = (k + offs_k) < length
        a = tl.load(l_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(r_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        l_ptrs += BLOCK_K * stride_lt
        r_ptrs += BLOCK_K * stride_rt

    dst = i.to(tl.int64) * out_stride + out_offset + idx
    if WRITE_RAW:
        tl.store(raw_ptr + dst, acc.to(tl.float16), mask=mask)
    if GRAD_TYPE == 0:
        if not PREFETCH:
            m = tl.load(m_ptr + idx, mask=mask, other=0.0)
            v = tl.load(v_ptr + idx, mask=mask, other=0.0)
        num = b1 * m + (1.0 - b1) * acc
        den = tl.sqrt_rn(b2 * v + (1.0 - b2) * acc * acc + eps)
        feat = tl.div_rn(num, den)
    elif GRAD_TYPE == 1:
        feat = acc
    else:
        feat = tl.where(acc > 0, 1.0, tl.where(acc < 0, -1.0, 0.0))
    tl.store(out_ptr + dst, feat.to(tl.float16), mask=mask)
