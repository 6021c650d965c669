"""Listwise reranking prompts: passages labelled [A], [B], ... in a seeded order, the gold order by relevance."""

from __future__ import annotations

import logging
import os
import random
from typing import Any, Sequence

from lessctl.errors import ConfigError
from lessctl.ir.beir import Collection, _clean

log = logging.getLogger(__name__)


# LESS.md section 7, verbatim (the "numerical identifier" wording included, for comparability).
PROMPT_HEAD = (
    "You are RankLLM, an intelligent assistant that can rank passages based on their relevancy to the query. "
    "I will provide you with {n} passages, each indicated by a numerical identifier []. "
    "Rank the passages based on their relevance to the search query: {query}.\n\n"
)
PROMPT_TAIL = (
    "\n\nSearch Query: {query}\n"
    "Rank the {n} passages above based on their relevance to the search query. All the passages should be "
    "included and listed using identifiers, in descending order of relevance. The output format should be "
    "[] > [], e.g., [B] > [A]. Only respond with the ranking results; do not add any explanation."
)


# ---------------------------------------------------------------------------------------------- examples


def labels(n: int) -> list[str]:
    if not 1 <= n <= 26:
        raise ConfigError(f"--candidates: expected 1 to 26 passages (identifiers [A] to [Z]), got {n}")
    return [chr(ord("A") + i) for i in range(n)]


def build_prompt(query: str, passages: Sequence[str]) -> str:
    """The user message of LESS.md section 7 for `passages`, labelled [A], [B], ... in order."""
    n = len(passages)
    body = "\n".join(f"[{lab}] {p}" for lab, p in zip(labels(n), passages))
    return PROMPT_HEAD.format(n=n, query=query) + body + PROMPT_TAIL.format(n=n, query=query)


def format_ranking(order: Sequence[str]) -> str:
    return " > ".join(f"[{x}]" for x in order)


def gold_order(candidates: Sequence[dict]) -> list[str]:
    """Labels by relevance grade descending, ties by BM25 rank."""
    return [c["label"] for c in sorted(candidates, key=lambda c: (-c["grade"], c["bm25_rank"]))]


class PassageTruncator:
    """Cuts passages to a number of tokens: a tokenizer's when given, else whitespace tokens."""

    def __init__(self, max_tokens: int, tokenizer: Any = None, name: str = "whitespace"):
        if max_tokens < 1:
            raise ConfigError(f"--max-passage-tokens: must be at least 1, got {max_tokens}")
        self.max_tokens = max_tokens
        self.tokenizer = tokenizer
        self.name = name

    def __call__(self, text: str) -> str:
        if self.tokenizer is None:
            words = text.split()
            return " ".join(words[: self.max_tokens])
        ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) <= self.max_tokens:
            return text
        return _clean(self.tokenizer.decode(ids[: self.max_tokens], skip_special_tokens=True))


def make_truncator(max_tokens: int, tokenizer_path: str | os.PathLike | None = None) -> PassageTruncator:
    if tokenizer_path is None:
        return PassageTruncator(max_tokens)
    from lessctl.models import load_tokenizer

    return PassageTruncator(max_tokens, load_tokenizer(tokenizer_path), str(tokenizer_path))


def make_example(
    name: str,
    qid: str,
    query: str,
    cand: Sequence[tuple[int, float, int]],
    coll: Collection,
    grades: dict[str, int],
    truncate: PassageTruncator,
    rng: random.Random,
) -> dict:
    """One listwise example; cand = [(doc index, BM25 score, BM25 rank)], shown in a seeded order."""
    shown = list(cand)
    rng.shuffle(shown)
    labs = labels(len(shown))
    candidates = [
        {
            "label": lab,
            "doc_id": coll.doc_ids[d],
            "grade": int(grades.get(coll.doc_ids[d], 0)),
            "bm25_rank": int(r),
            "bm25_score": round(float(s), 4),
        }
        for lab, (d, s, r) in zip(labs, shown)
    ]
    prompt = build_prompt(query, [truncate(coll.doc_texts[d]) for d, _, _ in shown])
    return {
        "dataset": name,
        "id": f"{name}-{qid}",
        "query_id": qid,
        "query": query,
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": format_ranking(gold_order(candidates))},
        ],
        "candidates": candidates,
    }
