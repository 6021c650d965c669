"""The study plan as Slurm jobs (`lessctl slurm submit` with a [study] table or --methods).

The study's jobs (lessctl.study.graph) that are not complete, and everything downstream of them, become:
warmup; grads as an array over checkpoints (or one array of shards per checkpoint) and, for rds, one
representations job at the last checkpoint; one match job for every pending selection; one array of
finetunes (a task per model); an array of their evaluations whose task k waits (aftercorr) for finetune
task k alone; arrays for the evaluations of models already trained and of the base model. Every other job
waits (afterok) for the jobs its items need. A further warmup run ([study] warmup_seeds) adds its warmup and
its grads as one job each, and its matches, finetunes and evaluations to the groups above. The match, finetune
and eval jobs (and those two) run `lessctl run
--items ...` with the stage's template and settings, the array task picking its item (`--pick`), so a job
that finds its item complete (a resubmission) skips it.
"""

from __future__ import annotations

from typing import Any, Sequence

from lessctl.config import Config
from lessctl.errors import ConfigError
from lessctl.evaluation.ranking import BM25_MODEL
from lessctl.slurm.quoting import TASK
from lessctl.slurm.submit import JobSpec
from lessctl.study.graph import BASE, Job, plan_states
from lessctl.vocab import REPS, STAGES

UNTRAINED = (BASE, BM25_MODEL)  # evaluations that wait for no finetune: the base model, a BM25 first stage


def pending_jobs(cfg: Config, jobs: list[Job]) -> list[Job]:
    """The jobs `lessctl run` would run: missing or stale, or after a job that makes a new upstream artifact
    (lessctl.study.graph.plan_states, what `run --dry-run` lists)."""
    states = plan_states(cfg, jobs)
    return [j for j in jobs if not j.reason and not states[j.key].current]


def plan_study(
    cfg: Config,
    stages: Sequence[str] = STAGES,
    methods: list[str] | None = None,
    shards: int | None = None,
    extra_args: dict[str, Sequence[str]] | None = None,
) -> list[JobSpec]:
    """The Slurm jobs of the study's pending items (empty when everything is complete)."""
    from lessctl.study.pipeline import study_jobs

    if shards is not None and shards < 1:
        raise ConfigError(f"--shards: must be at least 1, got {shards}")
    extra_args = extra_args or {}
    jobs = study_jobs(cfg, list(stages), methods)
    todo = pending_jobs(cfg, jobs)
    chosen = ("--methods", *methods) if methods else ()
    specs: list[JobSpec] = []
    where: dict[str, tuple[int, ...]] = {}  # study job key -> positions of the Slurm jobs that run it

    def add(spec: JobSpec, keys: list[str]) -> None:
        start = len(specs)
        specs.append(spec)
        for k in keys:
            where[k] = tuple(range(start, len(specs)))

    def after(items: list[Job]) -> tuple[int, ...]:
        return tuple(sorted({p for j in items for a in j.after for p in where.get(a, ())}))

    def items_args(items: list[Job]) -> tuple[str, ...]:
        return (*chosen, *(w for j in items for w in ("--items", j.key)))

    for job in todo:
        args = tuple(extra_args.get(job.stage, ()))
        if job.run_seed is not None and job.stage in ("warmup", "grads"):  # a further warmup run: its own folder
            spec = JobSpec(job.stage, args, after=after([job]), label=job.key,
                           command=("run", *items_args([job])), items=(job.key,))  # fmt: skip
            add(spec, [job.key])
        elif job.stage == "warmup":
            add(JobSpec("warmup", args, items=(job.key,)), [job.key])
        elif job.stage == "grads" and job.method == REPS:
            spec = JobSpec("grads", args + ("--type", REPS, "--ckpt-index", str(cfg.warmup.epochs)), after=after([job]),
                           label="grads reps", items=(job.key,))  # fmt: skip
            add(spec, [job.key])
        elif job.stage == "grads":
            n_ckpt, start = cfg.warmup.epochs, len(specs)
            if shards and shards > 1:
                for k in range(1, n_ckpt + 1):
                    specs.append(JobSpec("grads", args + ("--ckpt-index", str(k)), f"1-{shards}",
                                         ("--shard", f"{TASK}/{shards}"), after([job]), f"grads ckpt {k}",
                                         items=(job.key,)))  # fmt: skip
            else:
                specs.append(JobSpec("grads", args, f"1-{n_ckpt}", ("--ckpt-index", TASK), after([job]),
                                     items=(job.key,)))  # fmt: skip
            where[job.key] = tuple(range(start, len(specs)))
    finetunes = [j for j in todo if j.stage == "finetune"]
    eval_of = {j.after[0]: j for j in jobs if j.stage == "eval" and j.after}  # a finetune's evaluation
    paired = [eval_of[f.key] for f in finetunes if f.key in eval_of]
    if len(paired) < len(finetunes):  # --stages without eval
        paired = []
    in_pairs = {j.key for j in paired}
    training = {f.key for f in finetunes}
    rest = [j for j in todo if j.stage == "eval" and j.model not in UNTRAINED and j.key not in in_pairs]
    groups = [
        ("match", [j for j in todo if j.stage == "match"], False, "afterok"),
        ("finetune", finetunes, True, "afterok"),
        ("eval", paired, True, "aftercorr"),  # task k evaluates the model finetune task k trains
        # the other targets of a model evaluated on every target (a random draw, the full pool): after the whole
        # finetune array, whatever became of its other tasks (an evaluation whose model failed says so and fails)
        ("eval more", [j for j in rest if set(j.after) & training], True, "afterany"),
        ("eval trained", [j for j in rest if not set(j.after) & training], True, "afterok"),
        ("eval base", [j for j in todo if j.stage == "eval" and j.model in UNTRAINED], True, "afterok"),
    ]
    for label, items, array, dependency in groups:
        if not items:
            continue
        stage = label.split()[0]
        spec = JobSpec(
            stage,
            tuple(extra_args.get(stage, ())),
            array=f"1-{len(items)}" if array else None,
            task_args=("--pick", TASK) if array else (),
            after=after(items),
            label=label,
            command=("run", *items_args(items)),
            items=tuple(j.key for j in items),
            dependency=dependency,
        )
        add(spec, [j.key for j in items])
    return specs


def describe_specs(specs: list[JobSpec]) -> list[dict[str, Any]]:
    """Each Slurm job with the study items it runs (for tests and `--json`)."""
    return [{"label": s.label or s.stage, "array": s.array, "items": list(s.items)} for s in specs]


def uses_study(cfg: Config, methods: list[str] | None) -> bool:
    """`slurm submit` expands the study plan with a [study] table or --methods; else it chains [select] method."""
    return methods is not None or "study" in cfg.given


def submit_study(
    cfg: Config,
    stages: Sequence[str] = STAGES,
    dry_run: bool = False,
    *,
    methods: list[str] | None = None,
    shards: int | None = None,
    extra_args: dict[str, Sequence[str]] | None = None,
) -> list[dict[str, Any]]:
    """Submits the study's pending jobs (see `plan_study`); the rows of `submit_jobs`, empty when nothing is left."""
    from lessctl.slurm.submit import submit_jobs

    specs = plan_study(cfg, stages, methods, shards, extra_args)
    rows = submit_jobs(cfg, specs, dry_run=dry_run) if specs else []
    if dry_run and rows:
        from lessctl.study.estimate import clock, estimate_seconds, pool_size
        from lessctl.study.pipeline import study_jobs

        by_key, pool = {j.key: j for j in study_jobs(cfg, list(stages), methods)}, pool_size(cfg)
        for row in rows:  # an array's GPU time is the sum over its tasks
            estimates = [estimate_seconds(cfg, by_key[k], pool)[0] for k in row.get("items", [])]
            known = [e for e in estimates if e is not None]
            row["gpu_seconds"] = round(sum(known), 1) if known else None
            row["gpu_time"] = clock(row["gpu_seconds"]) + (" + ?" if known and len(known) < len(estimates) else "")
    return rows
