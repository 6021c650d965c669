"""Warmup and finetune runs: where they train, the checkpoint manifest, the run record, staleness.

Warmup saves a checkpoint (adapter, optimizer state, trainer state) at the end of every epoch and
writes `warmup/checkpoints.json` = [{"step", "epoch", "lr_mean"}], where lr_mean is the mean of the
learning rates the optimizer actually used in that epoch's steps (LESS's checkpoint weights).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from lessctl import __version__
from lessctl.config import Config
from lessctl.data.records import data_stem
from lessctl.distributed import barrier, is_main
from lessctl.errors import AlreadyExistsError, ConfigError, InputError, MissingArtifactError
from lessctl.files import not_a_file, replace_dir, sha256_file, write_atomic
from lessctl.outputs import artifacts, provenance
from lessctl.outputs import layout as paths
from lessctl.training.loop import MANIFEST, RUN_FILE, TrainResult, train_lora

log = logging.getLogger(__name__)


def warmup_dir(cfg: Config) -> Path:
    return paths.warmup_dir(cfg.output_dir)


def checkpoints_path(cfg: Config) -> Path:
    return warmup_dir(cfg) / MANIFEST


def read_checkpoints(cfg: Config) -> list[dict]:
    """The manifest written by warmup; a user error naming `lessctl warmup` when it is missing or damaged."""
    p = checkpoints_path(cfg)
    if not p.is_file():
        raise MissingArtifactError(
            f"no warmup checkpoints in {warmup_dir(cfg)} ({MANIFEST} missing); run `lessctl warmup` first"
        )
    redo = "run `lessctl warmup --force` to train the warmup again"
    try:
        entries = json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"{p}: not UTF-8 text (byte {e.start}); {redo}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{p}:{e.lineno}: invalid JSON ({e.msg}); {redo}") from None
    if not artifacts.manifest_ok(entries):
        raise InputError(f'{p}: expected a list of {{"step": int, "epoch", "lr_mean": number}}; {redo}')
    return entries


def checkpoint_dir(cfg: Config, step: int) -> Path:
    return paths.checkpoint_dir(cfg.output_dir, step)


def run_warmup(cfg: Config, *, force: bool = False, device: str | None = None, on_log=None) -> TrainResult:
    """`lessctl warmup`: LoRA on the warmup subset, a checkpoint per epoch, then checkpoints.json.

    Without force an interrupted warmup resumes in place. With force the new warmup is trained in
    `warmup.new/` and replaces `warmup/` only once it is complete: a failure (a bad data line, a device
    torch cannot use, Ctrl-C) leaves the old warmup as it was.
    """
    from lessctl.models import resolve_device

    device = resolve_device(device)
    out = warmup_dir(cfg)
    files = cfg.train_files()
    if not files:
        raise InputError(
            f"{cfg.path or 'config'}: [data] train is empty; add training files, e.g. train = {{dolly = "
            f"\"dolly.jsonl\"}}"
        )
    if (out / MANIFEST).is_file() and not force:
        state = artifacts.warmup_state(cfg.output_dir, provenance.warmup_fingerprint(cfg))
        now = "and current" if state.current else f"but made from other inputs ({state.reason})"
        raise AlreadyExistsError(f"warmup is already complete in {out} {now}; pass --force to train it again")
    if not (force and out.exists()):
        _check_resume(cfg, out)
        return _warmup_into(cfg, files, out, device, on_log)
    staging = paths.staging_dir(out)
    _clear(staging)
    try:
        res = _warmup_into(cfg, files, staging, device, on_log)
    except BaseException:
        _clear(staging)
        raise
    _move_into_place(staging, out)
    res.output_dir = out
    return res


def _check_resume(cfg: Config, out: Path) -> None:
    """An interrupted warmup resumes only under the settings and data it started with: ConfigError naming what
    changed otherwise (its checkpoints would mix two runs)."""
    from lessctl.training.loop import _complete_checkpoints

    if not out.is_dir() or not _complete_checkpoints(out):
        return
    rec = artifacts.read_record(out / RUN_FILE)
    if rec is None:
        log.warning("%s: resuming an interrupted warmup that has no record of its settings", out)
        return
    diff = provenance.changes(rec.get("fingerprint"), provenance.warmup_fingerprint(cfg))
    if diff:
        raise ConfigError(
            f"{out} holds an interrupted warmup started with other settings or data ({'; '.join(diff)}); resuming "
            "would mix two runs: restore the settings to resume, or pass --force to train it again from the start"
        )


def _clear(staging: Path) -> None:
    """Removes a staging folder; under torchrun rank 0 alone clears it, as it alone moves it into place."""
    if is_main():
        shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(staging: Path, out: Path) -> None:
    """staging replaces out, by rank 0 once every rank has finished (the others wait until it is there)."""
    barrier()
    if is_main():
        replace_dir(staging, out)
    barrier()


def _warmup_into(cfg: Config, files: dict[str, Path], out: Path, device: str, on_log) -> TrainResult:
    fingerprint = provenance.warmup_fingerprint(cfg).to_dict()
    started = artifacts.read_record(out / RUN_FILE) or {}  # a resumed run keeps its id
    run_id = started.get("run_id") if started.get("fingerprint") == fingerprint else None
    run_id = run_id or artifacts.new_id()
    if is_main() and started.get("run_id") != run_id:  # the settings are on record before the first step, so a
        out.mkdir(parents=True, exist_ok=True)  # resume can be checked against them (a resume leaves the record be)
        _write_run_file(out, cfg, {"kind": "warmup", "run_id": run_id, "complete": False, "fingerprint": fingerprint})
    res = train_lora(cfg, cfg.warmup, files, out, save_each_epoch=True, device=device, on_log=on_log)
    barrier()  # every rank's last step is done (rank 0 saved the checkpoints)
    if is_main():  # one writer: ranks sharing `<file>.part` would rename each other's file away
        write_atomic(out / MANIFEST, json.dumps(res.checkpoints, indent=2))
        run = {"kind": "warmup", "run_id": run_id, "complete": True, "fingerprint": fingerprint}
        run |= {"counts": res.counts, "seconds": res.seconds, "truncation": res.truncation}
        _write_run_file(out, cfg, run)
    barrier()
    return res


def warmup_run_id(cfg: Config) -> str | None:
    """The id of the warmup run whose checkpoints are in warmup/ (stores record it); None before ids existed."""
    return artifacts.warmup_run_id(cfg.output_dir)


def run_finetune(
    cfg: Config,
    train_file: Path,
    name: str,
    *,
    base_model: str | None = None,
    meta: dict | None = None,
    fingerprint: provenance.Fingerprint | None = None,
    force: bool = False,
    device: str | None = None,
    on_log=None,
) -> TrainResult:
    """`lessctl finetune`: a fresh LoRA on `train_file` (all of it by default) into finetune/<name>/.

    `fingerprint` is what made the adapter (default: the finetune settings, the base model and the file);
    the run record keeps it. The adapter is trained in `<name>.new/` and moved into place when complete, so a
    failed or interrupted run (`--force` included) leaves an existing adapter as it was.
    """
    from lessctl.models import resolve_device

    device = resolve_device(device)
    if not name or "/" in name or name in (".", "..") or name.endswith(paths.STAGING_SUFFIX) or len(name) > 200:
        raise ConfigError(
            f"--name: {name[:60]!r} is not a folder name (no '/', not '.', '..' or ending in .new, at most 200 "
            "characters)"
        )
    if problem := not_a_file(Path(train_file), "training file"):
        raise (MissingArtifactError if "no such" in problem else InputError)(problem)
    fingerprint = fingerprint or provenance.adapter_fingerprint(cfg, train_file, base_model=base_model)
    out = paths.finetune_dir(cfg.output_dir, name)
    if artifacts.is_adapter_dir(out) and not force:
        state = artifacts.adapter_state(cfg.output_dir, name, fingerprint)
        now = "(current)" if state.current else f"made from other inputs ({state.reason})"
        raise AlreadyExistsError(f"{out} already holds a finetuned adapter {now}; pass --force to train it again")
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):  # a folder of the user's
        raise AlreadyExistsError(f"{out} exists and holds no adapter; pass --force to replace it with the finetune")
    staging = paths.staging_dir(out)
    _clear(staging)
    try:
        res = _finetune_into(cfg, Path(train_file), staging, base_model, meta, device, on_log, fingerprint)
    except BaseException:
        _clear(staging)
        raise
    _move_into_place(staging, out)
    res.output_dir = out
    return res


def _finetune_into(cfg: Config, train_file: Path, out: Path, base_model, meta, device, on_log, fingerprint):
    res = train_lora(
        cfg,
        cfg.finetune,
        {data_stem(train_file): Path(train_file)},
        out,
        base_model=base_model,
        save_each_epoch=False,
        resume=False,
        device=device,
        on_log=on_log,
    )
    base, selector = cfg.model_ref(base_model), cfg.model_ref()
    barrier()
    if not is_main():
        return res
    _write_run_file(
        out,
        cfg,
        {
            "kind": "finetune",
            "run_id": artifacts.new_id(),
            "fingerprint": fingerprint.to_dict(),
            "train_file": str(train_file),
            "train_file_sha256": sha256_file(train_file),
            "base_model": base,
            "selection_model": selector,
            "transfer": base != selector,
            "counts": res.counts,
            "truncation": res.truncation,
            "seconds": res.seconds,
            **(meta or {}),
        },
    )
    return res


def _write_run_file(out: Path, cfg: Config, extra: dict) -> None:
    rec = {"lessctl_version": __version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra, "config": cfg.to_dict()}
    write_atomic(out / RUN_FILE, json.dumps(rec, indent=2, default=str))
