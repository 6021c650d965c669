"""Variable-length attention for packed training on CUDA: torch's flash-attention kernel for packed
sequences (`torch.nn.attention.varlen.varlen_attn`) behind transformers' attention interface.

Each pack's sequence boundaries (`cu_seq_lens`, from `PackingCollator`) go to the kernel, so attention costs
the sum of the squared example lengths, not the square of the pack's length as a block-diagonal mask does.
Elsewhere (the CPU, a torch without the kernel) packed training keeps transformers' sdpa with the
block-diagonal mask it builds from the restarting position ids: the same attention.
"""

from __future__ import annotations

import inspect
from typing import Any

NAME = "lessctl_varlen"


def available(device: str, half_precision: bool = True) -> bool:
    """True when `device` is CUDA, training runs in half precision (weights or autocast: the kernel takes
    bf16/fp16 only) and this torch has the varlen kernel."""
    if not (str(device).startswith("cuda") and half_precision):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _causal_kwargs(fn) -> dict:
    params = inspect.signature(fn).parameters
    if "is_causal" in params:
        return {"is_causal": True}
    return {"window_size": (-1, 0)}  # torch >= 2.12: (-1, 0) is causal


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention signature: query/key/value [1, heads, T, head_dim] -> ([1, T, heads, head_dim], None)."""
    import torch
    from torch.nn.attention.varlen import varlen_attn

    cu, longest = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
    # under autocast with float32 weights the rotary embedding hands over float32 q and k; sdpa would run
    # them in the autocast dtype, and so does the flash kernel (which takes only half precision)
    half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else query.dtype
    q, k, v = (x[0].transpose(0, 1).to(half).contiguous() for x in (query, key, value))
    if k.shape[1] != q.shape[1]:  # grouped-query attention: every query head gets its key/value head
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scaling, **_causal_kwargs(varlen_attn))
    return out[None], None


def _no_mask(*args, **kwargs):
    return None  # the sequence boundaries travel as cu_seq_lens


def enable(model: Any) -> None:
    """Switches `model` (a transformers model, before peft wraps it) to the varlen attention."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, _no_mask)
    model.set_attn_implementation(NAME)
