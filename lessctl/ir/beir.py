"""Reading a BEIR folder: `corpus.jsonl` ({_id, title, text}), `queries.jsonl` ({_id, text}), `qrels/<split>.tsv`."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from lessctl.errors import InputError

log = logging.getLogger(__name__)


LAYOUT = "a BEIR folder: corpus.jsonl ({_id, title, text}), queries.jsonl ({_id, text}), qrels/<split>.tsv"


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
    from lessctl.data.records import iter_json_lines

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
    from lessctl.data.records import text_lines

    for lineno, line in text_lines(path):
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
