"""The study plan: `[study]` in lessctl.toml, what `lessctl run`, `lessctl slurm submit` and `lessctl results` cover.

The section is read and checked with the rest of the config (its schema, StudyConfig and
`study_problems`, is lessctl.config_study's). `resolve_plan` turns the section (or `--methods`) into a Plan and
checks what lives on disk: the transfer base models.

Without a `[study]` table and without `--methods`, the plan is `[select] method` alone, one draw,
no ablation, transfer or base evaluation: what `lessctl run` did before plans existed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from lessctl.config_study import SECTION, subset_positions
from lessctl.errors import ConfigError
from lessctl.vocab import CHECKPOINT_METHODS, METHODS, closest, spelled

if TYPE_CHECKING:
    from lessctl.config import Config


@dataclass(frozen=True)
class Plan:
    """What a study covers, resolved: methods in order, random seeds, ablation subsets, transfer models."""

    methods: tuple[str, ...]
    random_seeds: tuple[int, ...]
    ablation: tuple[tuple[int, ...], ...] = ()
    transfer: tuple[str, ...] = ()
    base: bool = False
    full: bool = False
    study: bool = False  # False: the plan is [select] method alone (no [study] table, no --methods)
    warmup_seeds: tuple[int, ...] = ()  # further warmup runs (not [warmup] seed)

    @property
    def uses_checkpoints(self) -> bool:
        """The ablation and transfer branches start from the LESS selection: they need less among the methods."""
        return any(m in CHECKPOINT_METHODS for m in self.methods)


def resolve_plan(cfg: Config, methods: Sequence[str] | None = None, check_models: bool = True) -> Plan:
    """The plan of this workspace; `methods` (`--methods`) replaces `[study] methods`.

    Raises ConfigError naming the option or key: an unknown method, a transfer model that is neither a
    folder nor a cached hub model (unless not `check_models`: reading results needs no model). Nothing is
    run or written.
    """
    if methods is not None:
        for m in methods:
            if m not in METHODS:
                raise ConfigError(f"--methods: unknown method {m!r}{closest(m, METHODS)}")
        if not methods:
            raise ConfigError(f"--methods: give one or more of {spelled(METHODS)}")
    study = SECTION in cfg.given or methods is not None
    if not study:
        return Plan((cfg.select.method,), (cfg.experiment.seed,))
    s = cfg.study
    chosen = tuple(dict.fromkeys(methods if methods is not None else s.methods))
    seeds = tuple(s.random_seeds) or (cfg.experiment.seed,)
    subsets = tuple(tuple(sorted(subset_positions(t) or ())) for t in s.ablation)
    for t in s.transfer if check_models else ():
        _check_model(cfg, t)
    runs = tuple(x for x in dict.fromkeys(s.warmup_seeds) if x != cfg.warmup.seed)
    return Plan(chosen, seeds, tuple(dict.fromkeys(subsets)), tuple(s.transfer), s.base, s.full, True, runs)


def seed_run_config(cfg: Config, seed: int | None) -> Config:
    """The workspace as one further warmup run sees it: output under <output_dir>/warmup-seed<s>/, the warmup's
    seed and data_seed s; `cfg` itself for the workspace's own run (seed None) and for the run's own config."""
    import dataclasses

    from lessctl.outputs import layout

    if seed is None or layout.is_seed_run_dir(cfg.experiment.output_dir, seed):  # None, or already its own
        return cfg
    out = str(layout.seed_run_dir(cfg.experiment.output_dir, seed))
    return dataclasses.replace(
        cfg,
        experiment=dataclasses.replace(cfg.experiment, output_dir=out),
        warmup=dataclasses.replace(cfg.warmup, seed=seed, data_seed=seed),
    )


def _check_model(cfg: Config, model: str) -> None:
    where = f"{cfg.path}: " if cfg.path else ""
    if cfg.resolve(model).is_dir():
        return
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache(model, "config.json"), str)
    except Exception:  # not a repository id at all
        cached = False
    if not cached:
        raise ConfigError(
            f"{where}{SECTION}.transfer: {model!r} is neither a model folder ({cfg.resolve(model)} does not exist) "
            "nor a model in the Hugging Face cache"
        )
