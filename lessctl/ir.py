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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from lessctl.errors import AlreadyExistsError, ConfigError, InputError

log = logging.getLogger(__name__)

ROLES = ("pool", "target")
BM25_PARAMS = {"k1": 1.5, "b": 0.75, "epsilon": 0.25}  # rank_bm25's defaults, as in selection's baseline
LAYOUT = "a BEIR folder: corpus.jsonl ({_id, title, text}), queries.jsonl ({_id, text}), qrels/<split>.tsv"
FORMAT_VERSION = 1

# LESS.md section 7, verbatim (the "numerical identifier" wording included, for comparability).
PROMPT_HEAD = (
    "You are RankLLM, an intelligent assistant that can rank passages based on their relevancy to the query. "
    "I will provide you with {n} passages, each indicated by a numerical identifier []. "
    "Rank the passages based on their relevance to the search query: {query}.\n\n"
)
PROMPT_TAIL = (
    "\n\nSearch Query: {query}\n"
    "Rank the {n} passages above based on their relevance to the search query. All the passages should be "
    "included and listed using identifiers, in descending order of relevance. The output format should be "
    "[] > [], e.g., [B] > [A]. Only respond with the ranking results; do not add any explanation."
)

# progress(description, done, total): called now and then during long loops.
Progress = Callable[[str, int, int], None]


# ---------------------------------------------------------------------------------------------- reading BEIR


@dataclass
class Collection:
    """A BEIR collection in memory: documents in corpus order, queries, and graded judgements."""

    root: Path
    doc_ids: list[str]
    doc_texts: list[str]  # title and text joined by a space, whitespace collapsed
    queries: dict[str, str]  # query id -> text, in file order
    qrels: dict[str, dict[str, int]] = field(default_factory=dict)  # query id -> {doc id: grade}


def _read_jsonl_objects(path: Path, what: str) -> Iterator[tuple[int, dict]]:
    if not path.is_file():
        raise InputError(f"{path}: no such file; expected {LAYOUT}")
    from lessctl.data import iter_json_lines

    for lineno, _, obj in iter_json_lines(path, f"one {what} a line"):
        if "_id" not in obj:
            raise InputError(f"{path}:{lineno}: expected a JSON object with an _id ({what})")
        yield lineno, obj


def _clean(text: str) -> str:
    return " ".join(str(text).split())


def read_corpus(path: Path) -> tuple[list[str], list[str]]:
    """(doc ids, texts) in file order; a text is `title + " " + text` with whitespace collapsed."""
    ids: list[str] = []
    texts: list[str] = []
    seen: set[str] = set()
    for lineno, obj in _read_jsonl_objects(path, "document {_id, title, text}"):
        did = str(obj["_id"])
        if did in seen:
            raise InputError(f"{path}:{lineno}: document id {did!r} appears twice")
        seen.add(did)
        ids.append(did)
        texts.append(_clean(" ".join(s for s in (obj.get("title") or "", obj.get("text") or "") if s)))
    if not ids:
        raise InputError(f"{path}: no documents; expected {LAYOUT}")
    return ids, texts


def read_queries(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for lineno, obj in _read_jsonl_objects(path, "query {_id, text}"):
        if not isinstance(obj.get("text"), str):
            raise InputError(f"{path}:{lineno}: a query needs a text string")
        out[str(obj["_id"])] = _clean(obj["text"])
    if not out:
        raise InputError(f"{path}: no queries; expected {LAYOUT}")
    return out


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """{query id: {doc id: grade}} from a BEIR qrels file (query-id, corpus-id, score; TREC's 4 columns too)."""
    if not path.is_file():
        split_dir = path.parent
        have = sorted(p.stem for p in split_dir.glob("*.tsv")) if split_dir.is_dir() else []
        hint = f" (splits here: {', '.join(have)})" if have else ""
        raise InputError(f"{path}: no such qrels file{hint}; expected {LAYOUT}")
    out: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            parts = line.rstrip("\n").split("\t") if "\t" in line else line.split()
            if not parts or not line.strip():
                continue
            if len(parts) == 4:  # TREC: qid iteration docid grade
                parts = [parts[0], parts[2], parts[3]]
            if len(parts) != 3:
                raise InputError(f"{path}:{lineno}: expected query-id, corpus-id and score separated by tabs")
            qid, did, score = (p.strip() for p in parts)
            try:
                grade = int(float(score))
            except ValueError:
                if lineno == 1:  # the header
                    continue
                raise InputError(f"{path}:{lineno}: the score {score!r} is not a number") from None
            out.setdefault(qid, {})[did] = grade
    return out


def read_collection(root: str | os.PathLike, splits: Sequence[str] = ("test",)) -> tuple[Collection, dict[str, dict]]:
    """The collection and the qrels of each split: (collection, {split: {qid: {doc id: grade}}})."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise InputError(f"{root}: no such folder; expected {LAYOUT}")
    ids, texts = read_corpus(root / "corpus.jsonl")
    queries = read_queries(root / "queries.jsonl")
    qrels = {s: read_qrels(root / "qrels" / f"{s}.tsv") for s in dict.fromkeys(splits)}
    return Collection(root, ids, texts, queries), qrels


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

    def __init__(self, texts: Sequence[str], *, progress: Progress | None = None, k1: float = 1.5,
                 b: float = 0.75, epsilon: float = 0.25):
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


# ---------------------------------------------------------------------------------------------- examples


def labels(n: int) -> list[str]:
    if not 1 <= n <= 26:
        raise ConfigError(f"--candidates: expected 1 to 26 passages (identifiers [A] to [Z]), got {n}")
    return [chr(ord("A") + i) for i in range(n)]


def build_prompt(query: str, passages: Sequence[str]) -> str:
    """The user message of LESS.md section 7 for `passages`, labelled [A], [B], ... in order."""
    n = len(passages)
    body = "\n".join(f"[{lab}] {p}" for lab, p in zip(labels(n), passages))
    return PROMPT_HEAD.format(n=n, query=query) + body + PROMPT_TAIL.format(n=n, query=query)


def format_ranking(order: Sequence[str]) -> str:
    return " > ".join(f"[{x}]" for x in order)


def gold_order(candidates: Sequence[dict]) -> list[str]:
    """Labels by relevance grade descending, ties by BM25 rank."""
    return [c["label"] for c in sorted(candidates, key=lambda c: (-c["grade"], c["bm25_rank"]))]


class PassageTruncator:
    """Cuts passages to a number of tokens: a tokenizer's when given, else whitespace tokens."""

    def __init__(self, max_tokens: int, tokenizer: Any = None, name: str = "whitespace"):
        if max_tokens < 1:
            raise ConfigError(f"--max-passage-tokens: must be at least 1, got {max_tokens}")
        self.max_tokens = max_tokens
        self.tokenizer = tokenizer
        self.name = name

    def __call__(self, text: str) -> str:
        if self.tokenizer is None:
            words = text.split()
            return " ".join(words[: self.max_tokens])
        ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) <= self.max_tokens:
            return text
        return _clean(self.tokenizer.decode(ids[: self.max_tokens], skip_special_tokens=True))


def make_truncator(max_tokens: int, tokenizer_path: str | os.PathLike | None = None) -> PassageTruncator:
    if tokenizer_path is None:
        return PassageTruncator(max_tokens)
    from lessctl.models import load_tokenizer

    return PassageTruncator(max_tokens, load_tokenizer(tokenizer_path), str(tokenizer_path))


def make_example(
    name: str, qid: str, query: str, cand: Sequence[tuple[int, float, int]], coll: Collection,
    grades: dict[str, int], truncate: PassageTruncator, rng: random.Random,
) -> dict:
    """One listwise example; cand = [(doc index, BM25 score, BM25 rank)], shown in a seeded order."""
    shown = list(cand)
    rng.shuffle(shown)
    labs = labels(len(shown))
    candidates = [
        {"label": lab, "doc_id": coll.doc_ids[d], "grade": int(grades.get(coll.doc_ids[d], 0)),
         "bm25_rank": int(r), "bm25_score": round(float(s), 4)}
        for lab, (d, s, r) in zip(labs, shown)
    ]
    prompt = build_prompt(query, [truncate(coll.doc_texts[d]) for d, _, _ in shown])
    return {
        "dataset": name,
        "id": f"{name}-{qid}",
        "query_id": qid,
        "query": query,
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": format_ranking(gold_order(candidates))},
        ],
        "candidates": candidates,
    }


def first_stage(index: BM25Index, query: str, k: int) -> list[tuple[int, float, int]]:
    """The BM25 top-k: [(doc index, score, rank)]."""
    s = index.scores(query)
    return [(d, float(s[d]), r) for r, d in enumerate(top_k(s, k), start=1)]


def pool_candidates(
    index: BM25Index, coll: Collection, query: str, grades: dict[str, int], k: int, max_relevant: int,
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
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


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
            f"{existing[0]} exists and was prepared with other settings (see {manifest.name}); pass --force to replace it"
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
        raise ConfigError(f"--max-relevant: expected 0 (candidates - 1) to {settings.candidates}, got {settings.max_relevant}")


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
        source=str(root.resolve()), name=name, role=role, split=split, dev_split=dsplit,
        dev_queries=dev_queries if role == "target" else 0, eval_queries=eval_queries if role == "target" else 0,
        candidates=candidates, max_relevant=(max_relevant or candidates - 1) if role == "pool" else 0, seed=seed,
        max_passage_tokens=max_passage_tokens, tokenizer=str(tokenizer) if tokenizer else "whitespace",
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
        dev_pool = [q for q in coll.queries if has_relevant(q, dev_judged) and (dsplit == split or q not in eval_judged)]
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
        counts.update({
            "dev": len(dev_records), "dev_skipped_no_relevant_in_top_k": dev_skipped,
            "eval_queries": len(eval_ids), "eval": len(eval_records),
            "eval_skipped_no_relevant_in_top_k": eval_skipped,
        })
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
        name=name, role=role, files={k2: str(p) for k2, p in files.items()}, counts=counts,
        settings=asdict(settings), notes=notes, seconds=round(time.time() - start, 2),
    )
    from lessctl import __version__

    manifest = {"format_version": FORMAT_VERSION, "lessctl_version": __version__,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "bm25": {"tokens": r"lowercased \w+", **BM25_PARAMS},
                **summary.to_dict()}
    _manifest_path(out, name).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return summary


# ---------------------------------------------------------------------------------------------- tiny-ir workspace

TINY_IR_PASSAGE_TOKENS = 24  # whitespace tokens: keeps a 5-passage example within the tiny model's context
TINY_IR_MAX_SEQ_LENGTH = 1024


def _collection_name(folder: Path) -> str:
    name = folder.name
    return name[: -len("_sample")] if name.endswith("_sample") else name


def tiny_ir_layout(beir_root: str | os.PathLike) -> tuple[tuple[str, Path], list[tuple[str, Path]]]:
    """The pool ((name, folder) of the `msmarco*` collection) and the targets (every other BEIR folder)
    under a folder of BEIR collections such as `../shared/data/beir`."""
    root = Path(beir_root).expanduser()
    hint = "the tiny-ir preset needs --data-dir pointing to a folder of BEIR collections (e.g. ../shared/data/beir)"
    if not root.is_dir():
        raise ConfigError(f"--data-dir: {root} is not a folder; {hint}")
    found = sorted(p for p in root.iterdir() if p.is_dir() and (p / "corpus.jsonl").is_file())
    pools = [p for p in found if p.name.startswith("msmarco")]
    targets = [p for p in found if p not in pools]
    if not pools or not targets:
        raise ConfigError(
            f"--data-dir: {root} holds {len(found)} BEIR collections; {hint}, with an msmarco* one (the pool) "
            "and at least one other (the targets)"
        )
    return (_collection_name(pools[0]), pools[0]), [(_collection_name(p), p) for p in targets]


def build_tiny_ir_model(out_dir: Path, texts: list[str], seed: int = 0, vocab_size: int = 1000) -> Path:
    """A BPE tokenizer trained on the examples and a randomly initialised 2-layer Llama with a context
    long enough for a listwise example (lessctl.tiny's model, with more positions)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lessctl.tiny import train_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(texts, out_dir, vocab_size=vocab_size)
    tok.model_max_length = TINY_IR_MAX_SEQ_LENGTH
    tok.save_pretrained(str(out_dir))
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=TINY_IR_MAX_SEQ_LENGTH, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(str(out_dir))
    return out_dir


def build_tiny_ir_workspace(folder: Path, beir_root: str | os.PathLike, *, seed: int = 0,
                            progress: Progress | None = None) -> dict[str, Path]:
    """Prepares the pool and every target of `tiny_ir_layout` into `folder/data` and builds the tiny
    model in `folder/model`. Returns {file key: path}."""
    from lessctl.tiny import corpus_texts

    (pool_name, pool_dir), targets = tiny_ir_layout(beir_root)
    data = Path(folder) / "data"
    files: dict[str, Path] = {}
    common = {"seed": seed, "max_passage_tokens": TINY_IR_PASSAGE_TOKENS, "force": True, "progress": progress}
    s = prepare_ir(pool_dir, pool_name, data, role="pool", **common)
    files[f"{pool_name}_data"] = Path(s.files["data"])
    for name, d in targets:
        s = prepare_ir(d, name, data, role="target", **common)
        files[f"{name}_dev"], files[f"{name}_eval"] = Path(s.files["dev"]), Path(s.files["eval"])
    build_tiny_ir_model(Path(folder) / "model", corpus_texts(list(files.values())), seed=seed)
    return files
