"""`lessctl run`: the study plan's jobs (lessctl.study.graph) in stage order on this machine, skipping complete ones."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable

from lessctl.config import Config, closest
from lessctl.errors import ConfigError
from lessctl.outputs import artifacts
from lessctl.outputs import layout as paths
from lessctl.outputs.artifacts import STALE
from lessctl.study.graph import (
    BASE,
    FULL,
    Job,
    eval_fingerprint,
    expand,
    finetune_fingerprint,
    job_config,
    job_state,
    only_stages,
)
from lessctl.study.plan import Plan, resolve_plan
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
    progress: Any = None,
    plan: Plan | None = None,
) -> list[StageReport]:
    """Runs the plan's jobs of the stages from `start` to `until` in order, skipping complete ones.

    methods replaces the plan's (`--methods`); items keeps only the jobs with these keys (`--items`), and
    pick only the pick-th of them (1-based: a Slurm array task's id). `progress` (the CLI's ProgressBar, or
    anything with its `update(completed=, advance=, total=, description=, status=, unit=)`) hears of every job
    that does work: its key when it starts, then its training steps and loss, store rows or prompts. `plan`
    replaces the workspace's (`lessctl demo` runs its own).
    """
    from lessctl.models import resolve_device

    say = say or (lambda s: None)
    stages = stage_range(start, until)
    if pick is not None:
        if not items or not 1 <= pick <= len(items):
            raise ConfigError(f"--pick: {pick} is not one of the {len(items or [])} --items (1 to {len(items or [])})")
        items = [items[pick - 1]]
    jobs = study_jobs(cfg, stages, methods, items, plan)
    device = resolve_device(device) if device is not None else None  # a bad --device fails before any stage
    out: list[StageReport] = []
    for stage in stages:
        say(f"stage {stage}")
        for job in (j for j in jobs if j.stage == stage):
            out += run_job(cfg, job, device, progress)
    return out


def study_jobs(
    cfg: Config,
    stages: list[str] | None = None,
    methods: list[str] | None = None,
    items: list[str] | None = None,
    plan: Plan | None = None,
) -> list[Job]:
    """The plan's jobs of these stages (all by default), or those named by `items`; ConfigError on a bad plan."""
    jobs = expand(cfg, plan or resolve_plan(cfg, methods))
    if items:
        keys = {j.key for j in jobs}
        for k in items:
            if k not in keys:
                raise ConfigError(f"--items: no job {k!r} in the plan{closest(k, keys)}")
        jobs = [j for j in jobs if j.key in set(items)]
    return only_stages(jobs, list(stages or STAGES))


def run_job(cfg: Config, job: Job, device: str | None, progress: Any = None) -> list[StageReport]:
    """Runs one job unless its artifact is current; a stale one is redone (its report says what changed).
    The reports of what it did (grads: one per store)."""
    tell = _Told(progress, job)
    cfg = job_config(cfg, job)  # a further warmup run works in its own folder
    if job.reason:
        return [StageReport(job.stage, job.item, "not applicable", job.reason)]
    if job.stage == "grads":  # collect_gradients skips current stores itself, and recomputes stale ones
        return _grads(cfg, job, device, tell)
    state = job_state(cfg, job)
    if state.current:
        return [StageReport(job.stage, job.item, "skipped", "current")]
    report = _STAGE_FUNCS[job.stage](cfg, job, device, tell, state.status == STALE)
    if state.status == STALE:
        report.detail = f"{report.detail}; stale: {state.reason}" if report.detail else f"stale: {state.reason}"
    return [report]


class _Told:
    """One job's progress, told to run_pipeline's `progress`: `start` names the job (only jobs that do work
    are named), `training` is a training loop's on_log, `stores` collect_gradients' progress, `counter` an
    evaluation's (a call with an advance, set_total)."""

    def __init__(self, progress: Any, job: Job):
        self._p, self._job = progress, job

    def start(self, unit: str, what: str | None = None, done: int = 0, total: int | None = None) -> None:
        if self._p is not None:
            name = self._job.key if what is None else f"{self._job.key}: {what}"
            self._p.update(description=name, completed=done, total=total, status="", unit=unit)

    def training(self):
        def on_log(rec: dict) -> None:
            if self._p is not None:
                loss = f"loss {rec['loss']:.3f}" if "loss" in rec else None
                self._p.update(completed=rec["step"], total=rec["max_steps"], status=loss)

        self.start("steps")
        return on_log

    def stores(self):
        seen: set = set()

        def progress(name: str, step: int, done: int, total: int) -> None:
            if (name, step) not in seen:
                seen.add((name, step))
                self.start("ex", f"{name} ckpt {step}", done, total)
            elif self._p is not None:
                self._p.update(completed=done, total=total)

        return progress

    def counter(self):
        told = self

        class Counter:
            def __call__(self, n: int) -> None:
                if told._p is not None:
                    told._p.update(advance=n)

            def set_total(self, n: int) -> None:
                if told._p is not None:
                    told._p.update(completed=0, total=n)

        self.start("prompts")
        return Counter()


def _warmup(cfg: Config, job: Job, device, tell: _Told, stale: bool) -> StageReport:
    from lessctl.training import run_warmup

    res = run_warmup(cfg, device=device, on_log=tell.training(), force=stale)
    return StageReport("warmup", job.item, "done", f"{len(res.checkpoints)} checkpoints")


def _grads(cfg: Config, job: Job, device, tell: _Told) -> list[StageReport]:
    from lessctl.grads.stage import collect_gradients
    from lessctl.training import read_checkpoints

    steps = [c["step"] for c in read_checkpoints(cfg)]
    if job.method == REPS:  # rds matches on representations at the last checkpoint (its default)
        steps = steps[-1:]
    results = collect_gradients(cfg, steps=steps, grad_type=job.method, device=device, progress=tell.stores())
    return [
        StageReport("grads", r.path.name, "skipped" if r.status == "skipped" else "done", f"{r.rows} rows")
        for r in results
    ]


def _match(cfg: Config, job: Job, device, tell: _Told, stale: bool) -> StageReport:
    from lessctl.select.match import run_match
    from lessctl.training import read_checkpoints

    run_cfg, ckpts = cfg, None
    if job.seed is not None:  # one random draw: the workspace's seed replaced by the draw's
        run_cfg = dataclasses.replace(cfg, experiment=dataclasses.replace(cfg.experiment, seed=job.seed))
    if job.subset:
        steps = [c["step"] for c in read_checkpoints(cfg)]
        ckpts = [steps[p - 1] for p in job.subset]
    res = run_match(run_cfg, job.target, method=job.method, ckpts=ckpts, out_name=job.selection, force=stale)
    return StageReport("match", job.item, "done", f"{res.n_selected} of {res.total}")


def _finetune(cfg: Config, job: Job, device, tell: _Told, stale: bool) -> StageReport:
    from lessctl.select.match import selection_file
    from lessctl.training import run_finetune

    fingerprint = finetune_fingerprint(cfg, job)
    if job.branch == FULL:  # the whole pool, written to one file (kept as it is when the pool did not change)
        from lessctl.data.pool import write_pool_file

        pool = write_pool_file(cfg.train_files(), paths.full_pool_file(cfg.output_dir))
        run_finetune(cfg, pool, FULL, meta={"method": FULL}, fingerprint=fingerprint, device=device, force=stale,
                     on_log=tell.training())  # fmt: skip
        return StageReport("finetune", job.item, "done", "the whole pool")
    selection = selection_file(cfg, job.target, job.selection)  # names `lessctl match` when it is missing
    meta = {"target": job.target, "method": job.selection if job.subset else job.method}
    meta |= {"seed": job.seed} if job.seed is not None else {}
    meta |= {"checkpoint_positions": list(job.subset)} if job.subset else {}
    meta |= {"transfer": True} if job.base_model else {}
    run_finetune(
        cfg,
        selection,
        job.model,
        base_model=job.base_model,
        meta=meta,
        fingerprint=fingerprint,
        device=device,
        force=stale,
        on_log=tell.training(),
    )
    return StageReport("finetune", job.item, "done")


def _eval(cfg: Config, job: Job, device, tell: _Told, stale: bool) -> StageReport:
    from lessctl.evaluation.ranking import BM25_MODEL
    from lessctl.evaluation.runner import describe_model
    from lessctl.evaluation.targets import run_target_eval, target_eval

    if job.model == BM25_MODEL:  # a reranking target's first stage: the order any reranker must beat
        model_spec = None
    elif job.model == BASE:
        model_spec = describe_model(BASE, base_model=cfg.model_ref())
    else:
        model_spec = describe_model(paths.finetune_dir(cfg.output_dir, job.model), output_dir=cfg.output_dir)
    fingerprint = eval_fingerprint(cfg, job)  # of the model as it is before the evaluation reads it
    res = run_target_eval(cfg, target_eval(cfg, job.target), model_spec, device=device, progress=tell.counter())
    artifacts.stamp(res.path, fingerprint)
    return StageReport("eval", job.item, "done", f"{res.record['metric']} {res.record['score']}")


_STAGE_FUNCS = {"warmup": _warmup, "match": _match, "finetune": _finetune, "eval": _eval}
