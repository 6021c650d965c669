"""`lessctl run`: the study plan's jobs (lessctl.study.graph) in stage order on this machine, skipping complete ones."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable

from lessctl import paths
from lessctl.config import Config, closest
from lessctl.errors import ConfigError
from lessctl.study.graph import BASE, Job, expand, finetune_state, is_complete, only_stages
from lessctl.study.plan import resolve_plan
from lessctl.vocab import REPS, STAGES

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
    methods: list[str] | None = None,
    items: list[str] | None = None,
    pick: int | None = None,
) -> list[StageReport]:
    """Runs the plan's jobs of the stages from `start` to `until` in order, skipping complete ones.

    methods replaces the plan's (`--methods`); items keeps only the jobs with these keys (`--items`), and
    pick only the pick-th of them (1-based: a Slurm array task's id).
    """
    from lessctl.models import resolve_device

    say = say or (lambda s: None)
    stages = stage_range(start, until)
    if pick is not None:
        if not items or not 1 <= pick <= len(items):
            raise ConfigError(f"--pick: {pick} is not one of the {len(items or [])} --items (1 to {len(items or [])})")
        items = [items[pick - 1]]
    jobs = study_jobs(cfg, stages, methods, items)
    device = resolve_device(device) if device is not None else None  # a bad --device fails before any stage
    out: list[StageReport] = []
    for stage in stages:
        say(f"stage {stage}")
        for job in (j for j in jobs if j.stage == stage):
            out += run_job(cfg, job, device)
    return out


def study_jobs(
    cfg: Config, stages: list[str] | None = None, methods: list[str] | None = None, items: list[str] | None = None
) -> list[Job]:
    """The plan's jobs of these stages (all by default), or those named by `items`; ConfigError on a bad plan."""
    jobs = expand(cfg, resolve_plan(cfg, methods))
    if items:
        keys = {j.key for j in jobs}
        for k in items:
            if k not in keys:
                raise ConfigError(f"--items: no job {k!r} in the plan{closest(k, keys)}")
        jobs = [j for j in jobs if j.key in set(items)]
    return only_stages(jobs, list(stages or STAGES))


def run_job(cfg: Config, job: Job, device: str | None) -> list[StageReport]:
    """Runs one job unless it is complete; the reports of what it did (grads: one per store)."""
    if job.reason:
        return [StageReport(job.stage, job.item, "not applicable", job.reason)]
    if job.stage == "grads":  # collect_gradients skips complete stores itself, and recomputes stale ones
        return _grads(cfg, job, device)
    if job.stage == "finetune":
        return [_finetune(cfg, job, device)]
    if is_complete(cfg, job):
        why = {"warmup": "checkpoints.json exists", "match": "summary.json exists"}.get(job.stage, "result exists")
        return [StageReport(job.stage, job.item, "skipped", why)]
    return [_STAGE_FUNCS[job.stage](cfg, job, device)]


def _warmup(cfg: Config, job: Job, device) -> StageReport:
    from lessctl.training import run_warmup

    res = run_warmup(cfg, device=device)
    return StageReport("warmup", job.item, "done", f"{len(res.checkpoints)} checkpoints")


def _grads(cfg: Config, job: Job, device) -> list[StageReport]:
    from lessctl.grads.stage import collect_gradients
    from lessctl.training import read_checkpoints

    steps = [c["step"] for c in read_checkpoints(cfg)]
    if job.method == REPS:  # rds matches on representations at the last checkpoint (its default)
        steps = steps[-1:]
    results = collect_gradients(
        cfg, steps=steps, dims=list(cfg.grads.dims), grad_type=job.method, projector=cfg.grads.projector, device=device
    )
    return [
        StageReport("grads", r.path.name, "skipped" if r.status == "skipped" else "done", f"{r.rows} rows")
        for r in results
    ]


def _match(cfg: Config, job: Job, device) -> StageReport:
    from lessctl.select.match import run_match
    from lessctl.training import read_checkpoints

    run_cfg, ckpts = cfg, None
    if job.seed is not None:  # one random draw: the workspace's seed replaced by the draw's
        run_cfg = dataclasses.replace(cfg, experiment=dataclasses.replace(cfg.experiment, seed=job.seed))
    if job.subset:
        steps = [c["step"] for c in read_checkpoints(cfg)]
        ckpts = [steps[p - 1] for p in job.subset]
    res = run_match(run_cfg, job.target, method=job.method, ckpts=ckpts, out_name=job.selection)
    return StageReport("match", job.item, "done", f"{res.n_selected} of {res.total}")


def _finetune(cfg: Config, job: Job, device) -> StageReport:
    from lessctl.select.match import selection_file
    from lessctl.training import run_finetune

    state = finetune_state(cfg, job)
    if state == "complete":
        return StageReport("finetune", job.item, "skipped", "adapter exists")
    selection = selection_file(cfg, job.target, job.selection)  # names `lessctl match` when it is missing
    meta = {"target": job.target, "method": job.selection if job.subset else job.method}
    meta |= {"seed": job.seed} if job.seed is not None else {}
    meta |= {"checkpoint_positions": list(job.subset)} if job.subset else {}
    meta |= {"transfer": True} if job.base_model else {}
    stale = state == "stale"
    run_finetune(cfg, selection, job.model, base_model=job.base_model, meta=meta, device=device, force=stale)
    return StageReport("finetune", job.item, "done", "the selection changed since the last finetune" * stale)


def _eval(cfg: Config, job: Job, device) -> StageReport:
    from lessctl.evaluation.runner import describe_model, run_custom_evaluation, run_evaluation, task_options

    data_dir = cfg.resolve(cfg.eval.data_dir or cfg.data.data_dir)
    if job.model == BASE:
        model_spec = describe_model(BASE, base_model=cfg.model_ref())
    else:
        model_spec = describe_model(paths.finetune_dir(cfg.output_dir, job.model), output_dir=cfg.output_dir)
    opts = {
        "dtype": cfg.model.dtype,
        "device": device,
        "batch_size": cfg.eval.batch_size,
        "limit": cfg.eval.limit or None,
    }
    if job.eval_file is None:
        res = run_evaluation(model_spec, job.task, data_dir, cfg.output_dir, **opts, **task_options(cfg.eval, job.task))
    else:
        res = run_custom_evaluation(
            model_spec, job.target, job.eval_file, cfg.output_dir, chat_format=cfg.model.chat_format, **opts
        )
    return StageReport("eval", job.item, "done", f"{res.record['metric']} {res.record['score']}")


_STAGE_FUNCS = {"warmup": _warmup, "match": _match, "eval": _eval}
