"""GPU fast paths of the gradient pass, each with a plain-torch equivalent it is tested against.

- `adam_into`: LESS's Adam transform of gradient rows written straight into float16 (one Triton kernel:
  one read of g, m and v, one write; the torch ops need four passes);
- `bmm_f32`: a batched matmul of bfloat16 operands with float32 accumulation and output, where this
  torch supports `torch.bmm(..., out_dtype=torch.float32)` (`has_bmm_f32`).
Both are used only on CUDA tensors and only when they work here; `fast_paths()` says which are active.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


_state: dict[str, bool | None] = {"triton": None, "bmm_dtype": None}
_kernel = None


def _triton_kernel():
    global _kernel
    if _kernel is not None:
        return _kernel
    import triton
    import triton.language as tl

    @triton.jit
    def adam_f16(g_ptr, m_ptr, v_ptr, out_ptr, n, out_row_stride, b1, b2, eps, BLOCK: tl.constexpr):
        row = tl.program_id(1).to(tl.int64)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + row * n + offs, mask=mask, other=0.0)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        num = b1 * m + (1.0 - b1) * g
        den = tl.sqrt_rn(b2 * v + (1.0 - b2) * g * g + eps)
        tl.store(out_ptr + row * out_row_stride + offs, tl.div_rn(num, den).to(tl.float16), mask=mask)

    _kernel = (triton, adam_f16)
    return _kernel


def adam_into(g, m, v, beta1: float, beta2: float, eps: float, out) -> bool:
    """out[b] = f16((b1 m + (1-b1) g[b]) / sqrt(b2 v + (1-b2) g[b]^2 + eps)) in one kernel; False when the
    Triton path is not available for these tensors (the caller then uses torch ops)."""
    if not g.is_cuda or _state["triton"] is False:
        return False
    if not (g.is_contiguous() and m.is_contiguous() and v.is_contiguous() and out.stride(1) == 1):
        return False
    try:
        triton, kernel = _triton_kernel()
        B, n = g.shape
        block = 2048
        kernel[(triton.cdiv(n, block), B)](
            g, m, v, out, n, out.stride(0), float(beta1), float(beta2), float(eps), BLOCK=block
        )
        _state["triton"] = True
        return True
    except Exception as exc:  # noqa: BLE001 - no Triton, or it cannot compile here: the torch ops are equivalent
        if _state["triton"] is None:
            log.warning(
                "the fused Adam transform (Triton) is not available here (%s); using torch ops",
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            )
        _state["triton"] = False
        return False


def has_bmm_f32(device) -> bool:
    """Whether this torch multiplies bfloat16 batches into float32 on `device` (`torch.bmm(out_dtype=...)`):
    probed once, on a CUDA device only."""
    import torch

    if torch.device(device).type != "cuda":
        return False
    if _state["bmm_dtype"] is None:
        try:
            x = torch.ones(1, 1, 1, dtype=torch.bfloat16, device=device)
            _state["bmm_dtype"] = torch.bmm(x, x, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            _state["bmm_dtype"] = False
    return bool(_state["bmm_dtype"])


def bmm_f32(a, b):
    """a @ b for bfloat16 [B, M, K] x [B, K, N] with float32 accumulation and output (see `has_bmm_f32`)."""
    import torch

    return torch.bmm(a, b, out_dtype=torch.float32)


def fast_paths() -> dict[str, bool | None]:
    """Which fast paths ran (True), failed (False) or were never tried (None) in this process."""
    return dict(_state)
