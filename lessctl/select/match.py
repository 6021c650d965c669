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

from lessctl.config import Config
from lessctl.errors import AlreadyExistsError, ConfigError, InputError, MissingArtifactError
from lessctl.files import write_atomic
from lessctl.outputs import artifacts, provenance
from lessctl.outputs import layout as paths
from lessctl.select.baselines import BM25_PARAMS, bm25_scores, random_scores
from lessctl.select.scores import Scored, check_compatible, check_rows, less_scores, normalize_weights
from lessctl.vocab import CHECKPOINT_METHODS, METHODS, REPS_METHODS

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
    found = artifacts.selection_jsonl(cfg.output_dir, target, method)
    if found is None:
        d = selection_dir(cfg, target, method)
        damaged = paths.selection_summary(cfg.output_dir, target, method).exists()
        what = "a readable selection" if damaged else "selection"
        raise MissingArtifactError(
            f"no {what} for target '{target}' with method '{method}' in {d}; run `lessctl match --target {target} "
            f"--method {method}{' --force' if what != 'selection' else ''}` first"
        )
    return found


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
    from lessctl.data.records import read_examples

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
    reads_stores = method in CHECKPOINT_METHODS or method in REPS_METHODS
    fingerprint = provenance.selection_fingerprint(
        cfg,
        target,
        method,
        ckpts=ckpts,
        weights=weights,
        percentage=percentage,
        max_samples=max_samples,
        train=train if train != list(files) else None,
        dim=dim,
        warmup_run=artifacts.warmup_run_id(cfg.output_dir) if reads_stores else None,
    )
    if method in CHECKPOINT_METHODS:  # the options are checked before any existing selection is looked at
        less_checkpoints(cfg, ckpts, weights)
    elif method in REPS_METHODS:
        from lessctl.select.rds import rds_step

        rds_step(cfg, ckpts)
    _refuse_existing(cfg, target, out_name or method, fingerprint, force)
    records = {n: read_examples(files[n]) for n in train}
    subtasks, prompts = _target_subtasks_and_prompts(cfg, target)
    job = _Scoring(cfg, target, files, train, records, subtasks, prompts, ckpts, weights, dim, progress)
    scored, info = SCORERS[method](job)

    total = len(scored.scores)
    k = n_selected(total, percentage, max_samples)
    if k == 0:
        raise ConfigError(f"--percentage: {percentage:g} of {total} examples selects none; give a larger share")
    unscored = int(np.isnan(scored.scores).sum())
    k = min(k, total - unscored)  # rows without a score are never taken
    order = top_order(scored.scores)
    out_dir.mkdir(parents=True, exist_ok=True)
    fname = paths.selection_file_name(percentage, max_samples, k)
    raw = {n: {r.line: r for r in recs} for n, recs in records.items()}
    chosen = [raw[scored.names[i]][int(scored.index[i])] for i in order[:k]]
    write_atomic(out_dir / fname, "".join(r.raw + "\n" for r in chosen))
    sel_scores = scored.scores[order[:k]]
    summary = {
        "id": artifacts.new_id(),
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
        "fingerprint": fingerprint.to_dict(),
    }
    write_atomic(out_dir / paths.SORTED_FILE, _sorted_csv(scored, order))
    write_atomic(out_dir / paths.SUMMARY_FILE, json.dumps(summary, indent=2, default=str))
    return SelectionResult(target, method, out_dir, out_dir / fname, k, total, summary, scored)


def _refuse_existing(cfg: Config, target: str, selection: str, now: provenance.Fingerprint, force: bool) -> None:
    """One rule for every method: an existing selection is replaced only with `force`; the refusal says whether
    it is current or what changed since it was made."""
    out_dir = paths.selection_dir(cfg.output_dir, target, selection)
    if force or not paths.selection_summary(cfg.output_dir, target, selection).exists():
        return
    state = artifacts.selection_state(cfg.output_dir, target, selection, now)
    what = "this very selection (current)" if state.current else f"a selection made otherwise ({state.reason})"
    raise AlreadyExistsError(
        f"{out_dir} already holds {what}; pass --force to replace it (`lessctl run` then redoes the finetune on it)"
    )


@dataclass
class _Scoring:
    """What every method's scorer reads."""

    cfg: Config
    target: str
    files: dict[str, Path]
    train: list[str]
    records: dict[str, list[Any]]
    subtasks: list[str]
    prompts: list[str]
    ckpts: list[int] | None
    weights: list[float] | None
    dim: int | None
    progress: Callable[[int, int], None] | None

    def texts(self) -> dict[str, list[tuple[int, str]]]:
        from lessctl.data.records import example_text

        return {n: [(r.line, example_text(r.data)) for r in recs] for n, recs in self.records.items()}


def less_checkpoints(cfg: Config, ckpts: list[int] | None, weights: list[float] | None) -> tuple[list[int], Any]:
    """(checkpoint steps, normalized weights) of a LESS selection: every checkpoint weighted by its mean learning
    rate unless --ckpts / --weights say otherwise; ConfigError naming the option."""
    from lessctl.training import read_checkpoints

    manifest = read_checkpoints(cfg)
    by_step = {c["step"]: c for c in manifest}
    steps = list(ckpts) if ckpts else [c["step"] for c in manifest]
    for s in steps:
        if s not in by_step:
            raise ConfigError(f"--ckpts: no checkpoint {s} in checkpoints.json (have: {', '.join(map(str, by_step))})")
    if weights:
        if len(weights) != len(steps):
            raise ConfigError(f"--weights: {len(weights)} weights for {len(steps)} checkpoints")
        return steps, normalize_weights(weights)
    return steps, normalize_weights([by_step[s]["lr_mean"] for s in steps], *_lr_weight_source(cfg))


def _score_less(j: _Scoring) -> tuple[Scored, dict]:
    from lessctl.grads.stage import data_sets
    from lessctl.training import warmup_run_id

    cfg, target, files, records, subtasks = j.cfg, j.target, j.files, j.records, j.subtasks
    steps, w = less_checkpoints(cfg, j.ckpts, j.weights)
    dim = j.dim or max(cfg.grads.dims)
    train_readers = _open_stores(cfg, j.train, steps, "adam")
    target_readers = _open_stores(cfg, [target], steps, "sgd")[target]
    try:
        everything = [r for rs in train_readers.values() for r in rs] + target_readers
        check_compatible(everything, dim)
        run_id = warmup_run_id(cfg)
        for ds in data_sets(cfg, j.train, [target], None):  # first: it says which file, or whose store, it is
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
                f"examples; recompute with `lessctl grads --target {target}`"
            )
        check_rows(target_readers, dim)
        scored = less_scores(train_readers, target_readers, w, subtasks, dim, j.progress)
    finally:
        for r in [r for rs in train_readers.values() for r in rs] + target_readers:
            r.close()
    info = {
        "checkpoints": steps,
        "weights": [float(x) for x in w],
        "dim": dim,
        "projector": target_readers[0].projector,
    }
    return scored, info


def _score_rds(j: _Scoring) -> tuple[Scored, dict]:
    from lessctl.select.rds import rds_scores

    n_examples = {n: len(recs) for n, recs in j.records.items()}
    return rds_scores(
        j.cfg, j.target, j.files, n_examples, j.subtasks, j.ckpts, weights=j.weights, dim=j.dim, progress=j.progress
    )


def _score_dsir(j: _Scoring) -> tuple[Scored, dict]:
    from lessctl.select.dsir import dsir_scores, target_texts

    return dsir_scores(j.texts(), target_texts(j.cfg, j.target), j.cfg.experiment.seed)


def _score_bm25(j: _Scoring) -> tuple[Scored, dict]:
    return bm25_scores(j.texts(), j.prompts, j.subtasks), {"bm25": dict(BM25_PARAMS)}


def _score_random(j: _Scoring) -> tuple[Scored, dict]:
    seed = j.cfg.experiment.seed
    return random_scores({n: [r.line for r in recs] for n, recs in j.records.items()}, seed), {"seed": seed}


# Every selection method's scorer, keyed by the vocabulary's methods (lessctl.vocab.METHODS).
SCORERS: dict[str, Callable[[_Scoring], tuple[Scored, dict]]] = {
    "less": _score_less,
    "random": _score_random,
    "bm25": _score_bm25,
    "rds": _score_rds,
    "dsir": _score_dsir,
}
assert set(SCORERS) == set(METHODS), "every method of lessctl.vocab.METHODS needs a scorer"


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
    from lessctl.outputs.readback import read_sorted_csv as checked

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
