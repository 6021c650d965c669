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

import dataclasses
import difflib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

from lessctl.errors import ConfigError, LessctlError, MissingArtifactError

log = logging.getLogger(__name__)

# The pipeline, in dependency order (`lessctl slurm submit`).
PIPELINE = ("warmup", "grads", "match", "finetune", "eval")
# Commands that may have their own `[slurm.stages.<name>]` overrides.
STAGE_NAMES = PIPELINE + ("ir", "ablate", "run", "demo")
# How many GPUs a command uses: "multi" takes [slurm] gpus (launched through torchrun when > 1),
# "one" at most one, "none" none. Commands not listed use one GPU when [slurm] gpus > 0. A stage's own
# `[slurm.stages.<name>] gpus` overrides this; for grads, more than one runs `lessctl grads --devices N`.
GPU_USE = {
    "warmup": "multi", "finetune": "multi", "ablate": "multi",
    "grads": "one", "eval": "one", "run": "one", "demo": "one",
    "match": "none", "ir": "none",
}
# [slurm] keys a stage can override (the rest are global).
STAGE_KEYS = ("partition", "account", "qos", "gpus", "cpus", "memory", "time", "modules", "setup", "sbatch_extra", "env")
_KEY_TYPES = {
    "partition": str, "account": str, "qos": str, "memory": str, "time": str,
    "gpus": int, "cpus": int, "modules": list, "setup": list, "sbatch_extra": list, "env": dict,
}
# The placeholder in `task_args` that becomes the array task id in the job.
TASK = "{task}"
TASK_VAR = '"${SLURM_ARRAY_TASK_ID}"'
TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
    "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT",
})
_FAILED_STATES = TERMINAL_STATES - {"COMPLETED"}
_ACTIVE_STATES = frozenset({"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "RESIZING"})

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TIME = re.compile(
    r"^(?:\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2}"
    r"|UNLIMITED|INFINITE|unlimited|infinite)$"
)
_MEMORY = re.compile(r"^\d+[KMGTkmgt]?$")
_ARRAY = re.compile(r"^\d+(?:-\d+(?::\d+)?)?(?:,\d+(?:-\d+(?::\d+)?)?)*(?:%\d+)?$")
_DEPENDENCY = re.compile(r"^[A-Za-z0-9_:+,?]+$")
_COMMAND = re.compile(r"^[a-z][a-z0-9-]*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Raw(str):
    """Text already quoted for its place in the script: printed by templates as is."""


def _shell_finalize(value: Any) -> str:
    # Every `{{ value }}` in a template passes through here: Raw stays, anything else is shell-quoted.
    if isinstance(value, Raw):
        return value
    if value is None:
        return "''"
    if isinstance(value, bool):
        value = "true" if value else "false"
    return shlex.quote(str(value))


def sbatch_quote(value: str) -> str:
    """Quotes a value for sbatch's `#SBATCH` parser (not the shell's): "..." with \\ and " escaped."""
    if value and not re.search(r"[\s\"'\\#]", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _check_text(name: str, value: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    m = _CONTROL.search(value)
    if m:
        what = "a newline" if m.group() in "\r\n" else f"a control character ({m.group()!r})"
        raise ConfigError(f"{name}: {value!r} contains {what}, which cannot go into an #SBATCH line")
    return value


def _directive(option: str, value: Any, name: str) -> Raw:
    """One `#SBATCH --option=value` line; `name` is what the user calls the value (key or option)."""
    text = _check_text(name, str(value))
    return Raw(f"#SBATCH --{option}={sbatch_quote(text)}")


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class _Setting:
    value: Any
    source: str  # the key or option it came from, for error messages


def _closest(name: str, options: Iterable[str]) -> str:
    options = list(options)
    m = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean '{m[0]}'?)" if m else f" (valid: {', '.join(options)})"


def _check_type(name: str, key: str, value: Any) -> Any:
    typ = _KEY_TYPES[key]
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
    elif not isinstance(value, typ):
        kind = {str: "a string", list: "a list", dict: "a table"}[typ]
        raise ConfigError(f"{name}: expected {kind}, got {value!r}")
    return value


def check_stage_overrides(slurm_cfg: Any) -> None:
    """Checks `[slurm.stages.*]`: known stage names, known keys, right types (ConfigError naming the key)."""
    stages = slurm_cfg.stages
    for stage, table in stages.items():
        if stage not in STAGE_NAMES:
            raise ConfigError(f"slurm.stages.{stage}: unknown stage{_closest(stage, STAGE_NAMES)}")
        if not isinstance(table, dict):
            raise ConfigError(f"slurm.stages.{stage}: expected a table of [slurm] keys, got {table!r}")
        for key, value in table.items():
            if key not in STAGE_KEYS:
                raise ConfigError(f"slurm.stages.{stage}.{key}: unknown key{_closest(key, STAGE_KEYS)}")
            _check_type(f"slurm.stages.{stage}.{key}", key, value)


def stage_settings(cfg: Any, stage: str, overrides: dict[str, Any] | None = None) -> dict[str, _Setting]:
    """The [slurm] settings of one stage: [slurm] < the stage's GPU use < [slurm.stages.<stage>] < overrides."""
    sc = cfg.slurm
    check_stage_overrides(sc)
    out = {k: _Setting(getattr(sc, k), f"slurm.{k}") for k in STAGE_KEYS}
    use = GPU_USE.get(stage, "one")
    if use == "one":
        out["gpus"] = _Setting(min(sc.gpus, 1), "slurm.gpus")
    elif use == "none":
        out["gpus"] = _Setting(0, "slurm.gpus")
    for key, value in sc.stages.get(stage, {}).items():
        name = f"slurm.stages.{stage}.{key}"
        if key == "env":  # env tables merge; every other key replaces
            value = {**out["env"].value, **value}
        out[key] = _Setting(value, name)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in STAGE_KEYS:
            raise ValueError(f"unknown Slurm setting {key!r}")
        name = "--" + ("mem" if key == "memory" else key.replace("_", "-"))
        out[key] = _Setting(_check_type(name, key, value), name)
    return out


# ----------------------------------------------------------------------------- rendering


def slurm_dir(cfg: Any) -> Path:
    """`<output_dir>/slurm`: job logs, submitted scripts and jobs.json."""
    return cfg.output_dir / "slurm"


def log_dir(cfg: Any, create: bool = False) -> Path:
    """Where jobs write their logs; Slurm needs it to exist when a job starts."""
    d = slurm_dir(cfg) / "logs"
    if create:
        d.mkdir(parents=True, exist_ok=True)
    return d


def _template_env(cfg: Any):
    import jinja2

    shipped = Path(__file__).parent / "templates" / "slurm"
    search = [str(shipped)]
    if cfg.slurm.templates:
        own = cfg.resolve(cfg.slurm.templates)
        if not own.is_dir():
            raise ConfigError(f"slurm.templates: {own} is not a folder of templates")
        search.insert(0, str(own))
    class _ShellEnvironment(jinja2.Environment):
        # Text a template renders itself ({{ super() }}, macros, {% set %} blocks) is made of template
        # text and values that were quoted on their way in: it is printed as is, not quoted again.
        concat = staticmethod(lambda parts: Raw("".join(parts)))

    return _ShellEnvironment(
        loader=jinja2.FileSystemLoader(search),
        finalize=_shell_finalize,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def template_name(env: Any, stage: str) -> str:
    """`<stage>.sh.j2` where one exists (the user's folder first), else `base.sh.j2`."""
    import jinja2

    name = f"{stage}.sh.j2"
    try:
        env.get_template(name)
        return name
    except jinja2.TemplateNotFound:
        return "base.sh.j2"


def _task_word(arg: str) -> Raw:
    """Shell-quotes an argument, except that `{task}` becomes the array task id."""
    pieces = arg.split(TASK)
    return Raw(TASK_VAR.join(shlex.quote(p) if p else "" for p in pieces) or "''")


def render_script(
    cfg: Any,
    stage: str,
    stage_args: Sequence[str] = (),
    *,
    job_name: str | None = None,
    array: str | None = None,
    task_args: Sequence[str] = (),
    dependency: str | None = None,
    time: str | None = None,
    python: str | None = None,
    **overrides: Any,
) -> str:
    """An sbatch script that runs `lessctl --config <workspace> <stage> <stage_args> <task_args>`.

    stage: a lessctl command (the pipeline stages have their own templates); stage_args: its options,
    passed through untouched; array: an #SBATCH --array spec; task_args: more options, in which
    `{task}` becomes $SLURM_ARRAY_TASK_ID; dependency: e.g. "afterok:12:13"; time and overrides
    (partition, account, qos, gpus, cpus, memory, modules, setup, sbatch_extra, env): this job's
    settings over the workspace's [slurm] and [slurm.stages.<stage>]. python: the interpreter that
    runs lessctl in the job (default: this one; a setup line may set LESSCTL_PYTHON instead).
    """
    if not isinstance(stage, str) or not _COMMAND.match(stage):
        raise ConfigError(f"stage: {stage!r} is not a lessctl command name")
    s = stage_settings(cfg, stage, {**overrides, "time": time})
    sc = cfg.slurm

    for key in ("gpus", "cpus"):
        low = 1 if key == "cpus" else 0
        if s[key].value < low:
            raise ConfigError(f"{s[key].source}: must be at least {low}, got {s[key].value}")
    if not _TIME.match(_check_text(s["time"].source, s["time"].value)):
        raise ConfigError(
            f"{s['time'].source}: {s['time'].value!r} is not a Slurm time "
            "(minutes, HH:MM:SS, D-HH:MM:SS or UNLIMITED)"
        )
    if s["memory"].value and not _MEMORY.match(_check_text(s["memory"].source, s["memory"].value)):
        raise ConfigError(f"{s['memory'].source}: {s['memory'].value!r} is not a Slurm memory size (e.g. 64G, 500M)")
    if array is not None and not _ARRAY.match(_check_text("--array", array)):
        raise ConfigError(f"--array: {array!r} is not a Slurm array spec (e.g. 1-4, 1,3,5 or 1-8%2)")
    if dependency is not None and not _DEPENDENCY.match(_check_text("--dependency", dependency)):
        raise ConfigError(f"--dependency: {dependency!r} is not a Slurm dependency (e.g. afterok:123:124)")
    if task_args and array is None:
        raise ConfigError("task arguments with {task} need a job array (--array)")
    for a in (*stage_args, *task_args):
        if not isinstance(a, str):
            raise ConfigError(f"stage option {a!r}: expected a string")

    name = job_name if job_name is not None else f"{cfg.experiment.name}-{stage}"
    name_source = "--job-name" if job_name is not None else "experiment.name (the default job name)"
    if not name.strip():
        raise ConfigError(f"{name_source}: must not be empty")
    logs = log_dir(cfg)
    pattern = f"{stage}-%A_%a.out" if array is not None else f"{stage}-%j.out"
    # `%` in a folder name would be a Slurm filename pattern: %% is a literal %.
    output = str(logs).replace("%", "%%") + "/" + pattern

    directives = [
        _directive("job-name", name, name_source),
        _directive("output", output, "slurm log path (experiment.output_dir)"),
        Raw("#SBATCH --nodes=1"),
        Raw("#SBATCH --ntasks=1"),
        _directive("cpus-per-task", s["cpus"].value, s["cpus"].source),
        _directive("time", s["time"].value, s["time"].source),
    ]
    for key, option in (("partition", "partition"), ("account", "account"), ("qos", "qos")):
        if s[key].value:
            directives.append(_directive(option, s[key].value, s[key].source))
    if s["gpus"].value > 0:
        directives.append(_directive("gres", f"gpu:{s['gpus'].value}", s["gpus"].source))
    if s["memory"].value:
        directives.append(_directive("mem", s["memory"].value, s["memory"].source))
    if array is not None:
        directives.append(_directive("array", array, "--array"))
    if dependency is not None:
        directives.append(_directive("dependency", dependency, "--dependency"))
        # A dependency that can never be satisfied (an earlier stage failed) cancels this job
        # instead of leaving it pending forever.
        directives.append(Raw("#SBATCH --kill-on-invalid-dep=yes"))
    for i, extra in enumerate(s["sbatch_extra"].value):
        where = f"{s['sbatch_extra'].source}[{i}]"
        if not isinstance(extra, str) or not extra.startswith("-"):
            raise ConfigError(f"{where}: expected an sbatch option such as '--constraint=a100', got {extra!r}")
        directives.append(Raw("#SBATCH " + _check_text(where, extra)))

    env = []
    for k, v in s["env"].value.items():
        if not _ENV_NAME.match(str(k)):
            raise ConfigError(f"{s['env'].source}.{k}: not a valid environment variable name")
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise ConfigError(f"{s['env'].source}.{k}: expected a string or number, got {v!r}")
        env.append((Raw(k), str(v)))
    for i, m in enumerate(s["modules"].value):
        if not isinstance(m, str) or not m:
            raise ConfigError(f"{s['modules'].source}[{i}]: expected a module name, got {m!r}")
    for i, line in enumerate(s["setup"].value):
        if not isinstance(line, str):
            raise ConfigError(f"{s['setup'].source}[{i}]: expected a shell line, got {line!r}")

    lessctl_args = []
    if cfg.path is not None:
        lessctl_args += ["--config", shlex.quote(str(cfg.path))]
    lessctl_args.append(stage)
    lessctl_args += [shlex.quote(a) for a in stage_args]
    lessctl_args += [_task_word(a) for a in task_args]
    if stage == "grads" and s["gpus"].value > 1:  # several GPUs in one grads job: one worker per GPU
        taken = [a for a in (*stage_args, *task_args) if a.split("=")[0] in ("--devices", "--device", "--shard")]
        if taken:
            raise ConfigError(f"{s['gpus'].source} = {s['gpus'].value}: a grads job on several GPUs runs "
                              f"`lessctl grads --devices {s['gpus'].value}`, which replaces {taken[0].split('=')[0]}; "
                              "drop that option or use one GPU per job")
        lessctl_args += ["--devices", str(s["gpus"].value)]

    from lessctl import __version__

    import jinja2

    env_j = _template_env(cfg)
    try:
        tname = template_name(env_j, stage)
        tmpl = env_j.get_template(tname)
    except jinja2.TemplateError as exc:
        where = f"{exc.filename}:{exc.lineno}" if getattr(exc, "filename", None) else f"{stage}.sh.j2"
        raise ConfigError(f"Slurm template {where}: {exc.message or exc}") from None
    return _render(tmpl, tname, dict(
        stage=Raw(stage),
        job_name=name,
        directives=directives,
        workspace=str(cfg.root),
        config_path=str(cfg.path) if cfg.path else "",
        output_dir=str(cfg.output_dir),
        log_dir=str(logs),
        python=python or sys.executable,
        lessctl_args=Raw(" ".join(lessctl_args)),
        stage_args=list(stage_args),
        gpus=s["gpus"].value,
        cpus=s["cpus"].value,
        memory=s["memory"].value,
        time=s["time"].value,
        partition=s["partition"].value,
        account=s["account"].value,
        qos=s["qos"].value,
        array=array,
        dependency=dependency,
        modules=list(s["modules"].value),
        setup=[Raw(line) for line in s["setup"].value],
        env=env,
        version=Raw(__version__),
        experiment=cfg.experiment.name,
        sc=sc,
    ))


def _render(tmpl: Any, name: str, context: dict[str, Any]) -> str:
    import jinja2

    try:
        return tmpl.render(**context)
    except jinja2.TemplateError as exc:
        raise ConfigError(f"Slurm template {tmpl.filename or name}: {exc}") from None


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
            [exe, "--parsable", *sbatch_args], input=text, capture_output=True, text=True, cwd=cwd, timeout=timeout_s,
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


def plan_pipeline(
    cfg: Any,
    stages: Sequence[str] = PIPELINE,
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
    unknown = [s for s in stages if s not in PIPELINE]
    if unknown:
        raise ConfigError(f"--stages: unknown stage '{unknown[0]}'{_closest(unknown[0], PIPELINE)}")
    if not stages:
        raise ConfigError("--stages: no stages given")
    if shards is not None and shards < 1:
        raise ConfigError(f"--shards: must be at least 1, got {shards}")
    extra_args = extra_args or {}
    ordered = [s for s in PIPELINE if s in set(stages)]
    specs: list[JobSpec] = []
    previous: tuple[int, ...] = ()
    for stage in ordered:
        args = tuple(extra_args.get(stage, ()))
        start = len(specs)
        if stage == "grads":
            n_ckpt = cfg.warmup.epochs
            if shards and shards > 1:
                for k in range(1, n_ckpt + 1):
                    specs.append(JobSpec(
                        stage, args + ("--ckpt-index", str(k)), array=f"1-{shards}",
                        task_args=("--shard", f"{TASK}/{shards}"), after=previous, label=f"grads ckpt {k}",
                    ))
            else:
                specs.append(JobSpec(
                    stage, args, array=f"1-{n_ckpt}", task_args=("--ckpt-index", TASK), after=previous,
                ))
        elif stage == "finetune":
            if not cfg.data.targets:
                raise ConfigError("--stages: finetune needs targets in [data] targets (or drop it from --stages)")
            for target in cfg.data.targets:
                specs.append(JobSpec(
                    stage, args + ("--target", target, "--method", cfg.select.method), after=previous,
                    label=f"finetune {target}",
                ))
        elif stage == "eval":
            finetuned = {s.label: i for i, s in enumerate(specs) if s.stage == "finetune"}
            for target, spec in cfg.data.targets.items():
                if not isinstance(spec, str):
                    continue  # a custom target: nothing to evaluate it with
                model = cfg.output_dir / "finetune" / f"{target}-{cfg.select.method}"
                after = (finetuned[f"finetune {target}"],) if f"finetune {target}" in finetuned else previous
                specs.append(JobSpec(
                    stage, args + ("--task", spec, "--model", str(model)), after=after, label=f"eval {target}",
                ))
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
    order = {s: i for i, s in enumerate(PIPELINE)}
    jobs.sort(key=lambda j: order.get(j.get("stage"), len(order)))
    tmp = p.with_suffix(".json.part")
    tmp.write_text(json.dumps({"version": 1, "config": str(cfg.path) if cfg.path else None, "jobs": jobs}, indent=2) + "\n")
    os.replace(tmp, p)


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
        render_script(cfg, s.stage, s.args, array=s.array, task_args=s.task_args, **s.overrides) for s in specs
    ]
    if dry_run:
        rows = []
        for spec, text in zip(specs, texts):
            after = [specs[a].label or specs[a].stage for a in spec.after]
            deps = ["--dependency=afterok:" + ":".join(f"<{a}>" for a in after), "--kill-on-invalid-dep=yes"] if after else []
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
        deps = ["--dependency=afterok:" + ":".join(after), "--kill-on-invalid-dep=yes"] if after else []
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


def _row(cfg: Any, spec: JobSpec, job_id: str | None, after: list[str], sbatch: list[str], script: str) -> dict[str, Any]:
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
    }


def submit_pipeline(
    cfg: Any,
    stages: Sequence[str] = PIPELINE,
    dry_run: bool = False,
    *,
    shards: int | None = None,
    extra_args: dict[str, Sequence[str]] | None = None,
) -> list[dict[str, Any]]:
    """Submits the pipeline's stages as a chain of Slurm jobs (see `plan_pipeline`, `submit_jobs`)."""
    return submit_jobs(cfg, plan_pipeline(cfg, stages, shards, extra_args), dry_run=dry_run)


# ----------------------------------------------------------------------------- states


@dataclass(frozen=True)
class JobState:
    """A job's state; for an array, the state of the whole and of each task."""

    job_id: str
    state: str  # PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, ... or UNKNOWN (Slurm forgot it)
    reason: str = ""
    tasks: dict = field(default_factory=dict)  # task id -> state (arrays only)
    source: str = ""  # squeue, sacct or scontrol

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES or self.state == "UNKNOWN"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _split_id(raw: str) -> tuple[str, str | None]:
    """'123' -> ('123', None); '123_4' -> ('123', '4'); '123_[5-7]' -> ('123', '[5-7]')."""
    job, _, task = raw.partition("_")
    return job, (task or None)


def _aggregate(job_id: str, records: list[tuple[str | None, str, str]], source: str) -> JobState:
    """records: (task id or None, state, reason) of one job."""
    states = [s for _, s, _ in records]
    tasks = {t: s for t, s, _ in records if t is not None}
    if any(s in _FAILED_STATES for s in states):
        state = next(s for s in states if s in _FAILED_STATES)
    elif any(s in _ACTIVE_STATES for s in states):
        state = "RUNNING"
    elif all(s == "COMPLETED" for s in states):
        state = "COMPLETED"
    else:
        state = next((s for s in states if s != "COMPLETED"), states[0])
    reason = next((r for _, s, r in records if s == state and r and r not in ("None", "(null)")), "")
    return JobState(job_id, state, reason, tasks, source)


def _run(cmd: list[str], timeout_s: float = 60) -> subprocess.CompletedProcess | None:
    exe = shutil.which(cmd[0])
    if exe is None:
        return None
    try:
        return subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        log.warning("%s did not answer within %s s", cmd[0], timeout_s)
        return None


def parse_squeue(text: str) -> dict[str, list[tuple[str | None, str, str]]]:
    """Lines `%i|%T|%r` (squeue -r) -> {job id: [(task, state, reason)]}."""
    out: dict[str, list] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 2 or not parts[0]:
            continue
        job, task = _split_id(parts[0])
        out.setdefault(job, []).append((task, parts[1].split()[0].upper(), parts[2] if len(parts) > 2 else ""))
    return out


def parse_sacct(text: str) -> dict[str, list[tuple[str | None, str, str]]]:
    """Lines `JobID|State|ExitCode` (sacct -n -P -X) -> {job id: [(task, state, exit code)]}."""
    out: dict[str, list] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 2 or not parts[0] or "." in parts[0]:
            continue
        job, task = _split_id(parts[0])
        state = parts[1].split()[0].upper() if parts[1].strip() else "UNKNOWN"  # "CANCELLED by 0"
        exit_code = parts[2] if len(parts) > 2 else ""
        out.setdefault(job, []).append((task, state, "" if exit_code in ("0:0", "") else f"exit {exit_code}"))
    return out


def parse_scontrol(text: str) -> list[tuple[str | None, str, str]]:
    """`scontrol show job -o` records of one job -> [(task, state, reason)]."""
    out = []
    for line in text.splitlines():
        fields = dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line))
        if "JobState" not in fields:
            continue
        task = fields.get("ArrayTaskId")
        out.append((task if task and task != "N/A" else None, fields["JobState"].upper(), fields.get("Reason", "")))
    return out


def job_states(job_ids: Sequence[str]) -> dict[str, JobState]:
    """The state of each job: squeue (jobs slurmctld still holds), then sacct, then scontrol."""
    ids = [str(j) for j in job_ids if j]
    result: dict[str, JobState] = {}
    if not ids:
        return result
    if shutil.which("squeue") is None and shutil.which("sacct") is None:
        raise LessctlError("Slurm's squeue is not on PATH; run this on a Slurm login node (or load Slurm's module)")
    # -t all: finished jobs too, while slurmctld keeps them (MinJobAge); -r: one line per array task.
    proc = _run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(ids), "-o", "%i|%T|%r"])
    if proc is not None and proc.returncode == 0:
        found = parse_squeue(proc.stdout)
        for j in ids:
            if j in found:
                result[j] = _aggregate(j, found[j], "squeue")
    missing = [j for j in ids if j not in result]
    if missing:
        proc = _run(["sacct", "-n", "-P", "-X", "-j", ",".join(missing), "-o", "JobID,State,ExitCode"])
        if proc is not None and proc.returncode == 0:  # fails where accounting is not configured
            found = parse_sacct(proc.stdout)
            for j in missing:
                if j in found:
                    result[j] = _aggregate(j, found[j], "sacct")
    for j in [j for j in ids if j not in result]:
        proc = _run(["scontrol", "show", "job", "-o", j])
        records = parse_scontrol(proc.stdout) if proc is not None and proc.returncode == 0 else []
        result[j] = _aggregate(j, records, "scontrol") if records else JobState(j, "UNKNOWN", "not known to Slurm any more")
    return result


def wait_for(job_ids: Sequence[str], timeout_s: float = 120, poll_s: float = 0.5) -> dict[str, JobState]:
    """Polls until every job is finished (or Slurm forgot it); raises LessctlError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = job_states(job_ids)
        if all(s.done for s in states.values()):
            return states
        if time.monotonic() > deadline:
            pending = ", ".join(f"{j}={s.state}" for j, s in states.items() if not s.done)
            raise LessctlError(f"jobs still not finished after {timeout_s:.0f} s: {pending}")
        time.sleep(poll_s)
