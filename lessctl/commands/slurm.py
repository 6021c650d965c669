"""`lessctl slurm render|submit|status`: the pipeline's stages as Slurm jobs."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from lessctl.commands._common import JsonOpt, MethodsOpt, emit_json, load_config, print_table, split_values
from lessctl.config import closest
from lessctl.errors import ConfigError
from lessctl.vocab import STAGES

app = typer.Typer(
    help="Run the stages as Slurm jobs: render one script, submit the whole chain, follow it.",
    no_args_is_help=True,
)
_MAIN_APP: Optional[typer.Typer] = None

JobNameOpt = Annotated[Optional[str], typer.Option("--job-name", help="Job name (default: <experiment>-<stage>).")]
ArrayOpt = Annotated[
    Optional[str],
    typer.Option(
        "--array",
        help="Run as a job array (e.g. 1-4). grads: task k takes the k-th warmup checkpoint (--ckpt-index k).",
    ),
]
ShardsOpt = Annotated[
    Optional[int],
    typer.Option("--shards", min=1, help="grads: an array of N tasks, task k computing shard k/N (--shard k/N)."),
]
TimeOpt = Annotated[Optional[str], typer.Option("--time", help="Time limit, e.g. 12:00:00 or 2-00:00:00.")]
PartitionOpt = Annotated[Optional[str], typer.Option("--partition", help="Partition.")]
AccountOpt = Annotated[Optional[str], typer.Option("--account", help="Account to charge.")]
QosOpt = Annotated[Optional[str], typer.Option("--qos", help="Quality of service.")]
GpusOpt = Annotated[Optional[int], typer.Option("--gpus", min=0, help="GPUs for this job.")]
CpusOpt = Annotated[Optional[int], typer.Option("--cpus", min=1, help="CPUs per task.")]
MemOpt = Annotated[Optional[str], typer.Option("--mem", help="Memory per node, e.g. 64G.")]
DependencyOpt = Annotated[Optional[str], typer.Option("--dependency", help="A Slurm dependency, e.g. afterok:123.")]


def _short(path: str, root) -> str:
    """A log path relative to the workspace where it lies inside it (tables stay readable)."""
    import os

    rel = os.path.relpath(path, root)
    return path if rel.startswith("..") else rel


def _known_commands() -> Optional[set[str]]:
    """The commands registered on the main app (None when unknown)."""
    if _MAIN_APP is None:
        return None
    names = set()
    for c in _MAIN_APP.registered_commands:
        name = c.name or (c.callback.__name__.replace("_", "-") if c.callback else None)
        if name:
            names.add(name)
    for g in _MAIN_APP.registered_groups:
        if g.name:
            names.add(g.name)
    return names


@app.command(
    "render",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    epilog="Examples:\n\n"
    "lessctl slurm render grads --ckpt 105 --time 24:00:00 | sbatch\n\n"
    "lessctl slurm render grads --array 1-4     (task k: the k-th warmup checkpoint)\n\n"
    "lessctl slurm render grads --ckpt 105 --shards 8\n\n"
    "Options after -- go to the stage even where render has one of that name.",
)
def render(
    ctx: typer.Context,
    stage: Annotated[
        str, typer.Argument(help="The stage (a lessctl command: warmup, grads, match, finetune, eval, ...).")
    ],
    job_name: JobNameOpt = None,
    array: ArrayOpt = None,
    shards: ShardsOpt = None,
    time: TimeOpt = None,
    partition: PartitionOpt = None,
    account: AccountOpt = None,
    qos: QosOpt = None,
    gpus: GpusOpt = None,
    cpus: CpusOpt = None,
    mem: MemOpt = None,
    dependency: DependencyOpt = None,
) -> None:
    """Print an sbatch script that runs `lessctl STAGE` with the options that follow it, in this workspace."""
    from lessctl.config import closest
    from lessctl.errors import ConfigError
    from lessctl.slurm.quoting import TASK
    from lessctl.slurm.render import log_dir, render_script

    stage_args = list(ctx.args)
    known = _known_commands()
    if known is not None and stage not in known:
        raise ConfigError(f"STAGE: unknown lessctl command '{stage}'{closest(stage, sorted(known), list_all=False)}")
    if _MAIN_APP is not None:  # `finetune --target a b` is refused now, not in the job
        from lessctl.commands._options import spread_values

        spread_values(typer.main.get_command(_MAIN_APP), [stage, *stage_args])
    task_args: list[str] = []
    if shards is not None:
        if stage != "grads":
            raise ConfigError("--shards: only grads runs in shards")
        if array is not None:
            raise ConfigError("--shards: give --shards or --array, not both")
        array, task_args = f"1-{shards}", ["--shard", f"{TASK}/{shards}"]
    elif array is not None and stage == "grads":
        if any(a.split("=")[0] in ("--ckpt", "--ckpt-index", "--shard") for a in stage_args):
            raise ConfigError(
                "--array: grads takes its checkpoint from the array task; drop --ckpt/--ckpt-index/--shard"
            )
        task_args = ["--ckpt-index", TASK]
    cfg = load_config()
    text = render_script(
        cfg,
        stage,
        stage_args,
        job_name=job_name,
        array=array,
        task_args=task_args,
        dependency=dependency,
        time=time,
        partition=partition,
        account=account,
        qos=qos,
        gpus=gpus,
        cpus=cpus,
        memory=mem,
    )
    log_dir(cfg, create=True)  # Slurm opens the log before the script runs
    typer.echo(text, nl=False)


@app.command("submit")
def submit(
    stages: Annotated[str, typer.Option("--stages", help="Comma-separated stages, run in pipeline order.")] = ",".join(
        STAGES
    ),
    dry_run: Annotated[
        bool, typer.Option("--dry-run", metavar="", help="Print the scripts and sbatch lines; submit nothing.")
    ] = False,
    shards: ShardsOpt = None,
    methods: MethodsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Submit the stages as jobs, each after the jobs it needs succeeded (afterok).

    With a study table in the workspace file (or --methods), the study's jobs not yet complete: warmup, grads,
    one match job, one finetune array, eval arrays; a resubmission submits only what is missing.
    """
    from lessctl.slurm.study import submit_study, uses_study
    from lessctl.slurm.submit import jobs_path, submit_pipeline

    cfg = load_config()
    names = [s.strip() for s in stages.split(",") if s.strip()]
    methods = split_values(methods)
    if uses_study(cfg, methods):
        if not names:
            raise ConfigError("--stages: no stages given")
        if unknown := [s for s in names if s not in STAGES]:
            raise ConfigError(f"--stages: unknown stage '{unknown[0]}'{closest(unknown[0], STAGES)}")
        rows = submit_study(cfg, names, dry_run=dry_run, methods=methods, shards=shards)
        if not rows:
            if json_out:
                emit_json({"dry_run": dry_run, "jobs": [], "jobs_file": None})
            else:
                typer.echo("nothing to submit: every job of the study is complete")
            return
    else:
        rows = submit_pipeline(cfg, names, dry_run=dry_run, shards=shards)
    if json_out:
        emit_json({"dry_run": dry_run, "jobs": rows, "jobs_file": None if dry_run else str(jobs_path(cfg))})
        return
    if dry_run:
        for r in rows:
            after = f" after {', '.join(r['after'])}" if r["after"] else ""
            typer.echo(f"# ===== {r['label']}{after}: {' '.join(r['sbatch'])} < script =====")
            typer.echo(r["script"])
    title = "Slurm jobs (dry run: nothing submitted)" if dry_run else f"Slurm jobs (recorded in {jobs_path(cfg)})"
    gpu = any("gpu_time" in r for r in rows)  # a dry run of the study: each job's estimated GPU time
    print_table(
        title,
        ["stage", "job", "array", "after", "log"] + (["GPU time"] if gpu else []),
        [
            [r["label"], r["job_id"] or "-", r["array"] or "", ", ".join(r["after"]), _short(r["log"], cfg.root)]
            + ([r.get("gpu_time", "")] if gpu else [])
            for r in rows
        ],
    )


@app.command("status")
def status(json_out: JsonOpt = False) -> None:
    """Show the state of the jobs recorded by `lessctl slurm submit` (squeue, else sacct or scontrol)."""
    from lessctl.slurm.jobs import job_states
    from lessctl.slurm.submit import load_jobs

    cfg = load_config()
    jobs = load_jobs(cfg)
    states = job_states([j["job_id"] for j in jobs if j.get("job_id")])
    rows: list[dict[str, Any]] = []
    for j in jobs:
        st = states.get(str(j.get("job_id")))
        rows.append(
            {
                **j,
                "state": st.state if st else "UNKNOWN",
                "reason": st.reason if st else "",
                "tasks": st.tasks if st else {},
            }
        )
    if json_out:
        emit_json({"jobs": rows})
        return

    def tasks(r: dict[str, Any]) -> str:
        if not r["tasks"]:
            return ""
        done = sum(1 for s in r["tasks"].values() if s == "COMPLETED")
        return f"{done}/{len(r['tasks'])} done"

    print_table(
        "Slurm jobs",
        ["stage", "job", "state", "reason", "tasks", "log"],
        [[r["label"], r["job_id"], r["state"], r["reason"], tasks(r), _short(r["log"], cfg.root)] for r in rows],
    )


def register(main_app: typer.Typer) -> None:
    global _MAIN_APP
    _MAIN_APP = main_app
    main_app.add_typer(app, name="slurm", help="Run the stages as Slurm jobs (render, submit, status).")
