"""Evaluation on a custom held-out jsonl (a target's `eval_file`): greedy answers scored by exact match and F1.

Each example is a `messages` conversation whose last message is the reference answer (the prompt is
the conversation before it in the training chat format, ending with the assistant marker), or a
prompt/completion pair. Scores are percentages, per subtask and overall.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lessctl.errors import InputError


def jsonl_prompts(path: Path, tokenizer: Any, chat_format: str = "tulu") -> list[tuple[str, str, str]]:
    """(prompt, reference answer, subtask) for every example of a custom eval file."""
    from lessctl.data.encoding import format_chat
    from lessctl.data.records import read_examples, where

    out = []
    for rec in read_examples(path):
        obj = rec.data
        subtask = str(obj.get("subtask", "all"))
        if "messages" in obj:
            msgs = obj["messages"]
            if msgs[-1]["role"] != "assistant":
                at = where(path, rec.line + 1)
                raise InputError(f"{at}: the last message must be the assistant's reference answer")
            prefix = format_chat(msgs[:-1], tokenizer, chat_format)
            prompt = prefix + ("<|assistant|>\n" if chat_format == "tulu" else "")
            out.append((prompt, msgs[-1]["content"].strip(), subtask))
        else:
            out.append((obj["prompt"], obj["completion"].strip(), subtask))
    return out


def evaluate_jsonl(
    model: Any,
    tokenizer: Any,
    path: str | Path,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    progress: Any = None,
    max_new_tokens: int = 48,
    chat_format: str = "tulu",
) -> dict:
    """Exact match and F1 (percent) of greedy answers against the references; `exact_match` is the headline."""
    from lessctl.evaluation.generation import ProgressHook, generate_greedy
    from lessctl.evaluation.metrics import squad_scores

    start = time.time()
    items = jsonl_prompts(Path(path), tokenizer, chat_format)
    if limit:
        items = items[:limit]
    eos = tokenizer.eos_token or "</s>"
    hook = ProgressHook(progress, "custom")
    hook.start(len(items))
    outputs, _ = generate_greedy(
        model,
        tokenizer,
        [p for p, _, _ in items],
        max_new_tokens=max_new_tokens,
        stop=["\n", eos],
        batch_size=batch_size,
        hook=hook,
    )
    per: dict[str, list[tuple[float, float]]] = {}
    examples = []
    for (_prompt, ref, sub), out in zip(items, outputs):
        em, f1 = squad_scores(out.strip(), [ref])
        per.setdefault(sub, []).append((em, f1))
        examples.append({"subtask": sub, "reference": ref, "prediction": out.strip(), "exact_match": em, "f1": f1})
    n = max(1, len(examples))
    return {
        "exact_match": 100.0 * sum(e["exact_match"] for e in examples) / n,
        "f1": 100.0 * sum(e["f1"] for e in examples) / n,
        "n": len(examples),
        "per_subtask": {
            s: {
                "exact_match": 100.0 * sum(x for x, _ in v) / len(v),
                "f1": 100.0 * sum(y for _, y in v) / len(v),
                "n": len(v),
            }
            for s, v in per.items()
        },
        "examples": examples,
        "settings": {"file": str(path), "limit": limit, "max_new_tokens": max_new_tokens, "chat_format": chat_format},
        "seconds": round(time.time() - start, 2),
    }
