"""Slow, obviously correct definitions the fast paths are tested against (tests and benchmarks only; private).

- `naive_gradients`: one backward per example, the per-example gradient `grads.engine` computes per batch;
- `fast_jl_matrix`, `reference_project`: fast_jl's Rademacher matrix and projection, in plain numpy/torch;
- `dense_matrix`: the count sketch (`grads.projection.sketch`) as an explicit [P, D] matrix;
- `step_gradient`: one optimizer step's gradient, one example at a time (what the training passes compute);
- `expected_lrs`: the learning rate of every step of the Trainer's linear schedule with warmup;
- `text_stop_generate`: greedy generation as plain `model.generate` calls with a stop check that decodes
  every row's last tokens at every step (what `evaluation.generation` does with token-id stops).
"""

from __future__ import annotations

import logging
import math

from lessctl.grads.engine import pad_batch, trainable_parameters
from lessctl.grads.projection.rademacher import factor_rows, thread_seeds, tile_size, xorwow_words
from lessctl.grads.projection.sketch import source_index
from lessctl.models import per_example_loss

log = logging.getLogger(__name__)


def naive_gradients(model, seqs, labels, pad_id: int = 0):
    """The reference: one example at a time, autograd on the trainable parameters. [B, P] float32."""
    import torch

    params = [p for _, p in trainable_parameters(model)]
    dev = params[0].device
    rows = []
    for s, l in zip(seqs, labels):
        ids, lab, att = pad_batch([s], [l], pad_id, dev)
        loss, _ = per_example_loss(model(input_ids=ids, attention_mask=att).logits, lab)
        grads = torch.autograd.grad(loss.sum(), params, allow_unused=True)
        rows.append(
            torch.cat(
                [(g if g is not None else torch.zeros_like(p)).reshape(-1).float() for g, p in zip(grads, params)]
            )
        )
    return torch.stack(rows)


def fast_jl_matrix(grad_dim: int, dim: int, seed: int, n_tiles: int, rows: slice | None = None):
    """fast_jl's Rademacher matrix R [grad_dim, dim] float32 (or its feature rows `rows`), emulated on the CPU.

    project_rademacher_*(x, dim, seed, n_tiles) is half(x) @ R, summed tile by tile. Costs dim x 16 bytes
    per feature: meant for tests with a few thousand features.
    """
    import numpy as np
    import torch

    if dim % 32:
        raise ValueError(f"fast_jl_matrix: dim {dim} is not a multiple of 32 (fast_jl's warp width)")
    n, tile = tile_size(grad_dim, n_tiles)
    start, stop, step = (rows or slice(None)).indices(grad_dim)
    if step != 1:
        raise ValueError("fast_jl_matrix: rows must be a contiguous slice")
    out = np.empty((max(0, stop - start), dim), dtype=np.float32)
    for t in range(start // tile, -(-stop // tile) if stop > start else 0):
        lo, hi = max(start, t * tile), min(stop, (t + 1) * tile)
        words = xorwow_words(thread_seeds(seed, t, dim), -(-(hi - t * tile) // 16))
        out[lo - start : hi - start] = factor_rows(words)[lo - t * tile : hi - t * tile]
    return torch.from_numpy(out)


def reference_project(x, dim: int, seed: int, n_tiles: int):
    """What project_rademacher_*(x, dim, seed, n_tiles) returns, on the CPU: per-tile float32 products of
    half(x) with the emulated matrix, summed over the tiles. [B, dim] float32."""
    import torch

    xh = x.detach().to("cpu", torch.float16).float()
    n, tile = tile_size(xh.shape[1], n_tiles)
    out = torch.zeros(xh.shape[0], dim, dtype=torch.float32)
    for t in range(n):
        lo, hi = t * tile, min(xh.shape[1], (t + 1) * tile)
        if lo < hi:
            out += xh[:, lo:hi] @ fast_jl_matrix(xh.shape[1], dim, seed, n_tiles, slice(lo, hi))
    return out


def dense_matrix(seg, code, grad_dim: int, dim: int):
    """The sketch as an explicit [grad_dim, dim] float32 matrix (one +-1 per row): project(x) = x @ it. For tests."""
    import torch

    src, sign = source_index(seg.cpu(), code.cpu(), dim)
    m = torch.zeros(seg.shape[0] * dim, dim)
    m[src.view(-1), torch.arange(dim).repeat(seg.shape[0])] = sign.view(-1)
    return m[:grad_dim]


def expected_lrs(n_steps: int, peak: float, warmup_ratio: float) -> list[float]:
    """The linear-with-warmup schedule's learning rate at each optimizer step (for checks and docs)."""
    warm = math.ceil(warmup_ratio * n_steps) if warmup_ratio < 1 else int(warmup_ratio)
    out = []
    for s in range(n_steps):
        if s < warm:
            out.append(peak * s / max(1, warm))
        else:
            out.append(peak * max(0.0, (n_steps - s) / max(1, n_steps - warm)))
    return out


class TextStops:
    """A StoppingCriteria that decodes each unfinished row's last `window` new tokens at every step."""

    def __init__(self, tokenizer, stops, prompt_len: int, window: int = 16):
        self.tokenizer, self.stops, self.prompt_len, self.window = tokenizer, list(stops), prompt_len, window
        self.done: list[bool] | None = None

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        if self.done is None:
            self.done = [False] * input_ids.shape[0]
        new = input_ids[:, self.prompt_len :]
        for i in range(new.shape[0]):
            if self.done[i]:
                continue
            start = 0 if new.shape[1] <= self.window else new.shape[1] - self.window
            text = self.tokenizer.decode(new[i, start:], skip_special_tokens=True)
            self.done[i] = any(s in text for s in self.stops)
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


def text_stop_generate(model, tokenizer, prompts, *, max_new_tokens: int, stop=(), batch_size: int = 8, stats=None):
    """Greedy continuations cut before their first stop string: the batches, padding, context limits and
    eos handling of `evaluation.generation.generate_greedy`, the stop check done on decoded text.
    stats: as generate_greedy's (new_tokens, steps, batches)."""
    import torch
    from transformers import GenerationConfig, StoppingCriteriaList

    from lessctl.evaluation import generation as g

    device = g.model_device(model)
    encoded = [g.encode(tokenizer, p) for p in prompts]
    limit = g.max_positions(model)
    if limit:
        budget = max(limit - max_new_tokens, limit // 2)
        encoded = [ids[len(ids) - budget :] if len(ids) > budget else ids for ids in encoded]
    eos = g._eos_ids(model, tokenizer)
    pad = g.pad_id(tokenizer)
    outputs = [""] * len(prompts)
    with torch.inference_mode():
        for idx in g._batches([len(e) for e in encoded], batch_size):
            ids, mask, _ = g._left_pad([encoded[i] for i in idx], pad, device)
            room = max_new_tokens if not limit else max(1, min(max_new_tokens, limit - ids.shape[1]))
            cfg = GenerationConfig(
                max_new_tokens=room,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
                eos_token_id=eos or None,
                bos_token_id=tokenizer.bos_token_id,
            )
            criteria = StoppingCriteriaList([TextStops(tokenizer, stop, ids.shape[1])]) if stop else None
            seqs = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg, stopping_criteria=criteria)
            for row, i in enumerate(idx):
                new = seqs[row, ids.shape[1] :].tolist()
                for k, t in enumerate(new):
                    if t in eos:
                        new = new[:k]
                        break
                outputs[i] = g.cut_at_stop(tokenizer.decode(new, skip_special_tokens=True), stop)
                if stats is not None:
                    stats["new_tokens"] = stats.get("new_tokens", 0) + len(new)
            if stats is not None:
                stats["steps"] = stats.get("steps", 0) + seqs.shape[1] - ids.shape[1]
                stats["batches"] = stats.get("batches", 0) + 1
    return outputs


def step_gradient(model, examples, weighting: str):
    """The gradient of one optimizer step over `examples`, by hand, one example at a time in float32:
    example: the mean over the examples of each one's mean next-token loss (transformers 4.36, LESS);
    token: the sum of all examples' token losses over their total label tokens (transformers 5)."""
    import torch
    import torch.nn.functional as F

    params = [p for _, p in model.named_parameters() if p.requires_grad]
    total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    n_tokens = sum(sum(1 for x in e.labels[1:] if x != -100) for e in examples)
    for e in examples:
        ids, labels = torch.tensor([e.input_ids]), torch.tensor(e.labels[1:])
        logits = model(input_ids=ids).logits[0, :-1].float()
        token_losses = F.cross_entropy(logits, labels, ignore_index=-100, reduction="none")[labels != -100]
        if weighting == "example":
            loss = token_losses.mean() / len(examples)
        else:
            loss = token_losses.sum() / n_tokens
        for t, g in zip(total, torch.autograd.grad(loss, params)):
            t += g
    return torch.cat([t.reshape(-1) for t in total])
