"""The `[study]` section of the config schema: StudyConfig and the checks of its values (`study_problems`).

Part of config.py's schema, in a module of its own for size; config.py holds it as `Config.study` and adds
`study_problems` to its checks, so a bad plan is reported with every other problem before any work starts.
What the section resolves to (the Plan) is lessctl.study.plan's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Callable

from lessctl.vocab import METHODS, STUDY_METHODS, closest, seed_problem, spelled, type_problem

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


def study_problems(s: StudyConfig, n_ckpts: int, label: Callable[[str], str]) -> list[str]:
    """Problems with the values of `[study]` (`n_ckpts`: [warmup] epochs, the checkpoints an ablation subset
    may name), each naming its key through `label` (which adds the file)."""
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
        elif PurePath(t).name in ("", ".", ".."):  # `/`, `.`, `x/..`: no folder name to name the finetunes by
            bad("transfer", f"{t!r} names no model folder (its last part names the finetunes `<target>-less-<name>`)")
    return out
