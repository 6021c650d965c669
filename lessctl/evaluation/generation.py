"""Batched inference for the evaluations: next-token scores and greedy generation with per-sequence stops.

Prompts are tokenized one by one (the tokenizer's special tokens included, BOS for Llama), sorted by
length, and padded on the left by hand, with position ids that skip the padding, so that a prompt's
result does not depend on the batch it lands in.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

log = logging.getLogger(__name__)


class ProgressHook:
    """Reports work done to an optional `progress`: a callable(advance) or a rich Progress handle.

    A rich Progress (anything with `add_task`/`advance`) gets one task per hook; a callable is
    called with the number of examples finished, and its `set_total(n)` is called when it has one.
    """

    def __init__(self, progress: Any = None, description: str = ""):
        self._p = progress
        self._task = None
        if progress is not None and hasattr(progress, "add_task") and hasattr(progress, "advance"):
            self._task = progress.add_task(description, total=None)

    def start(self, total: int) -> None:
        if self._task is not None:
            self._p.update(self._task, total=total)
        elif self._p is not None and hasattr(self._p, "set_total"):
            self._p.set_total(total)

    def advance(self, n: int) -> None:
        if self._task is not None:
            self._p.advance(self._task, n)
        elif self._p is not None:
            self._p(n)


def model_device(model: Any):
    return next(model.parameters()).device


def max_positions(model: Any) -> int | None:
    """The model's context length when its config states one."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(n) if n else None


def pad_id(tokenizer: Any) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt as the model sees it (the tokenizer's special tokens included)."""
    # verbose=False: lengths are checked here, the tokenizer's own warning about them would only mislead.
    return list(tokenizer(text, verbose=False)["input_ids"])


def _left_pad(batch: list[list[int]], pad: int, device: Any, width: int | None = None):
    """input_ids, attention_mask, position_ids [B, L] for left-padded rows (L: `width`, else the longest row)."""
    import torch

    width = width or max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, row in enumerate(batch):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first, so memory problems show early)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def next_token_scores(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    candidate_ids: Sequence[int],
    *,
    batch_size: int = 8,
    hook: ProgressHook | None = None,
) -> list[list[float]]:
    """Log-probabilities of the candidate tokens as the next token after each tokenized prompt: [N, C]."""
    import torch

    device = model_device(model)
    cand = torch.tensor(list(candidate_ids), dtype=torch.long, device=device)
    out: list[list[float] | None] = [None] * len(prompts)
    with torch.inference_mode():
        for idx in _batches([len(p) for p in prompts], batch_size):
            ids, mask, pos = _left_pad([list(prompts[i]) for i in idx], pad_id(tokenizer), device)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1, :]  # [B, V]
            logp = torch.log_softmax(logits.float(), dim=-1)[:, cand]  # [B, C]
            for row, i in enumerate(idx):
                out[i] = logp[row].tolist()
            if hook:
                hook.advance(len(idx))
    return out  # type: ignore[return-value]


def _stop_criteria(tokenizer: Any, stops: Sequence[str], prompt_len: int, window: int = 16, after_text=False):
    """A StoppingCriteria marking each row done once its new text holds a stop string (token-id prefilter)."""
    from lessctl.evaluation.stops import StopOnTokenIds

    return StopOnTokenIds(tokenizer, stops, prompt_len, window=window, after_text=after_text)


def cut_at_stop(text: str, stops: Sequence[str], after_text: bool = False) -> str:
    """The text before the first occurrence of any stop string (after_text: the first after the text's leading
    whitespace, which is kept)."""
    if after_text:
        body = text.lstrip()
        return text[: len(text) - len(body)] + cut_at_stop(body, stops)
    cut = len(text)
    for s in stops:
        k = text.find(s)
        if k != -1:
            cut = min(cut, k)
    return text[:cut]


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    for src in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(x) for x in src)
    return sorted(ids)


def generate_greedy(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    batch_size: int = 8,
    hook: ProgressHook | None = None,
    cache: str = "dynamic",  # or "static", or "auto": static on a CUDA device, else dynamic
    stats: dict | None = None,
    stop_after_text: bool = False,
) -> tuple[list[str], int]:
    """Greedy continuations of `prompts`, each cut before its first stop string; and the number of
    prompts that had to lose their first tokens to fit the model's context.

    Batches are left-padded; a row that has produced a stop string (or eos) is finished while the
    others go on. Prompt and continuation stay within the model's context: a prompt keeps at least
    half of it (losing its beginning beyond that), and a batch generates at most what is left.
    Stop strings are checked on token ids (`lessctl.evaluation.stops`). cache: "dynamic" (the
    cache grows with each step) or "static" (preallocated; on a GPU transformers then compiles the
    decoding step): every batch is then padded to the longest prompt's width and the last one filled
    up to `batch_size` with copies of its last row, so that one shape, one cache size and one compiled
    graph serve all batches.
    stats, when given, gets the counts `new_tokens` (up to eos), `steps` (decoding steps over all
    batches), `batches` and `text_checks` (rows whose text the stop check decoded) added to it.
    stop_after_text: a stop string counts only after the continuation's first non-blank character.
    """
    import torch
    from transformers import GenerationConfig, StoppingCriteriaList

    device = model_device(model)
    if cache == "auto":
        cache = "static" if torch.device(device).type == "cuda" else "dynamic"
    if cache not in ("static", "dynamic"):
        raise ValueError(f"cache: expected auto, static or dynamic, got {cache!r}")
    encoded = [encode(tokenizer, p) for p in prompts]
    limit = max_positions(model)
    truncated = 0
    if limit:
        budget = max(limit - max_new_tokens, limit // 2)
        for i, ids in enumerate(encoded):
            if len(ids) > budget:
                encoded[i] = ids[len(ids) - budget :]
                truncated += 1
        if truncated:
            log.warning("%d prompts were longer than %d tokens and lost their beginning", truncated, budget)
    eos = _eos_ids(model, tokenizer)
    pad = pad_id(tokenizer)
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad,
        eos_token_id=eos or None,
        bos_token_id=tokenizer.bos_token_id,
        cache_implementation=None if cache == "dynamic" else cache,
    )
    outputs: list[str] = [""] * len(prompts)
    static = cache == "static"
    width = max((len(e) for e in encoded), default=0) if static else None
    with torch.inference_mode():
        for idx in _batches([len(e) for e in encoded], batch_size):
            rows = [encoded[i] for i in idx]
            longest = max(len(r) for r in rows)
            if static:
                rows += [rows[-1]] * (batch_size - len(rows))
            ids, mask, _ = _left_pad(rows, pad, device, width)
            criteria = (
                StoppingCriteriaList([_stop_criteria(tokenizer, stop, ids.shape[1], after_text=stop_after_text)])
                if stop
                else None
            )
            room = max_new_tokens if not limit else max(1, min(max_new_tokens, limit - longest))
            gen_cfg.max_new_tokens = room  # the batch's own room, set on the config (not as a second source)
            seqs = model.generate(
                input_ids=ids,
                attention_mask=mask,
                generation_config=gen_cfg,
                stopping_criteria=criteria,
            )
            n_new = 0
            new_ids = seqs[:, ids.shape[1] :].tolist()  # one copy to the host for the whole batch
            for row, i in enumerate(idx):
                new = new_ids[row]
                for k, t in enumerate(new):  # what follows eos is padding
                    if t in eos:
                        new = new[:k]
                        break
                n_new += len(new)
                outputs[i] = cut_at_stop(tokenizer.decode(new, skip_special_tokens=True), stop, stop_after_text)
            if stats is not None:
                for key, v in (
                    ("new_tokens", n_new),
                    ("steps", seqs.shape[1] - ids.shape[1]),
                    ("batches", 1),
                    ("text_checks", criteria[0].checks if criteria else 0),
                ):
                    stats[key] = stats.get(key, 0) + v
            if hook:
                hook.advance(len(idx))
    return outputs, truncated
