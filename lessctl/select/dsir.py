"""DSIR (Xie et al., 2023): importance resampling of the pool toward the target's text with hashed n-gram features.

Each text is lower-cased and split as nltk's WordPunctTokenizer splits it (runs of word characters, runs of
other non-space characters); its unigrams and bigrams (joined by a space) are hashed into 10,000 buckets
with sha256, as the authors' package (`data-selection`, `hash_buckets`) hashes them. Two bag-of-ngrams
models over the buckets, one fitted on the target's examples and one on the whole pool ("raw"), with
add-one smoothing: p(b) = (count(b) + 1) / (total + B). An example's log importance weight is
sum_b n_x(b) (log p_target(b) - log p_raw(b)); the selection is k examples resampled without replacement in
proportion to the weights, by the Gumbel top-k trick: the k largest of log w + Gumbel noise (seeded).
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import Sequence

import numpy as np

from lessctl.errors import InputError
from lessctl.select.scores import Scored

log = logging.getLogger(__name__)


NUM_BUCKETS = 10_000
NGRAMS = 2  # unigrams and bigrams
_TOKEN = re.compile(r"\w+|[^\w\s]+")  # nltk.tokenize.WordPunctTokenizer's pattern


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


class Hasher:
    """The n-grams of a text as bucket ids: int(sha256(ngram).hexdigest(), 16) % buckets, cached per n-gram."""

    def __init__(self, buckets: int = NUM_BUCKETS, ngrams: int = NGRAMS):
        self.buckets, self.ngrams = buckets, ngrams
        self._cache: dict[str, int] = {}

    def bucket(self, ngram: str) -> int:
        b = self._cache.get(ngram)
        if b is None:
            b = int.from_bytes(hashlib.sha256(ngram.encode("utf-8")).digest(), "big") % self.buckets
            self._cache[ngram] = b
        return b

    def buckets_of(self, text: str) -> list[int]:
        words = tokens(text)
        grams = list(words)
        for n in range(2, self.ngrams + 1):
            grams += [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
        return [self.bucket(g) for g in grams]

    def counts(self, texts: Sequence[str]):
        """[len(texts), buckets] CSR matrix of n-gram counts."""
        import scipy.sparse as sp

        cols: list[int] = []
        indptr = [0]
        for t in texts:
            cols += self.buckets_of(t)
            indptr.append(len(cols))
        data = np.ones(len(cols), dtype=np.float64)
        X = sp.csr_matrix((data, np.asarray(cols, dtype=np.int64), np.asarray(indptr)), (len(texts), self.buckets))
        X.sum_duplicates()
        return X


def log_probs(counts: np.ndarray) -> np.ndarray:
    """log p(b) of a bag-of-ngrams model with add-one smoothing."""
    return np.log(counts + 1.0) - np.log(counts.sum() + len(counts))


def log_importance_weights(pool_texts: Sequence[str], target_texts: Sequence[str], hasher: Hasher | None = None):
    """[N] log p_target(x) - log p_raw(x) of every pool text, the raw model fitted on the pool itself."""
    hasher = hasher or Hasher()
    if not target_texts:
        raise InputError("dsir: the target has no examples")
    X = hasher.counts(pool_texts)  # [N, B]
    T = hasher.counts(target_texts)  # [M, B]
    raw = np.asarray(X.sum(axis=0)).ravel()
    tgt = np.asarray(T.sum(axis=0)).ravel()
    if not tgt.any():
        raise InputError("dsir: the target's examples hold no words")
    return X @ (log_probs(tgt) - log_probs(raw))


def gumbel_keys(log_weights: np.ndarray, seed: int) -> np.ndarray:
    """log w + Gumbel(0, 1) noise: the top k of these keys are a weighted sample of k without replacement."""
    return log_weights + np.random.default_rng(seed).gumbel(size=len(log_weights))


def dsir_scores(
    train_texts: dict[str, list[tuple[int, str]]], target_texts: Sequence[str], seed: int
) -> tuple[Scored, dict]:
    """DSIR's resampling keys of every pooled training row (their top k is the selection) and a summary."""
    names, index, texts = [], [], []
    for name, items in train_texts.items():
        for line, text in items:
            names.append(name)
            index.append(line)
            texts.append(text)
    logw = log_importance_weights(texts, target_texts)
    keys = gumbel_keys(logw, seed)
    info = {
        "dsir": {
            "buckets": NUM_BUCKETS,
            "ngrams": NGRAMS,
            "smoothing": "add-one",
            "resampling": "gumbel top-k",
            "seed": seed,
            "log_weight": {"min": float(logw.min()), "max": float(logw.max()), "mean": float(logw.mean())},
        }
    }
    return Scored(names, np.asarray(index, dtype=np.int64), keys), info


def target_texts(cfg, target: str) -> list[str]:
    """The target's examples as plain text (prompt and answer, without a chat format's markers)."""
    from lessctl.data.targets import _target_spec, load_target

    exs = load_target(_target_spec(cfg, target), cfg.resolve(cfg.data.data_dir), target, "plain", cfg.root)
    return [e.prompt + " " + e.completion for e in exs]
