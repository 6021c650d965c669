"""The grads stage: for each checkpoint and data set, per-example features projected into a gradient store."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lessctl import __version__
from lessctl.config import Config
from lessctl.data.targets import _target_spec, load_target_examples
from lessctl.errors import ConfigError, InputError
from lessctl.files import source_sha256
from lessctl.outputs import layout as paths

log = logging.getLogger(__name__)


# Rows computed between two flushes of the store (what a kill -9 can lose at most). They are also the unit
# that gets sorted by length into batches: more rows, less padding (at 7B on an H100 256 rows take ~10 s).
FLUSH_ROWS = int(os.environ.get("LESSCTL_FLUSH_ROWS", "256"))


@dataclass
class DataSet:
    """One data set to collect: a training file (adam by default) or a target (sgd by default)."""

    name: str
    role: str  # "train" | "target"
    grad_type: str
    files: list[Path]
    spec: Any = None

    def encode(self, cfg: Config, tok) -> list:
        from lessctl.data.encoding import encode_record, encode_target_example
        from lessctl.data.records import read_examples

        L = cfg.model.max_seq_length
        if self.role == "train":
            return [encode_record(r, tok, L, cfg.model.chat_format, self.name) for r in read_examples(self.files[0])]
        return [
            encode_target_example(ex.prompt, ex.completion, tok, L, i, self.name, {"subtask": ex.subtask})
            for i, ex in enumerate(load_target_examples(cfg, self.name, tok))
        ]


# What max_seq_length cut of a data set, as store attributes (stores written before them lack them).
TRUNCATION_ATTRS = {
    "truncated_examples": "truncated",
    "label_tokens": "label_tokens",
    "truncated_label_tokens": "truncated_label_tokens",
    "lost_label_tokens": "lost_label_tokens",
}


def truncation_report(enc: list, cfg: Config, name: str, shard: tuple[int, int] | None, logged: set[str]):
    """What the cut at max_seq_length cost the data set (all of its rows, whatever the shard); logged once per
    run and data set (by shard 1 of a sharded run): a `warning:` line when it is too costly."""
    from lessctl.data.encoding import TruncationReport

    rep = TruncationReport.of(enc, cfg.model.max_seq_length)
    if name not in logged and (shard is None or shard[0] == 1):
        logged.add(name)
        rep.log(name)
    return rep


def truncation_from_attrs(attrs: dict) -> dict | None:
    """A store's truncation figures (`TruncationReport.to_dict`); None for a store written before they were kept."""
    from lessctl.data.encoding import TruncationReport

    if not all(k in attrs for k in TRUNCATION_ATTRS):
        return None
    fields = {f: attrs[k] for k, f in TRUNCATION_ATTRS.items()}
    return TruncationReport(int(attrs["max_seq_length"]), int(attrs["total_rows"]), **fields).to_dict()


def data_sets(cfg: Config, train: list[str] | None, targets: list[str] | None, grad_type: str | None) -> list[DataSet]:
    """The data sets a grads run covers: all of the workspace's unless names are given."""
    from lessctl.data.targets import target_source_files

    files = cfg.train_files()
    if train is None and targets is None:
        train, targets = list(files), list(cfg.data.targets)
    out = []
    for n in train or []:
        if n not in files:
            raise ConfigError(f"--train: unknown training set {n!r} (the workspace's: {', '.join(files) or 'none'})")
        out.append(DataSet(n, "train", grad_type or "adam", [files[n]]))
    for n in targets or []:
        spec = _target_spec(cfg, n)
        out.append(
            DataSet(
                n, "target", grad_type or "sgd", list(target_source_files(spec, cfg.resolve(cfg.data.data_dir))), spec
            )
        )
    return out


def shard_rows(n: int, shard: tuple[int, int] | None) -> tuple[int, int]:
    """The contiguous rows [start, end) of 1-based shard K of N."""
    if shard is None:
        return 0, n
    k, N = shard
    return (k - 1) * n // N, k * n // N


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard: expected K/N such as 2/8, got {text!r}") from None
    if not (n >= 1 and 1 <= k <= n):
        raise ConfigError(f"--shard: K must be between 1 and N, got {text!r}")
    return (k, n)


@dataclass
class StoreResult:
    path: Path
    name: str
    step: int
    grad_type: str
    rows: int
    status: str  # "written" | "resumed" | "skipped"
    seconds: float = 0.0
    examples_per_s: float = 0.0
    zero_label_rows: int = 0
    extra: dict = field(default_factory=dict)
    truncation: dict | None = None  # what max_seq_length cut of the data set (TruncationReport.to_dict)


def collect_gradients(
    cfg: Config,
    *,
    steps: list[int],
    dims: list[int] | None = None,
    train: list[str] | None = None,
    targets: list[str] | None = None,
    grad_type: str | None = None,
    projector: str | None = None,
    shard: tuple[int, int] | None = None,
    batch_tokens: int | None = None,
    force: bool = False,
    device: str | None = None,
    progress: Callable[..., None] | None = None,
    announce: Callable[[str], None] | None = None,
) -> list[StoreResult]:
    """Computes and stores the features of every selected data set at every selected checkpoint.

    dims and projector default to `[grads] dims` and `[grads] projector`. grad_type "reps" stores RDS's
    representations instead (collect_representations; dims and projector do not apply).
    """
    import torch

    from lessctl.vocab import REPS

    if grad_type == REPS:
        return collect_representations(
            cfg,
            steps=steps,
            train=train,
            targets=targets,
            shard=shard,
            batch_tokens=batch_tokens,
            force=force,
            device=device,
            progress=progress,
            announce=announce,
        )

    from lessctl.grads.adam import load_adam_state
    from lessctl.grads.collector import FeatureCollector
    from lessctl.grads.engine import PerExampleGradients
    from lessctl.grads.projection.choose import choose_projector_kind, make_projector
    from lessctl.grads.store.schema import store_path
    from lessctl.grads.store.writer import StoreWriter
    from lessctl.models import load_adapter_model, resolve_device
    from lessctl.training import checkpoint_dir, warmup_run_id

    device = resolve_device(device)
    dims = list(cfg.grads.dims) if dims is None else list(dims)
    projector = cfg.grads.projector if projector is None else projector
    if batch_tokens is not None and batch_tokens < 1:
        raise ConfigError(f"--batch-tokens: must be at least 1, got {batch_tokens}")
    batch_tokens = batch_tokens or cfg.grads.batch_tokens
    check_steps(cfg, steps)
    sets = data_sets(cfg, train, targets, grad_type)
    kind, why = choose_projector_kind(projector, device, dims)
    if announce:
        announce(f"projector: {kind} ({why})")
    grads_dir = paths.grads_dir(cfg.output_dir)
    grads_dir.mkdir(parents=True, exist_ok=True)
    base = cfg.model_ref()
    hashes: dict[str, str] = {}  # computed only for stores that get written, once per run
    run_id = warmup_run_id(cfg)
    projectors: dict[int, Any] = {}
    results: list[StoreResult] = []
    logged: set[str] = set()  # data sets whose truncation was logged

    widen = {} if force else _lacking_dims(sets, steps, dims, grads_dir, shard)
    all_dims = sorted(set(dims).union(*widen.values()))
    for step in steps:
        store_paths = {ds.name: store_path(grads_dir, ds.name, step, ds.grad_type, shard) for ds in sets}
        todo, stale = _todo(sets, store_paths, step, force, hashes, run_id, results, widen, cfg)
        if not todo:
            continue
        ckpt = checkpoint_dir(cfg, step)
        model, tok = load_adapter_model(ckpt, base=base, dtype=cfg.model.dtype, device=device, trainable=True)
        model.eval()  # no dropout: LESS takes gradients in eval mode
        merge = cfg.grads.merge and PerExampleGradients.can_merge(model)  # other adapters run unmerged
        peg = PerExampleGradients(model, merge=merge, compile=cfg.grads.compile)
        if not projectors:
            for d in all_dims:
                projectors[d] = make_projector(
                    kind, peg.grad_dim, d, device, seed=cfg.grads.projection_seed, block_size=cfg.grads.block_size
                )
            note = projectors[dims[0]].engine_note()
            if announce and note:
                announce(note)
        adam = None
        for ds in todo:
            if ds.grad_type == "adam" and adam is None:
                adam = load_adam_state(ckpt, peg.params, device)
            enc = ds.encode(cfg, tok)
            cut = truncation_report(enc, cfg, ds.name, shard, logged)
            store_dims = widen.get((ds.name, step), sorted(set(dims)))
            collector = FeatureCollector(
                peg,
                {d: projectors[d] for d in store_dims},
                ds.grad_type,
                adam if ds.grad_type == "adam" else None,
                pad_id=tok.pad_token_id,
                batch_tokens=batch_tokens,
            )
            start, end = shard_rows(len(enc), shard)
            index = np.array([e.line for e in enc[start:end]], dtype=np.int64)
            if ds.name not in hashes:
                hashes[ds.name] = source_sha256(ds.files)
            attrs = _store_attrs(cfg, ds, base, ckpt, step, ds.grad_type, hashes[ds.name], len(enc), start, shard)
            attrs.update(
                batch_tokens=batch_tokens,
                warmup_run=run_id,
                merge=bool(cfg.grads.merge),
                compile=bool(cfg.grads.compile),
                projector={**projectors[dims[0]].attrs, "kind": kind},
                **{k: getattr(cut, f) for k, f in TRUNCATION_ATTRS.items()},
            )
            t0 = time.time()
            zero = 0
            with StoreWriter(
                store_paths[ds.name], dims=store_dims, index=index, attrs=attrs, force=force, replace=ds.name in stale
            ) as w:
                done0 = w.rows_completed
                status = "resumed" if done0 else "written"
                pos = start + done0
                if progress:
                    progress(ds.name, step, done0, end - start)
                step_rows = window_rows(FLUSH_ROWS, collector.project_rows)
                while pos < end:
                    window = enc[pos : min(end, pos + step_rows)]
                    got = collector([e.input_ids for e in window], [e.labels for e in window])
                    zero += got.zero_label_rows
                    w.write(got.features)
                    pos += len(window)
                    if progress:
                        progress(ds.name, step, pos - start, end - start)
                w.finalize()
            secs = time.time() - t0
            n_new = end - start - done0
            results.append(
                StoreResult(
                    store_paths[ds.name],
                    ds.name,
                    step,
                    ds.grad_type,
                    end - start,
                    status,
                    secs,
                    n_new / secs if secs > 0 else 0.0,
                    zero,
                    truncation=cut.to_dict(),
                )
            )
        peg.remove()
        del model
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
    return results


def _store_attrs(
    cfg: Config,
    ds: DataSet,
    base,
    ckpt,
    step: int,
    grad_type: str,
    source_sha: str,
    total: int,
    start: int,
    shard: tuple[int, int] | None,
) -> dict:
    """The attributes every store of a data set at a checkpoint records, whatever its features."""
    return {
        "base_model": str(base),
        "checkpoint": str(ckpt),
        "step": step,
        "grad_type": grad_type,
        "source": ";".join(str(f) for f in ds.files),
        "source_sha256": source_sha,
        "role": ds.role,
        "dataset": ds.name,
        "total_rows": total,
        "row_start": start,
        "max_seq_length": cfg.model.max_seq_length,
        "chat_format": cfg.model.chat_format,
        "lessctl_version": __version__,
        "shard": shard[0] if shard else 1,
        "num_shards": shard[1] if shard else 1,
    }


def _lacking_dims(sets, steps, dims, grads_dir: Path, shard) -> dict[tuple[str, int], list[int]]:
    """{(data set, step): the dims to write} for each complete store that lacks some of `dims`: it is rewritten
    with the dims asked for and those it held, so that nothing it held is lost."""
    from lessctl.grads.store.schema import complete_attrs, store_path

    out = {}
    for step in steps:
        for ds in sets:
            old = complete_attrs(store_path(grads_dir, ds.name, step, ds.grad_type, shard))
            held = {int(d) for d in np.atleast_1d(old.get("dims"))} if old and old.get("dims") is not None else None
            if held is not None and not set(dims) <= held:
                out[(ds.name, step)] = sorted(held | set(dims))
    return out


def _todo(sets, store_paths, step: int, force: bool, hashes: dict, run_id, results: list, widen=None, cfg=None):
    """(data sets whose store at `step` must be written, the names among them whose complete store is stale);
    a current complete store is appended to `results` as skipped. `widen` names the complete stores that lack
    some of the dims asked for (`_lacking_dims`): they are stale too."""
    from lessctl.grads.store.schema import complete_attrs, name_problem

    todo, stale = [], set()
    for ds in sets:
        if not force and (why := name_problem(store_paths[ds.name])):
            raise InputError(
                f"gradient store {store_paths[ds.name]} {why}; remove it, or pass --force to recompute it in its place"
            )
        if not force and (old := complete_attrs(store_paths[ds.name])) is not None:
            if ds.name not in hashes:
                hashes[ds.name] = source_sha256(ds.files)
            why = stale_reason(old, hashes[ds.name], run_id, ds.files[0], cfg)
            if why is None and widen and (ds.name, step) in widen:
                lack = sorted(set(widen[(ds.name, step)]) - {int(d) for d in np.atleast_1d(old.get("dims"))})
                dims_now = ", ".join(map(str, widen[(ds.name, step)]))
                why = f"it lacks dim {', '.join(map(str, lack))}; writing dims {dims_now}"
            if why is None:
                res = StoreResult(store_paths[ds.name], ds.name, step, ds.grad_type, 0, "skipped")
                res.truncation = truncation_from_attrs(old)
                results.append(res)
                continue
            log.warning("%s: %s; recomputing it", store_paths[ds.name].name, why)
            stale.add(ds.name)
        todo.append(ds)
    return todo, stale


def stale_reason(
    attrs: dict, source_sha: str, run_id: str | None, source: Path, cfg: Config | None = None
) -> str | None:
    """Why a complete store no longer describes its data: its source changed, the warmup was trained again since
    (its checkpoints are other weights under the same steps), or (given `cfg`) it was computed with another
    projection seed, sequence length or chat format than the config's; None when it is current."""
    if attrs.get("source_sha256") != source_sha:
        return f"{source} changed since it was written (its sha256 differs)"
    if attrs.get("warmup_run") and run_id and attrs["warmup_run"] != run_id:
        return "the warmup was trained again since it was written (another warmup run)"
    if cfg is not None:
        for attr, now, key in (
            ("projector_seed", cfg.grads.projection_seed, "[grads] projection_seed"),
            ("max_seq_length", cfg.model.max_seq_length, "[model] max_seq_length"),
            ("chat_format", cfg.model.chat_format, "[model] chat_format"),
        ):
            if attr in attrs and attrs[attr] != now:
                return f"it was computed with {key} {attrs[attr]!r}, the config says {now!r}"
    return None


def window_rows(flush_rows: int, project_rows: int) -> int:
    """Rows per written window: `flush_rows`, rounded up to whole projection calls when a call takes fewer.
    A short last call costs nearly a full one (TRAK's CUDA projection generates its matrix once per call),
    so at 63 rows per call a window of 256 rows becomes 315: five full calls instead of four and a short one."""
    if project_rows >= flush_rows:
        return flush_rows
    return -(-flush_rows // project_rows) * project_rows


def check_steps(cfg: Config, steps: list[int]) -> None:
    """A ConfigError naming --ckpt unless every step is a checkpoint in warmup/checkpoints.json."""
    from lessctl.training import read_checkpoints

    manifest = [c["step"] for c in read_checkpoints(cfg)]
    for s in steps:
        if s not in manifest:
            raise ConfigError(
                f"--ckpt: no checkpoint {s} in warmup/checkpoints.json (have: {', '.join(map(str, manifest))})"
            )


def resolve_steps(cfg: Config, ckpts: list[int] | None, ckpt_index: int | None) -> list[int]:
    """--ckpt values, or the 1-based --ckpt-index position (Slurm arrays), or every checkpoint."""
    from lessctl.training import read_checkpoints

    manifest = read_checkpoints(cfg)
    if ckpt_index is not None:
        if not 1 <= ckpt_index <= len(manifest):
            raise ConfigError(f"--ckpt-index: expected 1..{len(manifest)}, got {ckpt_index}")
        return [manifest[ckpt_index - 1]["step"]]
    return list(ckpts) if ckpts else [c["step"] for c in manifest]


def collect_representations(
    cfg: Config,
    *,
    steps: list[int],
    train: list[str] | None = None,
    targets: list[str] | None = None,
    shard: tuple[int, int] | None = None,
    batch_tokens: int | None = None,
    force: bool = False,
    device: str | None = None,
    progress: Callable[..., None] | None = None,
    announce: Callable[[str], None] | None = None,
    **_: Any,
) -> list[StoreResult]:
    """RDS's representations (lessctl.grads.reps) of every selected data set at every selected checkpoint, into
    `<name>-ckpt<step>-reps.h5` stores written, resumed and sharded like gradient stores.

    Takes collect_gradients' arguments; dims and projector do not apply (the features are the hidden states).
    """
    import torch

    from lessctl.grads.batching import token_batches
    from lessctl.grads.reps import REPS_PROJECTOR, hidden_size, last_token_states
    from lessctl.grads.store.schema import store_path
    from lessctl.grads.store.writer import StoreWriter
    from lessctl.models import default_device, load_adapter_model
    from lessctl.training import checkpoint_dir, warmup_run_id
    from lessctl.vocab import REPS

    device = device or default_device()
    batch_tokens = batch_tokens or cfg.grads.batch_tokens
    check_steps(cfg, steps)
    sets = data_sets(cfg, train, targets, REPS)
    grads_dir = paths.grads_dir(cfg.output_dir)
    grads_dir.mkdir(parents=True, exist_ok=True)
    base = cfg.model_ref()
    hashes: dict[str, str] = {}
    run_id = warmup_run_id(cfg)
    results: list = []
    logged: set[str] = set()
    for step in steps:
        store_paths = {ds.name: store_path(grads_dir, ds.name, step, REPS, shard) for ds in sets}
        todo, stale = _todo(sets, store_paths, step, force, hashes, run_id, results, cfg=cfg)
        if not todo:
            continue
        ckpt = checkpoint_dir(cfg, step)
        model, tok = load_adapter_model(ckpt, base=base, dtype=cfg.model.dtype, device=device)
        model.eval()
        hidden = hidden_size(model)
        if announce:
            announce(f"representations: the last hidden state ({hidden} dimensions) at checkpoint {step}")
        for ds in todo:
            enc = ds.encode(cfg, tok)
            cut = truncation_report(enc, cfg, ds.name, shard, logged)
            start, end = shard_rows(len(enc), shard)
            if ds.name not in hashes:
                hashes[ds.name] = source_sha256(ds.files)
            attrs = _store_attrs(cfg, ds, base, ckpt, step, REPS, hashes[ds.name], len(enc), start, shard)
            attrs.update(batch_tokens=batch_tokens, warmup_run=run_id, projector={**REPS_PROJECTOR, "grad_dim": hidden})
            attrs.update({k: getattr(cut, f) for k, f in TRUNCATION_ATTRS.items()})
            index = np.array([e.line for e in enc[start:end]], dtype=np.int64)
            t0 = time.time()
            with StoreWriter(
                store_paths[ds.name], dims=[hidden], index=index, attrs=attrs, force=force, replace=ds.name in stale
            ) as w:
                done0 = w.rows_completed
                pos = start + done0
                if progress:
                    progress(ds.name, step, done0, end - start)
                while pos < end:
                    window = [e.input_ids for e in enc[pos : min(end, pos + FLUSH_ROWS)]]
                    rows = np.zeros((len(window), hidden), dtype=np.float32)
                    for batch in token_batches([len(s) for s in window], batch_tokens):
                        states = last_token_states(model, [window[i] for i in batch], tok.pad_token_id, device)
                        rows[batch] = states.cpu().numpy()
                    w.write({hidden: rows})
                    pos += len(window)
                    if progress:
                        progress(ds.name, step, pos - start, end - start)
                w.finalize()
            secs = time.time() - t0
            n_new = end - start - done0
            status = "resumed" if done0 else "written"
            rate = n_new / secs if secs > 0 else 0.0
            res = StoreResult(store_paths[ds.name], ds.name, step, REPS, end - start, status, secs, rate)
            res.truncation = cut.to_dict()
            results.append(res)
        del model
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
    return results
