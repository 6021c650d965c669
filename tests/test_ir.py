"""IR extension: BEIR -> listwise reranking data (BM25 first stage), the answer parser, NDCG@5/MRR@5,
`ir eval` with the tiny model and the BM25 baseline, and the tiny-ir workspace through LESS."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from lessctl.data.records import read_jsonl
from lessctl.errors import AlreadyExistsError, ConfigError, InputError
from lessctl.evaluation.ranking import (
    ParsedRanking,
    evaluate_bm25,
    mrr_at_k,
    ndcg_at_k,
    parse_ranking,
    read_eval_file,
    score_answers,
    score_ranking,
)
from lessctl.ir.beir import read_collection, read_qrels
from lessctl.ir.bm25 import BM25Index, bm25_tokens, top_k
from lessctl.ir.prepare import prepare_ir
from lessctl.ir.prompts import build_prompt

LABELS = list("ABCDE")
RANKING = re.compile(r"^\[[A-E]\]( > \[[A-E]\]){4}$")


@pytest.fixture(scope="module")
def beir(data_dir) -> Path:
    d = data_dir / "beir"
    if not (d / "scifact" / "corpus.jsonl").is_file():
        pytest.skip(f"BEIR data not found in {d}")
    return d


@pytest.fixture(scope="module")
def ws(beir, tmp_path_factory) -> Path:
    """`lessctl init --preset tiny-ir` on the shared BEIR folder: msmarco pool, scifact and dbpedia targets."""
    from lessctl.workspace import init_workspace

    root = tmp_path_factory.mktemp("tinyir") / "ws"
    init_workspace(root, "tiny-ir", data_dir=str(beir))
    return root


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def qids(path: Path) -> set[str]:
    return {r["query_id"] for r in lines(path)}


def check_example(rec: dict, k: int = 5) -> None:
    """A well-formed listwise example: the section-7 prompt, an answer that is a permutation of its ids."""
    user, assistant = rec["messages"]
    assert user["role"] == "user" and assistant["role"] == "assistant"
    labels = [c["label"] for c in rec["candidates"]]
    assert labels == LABELS[:k]
    assert RANKING.match(assistant["content"]), assistant["content"]
    order = re.findall(r"\[([A-E])\]", assistant["content"])
    assert sorted(order) == labels
    for lab in labels:
        assert user["content"].count(f"\n[{lab}] ") == 1
    assert user["content"].startswith("You are RankLLM")
    assert f"Search Query: {rec['query']}\nRank the {k} passages above" in user["content"]
    # gold = grade descending, ties by BM25 rank
    by_label = {c["label"]: c for c in rec["candidates"]}
    keys = [(-by_label[x]["grade"], by_label[x]["bm25_rank"]) for x in order]
    assert keys == sorted(keys)


# ---------------------------------------------------------------------------------------------- prepare


def test_tiny_ir_workspace_files(ws, beir):
    from lessctl.config import load_config
    from lessctl.data.targets import load_target

    cfg = load_config(ws / "lessctl.toml")
    assert cfg.train_files() == {"msmarco": ws / "data" / "msmarco_data.jsonl"}
    assert set(cfg.data.targets) == {"scifact", "dbpedia_entity"}
    for name, spec in cfg.data.targets.items():  # dev files load as custom targets: 10 examples, one subtask
        ex = load_target(spec, cfg.data.data_dir, name, root=cfg.root)
        assert len(ex) == 10 and {e.subtask for e in ex} == {name}
        assert ex[0].prompt.startswith("<|user|>\nYou are RankLLM") and ex[0].prompt.endswith("<|assistant|>\n")
        assert RANKING.match(ex[0].completion)
    for f in sorted((ws / "data").glob("*.jsonl")):
        assert read_jsonl(f)  # the pool's validation accepts every file
        for rec in lines(f):
            check_example(rec)


def test_dev_and_eval_disjoint_and_from_the_right_splits(ws, beir):
    sci, dbp = ws / "data" / "scifact", ws / "data" / "dbpedia_entity"
    dev, ev = qids(Path(f"{sci}_dev.jsonl")), qids(Path(f"{sci}_eval.jsonl"))
    assert len(dev) == 10 and ev and not dev & ev
    # scifact has a train split: dev queries come from it, eval queries from test
    assert dev <= set(read_qrels(beir / "scifact" / "qrels" / "train.tsv"))
    assert ev <= set(read_qrels(beir / "scifact" / "qrels" / "test.tsv"))
    # dbpedia has only test: both from it, disjoint, and every judged query accounted for
    dev, ev = qids(Path(f"{dbp}_dev.jsonl")), qids(Path(f"{dbp}_eval.jsonl"))
    assert len(dev) == 10 and ev and not dev & ev
    manifest = json.loads(Path(f"{dbp}_prepare.json").read_text())
    judged = read_qrels(beir / "dbpedia_entity_sample" / "qrels" / "test.tsv")
    assert manifest["counts"]["eval_queries"] == len(judged) - 10
    assert manifest["counts"]["eval"] + manifest["counts"]["eval_skipped_no_relevant_in_top_k"] == len(judged) - 10


def test_eval_candidates_are_the_bm25_top5_and_hold_a_relevant_doc(ws, beir):
    from rank_bm25 import BM25Okapi

    recs = lines(ws / "data" / "dbpedia_entity_eval.jsonl")
    coll, qrels = read_collection(beir / "dbpedia_entity_sample")
    ref = BM25Okapi([bm25_tokens(t) for t in coll.doc_texts])
    for rec in recs[:3]:
        scores = ref.get_scores(bm25_tokens(rec["query"]))
        best = [coll.doc_ids[i] for i in np.argsort(-scores, kind="stable")[:5]]
        by_rank = sorted(rec["candidates"], key=lambda c: c["bm25_rank"])
        assert [c["doc_id"] for c in by_rank] == best
        assert [c["bm25_rank"] for c in by_rank] == [1, 2, 3, 4, 5]
    for rec in recs:
        grades = qrels["test"][rec["query_id"]]
        assert [c["grade"] for c in rec["candidates"]] == [grades.get(c["doc_id"], 0) for c in rec["candidates"]]
        assert any(c["grade"] > 0 for c in rec["candidates"])


def test_pool_examples_hold_relevant_docs_and_hard_negatives(ws, beir):
    qrels = read_qrels(beir / "msmarco_sample" / "qrels" / "test.tsv")
    recs = lines(ws / "data" / "msmarco_data.jsonl")
    assert len(recs) == sum(1 for g in qrels.values() if any(v > 0 for v in g.values()))
    for rec in recs:
        rel = {d for d, g in qrels[rec["query_id"]].items() if g > 0}
        got = [c for c in rec["candidates"] if c["doc_id"] in rel]
        assert len(got) == min(len(rel), 4)  # relevant ones, leaving room for a hard negative
        negs = [c for c in rec["candidates"] if c["doc_id"] not in rel]
        assert len(negs) == 5 - len(got) and all(c["grade"] == 0 for c in negs)


def write_beir(root: Path) -> Path:
    """A 40-document collection where query q1's relevant documents rank low in BM25."""
    root.mkdir(parents=True)
    docs = [
        {"_id": f"d{i}", "title": "", "text": f"apple banana cherry filler{i} " + "word " * (i % 7)} for i in range(40)
    ]
    docs[30]["text"] = "zebra stripes"  # relevant to q1 but shares no term with it
    docs[31]["text"] = "zebra apple"
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    queries = [{"_id": f"q{i}", "text": f"apple banana filler{i}"} for i in range(12)]
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (root / "qrels").mkdir()
    rows = ["query-id\tcorpus-id\tscore", "q1\td30\t2", "q1\td31\t1"] + [f"q{i}\td{i}\t1" for i in range(2, 12)]
    (root / "qrels" / "test.tsv").write_text("\n".join(rows) + "\n")
    return root


def test_pool_guarantees_relevant_docs_outside_the_top_k(tmp_path):
    src = write_beir(tmp_path / "mini")
    s = prepare_ir(src, "mini", tmp_path / "out", role="pool", seed=1)
    rec = next(r for r in lines(Path(s.files["data"])) if r["query_id"] == "q1")
    by_doc = {c["doc_id"]: c for c in rec["candidates"]}
    assert {"d30", "d31"} <= set(by_doc) and len(by_doc) == 5
    assert by_doc["d30"]["bm25_rank"] > 5 and by_doc["d30"]["grade"] == 2
    assert rec["messages"][1]["content"].startswith(f"[{by_doc['d30']['label']}] > [{by_doc['d31']['label']}] > ")
    check_example(rec)


def test_seeds_reproduce_and_change_the_order(tmp_path):
    src = write_beir(tmp_path / "mini")
    a = prepare_ir(src, "mini", tmp_path / "a", dev_queries=3, seed=7)
    b = prepare_ir(src, "mini", tmp_path / "b", dev_queries=3, seed=7)
    c = prepare_ir(src, "mini", tmp_path / "c", dev_queries=3, seed=8)
    for key in ("dev", "eval"):
        assert Path(a.files[key]).read_bytes() == Path(b.files[key]).read_bytes()
    assert Path(a.files["eval"]).read_bytes() != Path(c.files["eval"]).read_bytes()
    assert len(lines(Path(a.files["dev"]))) == 3
    assert not qids(Path(a.files["dev"])) & qids(Path(a.files["eval"]))
    # q1's relevant documents are not in its BM25 top 5: skipped from the target files, and said so
    assert "q1" not in qids(Path(a.files["dev"])) | qids(Path(a.files["eval"]))
    assert a.counts["dev_skipped_no_relevant_in_top_k"] + a.counts["eval_skipped_no_relevant_in_top_k"] == 1
    assert any("no relevant document" in n for n in a.notes)


def test_rerun_needs_force_when_settings_differ(tmp_path):
    src = write_beir(tmp_path / "mini")
    prepare_ir(src, "mini", tmp_path / "o", dev_queries=3)
    prepare_ir(src, "mini", tmp_path / "o", dev_queries=3)  # same settings: rewritten, identical
    with pytest.raises(AlreadyExistsError, match="--force"):
        prepare_ir(src, "mini", tmp_path / "o", dev_queries=4)
    prepare_ir(src, "mini", tmp_path / "o", dev_queries=4, force=True)
    assert len(lines(tmp_path / "o" / "mini_dev.jsonl")) == 4


def test_passages_truncated_by_tokens(tmp_path):
    from lessctl.tiny import train_tokenizer

    src = write_beir(tmp_path / "mini")
    long_text = " ".join(f"tok{i}" for i in range(300))
    docs = lines(src / "corpus.jsonl")
    docs[2]["text"] = "apple banana filler2 " + long_text
    (src / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    s = prepare_ir(src, "mini", tmp_path / "w", dev_queries=3, max_passage_tokens=7)
    for rec in lines(Path(s.files["eval"])) + lines(Path(s.files["dev"])):
        for line in rec["messages"][0]["content"].split("\n"):
            if re.match(r"\[[A-E]\] ", line):
                assert len(line.split()) - 1 <= 7
    tok = train_tokenizer([d["text"] for d in docs], tmp_path / "tok", vocab_size=300)
    s = prepare_ir(src, "mini", tmp_path / "t", dev_queries=3, max_passage_tokens=5, tokenizer=tmp_path / "tok")
    assert s.settings["tokenizer"] == str(tmp_path / "tok")
    for rec in lines(Path(s.files["eval"])):
        for line in rec["messages"][0]["content"].split("\n"):
            if re.match(r"\[[A-E]\] ", line):
                assert len(tok(line[4:], add_special_tokens=False)["input_ids"]) <= 6  # decode/re-encode may split one


def test_bm25_index_equals_rank_bm25(beir):
    from rank_bm25 import BM25Okapi

    coll, _ = read_collection(beir / "msmarco_sample")
    index = BM25Index(coll.doc_texts)
    ref = BM25Okapi([bm25_tokens(t) for t in coll.doc_texts])
    for q in list(coll.queries.values())[:4] + ["the the of", "zzzz unknownterm"]:
        assert np.array_equal(index.scores(q), ref.get_scores(bm25_tokens(q)))
    s = np.array([1.0, 3.0, 3.0, 0.5, 3.0, 2.0])
    assert top_k(s, 2) == [1, 2] and top_k(s, 4) == [1, 2, 4, 5] and top_k(s, 10) == [1, 2, 4, 5, 0, 3]


def test_prompt_is_the_section7_format():
    p = build_prompt("what is x", ["first passage", "second"])
    assert p == (
        "You are RankLLM, an intelligent assistant that can rank passages based on their relevancy to the query. "
        "I will provide you with 2 passages, each indicated by a numerical identifier []. Rank the passages based "
        "on their relevance to the search query: what is x.\n\n[A] first passage\n[B] second\n\nSearch Query: what "
        "is x\nRank the 2 passages above based on their relevance to the search query. All the passages should be "
        "included and listed using identifiers, in descending order of relevance. The output format should be [] > "
        "[], e.g., [B] > [A]. Only respond with the ranking results; do not add any explanation."
    )


def test_prepare_cli_done_criterion(beir, tmp_path, cli):
    out = tmp_path / "d"
    r = cli(
        "ir", "prepare", "--beir", beir / "scifact", "--name", "scifact", "--out", out, "--dev-queries", "10", "--json"
    )
    assert r.code == 0, r
    summary = json.loads(r.out)
    assert summary["counts"]["dev"] == 10 and summary["counts"]["eval"] == len(lines(out / "scifact_eval.jsonl"))
    assert len(lines(out / "scifact_dev.jsonl")) == 10
    rec = lines(out / "scifact_eval.jsonl")[0]
    check_example(rec)
    passages = [x for x in rec["messages"][0]["content"].split("\n") if re.match(r"\[[A-E]\] ", x)]
    assert max(len(x.split()) - 1 for x in passages) == 100  # default: 100 whitespace tokens, not 100 characters


def test_prepare_cli_errors(tmp_path, cli, beir):
    r = cli("ir", "prepare", "--beir", tmp_path / "nope", "--name", "x", "--out", tmp_path)
    assert r.code == 2 and r.err.startswith("error: ") and "no such folder" in r.err and r.err.count("\n") == 1
    r = cli("ir", "prepare", "--beir", beir / "msmarco_sample", "--name", "x", "--split", "dev", "--out", tmp_path)
    assert r.code == 2 and "dev.tsv: no such qrels file (splits here: test)" in r.err
    r = cli("ir", "prepare", "--beir", beir / "msmarco_sample", "--name", "x", "--role", "pool", "--dev-queries", "3")
    assert r.code == 2 and "--dev-queries" in r.err
    r = cli("ir", "prepare", "--beir", beir / "msmarco_sample", "--name", "x", "--role", "pool", "--eval-queries", "3")
    assert r.code == 2 and "--eval-queries" in r.err
    r = cli("ir", "prepare", "--beir", beir / "msmarco_sample", "--name", "x", "--candidates", "30", "--out", tmp_path)
    assert r.code == 2 and "--candidates" in r.err
    bad = write_beir(tmp_path / "bad")
    (bad / "queries.jsonl").write_text('{"_id": "q1", "text": "a"}\nnot json\n')
    r = cli("ir", "prepare", "--beir", bad, "--name", "x", "--out", tmp_path)
    assert r.code == 2 and "queries.jsonl:2: invalid JSON" in r.err
    with pytest.raises(ConfigError, match="--data-dir"):
        from lessctl.workspace import init_workspace

        init_workspace(tmp_path / "w", "tiny-ir", data_dir=str(tmp_path / "nothing"))


# ---------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "text,order",
    [
        ("[B] > [A] > [C] > [E] > [D]", "BACED"),
        ("[B]>[A]>[C]>[E]>[D]", "BACED"),
        ("  [ B ]  >[A] >  [C]>[ E]  > [D ]\n", "BACED"),
        ("Ranking: [b] > [a] > [c] > [e] > [d]. [B] is the most relevant.", "BACED"),
        ("Sure! Here it is:\n[E] > [D] > [C] > [B] > [A]", "EDCBA"),
    ],
)
def test_parse_well_formed(text, order):
    assert parse_ranking(text, LABELS) == ParsedRanking(tuple(order))


@pytest.mark.parametrize(
    "text,error",
    [
        ("[B] > [A] > [C] > [B] > [D]", "repeated identifier [B]"),
        ("[B] > [A] > [C] > [E]", "missing [D]"),
        ("[B] > [A]", "missing [C], [D], [E]"),
        ("[B] > [A] > [C] > [E] > [D] > [F]", "unknown identifier [F]"),
        ("[1] > [2] > [3] > [4] > [5]", "unknown identifier [1]"),
        ("B > A > C > E > D", "no ranking"),
        ("> > > > [ [ [", "no ranking"),
        ("", "no ranking"),
        ("[B], [A], [C], [E], [D]", "missing"),
    ],
)
def test_parse_malformed(text, error):
    parsed = parse_ranking(text, LABELS)
    assert parsed.malformed and parsed.order is None and error in parsed.error


# ---------------------------------------------------------------------------------------------- metrics


def test_ndcg_and_mrr_by_hand():
    # candidates' grades {A: 2, B: 1, C..E: 0}; predicted C, A, B, D, E -> grades 0, 2, 1, 0, 0
    dcg = 3 / math.log2(3) + 1 / math.log2(4)
    idcg = 3 / math.log2(2) + 1 / math.log2(3)
    assert ndcg_at_k([0, 2, 1, 0, 0], [2, 1, 0, 0, 0]) == pytest.approx(dcg / idcg)
    assert ndcg_at_k([0, 2, 1, 0, 0], [2, 1, 0, 0, 0]) == pytest.approx(0.659002, abs=1e-6)
    assert ndcg_at_k([2, 1, 0, 0, 0], [0, 0, 1, 2, 0]) == pytest.approx(1.0)
    assert ndcg_at_k([0, 0, 0, 0, 1], [1, 0, 0, 0, 0]) == pytest.approx(1 / math.log2(6))
    assert ndcg_at_k([0, 0, 0], [0, 0, 0]) == 0.0
    # each predicted item's own grade counts, not the gold list's i-th grade: swapping two equal grades is free
    assert ndcg_at_k([1, 1, 0], [1, 1, 0]) == 1.0
    assert mrr_at_k([0, 2, 1, 0, 0]) == 0.5
    assert mrr_at_k([0, 0, 0, 0, 1]) == 0.2
    assert mrr_at_k([0, 0, 0, 0, 0, 1]) == 0.0  # beyond the top 5
    assert mrr_at_k([3, 0]) == 1.0


def test_score_ranking_and_malformed_answers_count_as_zero():
    cands = [{"label": lab, "grade": g, "bm25_rank": i + 1} for i, (lab, g) in enumerate(zip(LABELS, [0, 2, 0, 1, 0]))]
    rec = {
        "id": "x",
        "query_id": "1",
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "[B] > [D] > [A] > [C] > [E]"}],
        "candidates": cands,
    }
    assert score_ranking(parse_ranking("[B] > [D] > [A] > [C] > [E]", LABELS), cands) == (1.0, 1.0)
    nd, rr = score_ranking(parse_ranking("[A] > [B] > [C] > [D] > [E]", LABELS), cands)
    assert nd == pytest.approx((3 / math.log2(3) + 1 / math.log2(5)) / (3 + 1 / math.log2(3))) and rr == 0.5
    assert score_ranking(parse_ranking("[A] > [A]", LABELS), cands) == (0.0, 0.0)
    res = score_answers(
        [rec, rec, rec, rec], ["[B] > [D] > [A] > [C] > [E]", "garbage", "[B] > [D]", "[B]>[D]>[A]>[C]>[E]"]
    )
    assert res["n"] == 4 and res["malformed"] == 2 and res["malformed_rate"] == 50.0
    assert res["ndcg@5"] == pytest.approx(50.0) and res["mrr@5"] == pytest.approx(50.0)
    assert [p["error"] is None for p in res["predictions"]] == [True, False, False, True]


# ---------------------------------------------------------------------------------------------- evaluation


def test_bm25_baseline_is_a_real_figure(ws):
    path = ws / "data" / "scifact_eval.jsonl"
    res = evaluate_bm25(path)
    recs = read_eval_file(path)
    assert res["n"] == len(recs) and res["malformed"] == 0 and res["task"] == "ir-scifact"
    by_hand = []
    for r in recs:
        grades = [c["grade"] for c in sorted(r["candidates"], key=lambda c: c["bm25_rank"])]
        by_hand.append(ndcg_at_k(grades, grades))
    assert res["ndcg@5"] == pytest.approx(100 * sum(by_hand) / len(by_hand))
    assert 20 < res["ndcg@5"] < 100 and 0 < res["mrr@5"] < 100  # every query has a relevant candidate


def test_ir_eval_end_to_end_with_the_tiny_model(ws, cli, monkeypatch):
    data = ws / "data" / "scifact_eval.jsonl"
    r = cli(
        "ir",
        "eval",
        "--model",
        ws / "model",
        "--dataset",
        data,
        "--limit",
        "3",
        "--max-new-tokens",
        "12",
        "--device",
        "cpu",
        "--json",
        cwd=ws,
    )
    assert r.code == 0, r
    rec = json.loads(r.out)["results"][0]
    assert rec["model"] == "base" and rec["task"] == "ir-scifact" and rec["metric"] == "ndcg@5" and rec["n"] == 3
    m = rec["metrics"]
    assert set(m) == {"ndcg@5", "mrr@5", "malformed", "malformed_rate"}
    assert 0 <= m["ndcg@5"] <= 100 and 0 <= m["malformed"] <= 3
    assert m["malformed_rate"] == pytest.approx(100 * m["malformed"] / 3, abs=1e-3)
    full = json.loads((ws / "out" / "eval" / "base" / "ir-scifact.json").read_text())
    assert len(full["predictions"]) == 3 and full["settings"]["decoding"] == "greedy"
    assert all(p["error"] is None or p["ndcg@5"] == 0 for p in full["predictions"])

    r = cli("ir", "eval", "--bm25", "--dataset", data, "--limit", "3", "--json", cwd=ws)
    assert r.code == 0, r
    base = json.loads(r.out)["results"][0]
    assert base["model"] == "first-stage-bm25" and base["metrics"]["malformed"] == 0 and base["score"] > 0

    r = cli("results", "--json", cwd=ws)
    tasks = [(x["model"], x["task"]) for x in json.loads(r.out)["results"]]
    assert ("base", "ir-scifact") in tasks and ("first-stage-bm25", "ir-scifact") in tasks
    monkeypatch.setenv("COLUMNS", "200")  # a wide table, so no header is cut short
    r = cli("results", cwd=ws)
    assert r.code == 0 and "ir-scifact (ndcg@5)" in r.out and "mrr@5" in r.out and "malformed" in r.out

    r = cli("ir", "eval", "--bm25", "--model", ws / "model", "--dataset", data, cwd=ws)
    assert r.code == 2 and "--bm25" in r.err
    r = cli("ir", "eval", "--bm25", "--dataset", ws / "data" / "msmarco_data.jsonl.missing", cwd=ws)
    assert r.code == 2 and "no such file" in r.err


def test_eval_file_validation(tmp_path):
    p = tmp_path / "x_eval.jsonl"
    p.write_text('{"messages": [{"role": "user", "content": "q"}], "candidates": []}\n')
    with pytest.raises(InputError, match=r"x_eval.jsonl:1: expected"):
        read_eval_file(p)


@pytest.mark.slow
def test_tiny_ir_workspace_runs_the_less_pipeline(ws, tmp_path, cli):
    """warmup, grads, match (less, random, bm25) and finetune need nothing IR-specific."""
    import shutil

    w = tmp_path / "w"
    shutil.copytree(ws, w, symlinks=True)
    for args in (
        ("warmup", "--epochs", "1", "--device", "cpu"),
        ("grads", "--device", "cpu", "--projector", "basic"),
        ("match", "--target", "scifact", "--method", "less", "--method", "random", "--method", "bm25", "--json"),
        ("finetune", "--target", "scifact", "--method", "less", "--epochs", "1", "--device", "cpu"),
    ):
        r = cli(*args, cwd=w)
        assert r.code == 0, (args, r)
    for m in ("less", "random", "bm25"):
        sel = lines(next((w / "out" / "selected" / "scifact" / m).glob("top_p*.jsonl")))
        assert len(sel) == int(0.25 * 43) and all(s["dataset"] == "msmarco" for s in sel)
    r = cli(
        "ir",
        "eval",
        "--model",
        w / "out" / "finetune" / "scifact-less",
        "--dataset",
        w / "data" / "scifact_eval.jsonl",
        "--limit",
        "2",
        "--max-new-tokens",
        "8",
        "--device",
        "cpu",
        "--json",
        cwd=w,
    )
    assert r.code == 0, r
    rec = json.loads(r.out)["results"][0]
    assert rec["method"] == "less" and rec["target"] == "scifact" and rec["n"] == 2


@pytest.mark.slow
def test_study_of_a_reranking_workspace_scores_ndcg(ws, tmp_path, cli):
    """`lessctl run` on the tiny-ir workspace evaluates every model as `ir eval` does (NDCG@5, task
    ir-<collection>), scores each target's BM25 first stage beside the base model, and `results` shows it."""
    import shutil

    from lessctl.evaluation.ranking import evaluate_bm25

    w = tmp_path / "w"
    shutil.copytree(ws, w, symlinks=True)
    shutil.rmtree(w / "out", ignore_errors=True)  # what other tests of the module ran in the shared workspace
    cfgp = w / "lessctl.toml"
    text = cfgp.read_text().replace("[finetune]\nepochs = 4", "[finetune]\nepochs = 1")
    cfgp.write_text(text + '\n[eval]\nlimit = 2\n\n[study]\nmethods = ["bm25"]\n')
    res = cli("run", "--device", "cpu", "--json", cwd=w)
    assert res.code == 0, res
    out = w / "out"
    for target in ("scifact", "dbpedia_entity"):
        for model in ("base", "first-stage-bm25", f"{target}-bm25"):
            saved = json.loads((out / "eval" / model / f"ir-{target}.json").read_text())
            assert saved["metric"] == "ndcg@5" and saved["n"] == 2 == len(saved["predictions"]), (model, saved["n"])
    first = json.loads((out / "eval" / "first-stage-bm25" / "ir-scifact.json").read_text())
    assert first["ndcg@5"] == pytest.approx(evaluate_bm25(w / "data" / "scifact_eval.jsonl", limit=2)["ndcg@5"])
    res = cli("results", "--study", "--json", cwd=w)
    assert res.code == 0, res
    row = json.loads(res.out)["study"]["targets"]["scifact"]
    assert row["task"] == "ir-scifact" and row["first_stage"]["score"] == pytest.approx(first["ndcg@5"], abs=1e-4)
    trained = json.loads((out / "eval" / "scifact-bm25" / "ir-scifact.json").read_text())["ndcg@5"]
    assert row["methods"]["bm25"]["score"] == pytest.approx(trained, abs=1e-4) and row["base"]["n"] == 1
    res = cli("results", "--study", cwd=w)
    assert res.code == 0 and "bm25 order" in res.out and "ir-scifact" in res.out
    again = cli("run", "--device", "cpu", "--json", cwd=w)
    assert again.code == 0 and json.loads(again.out)["done"] == 0, again
