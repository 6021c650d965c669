"""BEIR collections -> listwise reranking examples (LESS.md section 7), with a BM25 first stage.

A BEIR folder holds `corpus.jsonl` ({_id, title, text}), `queries.jsonl` ({_id, text}) and
`qrels/<split>.tsv` (query-id, corpus-id, score; a header line is optional). Every query's
candidates come from BM25 (rank_bm25's BM25Okapi) over the whole corpus:

- target collections: the BM25 top-k as it is; the dev file (the LESS target) and the eval file
  (held-out queries) hold only queries with a relevant document among their candidates;
- pools: the relevant documents (at most k - 1 by default, a seeded sample when there are more)
  plus the best-ranked non-relevant BM25 documents (hard negatives) up to k.

The passages of an example are shown in a seeded random order, labelled [A], [B], ... in that
order; the gold answer lists them by relevance grade, ties by BM25 rank.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from lessctl.errors import AlreadyExistsError, ConfigError, InputError
from lessctl.files import atomic_path
from lessctl.ir.beir import Collection, read_collection
from lessctl.ir.bm25 import BM25_PARAMS, BM25Index, Progress, first_stage, rank_of, top_k
from lessctl.ir.prompts import labels, make_example, make_truncator

log = logging.getLogger(__name__)


ROLES = ("pool", "target")
FORMAT_VERSION = 1


def pool_candidates(
    index: BM25Index,
    coll: Collection,
    query: str,
    grades: dict[str, int],
    k: int,
    max_relevant: int,
    rng: random.Random,
) -> list[tuple[int, float, int]]:
    """Relevant documents (a seeded sample of max_relevant when there are more) plus the best-ranked
    non-relevant BM25 documents up to k."""
    s = index.scores(query)
    pos = {d: i for i, d in enumerate(coll.doc_ids)}
    relevant = [pos[d] for d, g in grades.items() if g > 0 and d in pos]
    relevant.sort()
    if len(relevant) > max_relevant:
        relevant = sorted(rng.sample(relevant, max_relevant))
    chosen = {d: (d, float(s[d]), rank_of(s, d)) for d in relevant}
    judged_relevant = {pos[d] for d, g in grades.items() if g > 0 and d in pos}
    need = k - len(chosen)
    depth = k + len(judged_relevant)
    while need > 0:
        ranked = top_k(s, min(depth, len(s)))
        negs = [d for d in ranked if d not in judged_relevant]
        if len(negs) >= need or depth >= len(s):
            for d in negs[:need]:
                chosen[d] = (d, float(s[d]), rank_of(s, d))
            break
        depth *= 2
    return sorted(chosen.values(), key=lambda c: c[2])


# ---------------------------------------------------------------------------------------------- prepare


@dataclass
class PrepareSettings:
    """What decides a prepared file's content (stored beside it; a re-run with others needs --force)."""

    source: str
    name: str
    role: str = "target"
    split: str = "test"
    dev_split: str = ""
    dev_queries: int = 10
    eval_queries: int = 0
    candidates: int = 5
    max_relevant: int = 0
    seed: int = 0
    max_passage_tokens: int = 100
    tokenizer: str = "whitespace"


@dataclass
class PrepareSummary:
    """What `prepare` wrote and why some queries are not in it."""

    name: str
    role: str
    files: dict[str, str]
    counts: dict[str, int]
    settings: dict
    notes: list[str]
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def _manifest_path(out_dir: Path, name: str) -> Path:
    return out_dir / f"{name}_prepare.json"


def output_files(out_dir: Path, name: str, role: str) -> dict[str, Path]:
    if role == "pool":
        return {"data": out_dir / f"{name}_data.jsonl"}
    return {"dev": out_dir / f"{name}_dev.jsonl", "eval": out_dir / f"{name}_eval.jsonl"}


def _write_jsonl(path: Path, records: Iterable[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def _check_outputs(out_dir: Path, name: str, role: str, settings: dict, force: bool) -> None:
    existing = [p for p in output_files(out_dir, name, role).values() if p.exists()]
    if not existing or force:
        return
    manifest = _manifest_path(out_dir, name)
    try:
        before = json.loads(manifest.read_text(encoding="utf-8")).get("settings")
    except (OSError, ValueError, AttributeError):
        before = None
    if before != settings:
        raise AlreadyExistsError(
            f"{existing[0]} exists and was prepared with other settings (see {manifest.name}); pass --force to "
            f"replace it"
        )


def _validate(settings: PrepareSettings) -> None:
    if settings.role not in ROLES:
        raise ConfigError(f"--role: expected pool or target, got {settings.role!r}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", settings.name):
        raise ConfigError(f"--name: {settings.name!r} must be letters, digits, '_', '.' or '-' (it names the files)")
    labels(settings.candidates)
    if settings.dev_queries < 1 and settings.role == "target":
        raise ConfigError(f"--dev-queries: must be at least 1, got {settings.dev_queries}")
    if settings.eval_queries < 0:
        raise ConfigError(f"--eval-queries: must be 0 (all) or more, got {settings.eval_queries}")
    if settings.max_relevant < 0 or settings.max_relevant > settings.candidates:
        raise ConfigError(
            f"--max-relevant: expected 0 (candidates - 1) to {settings.candidates}, got {settings.max_relevant}"
        )


def resolve_dev_split(root: Path, split: str, dev_split: str | None) -> str:
    """The split dev queries come from: as given, else `train` when the collection has it, else `split`."""
    if dev_split:
        return dev_split
    if split != "train" and (root / "qrels" / "train.tsv").is_file():
        return "train"
    return split


def prepare_ir(
    beir_dir: str | os.PathLike,
    name: str,
    out_dir: str | os.PathLike = ".",
    *,
    role: str = "target",
    split: str = "test",
    dev_split: str | None = None,
    dev_queries: int = 10,
    eval_queries: int = 0,
    candidates: int = 5,
    max_relevant: int = 0,
    seed: int = 0,
    max_passage_tokens: int = 100,
    tokenizer: str | os.PathLike | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> PrepareSummary:
    """Writes `NAME_dev.jsonl` + `NAME_eval.jsonl` (target) or `NAME_data.jsonl` (pool) from a BEIR folder.

    dev_split: the qrels split of the dev queries (default: `train` when the collection has one and
    `split` is not it, else `split`; dev and eval queries are disjoint either way). eval_queries: a
    seeded sample of that many eval queries (0: all). max_relevant: relevant documents per pool
    example (0: candidates - 1, so that every example keeps a hard negative when the corpus has one).
    """
    start = time.time()
    root = Path(beir_dir).expanduser()
    out = Path(out_dir).expanduser()
    if role == "pool" and (dev_split or eval_queries):
        raise ConfigError("--dev-split and --eval-queries apply to --role target only (a pool has no dev or eval file)")
    dsplit = resolve_dev_split(root, split, dev_split) if role == "target" else ""
    settings = PrepareSettings(
        source=str(root.resolve()),
        name=name,
        role=role,
        split=split,
        dev_split=dsplit,
        dev_queries=dev_queries if role == "target" else 0,
        eval_queries=eval_queries if role == "target" else 0,
        candidates=candidates,
        max_relevant=(max_relevant or candidates - 1) if role == "pool" else 0,
        seed=seed,
        max_passage_tokens=max_passage_tokens,
        tokenizer=str(tokenizer) if tokenizer else "whitespace",
    )
    _validate(settings)
    _check_outputs(out, name, role, asdict(settings), force)
    truncate = make_truncator(max_passage_tokens, tokenizer)
    splits = [split] + ([dsplit] if dsplit and dsplit != split else [])
    coll, qrels = read_collection(root, splits)
    doc_set = set(coll.doc_ids)
    counts: dict[str, int] = {"documents": len(coll.doc_ids), "queries": len(coll.queries)}
    notes: list[str] = []
    for s, q in qrels.items():
        unknown = sorted(qid for qid in q if qid not in coll.queries)
        if unknown:
            raise InputError(f"{root / 'qrels' / (s + '.tsv')}: query {unknown[0]!r} is not in queries.jsonl")
        missing_docs = sum(1 for g in q.values() for d in g if d not in doc_set)
        if missing_docs:
            notes.append(f"{missing_docs} judgements of {s} name documents missing from the corpus (ignored)")

    index = BM25Index(coll.doc_texts, progress=progress, **BM25_PARAMS)
    k = settings.candidates
    files = output_files(out, name, role)
    out.mkdir(parents=True, exist_ok=True)

    def has_relevant(qid: str, judged: dict[str, dict[str, int]]) -> bool:
        return any(g > 0 and d in doc_set for d, g in judged.get(qid, {}).items())

    if role == "pool":
        judged = qrels[split]
        qids = [q for q in coll.queries if q in judged]
        usable = [q for q in qids if has_relevant(q, judged)]
        counts["judged_queries"] = len(qids)
        if len(usable) < len(qids):
            notes.append(f"{len(qids) - len(usable)} judged queries have no relevant document and were skipped")
        if not usable:
            raise InputError(f"{root / 'qrels' / (split + '.tsv')}: no query has a relevant document (grade > 0)")
        records = []
        for i, qid in enumerate(usable):
            if progress:
                progress("pool examples", i, len(usable))
            rng = random.Random(f"{seed}:{name}:{qid}")
            cand = pool_candidates(index, coll, coll.queries[qid], judged[qid], k, settings.max_relevant, rng)
            records.append(make_example(name, qid, coll.queries[qid], cand, coll, judged[qid], truncate, rng))
        if progress:
            progress("pool examples", len(usable), len(usable))
        counts["examples"] = len(records)
        short = sum(1 for r in records if len(r["candidates"]) < k)
        if short:
            notes.append(f"{short} examples have fewer than {k} candidates (the corpus ran out of documents)")
        _write_jsonl(files["data"], records)
    else:

        def target_example(qid: str, judged: dict[str, dict[str, int]]) -> dict | None:
            """The first-stage example of a query, or None when no relevant document made the top k."""
            grades = judged.get(qid, {})
            cand = first_stage(index, coll.queries[qid], k)
            if not any(grades.get(coll.doc_ids[d], 0) > 0 for d, _, _ in cand):
                return None
            rng = random.Random(f"{seed}:{name}:{qid}")
            return make_example(name, qid, coll.queries[qid], cand, coll, grades, truncate, rng)

        eval_judged, dev_judged = qrels[split], qrels[dsplit]
        # Dev queries: the first dev_queries of the dev split's judged queries in a seeded order whose
        # BM25 top k holds a relevant document; never an eval query.
        dev_pool = [
            q for q in coll.queries if has_relevant(q, dev_judged) and (dsplit == split or q not in eval_judged)
        ]
        random.Random(seed).shuffle(dev_pool)
        dev_records: list[dict] = []
        dev_skipped = 0
        for qid in dev_pool:
            if len(dev_records) == dev_queries:
                break
            if progress:
                progress("dev examples", len(dev_records), dev_queries)
            rec = target_example(qid, dev_judged)
            if rec is None:
                dev_skipped += 1
            else:
                dev_records.append(rec)
        if len(dev_records) < dev_queries:
            raise InputError(
                f"{root}: only {len(dev_records)} queries of split {dsplit!r} have a relevant document in their BM25 "
                f"top {k}; lower --dev-queries (asked for {dev_queries})"
            )
        order = {q: i for i, q in enumerate(coll.queries)}
        dev_records.sort(key=lambda r: order[r["query_id"]])
        dev_ids = {r["query_id"] for r in dev_records}
        eval_ids = [q for q in coll.queries if q in eval_judged and q not in dev_ids]
        if eval_queries and eval_queries < len(eval_ids):
            keep = set(random.Random(f"{seed}:eval").sample(eval_ids, eval_queries))
            eval_ids = [q for q in eval_ids if q in keep]
        eval_records: list[dict] = []
        for i, qid in enumerate(eval_ids):
            if progress and i % 10 == 0:
                progress("eval examples", i, len(eval_ids))
            rec = target_example(qid, eval_judged)
            if rec is not None:
                eval_records.append(rec)
        if progress:
            progress("eval examples", len(eval_ids), len(eval_ids))
        eval_skipped = len(eval_ids) - len(eval_records)
        if not eval_records:
            raise InputError(
                f"{root}: no held-out query of split {split!r} has a relevant document in its BM25 top {k}; "
                "nothing to evaluate on"
            )
        counts.update(
            {
                "dev": len(dev_records),
                "dev_skipped_no_relevant_in_top_k": dev_skipped,
                "eval_queries": len(eval_ids),
                "eval": len(eval_records),
                "eval_skipped_no_relevant_in_top_k": eval_skipped,
            }
        )
        if eval_skipped:
            notes.append(
                f"{eval_skipped} of {len(eval_ids)} eval queries have no relevant document in their BM25 top {k} "
                "and were skipped (a reranker cannot help them)"
            )
        if dsplit != split:
            notes.append(f"dev queries come from split {dsplit!r}, eval queries from {split!r}")
        _write_jsonl(files["dev"], dev_records)
        _write_jsonl(files["eval"], eval_records)

    summary = PrepareSummary(
        name=name,
        role=role,
        files={k2: str(p) for k2, p in files.items()},
        counts=counts,
        settings=asdict(settings),
        notes=notes,
        seconds=round(time.time() - start, 2),
    )
    from lessctl import __version__

    manifest = {
        "format_version": FORMAT_VERSION,
        "lessctl_version": __version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "bm25": {"tokens": r"lowercased \w+", **BM25_PARAMS},
        **summary.to_dict(),
    }
    _manifest_path(out, name).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return summary
