"""Per-stage Slurm settings: `[slurm]` defaults, `[slurm.stages.<stage>]` overrides, each validated."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from lessctl.config import closest, type_problem
from lessctl.errors import ConfigError
from lessctl.vocab import SLURM_STAGES

log = logging.getLogger(__name__)


# The pipeline, in dependency order (`lessctl slurm submit`).
# Commands that may have their own `[slurm.stages.<name>]` overrides.
# How many GPUs a command uses: "multi" takes [slurm] gpus (launched through torchrun when > 1),
# "one" at most one, "none" none. Commands not listed use one GPU when [slurm] gpus > 0. A stage's own
# `[slurm.stages.<name>] gpus` overrides this; for grads, more than one runs `lessctl grads --devices N`.
GPU_USE = {
    "warmup": "multi",
    "finetune": "multi",
    "ablate": "multi",
    "grads": "one",
    "eval": "one",
    "run": "one",
    "demo": "one",
    "match": "none",
    "ir": "none",
}
# [slurm] keys a stage can override (the rest are global).
STAGE_KEYS = (
    "partition",
    "account",
    "qos",
    "gpus",
    "cpus",
    "memory",
    "time",
    "modules",
    "setup",
    "sbatch_extra",
    "env",
)
_KEY_TYPES = {
    "partition": str,
    "account": str,
    "qos": str,
    "memory": str,
    "time": str,
    "gpus": int,
    "cpus": int,
    "modules": list,
    "setup": list,
    "sbatch_extra": list,
    "env": dict,
}


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class _Setting:
    value: Any
    source: str  # the key or option it came from, for error messages


def _check_type(name: str, key: str, value: Any) -> Any:
    problem = type_problem(name, value, _KEY_TYPES[key])
    if problem:
        raise ConfigError(problem)
    return value


def check_stage_overrides(slurm_cfg: Any) -> None:
    """Checks `[slurm.stages.*]`: known stage names, known keys, right types (ConfigError naming the key)."""
    stages = slurm_cfg.stages
    for stage, table in stages.items():
        if stage not in SLURM_STAGES:
            raise ConfigError(f"slurm.stages.{stage}: unknown stage{closest(stage, SLURM_STAGES)}")
        if not isinstance(table, dict):
            raise ConfigError(f"slurm.stages.{stage}: expected a table of [slurm] keys, got {table!r}")
        for key, value in table.items():
            if key not in STAGE_KEYS:
                raise ConfigError(f"slurm.stages.{stage}.{key}: unknown key{closest(key, STAGE_KEYS)}")
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
