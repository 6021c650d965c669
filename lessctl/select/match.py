"""Influence scores, subtask aggregation, top-k selection, and the random and BM25 baselines (LESS.md section 5).

score[i, j] = sum_c w_c <x_i^c, y_j^c> over checkpoints c (rows are unit vectors, so cosines), then
the mean over the target examples of each subtask, then the max over subtasks. Training rows are
streamed from the stores in chunks, so memory stays bounded whatever the pool's size.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lessctl import paths
from lessctl.config import Config
from lessctl.errors import AlreadyExistsError, ConfigError, InputError, MissingArtifactError
from lessctl.files import write_atomic
from lessctl.select.baselines import BM25_PARAMS, bm25_scores, random_scores
from lessctl.select.scores import Scored, check_compatible, check_rows, less_scores, normalize_weights
from lessctl.vocab import METHODS

log = logging.getLogger(__name__)


SUMMARY_KEYS = ("family", "dataset", "source_task")


def top_order(scores: np.ndarray) -> np.ndarray:
    """Row positions by descending score; ties keep pool order; rows without a score (NaN) come last."""
    return np.argsort(-scores, kind="stable")


def n_selected(total: int, percentage: float | None, max_samples: int | None) -> int:
    if max_samples is not None:
        if max_samples < 1:
            raise ConfigError("--max-samples: must be at least 1")
        return min(max_samples, total)
    return int(percentage * total)


# ----------------------------------------------------------------------------- the stage


def selection_dir(cfg: Config, target: str, method: str) -> Path:
    return paths.selection_dir(cfg.output_dir, target, method)


def selection_file(cfg: Config, target: str, method: str) -> Path:
    """The jsonl a selection wrote (named in its summary.json)."""
    d = selection_dir(cfg, target, method)
    summary = d / "summary.json"
    if not summary.is_file():
        raise MissingArtifactError(
            f"no selection for target '{target}' with method '{method}' in {d}; run `lessctl match --target {target} "
            f"--method {method}` first"
        )
    from lessctl.select.readback import read_summary

    return d / read_summary(summary)["file"]


def _lr_weight_source(cfg: Config) -> tuple[str, str]:  # where the default checkpoint weights come from
    return f"{paths.checkpoints_file(cfg.output_dir)} (lr_mean)", (
        ": the weights are the warmup's mean learning rates, and no step learned (learning rate 0: a warmup of "
        "one step spent warming up?); give --weights, or train a longer warmup with `lessctl warmup --force`"
    )


def _target_subtasks_and_prompts(cfg: Config, target: str) -> tuple[list[str], list[str]]:
    from lessctl.data.targets import load_target_examples

    exs = load_target_examples(cfg, target)
    return [e.subtask for e in exs], [e.prompt for e in exs]


def _open_stores(cfg: Config, names: list[str], steps: list[int], grad_type: str) -> dict[str, list[Any]]:
    from lessctl.grads.store.reader import open_store

    grads_dir = paths.grads_dir(cfg.output_dir)
    out: dict[str, list[Any]] = {}
    try:
        for n in names:
            out[n] = [open_store(grads_dir, n, s, grad_type) for s in steps]
    except BaseException:
        for rs in out.values():
            for r in rs:
                r.close()
        raise
    return out


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
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> SelectionResult:
    """Scores the pool for one target with one method and writes selected/<target>/<method>/.

    An existing selection there is replaced only with `force`; every check runs before anything is written.
    """
    from lessctl.data.records import example_text, read_examples
    from lessctl.grads.stage import data_sets
    from lessctl.training import read_checkpoints, warmup_run_id

    if method not in METHODS:
        raise ConfigError(f"--method: expected one of {', '.join(METHODS)}, got {method!r}")
    if target not in cfg.data.targets:
        raise ConfigError(
            f"--target: unknown target {target!r} (the workspace's targets: {', '.join(cfg.data.targets) or 'none'})"
        )
    t0 = time.time()
    files = cfg.train_files()
    train = list(train) if train else list(files)
    for n in train:
        if n not in files:
            raise ConfigError(f"--train: unknown training set {n!r} (the workspace's: {', '.join(files)})")
    percentage = cfg.select.percentage if percentage is None else percentage
    if max_samples is None and not 0 < percentage <= 1:
        raise ConfigError(f"--percentage: must be in (0, 1], got {percentage}")
    out_dir = paths.selection_dir(cfg.output_dir, target, out_name or method)
    records = {n: read_examples(files[n]) for n in train}
    subtasks, prompts = _target_subtasks_and_prompts(cfg, target)
    info: dict[str, Any] = {}

    if method == "less":
        manifest = read_checkpoints(cfg)
        by_step = {c["step"]: c for c in manifest}
        steps = list(ckpts) if ckpts else [c["step"] for c in manifest]
        for s in steps:
            if s not in by_step:
                raise ConfigError(
                    f"--ckpts: no checkpoint {s} in checkpoints.json (have: {', '.join(map(str, by_step))})"
                )
        if weights:
            if len(weights) != len(steps):
                raise ConfigError(f"--weights: {len(weights)} weights for {len(steps)} checkpoints")
            w = normalize_weights(weights)
        else:
            w = normalize_weights([by_step[s]["lr_mean"] for s in steps], *_lr_weight_source(cfg))
        dim = dim or max(cfg.grads.dims)
        _refuse_existing(out_dir, force)
        train_readers = _open_stores(cfg, train, steps, "adam")
        target_readers = _open_stores(cfg, [target], steps, "sgd")[target]
        try:
            everything = [r for rs in train_readers.values() for r in rs] + target_readers
            check_compatible(everything, dim)
            run_id = warmup_run_id(cfg)
            for ds in data_sets(cfg, train, [target], None):  # first: it says which file, or whose store, it is
                _check_source(ds, train_readers[ds.name] if ds.role == "train" else target_readers, run_id)
            for n, rs in train_readers.items():
                if rs[0].n_rows != len(records[n]) or any(r.n_rows != rs[0].n_rows for r in rs):
                    raise InputError(
                        f"the stores of '{n}' hold {rs[0].n_rows} rows but {files[n]} has {len(records[n])} examples; "
                        f"the file changed: recompute with `lessctl grads --train {n}`"
                    )
            if target_readers[0].n_rows != len(subtasks):
                raise InputError(
                    f"the '{target}' stores hold {target_readers[0].n_rows} rows but the target has {len(subtasks)} "
                    f"examples; "
                    f"recompute with `lessctl grads --target {target}`"
                )
            check_rows(target_readers, dim)
            scored = less_scores(train_readers, target_readers, w, subtasks, dim, progress)
        finally:
            for r in [r for rs in train_readers.values() for r in rs] + target_readers:
                r.close()
        info = {
            "checkpoints": steps,
            "weights": [float(x) for x in w],
            "dim": dim,
            "projector": target_readers[0].projector,
        }
    elif method == "rds":
        from lessctl.select.rds import rds_scores

        n_examples = {n: len(recs) for n, recs in records.items()}
        scored, info = rds_scores(
            cfg, target, files, n_examples, subtasks, ckpts, weights=weights, dim=dim, progress=progress
        )
    elif method == "dsir":
        from lessctl.select.dsir import dsir_scores, target_texts

        texts = {n: [(r.line, example_text(r.data)) for r in recs] for n, recs in records.items()}
        scored, info = dsir_scores(texts, target_texts(cfg, target), cfg.experiment.seed)
    elif method == "bm25":
        _refuse_existing(out_dir, force)
        texts = {n: [(r.line, example_text(r.data)) for r in recs] for n, recs in records.items()}
        scored = bm25_scores(texts, prompts, subtasks)
        info = {"bm25": dict(BM25_PARAMS)}
    else:
        _refuse_existing(out_dir, force)
        scored = random_scores({n: [r.line for r in recs] for n, recs in records.items()}, cfg.experiment.seed)
        info = {"seed": cfg.experiment.seed}

    total = len(scored.scores)
    k = n_selected(total, percentage, max_samples)
    if k == 0:
        raise ConfigError(f"--percentage: {percentage:g} of {total} examples selects none; give a larger share")
    unscored = int(np.isnan(scored.scores).sum())
    k = min(k, total - unscored)  # rows without a score are never taken
    order = top_order(scored.scores)
    out_dir.mkdir(parents=True, exist_ok=True)
    fname = f"top_n{k}.jsonl" if max_samples is not None else f"top_p{percentage:g}.jsonl"
    raw = {n: {r.line: r for r in recs} for n, recs in records.items()}
    write_atomic(out_dir / "sorted.csv", _sorted_csv(scored, order))
    chosen = [raw[scored.names[i]][int(scored.index[i])] for i in order[:k]]
    write_atomic(out_dir / fname, "".join(r.raw + "\n" for r in chosen))
    sel_scores = scored.scores[order[:k]]
    summary = {
        "target": target,
        "method": method,
        "file": fname,
        "selected": k,
        "total": total,
        "percentage": percentage if max_samples is None else None,
        "max_samples": max_samples,
        "by_train_set": _count(scored.names[i] for i in order[:k]),
        **{
            f"by_{key}": _count(r.data.get(key) for r in chosen)
            for key in SUMMARY_KEYS
            if any(key in r.data for r in chosen)
        },
        "no_label_rows": unscored,
        "score": _stats(scored.scores),
        "selected_score": _stats(sel_scores),
        "subtasks": len(set(subtasks)),
        "target_examples": len(subtasks),
        **info,
        "seconds": round(time.time() - t0, 3),
    }
    write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    return SelectionResult(target, method, out_dir, out_dir / fname, k, total, summary, scored)


def _refuse_existing(out_dir: Path, force: bool) -> None:
    if (out_dir / "summary.json").exists() and not force:
        raise AlreadyExistsError(
            f"{out_dir} already holds a selection; pass --force to replace it (`lessctl run` then redoes the "
            "finetune on it)"
        )


def _check_source(ds: Any, readers: list[Any], run_id: str | None) -> None:
    """An InputError when a data set's files changed, or the warmup was trained again, since any of its stores
    was written."""
    from lessctl.files import source_sha256
    from lessctl.grads.stage import stale_reason

    sha = source_sha256(ds.files)
    for r in readers:
        if why := stale_reason(r.attrs, sha, run_id, ds.files[0]):
            raise InputError(
                f"gradient store {r.paths[0].name}: {why}; `lessctl grads --{ds.role} {ds.name}` recomputes it"
            )


def _sorted_csv(scored: Scored, order: np.ndarray) -> str:
    lines = ["file name, index, score"]
    lines += [f"{scored.names[i]}, {int(scored.index[i])}, {scored.scores[i]:.6f}" for i in order]
    return "\n".join(lines) + "\n"


def read_sorted_csv(path: Path) -> list[tuple[str, int, float]]:
    from lessctl.select.readback import read_sorted_csv as checked

    return checked(path)


def _count(values) -> dict:
    out: dict = {}
    for v in values:
        if v is not None:
            out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _stats(x: np.ndarray) -> dict:
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return {}
    return {"min": float(x.min()), "max": float(x.max()), "mean": float(x.mean()), "median": float(np.median(x))}
