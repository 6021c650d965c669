"""Rendering one stage's sbatch script from its Jinja2 template (the shipped ones or the user's own folder)."""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

from lessctl.errors import ConfigError
from lessctl.outputs import layout as paths
from lessctl.slurm.quoting import (
    _ARRAY,
    _COMMAND,
    _DEPENDENCY,
    _ENV_NAME,
    _MEMORY,
    _TIME,
    Raw,
    _check_text,
    _directive,
    _shell_finalize,
    _task_word,
)
from lessctl.slurm.settings import stage_settings

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- rendering


def slurm_dir(cfg: Any) -> Path:
    """`<output_dir>/slurm`: job logs, submitted scripts and jobs.json."""
    return paths.slurm_dir(cfg.output_dir)


def log_dir(cfg: Any, create: bool = False) -> Path:
    """Where jobs write their logs; Slurm needs it to exist when a job starts."""
    d = slurm_dir(cfg) / "logs"
    if create:
        d.mkdir(parents=True, exist_ok=True)
    return d


def _template_env(cfg: Any):
    import jinja2

    shipped = Path(__file__).parent / "templates"
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
    command: Sequence[str] = (),
    **overrides: Any,
) -> str:
    """An sbatch script that runs `lessctl --config <workspace> <stage> <stage_args> <task_args>`.

    stage: a lessctl command (the pipeline stages have their own templates); stage_args: its options,
    passed through untouched; array: an #SBATCH --array spec; task_args: more options, in which
    `{task}` becomes $SLURM_ARRAY_TASK_ID; dependency: e.g. "afterok:12:13"; time and overrides
    (partition, account, qos, gpus, cpus, memory, modules, setup, sbatch_extra, env): this job's
    settings over the workspace's [slurm] and [slurm.stages.<stage>]. python: the interpreter that
    runs lessctl in the job (default: this one; a setup line may set LESSCTL_PYTHON instead). command: the
    lessctl command line the job runs instead of `<stage>` (e.g. `run --items ...` for the study's jobs), with
    the stage's template and settings.
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
            f"{s['time'].source}: {s['time'].value!r} is not a Slurm time (minutes, HH:MM:SS, D-HH:MM:SS or UNLIMITED)"
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
    lessctl_args += [shlex.quote(a) for a in command] or [stage]
    lessctl_args += [shlex.quote(a) for a in stage_args]
    lessctl_args += [_task_word(a) for a in task_args]
    if stage == "grads" and s["gpus"].value > 1:  # several GPUs in one grads job: one worker per GPU
        taken = [a for a in (*stage_args, *task_args) if a.split("=")[0] in ("--devices", "--device", "--shard")]
        if taken:
            raise ConfigError(
                f"{s['gpus'].source} = {s['gpus'].value}: a grads job on several GPUs runs "
                f"`lessctl grads --devices {s['gpus'].value}`, which replaces {taken[0].split('=')[0]}; "
                "drop that option or use one GPU per job"
            )
        lessctl_args += ["--devices", str(s["gpus"].value)]

    import jinja2

    from lessctl import __version__

    env_j = _template_env(cfg)
    try:
        tname = template_name(env_j, stage)
        tmpl = env_j.get_template(tname)
    except jinja2.TemplateError as exc:
        where = f"{exc.filename}:{exc.lineno}" if getattr(exc, "filename", None) else f"{stage}.sh.j2"
        raise ConfigError(f"Slurm template {where}: {exc.message or exc}") from None
    return _render(
        tmpl,
        tname,
        dict(
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
        ),
    )


def _render(tmpl: Any, name: str, context: dict[str, Any]) -> str:
    import jinja2

    try:
        return tmpl.render(**context)
    except jinja2.TemplateError as exc:
        raise ConfigError(f"Slurm template {tmpl.filename or name}: {exc}") from None
