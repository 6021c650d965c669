"""The BM25 first stage: rank_bm25's Okapi over a whole corpus, with an inverted index so a query costs its postings."""

from __future__ import annotations

import logging
import re
from typing import Callable, Iterator, Sequence

import numpy as np

from lessctl.errors import InputError
from lessctl.select.baselines import BM25_PARAMS

log = logging.getLogger(__name__)


# progress(description, done, total): called now and then during long loops.
Progress = Callable[[str, int, int], None]


# ---------------------------------------------------------------------------------------------- BM25

_WORD = re.compile(r"\w+")


def bm25_tokens(text: str) -> list[str]:
    """The first stage's analyzer: lower-cased word characters (no stemming, no stop words)."""
    return _WORD.findall(text.lower())


def _bm25_okapi_class():
    from rank_bm25 import BM25Okapi

    class CountingBM25Okapi(BM25Okapi):
        """rank_bm25's BM25Okapi whose corpus pass counts with collections.Counter (same statistics, faster)."""

        def _initialize(self, corpus):
            from collections import Counter

            nd: Counter = Counter()  # word -> number of documents holding it, in first-seen order
            total = 0
            for document in corpus:
                freqs = Counter(document)
                self.doc_freqs.append(freqs)
                self.doc_len.append(len(document))
                total += len(document)
                nd.update(freqs.keys())
                self.corpus_size += 1
            if not self.corpus_size:
                raise InputError("the corpus holds no documents")
            self.avgdl = total / self.corpus_size
            return nd

    return CountingBM25Okapi


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
        self.bm25 = _bm25_okapi_class()(tokenized(), k1=k1, b=b, epsilon=epsilon)
        self.n_docs = n
        vocab: dict[str, int] = {}
        docs: list[int] = []
        terms: list[int] = []
        tfs: list[int] = []
        for i, freqs in enumerate(self.bm25.doc_freqs):
            terms.extend(vocab.setdefault(w, len(vocab)) for w in freqs)
            tfs.extend(freqs.values())
            docs.extend([i] * len(freqs))
        self.bm25.doc_freqs = []  # the postings below hold it all; free the per-document counters
        term = np.asarray(terms, dtype=np.int64)
        order = np.argsort(term, kind="stable")  # postings grouped by term, documents ascending
        doc = np.asarray(docs, dtype=np.int64)[order]
        tf = np.asarray(tfs, dtype=np.float64)[order]
        doc_len = np.asarray(self.bm25.doc_len, dtype=np.float64)
        # each posting's BM25 term weight, as rank_bm25 computes it: [P] float64
        self._weight = tf * (k1 + 1) / (tf + k1 * (1 - b + b * doc_len[doc] / self.bm25.avgdl))
        self._doc = doc
        self._start = np.searchsorted(term[order], np.arange(len(vocab) + 1))  # [V + 1] offsets
        self._vocab = vocab

    def scores(self, query: str) -> np.ndarray:
        """[N] float64 BM25 scores of every document for the query."""
        out = np.zeros(self.n_docs)
        for q in bm25_tokens(query):
            t = self._vocab.get(q)
            if t is None:
                continue
            lo, hi = self._start[t], self._start[t + 1]
            out[self._doc[lo:hi]] += (self.bm25.idf.get(q) or 0) * self._weight[lo:hi]
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
