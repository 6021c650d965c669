"""DSIR: the authors' hashed n-gram features, add-one bag-of-ngrams models, seeded Gumbel top-k resampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lessctl.select.dsir import Hasher, dsir_scores, gumbel_keys, log_importance_weights, log_probs, tokens
from lessctl.select.match import top_order


def _pool() -> dict[str, list[tuple[int, str]]]:
    fruit = [f"the apple and the banana are ripe fruit number {i}" for i in range(30)]
    cars = [f"the car engine needs oil and a new tyre number {i}" for i in range(30)]
    return {"fruit": list(enumerate(fruit)), "cars": list(enumerate(cars))}


def test_weights_by_hand():
    pool, target = ["a b", "c c"], ["a b a"]
    h = Hasher(buckets=50)
    X, T = h.counts(pool).toarray(), h.counts(target).toarray()
    # unigrams and bigrams: "a b" -> a, b, "a b"; "c c" -> c, c, "c c"
    assert X.sum(axis=1).tolist() == [3, 3] and T.sum() == 5
    lt = np.log((T.sum(0) + 1) / (T.sum() + 50))
    lr = np.log((X.sum(0) + 1) / (X.sum() + 50))
    np.testing.assert_allclose(log_importance_weights(pool, target, h), X @ (lt - lr))
    np.testing.assert_allclose(np.exp(log_probs(T.sum(0))).sum(), 1.0)
    assert tokens("Don't STOP, now!") == ["don", "'", "t", "stop", ",", "now", "!"]


def test_features_equal_the_authors_package(data_dir):
    ds = pytest.importorskip(
        "data_selection.hashed_ngram_dsir", reason="data-selection (the dev extra) is not installed"
    )
    from lessctl.data.records import example_text, read_jsonl

    recs = read_jsonl(data_dir / "train" / "processed" / "cot" / "cot_data.jsonl")[:200]
    texts = [example_text(r.data) for r in recs] + ["Ünïcode — «quotes» and  spaces\n\tTabs", ""]
    X = Hasher().counts(texts).toarray()
    for i, t in enumerate(texts):
        assert np.array_equal(X[i], ds.get_ngram_counts(t, n=2, num_buckets=10000)), i


def test_seeded_and_prefers_target_like_examples():
    target = ["a ripe apple", "banana fruit", "the apple is a fruit"]
    a, info = dsir_scores(_pool(), target, seed=1)
    b, _ = dsir_scores(_pool(), target, seed=1)
    c, _ = dsir_scores(_pool(), target, seed=2)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert not np.array_equal(a.scores, c.scores)
    top = [a.names[i] for i in top_order(a.scores)[:20]]
    assert top.count("fruit") == 20
    assert info["dsir"]["buckets"] == 10000 and info["dsir"]["seed"] == 1
    # the keys are the log weights plus seeded Gumbel noise
    logw = log_importance_weights([t for items in _pool().values() for _, t in items], target)
    np.testing.assert_allclose(a.scores, gumbel_keys(logw, 1))


def test_gumbel_top_k_samples_in_proportion_to_the_weights():
    w = np.array([1.0, 2.0, 7.0])
    firsts = np.bincount([int(np.argmax(gumbel_keys(np.log(w), s))) for s in range(3000)], minlength=3)
    np.testing.assert_allclose(firsts / 3000, w / w.sum(), atol=0.03)


def test_match_dsir_on_the_tiny_workspace(tiny_ws, cli):
    cfg = tiny_ws / "lessctl.toml"
    res = cli("--config", cfg, "match", "--target", "antonyms", "--method", "dsir", "--json")
    assert res.code == 0, res
    sel = json.loads(res.out)["selections"][0]
    assert sel["method"] == "dsir" and sel["selected"] == 18 and sel["dsir"]["smoothing"] == "add-one"
    first = Path(sel["file"]).read_text()
    fams = [json.loads(x).get("family") for x in first.splitlines()]
    assert fams.count("antonyms") > 2 * len(fams) / 6  # over twice the share of one family in six
    res = cli("--config", cfg, "match", "--target", "antonyms", "--method", "dsir", "--json")
    assert res.code == 2 and "this very selection (current)" in res.err  # every method's overwrite rule
    res = cli("--config", cfg, "match", "--target", "antonyms", "--method", "dsir", "--json", "--force")
    assert Path(json.loads(res.out)["selections"][0]["file"]).read_text() == first
    res = cli("--config", cfg, "match", "--target", "antonyms", "--method", "dsri")
    assert res.code == 2 and res.err.startswith("error: --method") and "dsir" in res.err
