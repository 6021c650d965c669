"""RDS (representation-based data selection, LESS's baseline): cosine of last-token hidden states, LESS's aggregation.

score[i] = max over subtasks s of mean over target examples j in s of cos(h_i, h_j), where h are the
representations `lessctl grads --type reps` stores at one warmup checkpoint (unit rows, so dot products).
The pool is streamed from the stores exactly as LESS's scores are (select.scores.less_scores, one checkpoint
of weight 1).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

from lessctl.config import Config
from lessctl.errors import ConfigError, InputError, MissingArtifactError
from lessctl.outputs import layout as paths
from lessctl.select.scores import Scored, check_compatible, less_scores
from lessctl.vocab import REPS

log = logging.getLogger(__name__)


def _open(grads_dir: Path, name: str, step: int):
    from lessctl.grads.store.reader import open_store

    try:
        return open_store(grads_dir, name, step, REPS)
    except MissingArtifactError as e:  # the reader names `lessctl grads --ckpt S`; reps stores need --type reps
        raise MissingArtifactError(str(e).replace("`lessctl grads --ckpt", "`lessctl grads --type reps --ckpt")) from e


def rds_step(cfg: Config, ckpts: Sequence[int] | None) -> int:
    """The checkpoint whose representations RDS uses: the one --ckpts names, else the last warmup checkpoint."""
    from lessctl.training import read_checkpoints

    have = [c["step"] for c in read_checkpoints(cfg)]
    if not ckpts:
        return have[-1]
    if len(ckpts) != 1:
        raise ConfigError(f"--ckpts: rds uses the representations of one checkpoint, got {len(ckpts)}")
    if ckpts[0] not in have:
        raise ConfigError(f"--ckpts: no checkpoint {ckpts[0]} in checkpoints.json (have: {', '.join(map(str, have))})")
    return ckpts[0]


def rds_scores(
    cfg: Config,
    target: str,
    files: dict[str, Path],
    n_examples: dict[str, int],
    subtasks: Sequence[str],
    ckpts: Sequence[int] | None = None,
    *,
    weights: Sequence[float] | None = None,
    dim: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Scored, dict[str, Any]]:
    """RDS scores of every row of the training sets in `n_examples` (name -> examples in its file) for `target`."""
    from lessctl.files import sha256_file

    if weights:
        raise ConfigError("--weights: rds uses one checkpoint's representations; there is nothing to weigh")
    step = rds_step(cfg, ckpts)
    grads_dir = paths.grads_dir(cfg.output_dir)
    readers: dict[str, list[Any]] = {}
    target_reader = None
    try:
        for n in n_examples:
            readers[n] = [_open(grads_dir, n, step)]
        target_reader = _open(grads_dir, target, step)
        everything = [rs[0] for rs in readers.values()] + [target_reader]
        if dim is not None and dim not in target_reader.dims:
            raise ConfigError(f"--dim: rds features have the model's hidden size {target_reader.dims[0]}, not {dim}")
        dim = target_reader.dims[0]
        check_compatible(everything, dim)
        for n, (r,) in readers.items():
            if r.n_rows != n_examples[n]:
                raise InputError(
                    f"the reps store of '{n}' holds {r.n_rows} rows but {files[n]} has {n_examples[n]} examples; "
                    f"the file changed: recompute with `lessctl grads --type reps --train {n} --force`"
                )
            if r.attrs.get("source_sha256") != sha256_file(files[n]):
                raise InputError(
                    f"{files[n]} changed since its reps store was written; recompute with `lessctl grads --type reps "
                    f"--train {n} --force`"
                )
        if target_reader.n_rows != len(subtasks):
            raise InputError(
                f"the '{target}' reps store holds {target_reader.n_rows} rows but the target has {len(subtasks)} "
                f"examples; recompute with `lessctl grads --type reps --target {target} --force`"
            )
        scored = less_scores(readers, [target_reader], [1.0], subtasks, dim, progress)
    finally:
        for r in [rs[0] for rs in readers.values()] + ([target_reader] if target_reader else []):
            r.close()
    return scored, {"checkpoint": step, "dim": dim, "features": "last-token hidden state (reps)"}
