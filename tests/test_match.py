"""match: scores and selection equal a direct numpy computation from the stores; baselines; refusals; demo."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from lessctl.select.match import read_sorted_csv
from lessctl.select.scores import aggregate, subtask_matrix


def _manifest(ws: Path) -> list[dict]:
    return json.loads((ws / "out" / "warmup" / "checkpoints.json").read_text())


def _features(ws: Path, name: str, step: int, gtype: str, dim: int) -> np.ndarray:
    with h5py.File(ws / "out" / "grads" / f"{name}-ckpt{step}-{gtype}.h5", "r") as f:
        return f[f"dim{dim}/features"][:].astype(np.float32)


def _subtasks(ws: Path, target: str) -> list[str]:
    return [json.loads(l)["subtask"] for l in (ws / "data" / f"{target}_target.jsonl").read_text().splitlines()]


def test_subtask_aggregation_by_hand():
    scores = np.array([[1.0, 3.0, 5.0], [2.0, 2.0, -4.0]])
    names, A = subtask_matrix(["x", "x", "y"])
    assert names == ["x", "y"]
    np.testing.assert_allclose(aggregate(scores, A), [max(2.0, 5.0), max(2.0, -4.0)])


def test_less_scores_equal_direct_numpy(tiny_grads_ws, cli):
    ws = tiny_grads_ws
    res = cli("--config", ws / "lessctl.toml", "match", "--target", "arithmetic", "--dim", "64", "--json")
    assert res.code == 0, res
    sel = json.loads(res.out)["selections"][0]
    steps = [c["step"] for c in _manifest(ws)]
    w = np.array([c["lr_mean"] for c in _manifest(ws)])
    w = w / w.sum()
    assert sel["weights"] == pytest.approx(list(w)) and sel["checkpoints"] == steps
    subtasks = _subtasks(ws, "arithmetic")
    assert len(set(subtasks)) == 2
    expected = []
    for name in ("synth_a", "synth_b"):  # config order
        s = sum(
            wc * _features(ws, name, st, "adam", 64) @ _features(ws, "arithmetic", st, "sgd", 64).T
            for wc, st in zip(w, steps)
        )
        per_sub = np.stack(
            [s[:, [j for j, t in enumerate(subtasks) if t == u]].mean(1) for u in dict.fromkeys(subtasks)], 1
        )
        lines = [i for i, l in enumerate((ws / "data" / f"{name}.jsonl").read_text().splitlines())]
        expected += [(name, i, v) for i, v in zip(lines, per_sub.max(1))]
    rows = read_sorted_csv(Path(sel["file"]).parent / "sorted.csv")
    assert len(rows) == len(expected) == sel["total"]
    exp = {(n, i): v for n, i, v in expected}
    for n, i, v in rows:
        assert v == pytest.approx(exp[(n, i)], abs=2e-6)
    assert [r[2] for r in rows] == sorted((r[2] for r in rows), reverse=True)
    # the selection is the first int(0.05 * total) rows of sorted.csv, lines verbatim and in that order
    k = int(0.05 * len(rows))
    out_lines = Path(sel["file"]).read_text().splitlines()
    src = {n: (ws / "data" / f"{n}.jsonl").read_text().splitlines() for n in ("synth_a", "synth_b")}
    assert out_lines == [src[n][i] for n, i, _ in rows[:k]]
    assert Path(sel["file"]).name == "top_p0.05.jsonl"


def test_ckpt_subset_and_explicit_weights(tiny_grads_ws, cli):
    ws = tiny_grads_ws
    steps = [c["step"] for c in _manifest(ws)]
    res = cli("--config", ws / "lessctl.toml", "match", "--target", "sorting", "--ckpts", str(steps[1]), "--json")
    assert res.code == 0, res
    sel = json.loads(res.out)["selections"][0]
    assert sel["weights"] == [1.0] and sel["checkpoints"] == [steps[1]]
    res = cli(
        "--config", ws / "lessctl.toml", "match", "--target", "sorting", "--weights", "3", "1", "--json", "--force"
    )
    sel = json.loads(res.out)["selections"][0]
    assert sel["weights"] == pytest.approx([0.75, 0.25])
    res = cli("--config", ws / "lessctl.toml", "match", "--target", "sorting", "--weights", "1")
    assert res.code == 2 and "--weights" in res.err


def test_max_samples_and_summary(tiny_grads_ws, cli):
    res = cli(
        "--config", tiny_grads_ws / "lessctl.toml", "match", "--target", "antonyms", "--max-samples", "7", "--json"
    )
    sel = json.loads(res.out)["selections"][0]
    assert sel["selected"] == 7 and Path(sel["file"]).name == "top_n7.jsonl"
    assert len(Path(sel["file"]).read_text().splitlines()) == 7
    assert sum(sel["by_train_set"].values()) == 7 and sum(sel["by_family"].values()) == 7


def test_bm25_scores_equal_rank_bm25(tiny_ws):
    from rank_bm25 import BM25Okapi

    from lessctl.select.baselines import bm25_scores

    texts = {
        "a": [(0, "the cat sat on the mat"), (1, "dogs chase cats")],
        "b": [(4, "a mat for the dog"), (7, "nothing here")],
    }
    queries = ["cat on mat", "dog", "the mat"]
    subtasks = ["s1", "s1", "s2"]
    got = bm25_scores(texts, queries, subtasks)
    corpus = [t.split() for items in texts.values() for _, t in items]
    bm = BM25Okapi(corpus, k1=1.5, b=0.75, epsilon=0.25)
    S = np.stack([bm.get_scores(q.split()) for q in queries], 1)
    expected = np.maximum((S[:, 0] + S[:, 1]) / 2, S[:, 2])
    np.testing.assert_allclose(got.scores, expected)
    assert got.names == ["a", "a", "b", "b"] and list(got.index) == [0, 1, 4, 7]


def test_bm25_and_random_through_the_cli(tiny_ws, cli):
    res = cli(
        "--config",
        tiny_ws / "lessctl.toml",
        "match",
        "--target",
        "arithmetic",
        "--method",
        "bm25",
        "--method",
        "random",
        "--json",
    )
    assert res.code == 0, res
    sels = {s["method"]: s for s in json.loads(res.out)["selections"]}
    assert sels["bm25"]["selected"] == sels["random"]["selected"] == 18
    first = Path(sels["random"]["file"]).read_text()
    res = cli(
        "--config",
        tiny_ws / "lessctl.toml",
        "match",
        "--target",
        "arithmetic",
        "--method",
        "random",
        "--json",
        "--force",
    )
    assert Path(json.loads(res.out)["selections"][0]["file"]).read_text() == first  # same seed, same subset
    cfg_text = (tiny_ws / "lessctl.toml").read_text().replace("seed = 3", "seed = 4", 1)
    (tiny_ws / "lessctl.toml").write_text(cfg_text)
    res = cli(
        "--config",
        tiny_ws / "lessctl.toml",
        "match",
        "--target",
        "arithmetic",
        "--method",
        "random",
        "--json",
        "--force",
    )
    assert Path(json.loads(res.out)["selections"][0]["file"]).read_text() != first


def test_mismatched_projection_is_refused(tiny_grads_ws, cli):
    ws = tiny_grads_ws
    step = _manifest(ws)[0]["step"]
    with h5py.File(ws / "out" / "grads" / f"sorting-ckpt{step}-sgd.h5", "r+") as f:
        f.attrs["projector_kind"] = "cuda"
    res = cli("--config", ws / "lessctl.toml", "match", "--target", "sorting")
    assert res.code == 2 and "projected differently" in res.err, res


def test_missing_dimension_and_store_are_named(tiny_grads_ws, cli):
    ws = tiny_grads_ws
    res = cli("--config", ws / "lessctl.toml", "match", "--target", "sorting", "--dim", "32")
    assert res.code == 2 and "--dims 32" in res.err
    step = _manifest(ws)[0]["step"]
    (ws / "out" / "grads" / f"sorting-ckpt{step}-sgd.h5").unlink()
    res = cli("--config", ws / "lessctl.toml", "match", "--target", "sorting")
    assert res.code == 2 and "lessctl grads" in res.err
    res = cli("--config", ws / "lessctl.toml", "match", "--target", "nope")
    assert res.code == 2 and "--target" in res.err


@pytest.mark.slow
def test_demo_json_reports_precision(tiny_ws, cli):
    res = cli("demo", "--dir", tiny_ws, "--json")
    assert res.code == 0, res
    report = json.loads(res.out)
    assert set(report["targets"]) == {"arithmetic", "antonyms", "sorting"}
    for t, e in report["targets"].items():
        assert set(e) >= {"less", "random", "bm25", "random_expected_precision"}
        assert 0 <= e["random"]["precision"] <= 1
        # LESS must select the target's own family far more often than chance
        assert e["less"]["precision"] > 2 * e["random_expected_precision"], (t, e)
    assert report["seconds"] > 0


def test_examples_without_label_tokens_are_zero_rows_never_selected(tiny_ws, cli):
    """Examples whose answer is cut off by max_seq_length have no gradient: zero feature rows in the store,
    no score (NaN, last in sorted.csv), never selected even when every other row is, counted in summary.json."""
    ws = tiny_ws
    data = ws / "data" / "synth_a.jsonl"
    lines = data.read_text().splitlines()
    long_question = "Write these words backwards in order: " + " ".join(["stone pepper tiger lemon"] * 60)
    cut = [len(lines), len(lines) + 1]  # two examples whose answers lie beyond the 128 tokens kept
    for i in cut:
        msg = [{"role": "user", "content": long_question}, {"role": "assistant", "content": f"lemon {i}"}]
        lines.append(json.dumps({"dataset": "synth_a", "id": f"cut_{i}", "messages": msg}))
    data.write_text("\n".join(lines) + "\n")
    cfg = ws / "lessctl.toml"
    r = cli("--config", cfg, "grads", "--train", "synth_a", "--target", "arithmetic", "--dims", "64",
            "--projector", "basic", "--device", "cpu")  # fmt: skip
    assert r.code == 0, r
    assert "synth_a: 2 examples have no label tokens after truncation: zero feature rows, never selected" in " ".join(
        r.err.split()
    )
    for c in _manifest(ws):
        with h5py.File(ws / "out" / "grads" / f"synth_a-ckpt{c['step']}-adam.h5", "r") as f:
            lines_of_rows = list(f["index"][:])
            norms, feats = f["dim64/norms"][:], f["dim64/features"][:]
        rows = [lines_of_rows.index(i) for i in cut]
        assert (norms[rows] == 0).all() and not feats[rows].any()
        assert (np.delete(norms, rows) > 0).all()

    n = len(lines)
    r = cli("--config", cfg, "match", "--target", "arithmetic", "--train", "synth_a", "--dim", "64",
            "--max-samples", str(n), "--json")  # fmt: skip
    assert r.code == 0, r
    sel = json.loads(r.out)["selections"][0]
    assert sel["no_label_rows"] == 2 and sel["selected"] == n - 2 and sel["total"] == n
    chosen = [json.loads(x)["id"] for x in Path(sel["file"]).read_text().splitlines()]
    assert len(chosen) == n - 2 and not {f"cut_{i}" for i in cut} & set(chosen)
    sorted_rows = read_sorted_csv(Path(sel["file"]).parent / "sorted.csv")
    assert [i for _, i, _ in sorted_rows[-2:]] == cut and all(np.isnan(s) for _, _, s in sorted_rows[-2:])
    assert all(np.isfinite(s) for _, _, s in sorted_rows[:-2])
    assert np.isfinite(sel["score"]["min"])
