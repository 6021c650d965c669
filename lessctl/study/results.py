"""The study's tables, as the paper shows them: one row per target, one column per method (and base), the paper's
numbers for the same model beside them (LESS.md section 8), random as the mean and spread of its draws; the
ablation's and the transfer's tables below.

Cells are read from eval/<model>/<task>.json of the models the plan names (lessctl.study.graph), so a
table shows exactly the study's runs, whatever else results.jsonl holds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from lessctl.config import Config
from lessctl.evaluation.ranking import BM25_MODEL
from lessctl.outputs import artifacts
from lessctl.outputs import layout as paths
from lessctl.outputs.artifacts import CURRENT, STALE
from lessctl.outputs.layout import transfer_names
from lessctl.study.graph import BASE, FULL, Job, expand, job_config, plan_states
from lessctl.study.plan import Plan, resolve_plan

# LESS.md section 8 (Xia et al., 2024, Table 2 and 3): 5% of the pool, the mean of 3 runs.
PAPER: dict[str, dict[str, dict[str, float]]] = {
    "Llama-2-7B": {
        "random": {"mmlu": 46.5, "tydiqa": 52.7, "bbh": 38.9},
        "less": {"mmlu": 50.2, "tydiqa": 56.2, "bbh": 41.5},
        "full": {"mmlu": 51.6, "tydiqa": 54.0, "bbh": 43.2},
    },
    "Llama-2-13B": {"less": {"mmlu": 54.0, "tydiqa": 54.6, "bbh": 50.6}},
    "Mistral-7B": {"less": {"mmlu": 61.8, "tydiqa": 60.3, "bbh": 56.0}},
}
_MODEL_KEYS = {"llama-2-7b": "Llama-2-7B", "llama-2-13b": "Llama-2-13B", "mistral-7b": "Mistral-7B"}


def paper_model(name_or_path: str) -> str | None:
    """The paper's name of the workspace's model (`meta-llama/Llama-2-7b-hf` -> Llama-2-7B), or None."""
    name = Path(name_or_path).name.lower()
    return next((v for k, v in _MODEL_KEYS.items() if name.startswith(k)), None)


def read_score(cfg: Config, model: str, task: str, current: bool = True) -> float | None:
    """The headline score of eval/<model>/<task>.json, or None (no result, or `current` False: a stale one)."""
    from lessctl.files import read_json_file
    from lessctl.outputs import artifacts

    path = paths.eval_json(cfg.output_dir, model, task)
    if not path.is_file():
        return None
    redo = f"`lessctl eval --model {model} --task {task}` evaluates it again"
    rec = read_json_file(path, "an evaluation result (a JSON object of metrics)", redo)  # damaged: one error line
    return artifacts.headline_score(rec) if current else None


def _summary(scores: list[float | None], stale: int = 0) -> dict[str, Any]:
    """A cell: one score, or the mean and standard deviation of several draws (n: how many are evaluated and
    current; stale: how many have a result older than what it claims to come from, left out of the score)."""
    got = [s for s in scores if s is not None]
    cell: dict[str, Any] = {"score": None, "n": len(got), "of": len(scores), "stale": stale}
    if got:
        mean = sum(got) / len(got)
        cell["score"] = round(mean, 4)
        if len(got) > 1:  # the sample standard deviation of the evaluated draws
            cell["spread"] = round(math.sqrt(sum((s - mean) ** 2 for s in got) / (len(got) - 1)), 4)
    if len(scores) > 1:
        cell["draws"] = got
    return cell


def study_results(cfg: Config, methods: list[str] | None = None) -> dict[str, Any]:
    """The study's tables as one dict (`lessctl results --study --json`)."""
    plan = resolve_plan(cfg, methods, check_models=False)
    jobs = expand(cfg, plan)
    states = plan_states(cfg, jobs)  # a result is shown only while it is current
    return study_table(cfg, plan, jobs, lambda j: states[j.key].status)


def study_table(cfg: Config, plan: Plan, jobs: list[Job], status: Callable[[Job], str]) -> dict[str, Any]:
    """The study's tables from the plan's eval jobs; `status(job)` (current, stale, missing) decides which results
    count: only current ones (study_results passes lessctl.study.graph.plan_states)."""
    evals = [j for j in jobs if j.stage == "eval" and not j.reason]

    def cell(cells: list[Job]) -> dict[str, Any]:
        scores = [read_score(job_config(cfg, j), j.model, j.task, status(j) == CURRENT) for j in cells]
        stale = sum(
            status(j) == STALE and artifacts.eval_record(job_config(cfg, j).output_dir, j.model, j.task) is not None
            for j in cells
        )
        return _summary(scores, stale)

    who = paper_model(cfg.model.name_or_path)
    paper = PAPER.get(who or "", {})
    main: dict[str, dict] = {}
    ablation: dict[str, dict] = {}
    transfer: dict[str, dict] = {}
    for target in cfg.data.targets:
        mine = [j for j in evals if j.target == target]
        if not mine:
            continue
        task = mine[0].task
        row: dict[str, Any] = {"task": task, "methods": {}, "paper": {}}
        if plan.base:
            row["base"] = cell([j for j in mine if j.model == BASE])
        if any(j.model == BM25_MODEL for j in mine):  # a reranking target: the BM25 order it reranks
            row["first_stage"] = cell([j for j in mine if j.model == BM25_MODEL])
        for m in plan.methods:
            cells = [j for j in mine if j.branch == "main" and j.method == m]
            # random: its draws; less with [study] warmup_seeds: its runs, each in its own folder
            row["methods"][m] = cell(cells)
            if task in paper.get(m, {}):
                row["paper"][m] = paper[m][task]
        if plan.full:
            row["full"] = cell([j for j in mine if j.model == FULL])
        if task in paper.get("full", {}):
            row["paper"]["full"] = paper["full"][task]
        main[target] = row
        subsets = [j for j in mine if j.branch == "ablation"]
        if subsets:
            cells = {j.selection: cell([j]) for j in subsets}
            ablation[target] = {"task": task, "all": row["methods"].get("less"), "subsets": cells}
        others = [j for j in mine if j.branch == "transfer"]
        if others:
            names = transfer_names([j.base_model for j in others])
            cells = {names[j.base_model]: cell([j]) for j in others}
            transfer[target] = {"task": task, "selection_model": row["methods"].get("less"), "models": cells}
    return {
        "model": cfg.model.name_or_path,
        "paper_model": who,
        "methods": list(plan.methods),
        "random_seeds": list(plan.random_seeds),
        "full": plan.full,
        "warmup_seeds": [cfg.warmup.seed, *plan.warmup_seeds] if plan.warmup_seeds else [],
        "targets": main,
        "ablation": ablation,
        "transfer": transfer,
    }


def cell_text(cell: dict | None) -> str:
    """'41.20', '38.10 ± 1.20' (mean ± standard deviation of the draws; '(2/3)' when some are missing), '-'."""
    if not cell or cell.get("score") is None:
        return f"- ({cell['stale']} stale)" if cell and cell.get("stale") else "-"
    text = f"{cell['score']:.2f}"
    if "spread" in cell:
        text += f" ± {cell['spread']:.2f}"
    if cell["n"] < cell["of"]:
        text += f" ({cell['n']}/{cell['of']})"
    if cell.get("stale"):
        text += f" ({cell['stale']} stale)"
    return text


def tables(study: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, columns, rows) of the study's tables, for print_table and the report."""
    out = []
    methods = study["methods"]
    paper = {m for row in study["targets"].values() for m in row["paper"]}
    by_target = study["targets"].values()
    base, first, full = (any(k in row for row in by_target) for k in ("base", "first_stage", "full"))
    cols = ["target", "task"] + (["bm25 order"] if first else []) + (["base"] if base else [])
    for m in methods:
        cols += [m] + ([f"{m} (paper)"] if m in paper else [])
    cols += (["full"] if full else []) + (["full (paper)"] if "full" in paper else [])
    rows = []
    for target, row in study["targets"].items():
        r = [target, row["task"]] + ([cell_text(row.get("first_stage"))] if first else [])
        r += [cell_text(row.get("base"))] if base else []
        for m in methods:
            r += [cell_text(row["methods"].get(m))] + ([_num(row["paper"].get(m))] if m in paper else [])
        r += [cell_text(row.get("full"))] if full else []
        r += [_num(row["paper"].get("full"))] if "full" in paper else []
        rows.append(r)
    who = f", paper: {study['paper_model']}" if study["paper_model"] else ""
    out.append((f"study: {Path(study['model']).name}{who}", cols, rows))
    if study["ablation"]:
        labels = list(dict.fromkeys(s for a in study["ablation"].values() for s in a["subsets"]))
        out.append(
            (
                "ablation: LESS with checkpoint subsets",
                ["target", "task", "all checkpoints", *labels],
                [
                    [t, a["task"], cell_text(a["all"]), *(cell_text(a["subsets"].get(s)) for s in labels)]
                    for t, a in study["ablation"].items()
                ],
            )
        )
    if study["transfer"]:
        models = list(dict.fromkeys(m for a in study["transfer"].values() for m in a["models"]))
        out.append(
            (
                "transfer: the LESS selection trained on other base models",
                ["target", "task", f"{Path(study['model']).name} (selecting)", *models],
                [
                    [t, a["task"], cell_text(a["selection_model"]), *(cell_text(a["models"].get(m)) for m in models)]
                    for t, a in study["transfer"].items()
                ],
            )
        )
    return out


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"
