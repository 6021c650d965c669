"""The baselines of LESS's comparison: random selection and BM25 (rank_bm25's Okapi), same aggregation as LESS.

BM25 is computed for all queries at once with sparse matrices: the pool's term weights W [N, V] (each
document's BM25 term weight times the term's IDF, exactly as rank_bm25 0.2.2 computes both) times the
queries' term counts Q [V, M]. rank_bm25 stays the reference in the tests.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

from lessctl.errors import InputError
from lessctl.select.scores import Scored, aggregate, subtask_matrix

log = logging.getLogger(__name__)


BM25_PARAMS = {"k1": 1.5, "b": 0.75, "epsilon": 0.25}  # rank_bm25's defaults (Okapi), as LESS's baseline uses them
SCORE_ROWS = 16384  # pool rows per block of dense [rows, M] scores


class OkapiStats:
    """rank_bm25.BM25Okapi's corpus statistics, as arrays.

    vocab: term -> id in first-seen order (rank_bm25's order of `nd`); postings as CSR (rows = documents,
    `indptr`, `indices` = term ids in each document's first-seen order, `tf`); `doc_len`, `avgdl`;
    `idf[t] = log(N - df + 0.5) - log(df + 0.5)`, with every negative IDF replaced by epsilon times the
    average IDF (the mean over all terms before the replacement), summed in rank_bm25's order with math.log,
    so each term's IDF is bit-identical to rank_bm25's; `weight` is each posting's
    `tf (k1 + 1) / (tf + k1 (1 - b + b dl / avgdl))`, rank_bm25's expression in its order of operations.
    """

    def __init__(
        self,
        corpus: Iterable[Sequence[str]],
        *,
        k1: float = BM25_PARAMS["k1"],
        b: float = BM25_PARAMS["b"],
        epsilon: float = BM25_PARAMS["epsilon"],
    ):
        self.k1, self.b, self.epsilon = k1, b, epsilon
        vocab: dict[str, int] = {}
        indices: list[int] = []
        tfs: list[int] = []
        counts: list[int] = [0]
        lengths: list[int] = []
        for document in corpus:
            freqs = Counter(document)
            indices.extend(vocab.setdefault(w, len(vocab)) for w in freqs)
            tfs.extend(freqs.values())
            counts.append(len(freqs))
            lengths.append(len(document))
        self.n_docs = len(lengths)
        if not self.n_docs:
            raise InputError("BM25: the corpus holds no documents")
        if not vocab:
            raise InputError("BM25: the corpus holds no words")
        self.vocab = vocab
        self.indptr = np.cumsum(counts, dtype=np.int64)  # [N + 1]
        self.indices = np.asarray(indices, dtype=np.int64)  # [P]
        self.tf = np.asarray(tfs, dtype=np.float64)  # [P]
        self.doc_len = np.asarray(lengths, dtype=np.float64)  # [N]
        self.avgdl = sum(lengths) / self.n_docs
        df = np.bincount(self.indices, minlength=len(vocab))
        idf = [math.log(self.n_docs - f + 0.5) - math.log(f + 0.5) for f in df.tolist()]
        idf_sum = 0.0
        for v in idf:  # rank_bm25's sequential sum, in its order
            idf_sum += v
        self.average_idf = idf_sum / len(idf)
        self.idf = np.asarray(idf)  # [V]
        self.idf[self.idf < 0] = epsilon * self.average_idf
        dl = np.repeat(self.doc_len, np.diff(self.indptr))  # [P]
        tf = self.tf
        self.weight = tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / self.avgdl))  # [P]

    def query_matrix(self, queries: Sequence[Sequence[str]]):
        """Q [V, M] float64 (CSC): how often each vocabulary term occurs in each query."""
        import scipy.sparse as sp

        rows, cols = [], []
        for j, q in enumerate(queries):
            for w in q:
                t = self.vocab.get(w)
                if t is not None:
                    rows.append(t)
                    cols.append(j)
        data = np.ones(len(rows))
        return sp.csc_matrix((data, (rows, cols)), shape=(len(self.vocab), len(queries)))  # duplicates summed


class SparseBM25(OkapiStats):
    """BM25Okapi scores of many queries at once: S = W @ Q, W [N, V] the IDF-weighted term weights (CSR)."""

    def __init__(self, corpus: Iterable[Sequence[str]], **params: float):
        import scipy.sparse as sp

        super().__init__(corpus, **params)
        data = self.idf[self.indices] * self.weight
        self.W = sp.csr_matrix((data, self.indices, self.indptr), shape=(self.n_docs, len(self.vocab)))
        # Each row's terms in vocabulary order: documents with the same terms, counts and length then get
        # bit-identical scores (their sums run in the same order), so rank_bm25's ties stay ties.
        self.W.sort_indices()

    def scores(self, queries: Sequence[Sequence[str]], rows: slice = slice(None)) -> np.ndarray:
        """[n, M] float64: every (document in `rows`, query) score, equal to rank_bm25's get_scores."""
        return np.asarray((self.W[rows] @ self.query_matrix(queries)).todense())

    def aggregated(self, queries: Sequence[Sequence[str]], A: np.ndarray, block: int = SCORE_ROWS) -> np.ndarray:
        """[N] scores aggregated like LESS's (A from subtask_matrix), computed in blocks of `block` rows."""
        Q = self.query_matrix(queries)
        out = np.empty(self.n_docs)
        for lo in range(0, self.n_docs, block):
            S = np.asarray((self.W[lo : lo + block] @ Q).todense())  # [b, M]
            out[lo : lo + len(S)] = aggregate(S, A)
        return out


def bm25_scores(
    train_texts: dict[str, list[tuple[int, str]]], queries: Sequence[str], subtasks: Sequence[str]
) -> Scored:
    """BM25Okapi over the pooled training texts (whitespace-split), one query per target example."""
    names, index, corpus = [], [], []
    for name, items in train_texts.items():
        for line, text in items:
            names.append(name)
            index.append(line)
            corpus.append(text.split())
    bm25 = SparseBM25(corpus, **BM25_PARAMS)
    _, A = subtask_matrix(subtasks)
    scores = bm25.aggregated([q.split() for q in queries], A.astype(np.float64))
    return Scored(names, np.asarray(index, dtype=np.int64), scores)


def random_scores(sizes: dict[str, list[int]], seed: int) -> Scored:
    """A seeded uniform score per row: its top k is a uniform random subset of size k."""
    names, index = [], []
    for name, lines in sizes.items():
        names += [name] * len(lines)
        index += list(lines)
    rng = np.random.default_rng(seed)
    return Scored(names, np.asarray(index, dtype=np.int64), rng.random(len(names)))
