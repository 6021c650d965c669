#!/usr/bin/env python
"""How much faster is lessctl's sparse BM25 than rank_bm25 over a real pool and real target prompts?

One run, on the CPU: the cot pool (--pool, whitespace tokens of every example's text, as `lessctl match
--method bm25` reads it) is indexed by rank_bm25.BM25Okapi and by lessctl's SparseBM25; both score the
first --queries prompts of a target (--target mmlu|bbh, read from --data-dir as `lessctl match` does), rank_bm25 one
query at a time with get_scores, lessctl all at once. It prints both times, the ratio, and the largest
difference between the two score matrices (with the top-5% selection of each query's scores compared).

    python bench/bm25_throughput.py --target mmlu --queries 40
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LESSCTL_TEST_DATA", REPO.parent / "shared" / "data"))


def main(argv: list[str] | None = None) -> int:
    from rank_bm25 import BM25Okapi

    from lessctl.data.records import example_text, read_jsonl
    from lessctl.data.targets import load_target
    from lessctl.select.baselines import BM25_PARAMS, SparseBM25
    from lessctl.select.match import top_order
    from lessctl.select.scores import aggregate, subtask_matrix

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pool", type=Path, default=DATA / "train" / "processed" / "cot" / "cot_data.jsonl")
    p.add_argument("--data-dir", type=Path, default=DATA / "eval")
    p.add_argument("--target", choices=("mmlu", "bbh"), default="mmlu")
    p.add_argument("--queries", type=int, default=40, help="how many of the target's prompts (rank_bm25 is slow)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = p.parse_args(argv)

    corpus = [example_text(r.data).split() for r in read_jsonl(a.pool)]
    examples = load_target(a.target, a.data_dir, a.target)[: a.queries]
    queries, subtasks = [e.prompt.split() for e in examples], [e.subtask for e in examples]
    q_tokens = sum(map(len, queries))
    print(f"pool {a.pool.name}: {len(corpus)} examples; {len(queries)} {a.target} queries, {q_tokens} tokens")

    t0 = time.perf_counter()
    ref = BM25Okapi(corpus, **BM25_PARAMS)
    t1 = time.perf_counter()
    S_ref = np.stack([ref.get_scores(q) for q in queries], axis=1)
    t2 = time.perf_counter()
    sparse = SparseBM25(corpus, **BM25_PARAMS)
    t3 = time.perf_counter()
    S = sparse.scores(queries)
    t4 = time.perf_counter()

    k = int(0.05 * len(corpus))
    # per query: the same top 5% as a set (its order may differ among scores equal to the last bits); and the
    # selection `lessctl match` makes (mean within subtasks, max over them), in order
    same_sets = all(set(top_order(S[:, j])[:k]) == set(top_order(S_ref[:, j])[:k]) for j in range(len(queries)))
    _, A = subtask_matrix(subtasks)
    same_selection = np.array_equal(
        top_order(aggregate(S, A.astype(np.float64)))[:k], top_order(aggregate(S_ref, A.astype(np.float64)))[:k]
    )
    rel = float(np.max(np.abs(S - S_ref) / np.maximum(np.abs(S_ref), 1e-300)))
    figures = {
        "pool": str(a.pool),
        "examples": len(corpus),
        "target": a.target,
        "queries": len(queries),
        "query_tokens": q_tokens,
        "rank_bm25_index_s": round(t1 - t0, 3),
        "rank_bm25_score_s": round(t2 - t1, 3),
        "rank_bm25_ms_per_query": round(1000 * (t2 - t1) / len(queries), 1),
        "sparse_index_s": round(t3 - t2, 3),
        "sparse_score_s": round(t4 - t3, 4),
        "score_ratio": round((t2 - t1) / (t4 - t3), 1),
        "total_ratio": round((t2 - t0) / (t4 - t2), 1),
        "max_rel_diff": rel,
        "same_top5pct_set_per_query": same_sets,
        "same_aggregated_top5pct": same_selection,
        "host": platform.node(),
        "cpu_threads": os.cpu_count(),
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
    }
    print(f"rank_bm25: index {t1 - t0:.2f} s, scoring {t2 - t1:.2f} s ({figures['rank_bm25_ms_per_query']} ms/query)")
    print(f"sparse:    index {t3 - t2:.2f} s, scoring {t4 - t3:.4f} s (all queries at once)")
    print(f"ratio: scoring {figures['score_ratio']}x, index + scoring {figures['total_ratio']}x")
    print(f"max relative difference {rel:.2e}; same top-5% set for every query: {same_sets}")
    print(f"same top-5% selection (subtask aggregation, in order): {same_selection}")
    if a.json:
        a.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if same_sets and same_selection and rel < 1e-10 else 1


if __name__ == "__main__":
    sys.exit(main())
