"""The BM25 first stage: rank_bm25's Okapi over a whole corpus (the statistics of select.baselines.OkapiStats),
with an inverted index so a query costs its postings."""

from __future__ import annotations

import logging
import re
from typing import Callable, Iterator, Sequence

import numpy as np

from lessctl.select.baselines import BM25_PARAMS, OkapiStats

log = logging.getLogger(__name__)


# progress(description, done, total): called now and then during long loops.
Progress = Callable[[str, int, int], None]


# ---------------------------------------------------------------------------------------------- BM25

_WORD = re.compile(r"\w+")


def bm25_tokens(text: str) -> list[str]:
    """The first stage's analyzer: lower-cased word characters (no stemming, no stop words)."""
    return _WORD.findall(text.lower())


class BM25Index:
    """rank_bm25's BM25Okapi over a corpus, with an inverted index so a query costs its postings only.

    `scores(query)` equals `BM25Okapi(...).get_scores(bm25_tokens(query))` (same statistics, same
    terms, same order of additions); building it reads the corpus once and reports progress.
    """

    def __init__(
        self,
        texts: Sequence[str],
        *,
        progress: Progress | None = None,
        k1: float = BM25_PARAMS["k1"],
        b: float = BM25_PARAMS["b"],
        epsilon: float = BM25_PARAMS["epsilon"],
    ):
        n = len(texts)
        step = max(1, n // 100)

        def tokenized() -> Iterator[list[str]]:
            for i, t in enumerate(texts):
                if progress and i % step == 0:
                    progress("BM25 index", i, n)
                yield bm25_tokens(t)
            if progress:
                progress("BM25 index", n, n)

        # The corpus is iterated once; a generator spares holding every document's tokens.
        stats = OkapiStats(tokenized(), k1=k1, b=b, epsilon=epsilon)
        self.n_docs = n
        order = np.argsort(stats.indices, kind="stable")  # postings grouped by term, documents ascending
        doc = np.repeat(np.arange(n, dtype=np.int64), np.diff(stats.indptr))
        self._doc = doc[order]
        self._weight = stats.weight[order]  # each posting's BM25 term weight, as rank_bm25 computes it: [P]
        self._start = np.searchsorted(stats.indices[order], np.arange(len(stats.vocab) + 1))  # [V + 1] offsets
        self._vocab = stats.vocab
        self._idf = stats.idf  # [V]

    def scores(self, query: str) -> np.ndarray:
        """[N] float64 BM25 scores of every document for the query."""
        out = np.zeros(self.n_docs)
        for q in bm25_tokens(query):
            t = self._vocab.get(q)
            if t is None:
                continue
            lo, hi = self._start[t], self._start[t + 1]
            out[self._doc[lo:hi]] += self._idf[t] * self._weight[lo:hi]
        return out


def top_k(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the k best scores, best first; ties go to the earlier document."""
    k = min(k, len(scores))
    part = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    # argpartition may pick any of several equal scores at the boundary: widen to all of them.
    cut = scores[part].min()
    pool = np.flatnonzero(scores >= cut)
    order = pool[np.lexsort((pool, -scores[pool]))]
    return [int(i) for i in order[:k]]


def rank_of(scores: np.ndarray, i: int) -> int:
    """1-based BM25 rank of document i (ties broken by corpus order, as `top_k` does)."""
    s = scores[i]
    return int((scores > s).sum() + (scores[:i] == s).sum() + 1)


def first_stage(index: BM25Index, query: str, k: int) -> list[tuple[int, float, int]]:
    """The BM25 top-k: [(doc index, score, rank)]."""
    s = index.scores(query)
    return [(d, float(s[d]), r) for r, d in enumerate(top_k(s, k), start=1)]
