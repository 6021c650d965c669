"""The study plan: `[study]` in lessctl.toml, what `lessctl run`, `lessctl slurm submit` and `lessctl results` cover.

The section is read and type-checked with the rest of the config (config.py holds a StudyConfig);
`study_problems` adds its value checks to the config's, so a bad plan is reported with every other
problem before any work starts. `resolve_plan` turns the section (or `--methods`) into a Plan and
checks what lives on disk: the transfer base models.

Without a `[study]` table and without `--methods`, the plan is `[select] method` alone, one draw,
no ablation, transfer or base evaluation: what `lessctl run` did before plans existed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from lessctl.errors import ConfigError
from lessctl.vocab import CHECKPOINT_METHODS, METHODS, STUDY_METHODS, closest, spelled, type_problem

if TYPE_CHECKING:
    from lessctl.config import Config

SECTION = "study"


def _f(default: Any, doc: str) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class StudyConfig:
    methods: list = _f(
        list(STUDY_METHODS),
        f"Selection methods compared for every target ({spelled(METHODS)}; default: all of them, none needs more "
        "than the workspace's data; rds reads representations the grads stage computes). Each gets a match, a "
        "finetune and an evaluation per target.",
    )
    random_seeds: list = _f(
        [3, 4, 5],
        "Seeds of the random baseline's draws, each its own selection, finetune and evaluation (the paper reports "
        "random as the mean of three); the draw with [experiment] seed is selected/<target>/random/, the others "
        "random-seed<s>/. The table shows their mean and spread.",
    )
    warmup_seeds: list = _f(
        [],
        "LESS's repeated runs: seeds of further warmups, each with its own gradients, LESS selections, finetunes "
        "and evaluations under <output_dir>/warmup-seed<s>/ ([warmup] seed and data_seed set to s; the warmup "
        "subset stays the same). A seed equal to [warmup] seed is the workspace's own run. The table's LESS "
        "cells show the mean and spread over the runs.",
    )
    ablation: list = _f(
        [],
        "Checkpoint subsets whose LESS selections are finetuned and evaluated too, as `lessctl ablate --subsets` "
        'writes them: 1-based positions in checkpoints.json ("1", "14", "1+10"); empty: no ablation branch.',
    )
    transfer: list = _f(
        [],
        "Other base models trained on every target's LESS selection (LESS-T): local folders (relative to the "
        "workspace file) or models in the Hugging Face cache; empty: no transfer branch.",
    )
    base: bool = _f(
        True,
        "Evaluate the base model on every target too (the table's base column; a reranking target also scores "
        "its BM25 first-stage order).",
    )
    full: bool = _f(
        False,
        "Also finetune one model on the whole pool (finetune/full/, trained on pool/full.jsonl) and evaluate it "
        "on every target: the paper's full-data column. As many passes as every selection together, 20 times.",
    )


def subset_positions(token: Any) -> tuple[int, ...] | None:
    """'14' -> (1, 4), '1+10' -> (1, 10), 12 -> (1, 2); None when it is not a subset."""
    text = str(token).strip() if isinstance(token, (str, int)) and not isinstance(token, bool) else ""
    parts = text.split("+") if "+" in text else list(text)
    if not text or not all(p.isdigit() for p in parts):
        return None
    return tuple(int(p) for p in parts)


def study_problems(cfg: Config, label: Callable[[str], str]) -> list[str]:
    """Problems with the values of `[study]`, each naming its key through `label` (which adds the file)."""
    from lessctl.config import name_problem, seed_problem

    s = cfg.study
    out: list[str] = []

    def bad(key: str, msg: str) -> None:
        out.append(f"{label(f'{SECTION}.{key}')}: {msg}")

    for m in s.methods:
        if not isinstance(m, str) or m not in METHODS:
            bad("methods", f"unknown method {m!r}{closest(str(m), METHODS)}")
    if not s.methods:
        bad("methods", f"no methods; give one or more of {spelled(METHODS)}")
    if len(set(map(str, s.methods))) != len(s.methods):
        bad("methods", f"a method is named twice in {s.methods!r}")
    for key in ("random_seeds", "warmup_seeds"):
        seeds = getattr(s, key)
        for seed in seeds:
            if problem := type_problem("", seed, int) or seed_problem(seed):
                bad(key, problem.lstrip(": "))
        if len(set(map(repr, seeds))) != len(seeds):
            bad(key, f"a seed is named twice in {seeds!r}")
    n_ckpts = cfg.warmup.epochs
    for token in s.ablation:
        positions = subset_positions(token)
        if positions is None:
            bad("ablation", f"{token!r} is not a subset; expected checkpoint positions such as \"1\", \"12\", \"1+10\"")
        elif beyond := [p for p in positions if not 1 <= p <= n_ckpts]:
            bad(
                "ablation",
                f"position {beyond[0]} in {str(token)!r} is beyond the {n_ckpts} checkpoints the warmup writes "
                f"([warmup] epochs = {n_ckpts}; positions are 1 to {n_ckpts})",
            )
        elif len(set(positions)) != len(positions):
            bad("ablation", f"{str(token)!r} names a checkpoint twice")
    for t in s.transfer:
        if not isinstance(t, str) or not t.strip():
            bad("transfer", f"expected model folders or hub names, got {t!r}")
        elif problem := name_problem(transfer_name(t)):  # `/`, `.`, `x/..`: no folder name to name the finetune
            bad(
                "transfer",
                f"{t!r}: its last part {transfer_name(t)!r} names the transfer finetunes (`<target>-less-<name>`), "
                f"and {problem.split(': ', 1)[1]}",
            )
    return out


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


def random_selection(cfg: Config, seed: int) -> str:
    """The selection folder of one random draw: `random` for [experiment] seed (what `lessctl match` writes)."""
    return "random" if seed == cfg.experiment.seed else f"random-seed{seed}"


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

    if seed is None or Path(cfg.experiment.output_dir).name == f"warmup-seed{seed}":  # None, or already its own
        return cfg
    out = str(Path(cfg.experiment.output_dir) / f"warmup-seed{seed}")
    return dataclasses.replace(
        cfg,
        experiment=dataclasses.replace(cfg.experiment, output_dir=out),
        warmup=dataclasses.replace(cfg.warmup, seed=seed, data_seed=seed),
    )


def transfer_name(model: str) -> str:
    """The suffix of a transfer finetune's folder: the model folder's name (`lessctl finetune --base-model`'s)."""
    return Path(model).name


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
