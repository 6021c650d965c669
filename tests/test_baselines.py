"""BM25 by sparse matrices equals rank_bm25's BM25Okapi (the reference) on real pool and target texts."""

from __future__ import annotations

import numpy as np
import pytest
from rank_bm25 import BM25Okapi

from lessctl.data.records import example_text, read_jsonl
from lessctl.data.targets import load_target
from lessctl.errors import InputError
from lessctl.select.baselines import BM25_PARAMS, SparseBM25, bm25_scores
from lessctl.select.match import n_selected, top_order
from lessctl.select.scores import aggregate, subtask_matrix

POOL_ROWS = 4000


@pytest.fixture(scope="module")
def real(data_dir):
    """A sample of the cot pool and real MMLU and BBH target prompts (a few subjects and tasks)."""
    recs = read_jsonl(data_dir / "train" / "processed" / "cot" / "cot_data.jsonl")
    rng = np.random.default_rng(0)
    picked = sorted(rng.choice(len(recs), POOL_ROWS, replace=False).tolist())
    texts = [(recs[i].line, example_text(recs[i].data)) for i in picked]
    mmlu = load_target("mmlu", data_dir / "eval", "mmlu")
    bbh = load_target("bbh", data_dir / "eval", "bbh")
    targets = [e for e in mmlu if e.subtask in dict.fromkeys(x.subtask for x in mmlu[:15])]  # 3 subjects
    targets += [e for e in bbh if e.subtask in list(dict.fromkeys(x.subtask for x in bbh))[:2]]  # 2 tasks
    return texts, [e.prompt for e in targets], [e.subtask for e in targets]


@pytest.fixture(scope="module")
def reference(real):
    texts, queries, _ = real
    bm = BM25Okapi([t.split() for _, t in texts], **BM25_PARAMS)
    return bm, np.stack([bm.get_scores(q.split()) for q in queries], axis=1)  # [N, M]


def test_sparse_scores_equal_rank_bm25_on_real_data(real, reference):
    texts, queries, _ = real
    bm, S = reference
    sparse = SparseBM25([t.split() for _, t in texts], **BM25_PARAMS)
    assert sparse.average_idf == bm.average_idf and sparse.avgdl == bm.avgdl
    idf = {w: sparse.idf[t] for w, t in sparse.vocab.items()}
    assert idf == bm.idf  # bit-identical IDFs, the epsilon floor included
    got = sparse.scores([q.split() for q in queries])
    assert got.shape == S.shape and (S > 0).mean() > 0.5
    np.testing.assert_allclose(got, S, rtol=1e-12, atol=1e-12)
    # a block boundary inside the pool changes nothing
    part = sparse.scores([q.split() for q in queries], slice(1000, 2500))
    np.testing.assert_array_equal(part, got[1000:2500])


def test_sparse_selection_equals_rank_bm25_selection(real, reference):
    texts, queries, subtasks = real
    _, S = reference
    _, A = subtask_matrix(subtasks)
    expected = aggregate(S, A.astype(np.float64))
    got = bm25_scores({"cot": texts}, queries, subtasks)
    np.testing.assert_allclose(got.scores, expected, rtol=1e-12, atol=1e-12)
    k = n_selected(len(texts), 0.05, None)
    assert k == 200
    assert list(top_order(got.scores)[:k]) == list(top_order(expected)[:k])
    assert list(got.index) == [line for line, _ in texts]


def test_negative_idf_floor_equals_rank_bm25():
    # "the" and "a" are in more than half the documents: negative IDFs, replaced by epsilon * average IDF
    corpus = [d.split() for d in ["the a cat", "the a dog", "the a bird", "the fish", "a cow eats"]]
    bm = BM25Okapi(corpus, **BM25_PARAMS)
    sp = SparseBM25(corpus, **BM25_PARAMS)
    assert sp.idf[sp.vocab["the"]] == bm.idf["the"] == BM25_PARAMS["epsilon"] * bm.average_idf
    queries = ["the cat the", "a fish eats", "unknown words only", ""]
    S = np.stack([bm.get_scores(q.split()) for q in queries], axis=1)
    np.testing.assert_allclose(sp.scores([q.split() for q in queries]), S, rtol=1e-12, atol=1e-15)


def test_empty_corpus_is_an_input_error():
    with pytest.raises(InputError, match="no documents"):
        SparseBM25([])
    with pytest.raises(InputError, match="no words"):
        SparseBM25([[], []])
