"""The baselines of LESS's comparison: random selection and BM25 (rank_bm25's Okapi), same aggregation as LESS."""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from lessctl.select.scores import Scored, aggregate, subtask_matrix

log = logging.getLogger(__name__)


BM25_PARAMS = {"k1": 1.5, "b": 0.75, "epsilon": 0.25}  # rank_bm25's defaults (Okapi), as LESS's baseline uses them


def bm25_scores(
    train_texts: dict[str, list[tuple[int, str]]], queries: Sequence[str], subtasks: Sequence[str]
) -> Scored:
    """rank_bm25.BM25Okapi over the pooled training texts (whitespace-split), one query per target example."""
    from rank_bm25 import BM25Okapi

    names, index, corpus = [], [], []
    for name, items in train_texts.items():
        for line, text in items:
            names.append(name)
            index.append(line)
            corpus.append(text.split())
    bm25 = BM25Okapi(corpus, **BM25_PARAMS)
    S = np.stack([bm25.get_scores(q.split()) for q in queries], axis=1)  # [N, M]
    _, A = subtask_matrix(subtasks)
    return Scored(names, np.asarray(index, dtype=np.int64), aggregate(S, A.astype(np.float64)))


def random_scores(sizes: dict[str, list[int]], seed: int) -> Scored:
    """A seeded uniform score per row: its top k is a uniform random subset of size k."""
    names, index = [], []
    for name, lines in sizes.items():
        names += [name] * len(lines)
        index += list(lines)
    rng = np.random.default_rng(seed)
    return Scored(names, np.asarray(index, dtype=np.int64), rng.random(len(names)))
