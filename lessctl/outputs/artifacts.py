"""The records of each artifact in the output folder, read back and judged: is it there, and is it current?

Each artifact has a record that says what made it (lessctl.outputs.provenance):
- the warmup: `warmup/lessctl_run.json` (`run_id`, `fingerprint`, `complete`), written when the warmup starts
  and again when it ends;
- a selection: `selected/<target>/<selection>/summary.json` (`id`, `fingerprint`);
- an adapter: `finetune/<model>/lessctl_run.json` (`run_id`, `fingerprint`);
- an evaluation: `eval/<model>/<task>.json` (`fingerprint`);
- a gradient store: its HDF5 attributes (source sha256, warmup run, step, type; lessctl.grads.store).

Records written before lessctl kept provenance carry no fingerprint: they read as stale, never as current.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lessctl.outputs import layout, provenance
from lessctl.outputs.provenance import Fingerprint, changes

if TYPE_CHECKING:
    from lessctl.config import Config

CURRENT, MISSING, STALE = "current", "missing", "stale"


@dataclass(frozen=True)
class State:
    """Whether an artifact is there and current; `reason` says what is missing or what changed."""

    status: str  # current | missing | stale
    reason: str = ""

    @property
    def current(self) -> bool:
        return self.status == CURRENT


def judge(record: dict | None, now: Fingerprint, missing: str) -> State:
    """The state of an artifact whose record is `record` (None: not there) against the fingerprint of now."""
    if record is None:
        return State(MISSING, missing)
    diff = changes(record.get("fingerprint"), now)
    return State(STALE, "; ".join(diff)) if diff else State(CURRENT)


def read_record(path: Path) -> dict | None:
    """A JSON object record, or None when the file is missing, damaged or not an object (then the artifact is
    not there as far as any check goes; the stage that writes it replaces it)."""
    try:
        rec = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


# ----------------------------------------------------------------------------- the warmup


def warmup_record(output_dir: layout.Folder) -> dict | None:
    return read_record(layout.warmup_dir(output_dir) / layout.RUN_FILE)


def warmup_run_id(output_dir: layout.Folder) -> str | None:
    """The id of the warmup run in warmup/ (stores and selections record it); None before ids existed."""
    rec = warmup_record(output_dir)
    rid = rec.get("run_id") if rec else None
    return rid if isinstance(rid, str) else None


def warmup_state(output_dir: layout.Folder, now: Fingerprint) -> State:
    if not layout.checkpoints_file(output_dir).is_file():
        return State(MISSING, "no checkpoints.json")
    return judge(warmup_record(output_dir), now, "no lessctl_run.json")


def read_manifest(output_dir: layout.Folder) -> list[dict] | None:
    """checkpoints.json's entries when it is there and well formed, else None (lessctl.training.read_checkpoints
    says what is wrong)."""
    try:
        entries = json.loads(layout.checkpoints_file(output_dir).read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None
    return entries if manifest_ok(entries) else None


def manifest_ok(entries: Any) -> bool:
    """Whether checkpoints.json's content is a list of {"step": int, "lr_mean": finite number, ...}."""
    return isinstance(entries, list) and all(
        isinstance(c, dict)
        and isinstance(c.get("step"), int)
        and not isinstance(c.get("step"), bool)
        and isinstance(c.get("lr_mean"), (int, float))
        and math.isfinite(c["lr_mean"])
        for c in entries
    )


def checkpoint_steps(output_dir: layout.Folder) -> list[int] | None:
    entries = read_manifest(output_dir)
    return None if entries is None else [c["step"] for c in entries]


# ----------------------------------------------------------------------------- selections


def selection_record(output_dir: layout.Folder, target: str, selection: str) -> dict | None:
    """summary.json of a selection, when it is there and its jsonl too (None otherwise); a damaged one is an
    InputError naming the file and the `match --force` that writes it again (lessctl.outputs.readback)."""
    from lessctl.outputs.readback import read_summary

    path = layout.selection_summary(output_dir, target, selection)
    if not path.exists():
        return None
    rec = read_summary(path)
    if not (layout.selection_dir(output_dir, target, selection) / rec["file"]).is_file():
        return None
    return rec


def selection_id(output_dir: layout.Folder, target: str, selection: str) -> str | None:
    rec = selection_record(output_dir, target, selection)
    sid = rec.get("id") if rec else None
    return sid if isinstance(sid, str) else None


def selection_jsonl(output_dir: layout.Folder, target: str, selection: str) -> Path | None:
    rec = selection_record(output_dir, target, selection)
    return None if rec is None else layout.selection_dir(output_dir, target, selection) / rec["file"]


def selection_state(output_dir: layout.Folder, target: str, selection: str, now: Fingerprint) -> State:
    return judge(selection_record(output_dir, target, selection), now, "no selection")


# ----------------------------------------------------------------------------- adapters


def is_adapter_dir(path: layout.Folder) -> bool:
    """A peft adapter folder (its adapter_config.json)."""
    return (Path(path) / "adapter_config.json").is_file()


def adapter_record(output_dir: layout.Folder, model: str) -> dict | None:
    """The run record of finetune/<model>/, when it holds an adapter."""
    d = layout.finetune_dir(output_dir, model)
    if not is_adapter_dir(d):
        return None
    return read_record(d / layout.RUN_FILE) or {}


def adapter_id(folder: layout.Folder) -> str | None:
    """The run id of an adapter folder's finetune (evaluations record it); None without one."""
    rec = read_record(Path(folder) / layout.RUN_FILE)
    rid = rec.get("run_id") if rec else None
    return rid if isinstance(rid, str) else None


def adapter_state(output_dir: layout.Folder, model: str, now: Fingerprint) -> State:
    return judge(adapter_record(output_dir, model), now, "no adapter")


# ----------------------------------------------------------------------------- evaluations


def eval_record(output_dir: layout.Folder, model: str, task: str) -> dict | None:
    return read_record(layout.eval_json(output_dir, model, task))


def eval_state(output_dir: layout.Folder, model: str, task: str, now: Fingerprint) -> State:
    return judge(eval_record(output_dir, model, task), now, "no result")


def stamp(path: layout.Folder, fingerprint: Fingerprint, **fields: Any) -> None:
    """Adds the fingerprint (and `fields`) to a JSON record just written (an evaluation's), atomically."""
    from lessctl.files import write_atomic

    p = Path(path)
    rec = read_record(p) or {}
    rec.update(fields, fingerprint=fingerprint.to_dict())
    write_atomic(p, json.dumps(rec, indent=2, ensure_ascii=False, default=str) + "\n")


def headline_score(result: dict) -> float | None:
    """An evaluation's headline score: the value of its `metric`; None when the record has none."""
    metric = result.get("metric") if isinstance(result, dict) else None
    v = result.get(metric) if isinstance(metric, str) else None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def new_id() -> str:
    """A fresh artifact id."""
    return os.urandom(16).hex()


def model_id(cfg: Config, name: str, path: str | os.PathLike | None) -> str | None:
    """What an evaluation records of the model it scored: the base model's name, `bm25` (a first-stage order),
    or an adapter's run id (None for a folder lessctl did not train)."""
    if name == "base":
        return provenance.base_model_id(cfg)
    if name == "bm25":
        return "bm25"
    return adapter_id(path) if path else None
