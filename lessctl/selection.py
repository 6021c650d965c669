"""Influence scores, subtask aggregation, top-k selection, and the random and BM25 baselines (LESS.md section 5).

score[i, j] = sum_c w_c <x_i^c, y_j^c> over checkpoints c (rows are unit vectors, so cosines), then
the mean over the target examples of each subtask, then the max over subtasks. Training rows are
streamed from the stores in chunks, so memory stays bounded whatever the pool's size.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from lessctl.config import Config
from lessctl.errors import ConfigError, InputError, MissingArtifactError

log = logging.getLogger(__name__)

METHODS = ("less", "random", "bm25")
CHUNK_ROWS = 16384  # rows per block streamed from a training store (256 MiB of float16 at D = 8192)
READ_AHEAD = 3  # host buffers of CHUNK_ROWS rows: one being read while two wait or are copied to the device
SUMMARY_KEYS = ("family", "dataset", "source_task")


# ----------------------------------------------------------------------------- the math


def subtask_matrix(subtasks: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(names in first-seen order, A [M, S]) with A[j, s] = 1/|s| when target row j belongs to subtask s."""
    names: list[str] = []
    for s in subtasks:
        if s not in names:
            names.append(s)
    A = np.zeros((len(subtasks), len(names)), dtype=np.float32)
    for j, s in enumerate(subtasks):
        A[j, names.index(s)] = 1.0
    A /= A.sum(axis=0, keepdims=True)
    return names, A


def aggregate(scores, A):
    """[n, M] example-by-target scores -> [n] scores: mean within each subtask, max over subtasks."""
    return (scores @ A).max(axis=1)


def normalize_weights(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ConfigError(f"--weights: checkpoint weights must be non-negative and not all zero, got {list(weights)}")
    return w / w.sum()


@dataclass
class Scored:
    """Scores of every pool row: parallel arrays over the pooled training sets."""

    names: list[str]  # training-set name of each row
    index: np.ndarray  # [N] line in its file
    scores: np.ndarray  # [N] float64


def _device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def less_scores(
    train_readers: dict[str, list[Any]],
    target_readers: list[Any],
    weights: np.ndarray,
    subtasks: Sequence[str],
    dim: int,
    progress: Callable[[int, int], None] | None = None,
    device: str | None = None,
) -> Scored:
    """LESS scores of every training row; readers are per checkpoint, in the order of `weights`.

    The training stores are streamed in blocks of CHUNK_ROWS rows. A background thread reads the blocks
    ahead (`_BlockReader`) while the current one is scored, so reading the disk and computing overlap. On
    a GPU the float16 rows are read into page-locked buffers, copied to the device as stored (half the
    bytes of float32) without blocking, and widened to float32 there; the scores stay on the device until
    every block is done. The arithmetic (float32 products, summed over checkpoints in order) is the same
    on every device and for any read-ahead.
    """
    import torch

    dev = torch.device(device or _device())
    cuda = dev.type == "cuda"
    _, A = subtask_matrix(subtasks)
    At = torch.from_numpy(A).to(dev)
    # target features are small: [C, M, D] float32
    Y = [torch.from_numpy(r.read(dim).astype(np.float32)).to(dev) for r in target_readers]
    w = [float(x) for x in weights]
    names, index, scores = [], [], []
    total = sum(rs[0].n_rows for rs in train_readers.values())
    done = 0
    for name, readers in train_readers.items():
        n = readers[0].n_rows
        out = torch.empty(n, dtype=torch.float32, device=dev)
        acc = None
        with _BlockReader(readers, dim, CHUNK_ROWS, pin=cuda) as blocks:
            for start, c, buf, x in blocks:  # x: [b, D] float16 on the host, rows start..start+b of checkpoint c
                ready = None
                if cuda:
                    x = x.to(dev, non_blocking=True)
                    ready = torch.cuda.Event()
                    ready.record()  # buf may be read into again once the copy out of it is done
                part = w[c] * (x.float() @ Y[c].T)  # [b, M]
                blocks.release(buf, ready)
                acc = part if c == 0 else acc + part
                if c == len(readers) - 1:
                    out[start : start + len(acc)] = (acc @ At).max(dim=1).values
                    done += len(acc)
                    if progress:
                        progress(done, total)
        names += [name] * n
        index.append(readers[0].index)
        scores.append(out.double().cpu().numpy())
    return Scored(names, np.concatenate(index), np.concatenate(scores))


class _BlockReader:
    """Reads rows of several stores of equal length in a background thread, ahead of their use.

    Iterating yields (start, c, buf, x) for every block of `rows` rows and, within a block, every store c in
    turn: x ([b, D] float16 tensor, a view of the host buffer buf) holds rows start..start+b of store c. Up
    to `depth` pieces are read ahead, into a ring of `depth` buffers (page-locked when `pin`, so that copies
    to a GPU are asynchronous). The caller hands each buffer back with release(buf, ready): it is read into
    again once `ready` (a CUDA event, or None) has completed. h5py releases the GIL while it reads.
    """

    def __init__(self, readers: list[Any], dim: int, rows: int, *, pin: bool = False, depth: int = READ_AHEAD):
        import queue
        import threading

        import torch

        self._readers, self._dim, self._n = readers, dim, readers[0].n_rows
        self._jobs = [(s, c) for s in range(0, self._n, rows) for c in range(len(readers))]
        self._free: queue.Queue = queue.Queue()
        self._full: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        for _ in range(min(depth, len(self._jobs))):
            buf = torch.empty((min(rows, self._n), dim), dtype=torch.float16, pin_memory=pin)
            self._free.put((buf, None))
        self._thread = threading.Thread(target=self._work, name="lessctl-store-reader", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            for start, c in self._jobs:
                item = self._free.get()
                if item is None or self._stop.is_set():
                    return
                buf, ready = item
                if ready is not None:
                    ready.synchronize()
                x = buf[: min(len(buf), self._n - start)]
                self._readers[c].read_into(self._dim, start, x.numpy())
                self._full.put((start, c, buf, x))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            self._full.put(e)

    def __iter__(self):
        for _ in self._jobs:
            item = self._full.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    def release(self, buf: Any, ready: Any = None) -> None:
        self._free.put((buf, ready))

    def close(self) -> None:
        self._stop.set()
        self._free.put(None)
        self._thread.join()

    def __enter__(self) -> _BlockReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bm25_scores(train_texts: dict[str, list[tuple[int, str]]], queries: Sequence[str], subtasks: Sequence[str]) -> Scored:
    """rank_bm25.BM25Okapi over the pooled training texts (whitespace-split), one query per target example."""
    from rank_bm25 import BM25Okapi

    names, index, corpus = [], [], []
    for name, items in train_texts.items():
        for line, text in items:
            names.append(name)
            index.append(line)
            corpus.append(text.split())
    bm25 = BM25Okapi(corpus, k1=1.5, b=0.75, epsilon=0.25)
    S = np.stack([bm25.get_scores(q.split()) for q in queries], axis=1)  # [N, M]
    _, A = subtask_matrix(subtasks)
    return Scored(names, np.asarray(index, dtype=np.int64), aggregate(S, A.astype(np.float64)))


def random_scores(sizes: dict[str, list[int]], seed: int) -> Scored:
    """A seeded uniform score per row: its top k is a uniform random subset of size k."""
    names, index = [], []
    for name, lines in sizes.items():
        names += [name] * len(lines)
        index += list(lines)
    rng = np.random.default_rng(seed)
    return Scored(names, np.asarray(index, dtype=np.int64), rng.random(len(names)))


def top_order(scores: np.ndarray) -> np.ndarray:
    """Row positions by descending score; ties keep pool order."""
    return np.argsort(-scores, kind="stable")


def n_selected(total: int, percentage: float | None, max_samples: int | None) -> int:
    if max_samples is not None:
        if max_samples < 1:
            raise ConfigError("--max-samples: must be at least 1")
        return min(max_samples, total)
    return int(percentage * total)


# ----------------------------------------------------------------------------- the stage


def selection_dir(cfg: Config, target: str, method: str) -> Path:
    return cfg.output_dir / "selected" / target / method


def selection_file(cfg: Config, target: str, method: str) -> Path:
    """The jsonl a selection wrote (named in its summary.json)."""
    d = selection_dir(cfg, target, method)
    summary = d / "summary.json"
    if not summary.is_file():
        raise MissingArtifactError(
            f"no selection for target '{target}' with method '{method}' in {d}; run `lessctl match --target {target} --method {method}` first"
        )
    return d / json.loads(summary.read_text())["file"]


def _target_subtasks_and_prompts(cfg: Config, target: str) -> tuple[list[str], list[str]]:
    from lessctl.collect import load_target_examples

    exs = load_target_examples(cfg, target)
    return [e.subtask for e in exs], [e.prompt for e in exs]


def _open_stores(cfg: Config, names: list[str], steps: list[int], grad_type: str) -> dict[str, list[Any]]:
    from lessctl.store import open_store

    grads_dir = cfg.output_dir / "grads"
    out: dict[str, list[Any]] = {}
    try:
        for n in names:
            out[n] = [open_store(grads_dir, n, s, grad_type) for s in steps]
    except MissingArtifactError:
        for rs in out.values():
            for r in rs:
                r.close()
        raise
    return out


def check_compatible(readers: list[Any], dim: int) -> None:
    """Refuses stores of different projections, dimensions or base models."""
    from lessctl.projection import same_projection

    first = readers[0]
    for r in readers:
        if dim not in r.dims:
            raise InputError(f"{r.paths[0]} has no dimension {dim} (it has {r.dims}); run `lessctl grads --dims {dim}`")
        diff = same_projection(first.projector, r.projector)
        if diff:
            raise InputError(f"{first.paths[0].name} and {r.paths[0].name} were projected differently ({diff[0]}); "
                             "recompute one of them with the same --projector (and --force)")
        if r.attrs.get("base_model") != first.attrs.get("base_model"):
            raise InputError(f"{first.paths[0].name} and {r.paths[0].name} come from different base models")


@dataclass
class SelectionResult:
    target: str
    method: str
    out_dir: Path
    file: Path
    n_selected: int
    total: int
    summary: dict
    scored: Scored | None = None  # every pool row's score, unrounded (sorted.csv keeps 6 decimals)


def run_match(
    cfg: Config,
    target: str,
    *,
    method: str = "less",
    ckpts: list[int] | None = None,
    weights: list[float] | None = None,
    percentage: float | None = None,
    max_samples: int | None = None,
    train: list[str] | None = None,
    dim: int | None = None,
    out_name: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SelectionResult:
    """Scores the pool for one target with one method and writes selected/<target>/<method>/."""
    from lessctl.data import example_text, read_jsonl
    from lessctl.store import sha256_file
    from lessctl.training import read_checkpoints

    if method not in METHODS:
        raise ConfigError(f"--method: expected one of {', '.join(METHODS)}, got {method!r}")
    if target not in cfg.data.targets:
        raise ConfigError(f"--target: unknown target {target!r} (the workspace's targets: {', '.join(cfg.data.targets) or 'none'})")
    t0 = time.time()
    files = cfg.train_files()
    train = list(train) if train else list(files)
    for n in train:
        if n not in files:
            raise ConfigError(f"--train: unknown training set {n!r} (the workspace's: {', '.join(files)})")
    percentage = cfg.select.percentage if percentage is None else percentage
    if max_samples is None and not 0 < percentage <= 1:
        raise ConfigError(f"--percentage: must be in (0, 1], got {percentage}")
    records = {n: read_jsonl(files[n]) for n in train}
    subtasks, prompts = _target_subtasks_and_prompts(cfg, target)
    info: dict[str, Any] = {}

    if method == "less":
        manifest = read_checkpoints(cfg)
        by_step = {c["step"]: c for c in manifest}
        steps = list(ckpts) if ckpts else [c["step"] for c in manifest]
        for s in steps:
            if s not in by_step:
                raise ConfigError(f"--ckpts: no checkpoint {s} in checkpoints.json (have: {', '.join(map(str, by_step))})")
        if weights:
            if len(weights) != len(steps):
                raise ConfigError(f"--weights: {len(weights)} weights for {len(steps)} checkpoints")
            w = normalize_weights(weights)
        else:
            w = normalize_weights([by_step[s]["lr_mean"] for s in steps])
        dim = dim or max(cfg.grads.dims)
        train_readers = _open_stores(cfg, train, steps, "adam")
        target_readers = _open_stores(cfg, [target], steps, "sgd")[target]
        try:
            everything = [r for rs in train_readers.values() for r in rs] + target_readers
            check_compatible(everything, dim)
            for n, rs in train_readers.items():
                if rs[0].n_rows != len(records[n]) or any(r.n_rows != rs[0].n_rows for r in rs):
                    raise InputError(f"the stores of '{n}' hold {rs[0].n_rows} rows but {files[n]} has {len(records[n])} examples; "
                                     f"the file changed: recompute with `lessctl grads --train {n} --force`")
                sha = sha256_file(files[n])
                if rs[0].attrs.get("source_sha256") != sha:
                    raise InputError(f"{files[n]} changed since its gradient store was written; recompute with `lessctl grads --train {n} --force`")
            if target_readers[0].n_rows != len(subtasks):
                raise InputError(f"the '{target}' stores hold {target_readers[0].n_rows} rows but the target has {len(subtasks)} examples; "
                                 f"recompute with `lessctl grads --target {target} --force`")
            scored = less_scores(train_readers, target_readers, w, subtasks, dim, progress)
        finally:
            for r in [r for rs in train_readers.values() for r in rs] + target_readers:
                r.close()
        info = {"checkpoints": steps, "weights": [float(x) for x in w], "dim": dim,
                "projector": target_readers[0].projector}
    elif method == "bm25":
        texts = {n: [(r.line, example_text(r.data)) for r in recs] for n, recs in records.items()}
        scored = bm25_scores(texts, prompts, subtasks)
        info = {"bm25": {"k1": 1.5, "b": 0.75, "epsilon": 0.25}}
    else:
        scored = random_scores({n: [r.line for r in recs] for n, recs in records.items()}, cfg.experiment.seed)
        info = {"seed": cfg.experiment.seed}

    total = len(scored.scores)
    k = n_selected(total, percentage, max_samples)
    order = top_order(scored.scores)
    out_dir = cfg.output_dir / "selected" / target / (out_name or method)
    out_dir.mkdir(parents=True, exist_ok=True)
    fname = f"top_n{k}.jsonl" if max_samples is not None else f"top_p{percentage:g}.jsonl"
    raw = {n: {r.line: r for r in recs} for n, recs in records.items()}
    _write_atomic(out_dir / "sorted.csv", _sorted_csv(scored, order))
    chosen = [raw[scored.names[i]][int(scored.index[i])] for i in order[:k]]
    _write_atomic(out_dir / fname, "".join(r.raw + "\n" for r in chosen))
    sel_scores = scored.scores[order[:k]]
    summary = {
        "target": target, "method": method, "file": fname, "selected": k, "total": total,
        "percentage": percentage if max_samples is None else None, "max_samples": max_samples,
        "by_train_set": _count(scored.names[i] for i in order[:k]),
        **{f"by_{key}": _count(r.data.get(key) for r in chosen) for key in SUMMARY_KEYS
           if any(key in r.data for r in chosen)},
        "score": _stats(scored.scores), "selected_score": _stats(sel_scores),
        "subtasks": len(set(subtasks)), "target_examples": len(subtasks),
        **info, "seconds": round(time.time() - t0, 3),
    }
    _write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    return SelectionResult(target, method, out_dir, out_dir / fname, k, total, summary, scored)


def _sorted_csv(scored: Scored, order: np.ndarray) -> str:
    lines = ["file name, index, score"]
    lines += [f"{scored.names[i]}, {int(scored.index[i])}, {scored.scores[i]:.6f}" for i in order]
    return "\n".join(lines) + "\n"


def read_sorted_csv(path: Path) -> list[tuple[str, int, float]]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh, skipinitialspace=True))
    return [(r[0], int(r[1]), float(r[2])) for r in rows[1:]]


def _count(values) -> dict:
    out: dict = {}
    for v in values:
        if v is not None:
            out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _stats(x: np.ndarray) -> dict:
    if len(x) == 0:
        return {}
    return {"min": float(x.min()), "max": float(x.max()), "mean": float(x.mean()), "median": float(np.median(x))}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
