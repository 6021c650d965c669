"""Slurm: rendering templates/slurm/* into sbatch scripts, submitting them as a chain, and their states.

Two kinds of text leave this module and need different quoting:
  - `#SBATCH` lines are parsed by sbatch itself (whitespace splits, "..." groups, backslash escapes,
    an unquoted # starts a comment); their values are validated here (no control characters, Slurm's
    own formats for time, memory, array and dependency) and quoted for sbatch's parser;
  - everything in the script body is shell: every value a template prints is shell-quoted by the
    template environment itself (`finalize`), unless this module marked it `Raw` (already quoted) or
    the template rendered it itself ({{ super() }}, a macro, a {% set %} block: quoted inside).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from lessctl.config import closest
from lessctl.errors import ConfigError, LessctlError, MissingArtifactError
from lessctl.files import write_atomic
from lessctl.outputs import layout as paths
from lessctl.slurm.quoting import TASK
from lessctl.slurm.render import log_dir, render_script, slurm_dir
from lessctl.vocab import REPS, REPS_METHODS, STAGES

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- submitting


def _sbatch_missing() -> LessctlError:
    return LessctlError("Slurm's sbatch is not on PATH; run this on a Slurm login node (or load Slurm's module)")


def submit_script(
    text: str, cwd: str | os.PathLike | None = None, sbatch_args: Sequence[str] = (), timeout_s: float = 300
) -> str:
    """Submits a script with `sbatch --parsable [sbatch_args]` (reading it on stdin); returns the job id."""
    exe = shutil.which("sbatch")
    if exe is None:
        raise _sbatch_missing()
    try:
        proc = subprocess.run(
            [exe, "--parsable", *sbatch_args],
            input=text,
            capture_output=True,
            text=True,
            cwd=cwd,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        raise LessctlError(f"sbatch did not answer within {timeout_s:.0f} s; is slurmctld reachable?") from None
    if proc.returncode != 0:
        msg = " ".join(proc.stderr.split()) or f"exit code {proc.returncode}"
        raise LessctlError(f"sbatch refused the job: {msg}")
    job_id = proc.stdout.strip().split(";")[0].strip()
    if not job_id.isdigit():
        raise LessctlError(f"sbatch answered {proc.stdout.strip()!r} instead of a job id")
    return job_id


@dataclass(frozen=True)
class JobSpec:
    """One job of a chain: a lessctl command, its options, and which earlier jobs it waits for."""

    stage: str
    args: tuple[str, ...] = ()
    array: str | None = None
    task_args: tuple[str, ...] = ()  # options with {task} (the array task id)
    after: tuple[int, ...] = ()  # positions in the chain of the jobs this one waits for (afterok)
    label: str = ""  # e.g. "grads ckpt 2"; default: the stage
    overrides: dict = field(default_factory=dict)  # time, gpus, ... for this job
    command: tuple[str, ...] = ()  # the lessctl command run instead of `<stage>` (with the stage's template)
    items: tuple[str, ...] = ()  # the study's jobs it runs (lessctl.study.graph keys)
    dependency: str = "afterok"  # or aftercorr: array task k waits for task k of the array it is after


def plan_pipeline(
    cfg: Any,
    stages: Sequence[str] = STAGES,
    shards: int | None = None,
    extra_args: dict[str, Sequence[str]] | None = None,
) -> list[JobSpec]:
    """The jobs of `lessctl slurm submit`: each stage after the previous one (afterok).

    grads runs as an array over the warmup checkpoints (task k: `--ckpt-index k`, 1-based, one per
    epoch); with shards=N, one array of N shards (`--shard k/N`) per checkpoint instead. finetune is
    one job per target (`--target T --method <select.method>`), eval one per built-in target
    (`--task mmlu|bbh|tydiqa --model <output_dir>/finetune/T-<method>`, after that target's finetune);
    custom targets have no eval task. extra_args: more options for every job of a stage.
    """
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"--stages: unknown stage '{unknown[0]}'{closest(unknown[0], STAGES)}")
    if not stages:
        raise ConfigError("--stages: no stages given")
    if shards is not None and shards < 1:
        raise ConfigError(f"--shards: must be at least 1, got {shards}")
    extra_args = extra_args or {}
    ordered = [s for s in STAGES if s in set(stages)]
    specs: list[JobSpec] = []
    previous: tuple[int, ...] = ()
    for stage in ordered:
        args = tuple(extra_args.get(stage, ()))
        start = len(specs)
        if stage == "grads":
            n_ckpt = cfg.warmup.epochs
            if cfg.select.method in REPS_METHODS:  # rds matches on representations
                args += ("--type", REPS)
            if shards and shards > 1:
                for k in range(1, n_ckpt + 1):
                    specs.append(
                        JobSpec(
                            stage,
                            args + ("--ckpt-index", str(k)),
                            array=f"1-{shards}",
                            task_args=("--shard", f"{TASK}/{shards}"),
                            after=previous,
                            label=f"grads ckpt {k}",
                        )
                    )
            else:
                specs.append(
                    JobSpec(
                        stage,
                        args,
                        array=f"1-{n_ckpt}",
                        task_args=("--ckpt-index", TASK),
                        after=previous,
                    )
                )
        elif stage == "finetune":
            if not cfg.data.targets:
                raise ConfigError("--stages: finetune needs targets in [data] targets (or drop it from --stages)")
            for target in cfg.data.targets:
                specs.append(
                    JobSpec(
                        stage,
                        args + ("--target", target, "--method", cfg.select.method),
                        after=previous,
                        label=f"finetune {target}",
                    )
                )
        elif stage == "eval":
            finetuned = {s.label: i for i, s in enumerate(specs) if s.stage == "finetune"}
            for target, spec in cfg.data.targets.items():
                if not isinstance(spec, str):
                    continue  # a custom target: nothing to evaluate it with
                model = paths.finetune_dir(cfg.output_dir, paths.finetune_name(target, cfg.select.method))
                after = (finetuned[f"finetune {target}"],) if f"finetune {target}" in finetuned else previous
                specs.append(
                    JobSpec(
                        stage,
                        args + ("--task", spec, "--model", str(model)),
                        after=after,
                        label=f"eval {target}",
                    )
                )
        else:
            specs.append(JobSpec(stage, args, after=previous))
        previous = tuple(range(start, len(specs)))
    return specs


def jobs_path(cfg: Any) -> Path:
    return slurm_dir(cfg) / "jobs.json"


def load_jobs(cfg: Any) -> list[dict[str, Any]]:
    """The jobs recorded by `lessctl slurm submit` (newest submission of each stage)."""
    p = jobs_path(cfg)
    if not p.is_file():
        raise MissingArtifactError(f"no Slurm jobs recorded in {p}; submit them with `lessctl slurm submit`")
    try:
        data = json.loads(p.read_text())
        return list(data["jobs"])
    except (ValueError, KeyError, TypeError) as exc:
        raise LessctlError(f"{p}: not a jobs file written by lessctl ({exc})") from None


def _save_jobs(cfg: Any, new: list[dict[str, Any]]) -> None:
    p = jobs_path(cfg)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        old = load_jobs(cfg)
    except LessctlError:
        old = []
    replaced = {j["stage"] for j in new}
    jobs = [j for j in old if j.get("stage") not in replaced] + new
    order = {s: i for i, s in enumerate(STAGES)}
    jobs.sort(key=lambda j: order.get(j.get("stage"), len(order)))
    write_atomic(
        p, json.dumps({"version": 1, "config": str(cfg.path) if cfg.path else None, "jobs": jobs}, indent=2) + "\n"
    )


def submit_jobs(cfg: Any, specs: Sequence[JobSpec], dry_run: bool = False) -> list[dict[str, Any]]:
    """Renders and submits a chain of jobs; records them in `<output_dir>/slurm/jobs.json`.

    Each job's dependency goes on sbatch's command line (`--dependency=afterok:<ids>
    --kill-on-invalid-dep=yes`), so a dry run shows the very scripts a real run submits.
    Returns one dict per job: stage, label, job_id (None in a dry run), array, after (job ids, or
    labels in a dry run), sbatch (the command line), job_name, script (the text in a dry run, else
    the path of the saved copy) and log.
    """
    for i, spec in enumerate(specs):
        if any(not 0 <= a < i for a in spec.after):
            raise ValueError(f"job {i} waits for a job that is not before it: {spec.after}")
    # Render everything first so that a config mistake submits nothing.
    texts = [
        render_script(cfg, s.stage, s.args, array=s.array, task_args=s.task_args, command=s.command, **s.overrides)
        for s in specs
    ]
    if dry_run:
        rows = []
        for spec, text in zip(specs, texts):
            after = [specs[a].label or specs[a].stage for a in spec.after]
            deps = (
                [f"--dependency={spec.dependency}:" + ":".join(f"<{a}>" for a in after), "--kill-on-invalid-dep=yes"]
                if after
                else []
            )
            rows.append(_row(cfg, spec, None, after, ["sbatch", "--parsable", *deps], text))
        return rows

    if shutil.which("sbatch") is None:
        raise _sbatch_missing()
    log_dir(cfg, create=True)
    scripts = slurm_dir(cfg) / "scripts"
    scripts.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    ids: list[str] = []
    for spec, text in zip(specs, texts):
        after = [ids[a] for a in spec.after]
        deps = [f"--dependency={spec.dependency}:" + ":".join(after), "--kill-on-invalid-dep=yes"] if after else []
        try:
            job_id = submit_script(text, cwd=cfg.root, sbatch_args=deps)
        except LessctlError as exc:
            if rows:
                done = ", ".join(f"{r['label']}={r['job_id']}" for r in rows)
                raise LessctlError(
                    f"{exc} (while submitting {spec.label or spec.stage}; already submitted: {done}; "
                    f"cancel them with `scancel {' '.join(r['job_id'] for r in rows)}`)"
                ) from None
            raise
        ids.append(job_id)
        path = scripts / f"{_slug(spec.label or spec.stage)}-{job_id}.sh"
        path.write_text(text)
        rows.append(_row(cfg, spec, job_id, after, ["sbatch", "--parsable", *deps], str(path)))
        _save_jobs(cfg, rows)
    return rows


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-")


def _row(
    cfg: Any, spec: JobSpec, job_id: str | None, after: list[str], sbatch: list[str], script: str
) -> dict[str, Any]:
    jid = job_id or "<id>"
    pattern = f"{spec.stage}-{jid}_<task>.out" if spec.array else f"{spec.stage}-{jid}.out"
    return {
        "stage": spec.stage,
        "label": spec.label or spec.stage,
        "job_id": job_id,
        "array": spec.array,
        "after": after,
        "sbatch": sbatch,
        "job_name": f"{cfg.experiment.name}-{spec.stage}",
        "script": script,
        "log": str(log_dir(cfg) / pattern),
        "submitted_at": datetime.now(timezone.utc).isoformat(timespec="seconds") if job_id else None,
        **({"items": list(spec.items)} if spec.items else {}),
    }


def submit_pipeline(
    cfg: Any,
    stages: Sequence[str] = STAGES,
    dry_run: bool = False,
    *,
    shards: int | None = None,
    extra_args: dict[str, Sequence[str]] | None = None,
) -> list[dict[str, Any]]:
    """Submits the pipeline's stages as a chain of Slurm jobs (see `plan_pipeline`, `submit_jobs`)."""
    return submit_jobs(cfg, plan_pipeline(cfg, stages, shards, extra_args), dry_run=dry_run)
