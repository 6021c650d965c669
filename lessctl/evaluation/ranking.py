"""Listwise reranking evaluation (LESS.md section 7): parsing `[X] > [Y] > ...`, NDCG@5 and MRR@5, the BM25 baseline.

The eval files are `lessctl ir prepare`'s `NAME_eval.jsonl`: each record holds the training-format
messages (user prompt, gold ranking) and its candidates ({label, doc_id, grade, bm25_rank}). A
model's answer is generated greedily from the same chat format as training. An answer that does not
name every identifier exactly once (or names an unknown one) is malformed: it scores 0 and stays in
the averages. Scores are fractions here; results report percentages like the other tasks.

It lives in evaluation/ (not ir/) because it reads only the files `lessctl ir prepare` writes, so ir/ (BEIR data
-> prompts, BM25 first stage) and evaluation/ import nothing of each other.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from lessctl.errors import InputError

log = logging.getLogger(__name__)


K = 5
METRIC = "ndcg@5"
BM25_MODEL = "first-stage-bm25"
STOP = ("\n\n", "<|user|>", "<|assistant|>")
EVAL_LAYOUT = (
    "`lessctl ir prepare`'s NAME_eval.jsonl: one JSON object a line with messages (user, assistant) and "
    "candidates [{label, doc_id, grade, bm25_rank}]"
)

# One bracketed identifier, spaces allowed inside the brackets; a chain is identifiers joined by '>'.
_ITEM = r"\[\s*([^\[\]\s>]{1,8})\s*\]"
_CHAIN = re.compile(_ITEM + r"(?:\s*>\s*" + _ITEM + r")*")
_ITEM_RE = re.compile(_ITEM)


# ---------------------------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class ParsedRanking:
    """A model answer read as a ranking: the identifiers in order, or why it is malformed."""

    order: tuple[str, ...] | None
    error: str | None = None

    @property
    def malformed(self) -> bool:
        return self.order is None


def parse_ranking(text: str, identifiers: Sequence[str]) -> ParsedRanking:
    """Reads `[X] > [Y] > ...` from an answer: the longest such chain in it (spaces and text around it
    tolerated, identifiers case-insensitive). Malformed unless it names each identifier exactly once.
    """
    ids = [i.upper() for i in identifiers]
    best: list[str] = []
    for m in _CHAIN.finditer(text):
        items = [x.upper() for x in _ITEM_RE.findall(m.group(0))]
        if len(items) > len(best):
            best = items
    if not best:
        return ParsedRanking(None, "no ranking of the form [X] > [Y]")
    unknown = [x for x in best if x not in ids]
    if unknown:
        return ParsedRanking(None, f"unknown identifier [{unknown[0]}]")
    seen: set[str] = set()
    for x in best:
        if x in seen:
            return ParsedRanking(None, f"repeated identifier [{x}]")
        seen.add(x)
    missing = [x for x in ids if x not in seen]
    if missing:
        return ParsedRanking(None, "missing " + ", ".join(f"[{x}]" for x in missing))
    return ParsedRanking(tuple(best))


# ---------------------------------------------------------------------------------------------- metrics


def _gain(grade: float) -> float:
    return 2.0 ** max(float(grade), 0.0) - 1.0


def dcg(grades: Sequence[float], k: int = K) -> float:
    """sum over positions i = 1..k of (2^grade - 1) / log2(i + 1)."""
    return sum(_gain(g) / math.log2(i + 1) for i, g in enumerate(list(grades)[:k], start=1))


def ndcg_at_k(predicted_grades: Sequence[float], candidate_grades: Sequence[float], k: int = K) -> float:
    """NDCG@k of a predicted order, given each predicted item's own grade; the ideal is the
    candidates' grades sorted descending. 0 when no candidate is relevant."""
    ideal = dcg(sorted(candidate_grades, reverse=True), k)
    return dcg(predicted_grades, k) / ideal if ideal > 0 else 0.0


def mrr_at_k(predicted_grades: Sequence[float], k: int = K) -> float:
    """1 / the position of the first relevant (grade > 0) item in the top k; 0 when none is."""
    for i, g in enumerate(list(predicted_grades)[:k], start=1):
        if g > 0:
            return 1.0 / i
    return 0.0


def score_ranking(parsed: ParsedRanking, candidates: Sequence[dict], k: int = K) -> tuple[float, float]:
    """(NDCG@k, MRR@k) of a parsed answer; (0, 0) when it is malformed."""
    if parsed.order is None:
        return 0.0, 0.0
    grade = {c["label"].upper(): c["grade"] for c in candidates}
    predicted = [grade[x] for x in parsed.order]
    return ndcg_at_k(predicted, [c["grade"] for c in candidates], k), mrr_at_k(predicted, k)


# ---------------------------------------------------------------------------------------------- data


def read_eval_file(path: str | Path) -> list[dict]:
    """The records of a prepared eval file, checked for what scoring needs."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"{path}: no such file; expected {EVAL_LAYOUT} (make it with `lessctl ir prepare`)")
    from lessctl.data.records import iter_objects, where

    out: list[dict] = []
    for number, _, rec in iter_objects(path, EVAL_LAYOUT, (("messages", "candidates"),)):
        at = where(path, number)
        try:
            msgs, cands = rec["messages"], rec["candidates"]
            ok = (
                isinstance(msgs, list)
                and msgs
                and msgs[-1]["role"] == "assistant"
                and all(isinstance(m["content"], str) for m in msgs)
                and isinstance(cands, list)
                and cands
                and all(
                    isinstance(c["label"], str)
                    and isinstance(c["grade"], (int, float))
                    and isinstance(c["bm25_rank"], int)
                    for c in cands
                )
            )
        except (KeyError, TypeError, IndexError):
            ok = False
        if not ok:
            raise InputError(f"{at}: expected {EVAL_LAYOUT}")
        out.append(rec)
    if not out:
        raise InputError(f"{path}: no examples; expected {EVAL_LAYOUT}")
    return out


def dataset_name(path: str | Path, records: Sequence[dict]) -> str:
    """The collection's name: the records' `dataset`, else the file name without `_eval.jsonl` (or .jsonl.gz,
    .parquet)."""
    from lessctl.data.records import data_stem

    name = records[0].get("dataset") if records else None
    if isinstance(name, str) and name:
        return name
    stem = data_stem(path)
    return stem[: -len("_eval")] if stem.endswith("_eval") else stem


def task_name(dataset: str) -> str:
    """The evaluation's task in eval/ and results.jsonl."""
    return f"ir-{dataset}"


# ---------------------------------------------------------------------------------------------- harness


def score_answers(
    records: Sequence[dict],
    answers: Sequence[str],
    *,
    settings: dict | None = None,
    dataset: str = "",
    start: float | None = None,
) -> dict:
    """Scores answers (model text) against their records: means over all of them, malformed ones as 0."""
    start = time.time() if start is None else start
    settings = settings or {}
    predictions = []
    ndcgs, mrrs, bad = [], [], 0
    for rec, answer in zip(records, answers):
        labels = [c["label"] for c in rec["candidates"]]
        parsed = parse_ranking(answer, labels)
        nd, rr = score_ranking(parsed, rec["candidates"], K)
        ndcgs.append(nd)
        mrrs.append(rr)
        bad += parsed.malformed
        predictions.append(
            {
                "id": rec.get("id"),
                "query_id": rec.get("query_id"),
                "output": answer,
                "ranking": list(parsed.order) if parsed.order else None,
                "error": parsed.error,
                "gold": rec["messages"][-1]["content"],
                "ndcg@5": round(nd, 6),
                "mrr@5": round(rr, 6),
            }
        )
    n = len(records)
    mean = (lambda xs: sum(xs) / len(xs)) if n else (lambda xs: 0.0)
    return {
        "task": task_name(dataset),
        "metric": METRIC,
        METRIC: 100.0 * mean(ndcgs),
        "mrr@5": 100.0 * mean(mrrs),
        "malformed": bad,
        "malformed_rate": 100.0 * bad / n if n else 0.0,
        "n": n,
        "dataset": dataset,
        "settings": {**settings, "k": K, "units": "percent (ndcg@5, mrr@5, malformed_rate)"},
        "seconds": round(time.time() - start, 3),
        "predictions": predictions,
    }


def evaluate_bm25(path: str | Path, *, limit: int | None = None) -> dict:
    """The first stage's own order (BM25 rank), scored like a model's answer: the baseline to beat."""
    start = time.time()
    records = read_eval_file(path)[: limit or None]
    answers = [
        " > ".join(f"[{c['label']}]" for c in sorted(r["candidates"], key=lambda c: c["bm25_rank"])) for r in records
    ]
    settings = {"dataset_file": str(Path(path).expanduser()), "limit": limit, "ranker": "bm25"}
    return score_answers(records, answers, settings=settings, dataset=dataset_name(path, records), start=start)


def evaluate_ir(
    model: Any,
    tokenizer: Any,
    path: str | Path,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    progress: Any = None,
    max_new_tokens: int = 64,
    chat_format: str = "tulu",
) -> dict:
    """NDCG@5, MRR@5 (percent) and malformed answers of a model reranking the eval file's candidates.

    The prompt is the record's conversation up to the gold answer in the training chat format;
    decoding is greedy, at most max_new_tokens, stopping at a blank line or a new turn marker.
    """
    from lessctl.data.targets import split_messages
    from lessctl.evaluation.generation import ProgressHook, generate_greedy

    start = time.time()
    records = read_eval_file(path)[: limit or None]
    prompts = [split_messages(r["messages"], chat_format, tokenizer)[0] for r in records]
    hook = ProgressHook(progress, "ir")
    hook.start(len(prompts))
    outputs, truncated = generate_greedy(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop=STOP, batch_size=batch_size, hook=hook
    )
    settings = {
        "dataset_file": str(Path(path).expanduser()),
        "limit": limit,
        "ranker": "model",
        "max_new_tokens": max_new_tokens,
        "stop": list(STOP),
        "chat_format": chat_format,
        "decoding": "greedy",
        "truncated_prompts": truncated,
    }
    return score_answers(
        records, [o.strip() for o in outputs], settings=settings, dataset=dataset_name(path, records), start=start
    )


# ---------------------------------------------------------------------------------------------- recording


def make_ir_record(spec: Any, result: dict, elapsed_s: float) -> dict:
    """The results.jsonl line of an IR evaluation: the usual fields, plus `metrics` (MRR, malformed)."""
    from lessctl import __version__

    return {
        "model": spec.name,
        "method": spec.method,
        "target": spec.target,
        "task": result["task"],
        "metric": METRIC,
        "score": round(float(result[METRIC]), 4),
        "n": result["n"],
        "limit": result["settings"].get("limit"),
        "metrics": {
            METRIC: round(float(result[METRIC]), 4),
            "mrr@5": round(float(result["mrr@5"]), 4),
            "malformed": int(result["malformed"]),
            "malformed_rate": round(float(result["malformed_rate"]), 4),
        },
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "elapsed_s": round(elapsed_s, 1),
        "model_path": spec.path,
        "lessctl_version": __version__,
    }


def record_ir_result(output_dir: str | Path, spec: Any, result: dict, elapsed_s: float):
    """Writes `eval/<model>/ir-<dataset>.json` and appends the record to `results.jsonl`."""
    from lessctl.evaluation.results import append_result, write_eval_json
    from lessctl.evaluation.runner import EvalOutcome

    record = make_ir_record(spec, result, elapsed_s)
    full = {**result, "model": asdict(spec), "lessctl_version": record["lessctl_version"]}
    path = write_eval_json(output_dir, spec.name, result["task"], full)
    record["eval_json"] = str(path)
    append_result(output_dir, record)
    return EvalOutcome(record, path, full)


def run_ir_evaluation(
    spec: Any,
    dataset: str | Path,
    output_dir: str | Path,
    *,
    dtype: str = "auto",
    device: str | None = None,
    loaded: tuple[Any, Any] | None = None,
    **options: Any,
):
    """Evaluates `spec`'s model (or, with spec None, the BM25 first stage) on a prepared eval file and
    records the result. options go to `evaluate_ir` (limit, batch_size, progress, max_new_tokens,
    chat_format); for BM25 only limit counts."""
    from lessctl.evaluation.runner import ModelSpec

    read_eval_file(dataset)  # a bad file stops us before any model is loaded
    start = time.time()
    if spec is None:
        spec = ModelSpec(BM25_MODEL, "", None, None)
        result = evaluate_bm25(dataset, limit=options.get("limit"))
    else:
        from lessctl.evaluation.runner import load_for_eval

        model, tokenizer = loaded or load_for_eval(spec, dtype, device)
        result = evaluate_ir(model, tokenizer, dataset, **options)
    return record_ir_result(output_dir, spec, result, time.time() - start)
