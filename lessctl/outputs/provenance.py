"""Provenance, as build systems record it (Make, DVC, Bazel): the fingerprint of what made each artifact.

A fingerprint has three parts:
- `config`: the values of the config keys that change the artifact's numbers, a declared list per stage
  (`STAGE_KEYS`; keys that change only how a stage runs, such as packing or batch sizes of gradient
  collection, are listed in `HOW` and never make an artifact stale);
- `inputs`: the sha256 of the files it read (pool files, target files, a selection, an eval file);
- `upstream`: the ids of the artifacts it was made from (the warmup run, the selection, the adapter).

An artifact is current when its recorded fingerprint equals the one the plan would use now; `changes` says
what differs, in the words `lessctl run --dry-run` prints (`[select] percentage 0.05 -> 0.25`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from lessctl.files import sha256_file, source_sha256

if TYPE_CHECKING:
    from lessctl.config import Config

# Keys that change how a stage runs, not what it computes (the packed step equals the batch-of-one step; the
# gradient batch's token budget, merging and compilation give the same features; the eval batch and cache
# give the same greedy answers).
HOW = frozenset(
    {
        *(f"{s}.{k}" for s in ("warmup", "finetune") for k in ("packing", "pack_tokens", "report_to", "logging_steps")),
        "grads.batch_tokens",
        "grads.compile",
        "grads.merge",
        "grads.dims",  # a store holds several; a selection records the one dimension it used
        "eval.batch_size",
        "eval.kv_cache",
    }
)

# The config keys each stage's artifacts depend on; `section.*` is every key of the section but those in HOW.
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "warmup": ("model.name_or_path", "model.dtype", "model.max_seq_length", "model.chat_format", "lora.*", "warmup.*"),
    # the stores' own checks (source, warmup run, dims) are lessctl.grads.stage.stale_reason's; a selection made
    # from stores depends on what shaped their features:
    "grads": ("model.max_seq_length", "model.chat_format", "grads.*"),
    "match": ("select.percentage",),
    "finetune": ("model.dtype", "model.max_seq_length", "model.chat_format", "lora.*", "finetune.*"),
    "eval": ("model.dtype", "model.chat_format", "eval.limit", "eval.data_dir"),
}
# Evaluation keys that apply to one task only.
EVAL_TASK_KEYS: dict[str, tuple[str, ...]] = {
    "bbh": ("eval.bbh_examples_per_task",),
    "tydiqa": ("eval.tydiqa_questions_per_language",),
}

NO_RECORD = "no provenance record (made by a lessctl that did not record one)"


@dataclass(frozen=True)
class Fingerprint:
    """What made an artifact: config values by `section.key`, input files' sha256 by role, upstream ids."""

    config: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    upstream: dict[str, str | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))  # plain JSON values, as recorded

    @classmethod
    def from_dict(cls, d: Any) -> Fingerprint | None:
        """The recorded fingerprint, or None when `d` is not one (an older or damaged record)."""
        if not isinstance(d, dict) or not all(isinstance(d.get(k), dict) for k in ("config", "inputs", "upstream")):
            return None
        return cls(dict(d["config"]), dict(d["inputs"]), dict(d["upstream"]))


def _label(key: str) -> str:
    section, _, name = key.partition(".")
    return f"[{section}] {name}" if name else key


def _show(v: Any) -> str:
    if v is None:
        return "none"
    return json.dumps(v) if not isinstance(v, str) else v


def changes(recorded: Any, now: Fingerprint) -> list[str]:
    """What differs between a recorded fingerprint and `now`, one phrase each; [] when the artifact is current."""
    old = Fingerprint.from_dict(recorded)
    if old is None:
        return [NO_RECORD]
    new = now.to_dict()
    out: list[str] = []
    for key in sorted(set(old.config) | set(new["config"])):
        a, b = old.config.get(key, "unset"), new["config"].get(key, "unset")
        if a != b:
            out.append(f"{_label(key)} {_show(a)} -> {_show(b)}")
    for role in sorted(set(old.inputs) | set(new["inputs"])):
        a, b = old.inputs.get(role), new["inputs"].get(role)
        if a != b:
            out.append(
                f"{role} is new" if a is None else f"{role} no longer read" if b is None else f"{role} changed (sha256)"
            )
    for name in sorted(set(old.upstream) | set(new["upstream"])):
        a, b = old.upstream.get(name), new["upstream"].get(name)
        if a != b:
            out.append(f"{name} was made again" if a and b else f"{name} {_show(a)} -> {_show(b)}")
    return out


# ----------------------------------------------------------------------------- config values

_SHA: dict[tuple, str] = {}


def file_sha256(path: str | os.PathLike) -> str | None:
    """The sha256 of a file, computed once per process for the same (path, size, mtime); None when it is missing or
    not a regular file (a FIFO or a device is never opened here: the stage that reads it names the problem)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _SHA:
        _SHA[key] = sha256_file(p)
    return _SHA[key]


def files_sha256(files: Sequence[str | os.PathLike]) -> str | None:
    """lessctl.files.source_sha256 of several files from the memoized hashes; None when one is missing."""
    if any(file_sha256(f) is None for f in files):
        return None
    return source_sha256([Path(f) for f in files], file_sha256)


def stage_keys(cfg: Config, stage: str) -> list[str]:
    """The `section.key` names a stage's artifacts depend on, wildcards expanded."""
    out: list[str] = []
    for key in STAGE_KEYS[stage]:
        section, _, name = key.partition(".")
        if name == "*":
            names = [f.name for f in dataclasses.fields(getattr(cfg, section))]
            out += [k for k in (f"{section}.{n}" for n in names) if k not in HOW]
        else:
            out.append(key)
    return out


def config_values(cfg: Config, keys: Sequence[str]) -> dict[str, Any]:
    """{'section.key': value} as the workspace gives them (paths as written, not resolved)."""
    out = {}
    for key in keys:
        section, _, name = key.partition(".")
        v = getattr(getattr(cfg, section), name)
        out[key] = list(v) if isinstance(v, tuple) else v
    return out


# ----------------------------------------------------------------------------- fingerprints of each stage


def warmup_fingerprint(cfg: Config) -> Fingerprint:
    """The warmup: its settings and the pool files it drew its subset from."""
    files = cfg.train_files()
    return Fingerprint(
        config_values(cfg, stage_keys(cfg, "warmup")),
        {f"training set '{n}'": files_sha256([p]) for n, p in files.items()},
    )


def target_files(cfg: Config, target: str) -> list[Path]:
    """The files a target's examples are read from."""
    from lessctl.data.targets import target_source_files
    from lessctl.errors import LessctlError

    try:
        return list(target_source_files(cfg.data.targets[target], cfg.resolve(cfg.data.data_dir), cfg.root))
    except (LessctlError, OSError):  # a missing data folder: the target's inputs are unknown (never current)
        return [cfg.resolve(cfg.data.data_dir) / f"<{target}: missing>"]


def selection_fingerprint(
    cfg: Config,
    target: str,
    method: str,
    *,
    seed: int | None = None,
    ckpts: Sequence[int] | None = None,
    weights: Sequence[float] | None = None,
    percentage: float | None = None,
    max_samples: int | None = None,
    train: Sequence[str] | None = None,
    dim: int | None = None,
    warmup_run: str | None = None,
) -> Fingerprint:
    """A selection (`lessctl match`): its method's settings, the pool and target files, the warmup run for the
    methods that read stores. `seed` is the random draw's (default `[experiment] seed`)."""
    from lessctl.vocab import CHECKPOINT_METHODS, REPS_METHODS

    files = cfg.train_files()
    names = list(train) if train else list(files)
    conf: dict[str, Any] = {
        "method": method,
        "select.percentage": None
        if max_samples is not None
        else float(cfg.select.percentage if percentage is None else percentage),
    }
    if max_samples is not None:
        conf["max_samples"] = max_samples
    if method in ("random", "dsir"):
        conf["seed"] = cfg.experiment.seed if seed is None else seed
    upstream: dict[str, str | None] = {}
    if method in CHECKPOINT_METHODS or method in REPS_METHODS:
        conf |= config_values(cfg, stage_keys(cfg, "grads"))
        conf["checkpoints"] = list(ckpts) if ckpts else "all"
        conf["weights"] = [float(w) for w in weights] if weights else "lr_mean"
        if method in CHECKPOINT_METHODS:
            conf["dim"] = int(dim or max(cfg.grads.dims))
        upstream["warmup"] = warmup_run
    inputs = {f"training set '{n}'": files_sha256([files[n]]) for n in names if n in files}
    inputs[f"target '{target}'"] = files_sha256(target_files(cfg, target))
    return Fingerprint(conf, inputs, upstream)


def adapter_fingerprint(
    cfg: Config,
    train_file: str | os.PathLike | None,
    *,
    base_model: str | None = None,
    selection: str | None = None,
    pool: bool = False,
) -> Fingerprint:
    """A finetuned adapter: the finetune settings, its base model, the training file and the selection's id;
    with `pool` (the whole-pool finetune) the pool's files instead of the file written from them."""
    conf = config_values(cfg, stage_keys(cfg, "finetune"))
    conf["base model"] = base_model or cfg.model.name_or_path
    upstream = {"selection": selection} if selection else {}
    if pool:
        inputs = {f"training set '{n}'": files_sha256([p]) for n, p in cfg.train_files().items()}
    else:
        inputs = {"training file": file_sha256(train_file) if train_file else None}
    return Fingerprint(conf, inputs, upstream)


def eval_fingerprint(cfg: Config, task: str, *, eval_file: str | os.PathLike | None, model: str | None) -> Fingerprint:
    """An evaluation: the eval settings that apply to its task, the eval file, the model's id (an adapter's
    run id; `base <name>` for the base model; `bm25` for a first-stage order)."""
    keys = [k for k in (*stage_keys(cfg, "eval"), *EVAL_TASK_KEYS.get(task, ())) if k != "eval.data_dir"]
    conf = config_values(cfg, keys)
    if not eval_file:  # a benchmark: the folder it is read from, as an absolute path (options give other folders)
        conf["eval data"] = str(cfg.resolve(cfg.eval.data_dir or cfg.data.data_dir).resolve())
    inputs = {"eval file": file_sha256(eval_file)} if eval_file else {}
    return Fingerprint(conf, inputs, {"model": model})


def base_model_id(cfg: Config) -> str:
    return f"base {cfg.model.name_or_path}"
