"""`lessctl run`: every stage in order on this machine, skipping what is already complete."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from lessctl import paths
from lessctl.config import Config
from lessctl.errors import ConfigError
from lessctl.vocab import STAGES

log = logging.getLogger(__name__)


@dataclass
class StageReport:
    stage: str
    item: str
    status: str  # "done" | "skipped" | "not applicable"
    detail: str = ""


def stage_range(start: str | None, until: str | None) -> list[str]:
    for opt, v in (("--from", start), ("--until", until)):
        if v is not None and v not in STAGES:
            raise ConfigError(f"{opt}: unknown stage {v!r} (stages: {', '.join(STAGES)})")
    a = STAGES.index(start) if start else 0
    b = STAGES.index(until) if until else len(STAGES) - 1
    if a > b:
        raise ConfigError(f"--from {start} comes after --until {until}")
    return list(STAGES[a : b + 1])


def run_pipeline(
    cfg: Config,
    *,
    start: str | None = None,
    until: str | None = None,
    device: str | None = None,
    say: Callable[[str], None] | None = None,
) -> list[StageReport]:
    """Runs the stages from `start` to `until`; each stage skips what a previous run completed."""
    from lessctl.models import resolve_device

    say = say or (lambda s: None)
    stages = stage_range(start, until)
    device = resolve_device(device) if device is not None else None  # a bad --device fails before any stage
    out: list[StageReport] = []
    for stage in stages:
        say(f"stage {stage}")
        out += _STAGE_FUNCS[stage](cfg, device)
    return out


def _warmup(cfg: Config, device) -> list[StageReport]:
    from lessctl.training import checkpoints_path, run_warmup

    if checkpoints_path(cfg).is_file():
        return [StageReport("warmup", "warmup", "skipped", "checkpoints.json exists")]
    res = run_warmup(cfg, device=device)
    return [StageReport("warmup", "warmup", "done", f"{len(res.checkpoints)} checkpoints")]


def _grads(cfg: Config, device) -> list[StageReport]:
    from lessctl.grads.stage import collect_gradients
    from lessctl.training import read_checkpoints
    from lessctl.vocab import REPS, REPS_METHODS

    steps = [c["step"] for c in read_checkpoints(cfg)]
    grad_type = REPS if cfg.select.method in REPS_METHODS else None  # rds matches on representations
    results = collect_gradients(
        cfg, steps=steps, dims=list(cfg.grads.dims), grad_type=grad_type, projector=cfg.grads.projector, device=device
    )
    return [
        StageReport("grads", r.path.name, "skipped" if r.status == "skipped" else "done", f"{r.rows} rows")
        for r in results
    ]


def _match(cfg: Config, device) -> list[StageReport]:
    from lessctl.select.match import run_match, selection_dir

    reps = []
    for target in cfg.data.targets:
        d = selection_dir(cfg, target, cfg.select.method)
        if (d / "summary.json").is_file():
            reps.append(StageReport("match", f"{target}/{cfg.select.method}", "skipped", "summary.json exists"))
            continue
        res = run_match(cfg, target, method=cfg.select.method)
        reps.append(StageReport("match", f"{target}/{cfg.select.method}", "done", f"{res.n_selected} of {res.total}"))
    return reps


def _finetune(cfg: Config, device) -> list[StageReport]:
    from lessctl.models import is_adapter_dir
    from lessctl.select.match import selection_dir, selection_file
    from lessctl.training import adapter_is_stale, run_finetune

    reps = []
    for target in cfg.data.targets:
        name = f"{target}-{cfg.select.method}"
        out = paths.finetune_dir(cfg.output_dir, name)
        has_selection = (selection_dir(cfg, target, cfg.select.method) / "summary.json").is_file()
        selection = selection_file(cfg, target, cfg.select.method) if has_selection else None
        stale = is_adapter_dir(out) and selection is not None and adapter_is_stale(out, selection)
        if is_adapter_dir(out) and not stale:
            reps.append(StageReport("finetune", name, "skipped", "adapter exists"))
            continue
        selection = selection or selection_file(cfg, target, cfg.select.method)  # names `lessctl match`
        run_finetune(
            cfg, selection, name, meta={"target": target, "method": cfg.select.method}, device=device, force=stale
        )
        reps.append(StageReport("finetune", name, "done", "the selection changed since the last finetune" * stale))
    return reps


def _eval(cfg: Config, device) -> list[StageReport]:
    from lessctl.evaluation.results import eval_json_path
    from lessctl.evaluation.runner import describe_model, run_custom_evaluation, run_evaluation, task_options

    reps = []
    data_dir = cfg.resolve(cfg.eval.data_dir or cfg.data.data_dir)
    for target, spec in cfg.data.targets.items():
        name = f"{target}-{cfg.select.method}"
        task = spec if isinstance(spec, str) else target
        if not isinstance(spec, str) and not spec.get("eval_file"):
            reps.append(StageReport("eval", name, "not applicable", "custom target without eval_file"))
            continue
        result = eval_json_path(cfg.output_dir, name, task)
        trained = paths.finetune_dir(cfg.output_dir, name) / "lessctl_run.json"  # a redone finetune: evaluate again
        if result.is_file() and (not trained.is_file() or result.stat().st_mtime >= trained.stat().st_mtime):
            reps.append(StageReport("eval", f"{name}/{task}", "skipped", "result exists"))
            continue
        model_spec = describe_model(paths.finetune_dir(cfg.output_dir, name), output_dir=cfg.output_dir)
        opts = {
            "dtype": cfg.model.dtype,
            "device": device,
            "batch_size": cfg.eval.batch_size,
            "limit": cfg.eval.limit or None,
        }
        if isinstance(spec, str):
            res = run_evaluation(model_spec, task, data_dir, cfg.output_dir, **opts, **task_options(cfg.eval, task))
        else:
            res = run_custom_evaluation(
                model_spec,
                target,
                cfg.resolve(spec["eval_file"]),
                cfg.output_dir,
                chat_format=cfg.model.chat_format,
                **opts,
            )
        reps.append(StageReport("eval", f"{name}/{task}", "done", f"{res.record['metric']} {res.record['score']}"))
    return reps


_STAGE_FUNCS = {"warmup": _warmup, "grads": _grads, "match": _match, "finetune": _finetune, "eval": _eval}
