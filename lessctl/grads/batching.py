"""Token-budget batches for the gradient pass, and the automatic limits on batch rows and projected rows."""

from __future__ import annotations

import logging
from typing import Iterator, Sequence

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- batching


BATCH_OVERHEAD_TOKENS = 256  # what one more forward/backward costs beyond its tokens (launches, hooks), in tokens


def token_batches(lengths: Sequence[int], batch_tokens: int, max_examples: int | None = None) -> Iterator[list[int]]:
    """Positions in batches of similar length, longest first, each within (longest length x size) <= batch_tokens
    and at most `max_examples` examples.

    Over the length-sorted order, the batch boundaries minimise the padded tokens plus BATCH_OVERHEAD_TOKENS
    per batch (dynamic programming): one long example among short ones would pad them all to its length.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    L = [lengths[i] for i in order]
    n = len(L)
    cap = max_examples or n
    best = [0.0] + [float("inf")] * n  # best[j]: cost of batching the first j sorted examples
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, max(-1, j - 1 - cap), -1):  # the batch is order[i:j]; its longest is L[i]
            size = j - i
            if size > 1 and L[i] * size > batch_tokens:
                break
            c = best[i] + L[i] * size + BATCH_OVERHEAD_TOKENS
            if c < best[j]:
                best[j], cut[j] = c, i
    batches = []
    j = n
    while j > 0:
        batches.append(order[cut[j] : j])
        j = cut[j]
    yield from reversed(batches)


def auto_max_batch_examples(grad_dim: int, device) -> int | None:
    """On a GPU: how many examples' [P] float16 feature rows (twice over: a batch's rows and as many waiting
    for projection) fit in a quarter of the GPU's memory; on a CPU no cap."""
    import torch

    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    return max(1, int(0.25 * total // (2 * 2 * grad_dim)))


def auto_project_rows(projectors: dict, grad_dim: int, device) -> int:
    """Rows to gather before one projection call: a fifth of the GPU's memory (1 GiB on a CPU), at most the
    projector's `max_rows`. TRAK's CUDA projection generates its random matrix once per call, whatever the
    rows (fast_jl: up to 32, lessctl's Triton kernel: up to 256), and BasicProjector may regenerate its matrix
    on every call, so calls should be as full as memory allows."""
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        budget = torch.cuda.get_device_properties(torch.device(device)).total_memory // 5
    else:
        budget = 1 << 30
    rows = max(1, budget // (2 * grad_dim))  # float16 rows
    for p in projectors.values():
        if p.max_rows is not None:
            rows = min(rows, p.max_rows)
    return int(rows)
