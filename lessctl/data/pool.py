"""The training pool: encoded examples of several files, and LESS's seeded warmup subset."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lessctl.data.encoding import Encoded, TruncationReport, encode_record
from lessctl.data.records import Record, read_examples
from lessctl.errors import warn

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- subsets


def subset_indices(n: int, percentage: float, seed: int) -> np.ndarray:
    """LESS's warmup subset: `np.random.seed(seed); permutation(n)[:int(n * p)]`; p = 1 keeps file order."""
    size = int(n * percentage)
    if size >= n:
        return np.arange(n)
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return np.random.permutation(n)[:size]
    finally:
        np.random.set_state(state)


@dataclass
class Pool:
    """The training files of a workspace read in config order, concatenated (as LESS concatenates them)."""

    files: dict[str, Path]
    records: dict[str, list[Record]]

    @classmethod
    def read(cls, files: dict[str, Path]) -> "Pool":
        return cls(dict(files), {name: read_examples(p) for name, p in files.items()})

    def flat(self) -> list[tuple[str, Record]]:
        return [(name, r) for name, recs in self.records.items() for r in recs]

    def __len__(self) -> int:
        return sum(len(v) for v in self.records.values())


def write_pool_file(files: dict[str, Path], path: Path) -> Path:
    """Writes every example of the pooled files (config order, .jsonl, .jsonl.gz or .parquet) to one jsonl, a
    line each. An existing file with the same content is kept as it is (its mtime too), so an adapter trained
    on it stays current; otherwise the file is replaced atomically."""
    import hashlib

    from lessctl.files import atomic_path, sha256_file

    pool = Pool.read(files).flat()
    h = hashlib.sha256()
    for _, r in pool:
        h.update((r.raw + "\n").encode("utf-8"))
    if path.is_file() and sha256_file(path) == h.hexdigest():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        f.writelines(r.raw + "\n" for _, r in pool)
    return path


def encode_training_set(
    files: dict[str, Path], tokenizer: Any, max_len: int, chat_format: str, percentage: float, seed: int
) -> tuple[list[Encoded], dict[str, int], TruncationReport]:
    """The examples one trains on: the seeded subset of the pooled files, tokenized, fully-masked ones dropped.

    Returns the examples, counts {"pool", "subset", "dropped_no_labels"} and what the cut at max_len cost the
    subset (logged: a `warning:` line when it loses more than LOST_LABEL_SHARE_WARNING of the label tokens).
    """
    pool = Pool.read(files).flat()
    idx = subset_indices(len(pool), percentage, seed)
    encoded = [encode_record(pool[int(i)][1], tokenizer, max_len, chat_format, source=pool[int(i)][0]) for i in idx]
    truncation = TruncationReport.of(encoded, max_len)
    truncation.log("training set " + "+".join(files))
    out = [enc for enc in encoded if enc.n_label_tokens > 0]
    dropped = len(encoded) - len(out)
    never = sum(1 for e in encoded if e.n_label_tokens == 0 and not e.untruncated_label_tokens)  # no answer at all
    if dropped - never:
        warn(
            log,
            f"{dropped - never} of {len(idx)} examples have no trainable tokens after truncation and were skipped",
        )
    if never:
        warn(
            log,
            f"{never} of {len(idx)} examples have no trainable tokens (no assistant answer to learn, before any "
            "cut) and were skipped",
        )
    return out, {"pool": len(pool), "subset": int(len(idx)), "dropped_no_labels": dropped}, truncation


def build_training_set(
    files: dict[str, Path], tokenizer: Any, max_len: int, chat_format: str, percentage: float, seed: int
) -> tuple[list[Encoded], dict[str, int]]:
    """`encode_training_set` without the truncation report: the examples and their counts."""
    examples, counts, _ = encode_training_set(files, tokenizer, max_len, chat_format, percentage, seed)
    return examples, counts
