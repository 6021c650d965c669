"""`lessctl results`: every evaluation of the workspace (results.jsonl), one table per task."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lessctl.commands._common import JsonOpt, MethodsOpt, emit_json, err_console, load_config, print_table, split_values

COLUMNS = ["model", "method", "target", "score", "n", "limit", "time", "version"]


def results(
    task: Annotated[Optional[list[str]], typer.Option("--task", help="Only these tasks (one or more).")] = None,
    model: Annotated[Optional[list[str]], typer.Option("--model", help="Only these model names (one or more).")] = None,
    study: Annotated[
        bool,
        typer.Option(
            "--study",
            metavar="",
            help="Only the study's tables: a row per target, a column per method and base, the paper's numbers "
            "beside them, random as mean ± standard deviation over its seeds; then the ablation and transfer tables.",
        ),
    ] = False,
    methods: MethodsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show the study's tables (a study table in the workspace file, --study or --methods), then the results by task."""
    from lessctl.errors import ConfigError
    from lessctl.evaluation.results import read_results, results_path
    from lessctl.study.results import study_results, tables

    cfg = load_config()
    methods = split_values(methods)
    plan = study_results(cfg, methods) if study or methods is not None or "study" in cfg.given else None
    if study:
        if json_out:
            emit_json({"study": plan})
            return
        for title, columns, rows in tables(plan):
            print_table(title, columns, rows)
        return
    everything = read_results(cfg.output_dir)
    for opt, wanted, key in (("--task", task, "task"), ("--model", model, "model")):
        known = sorted({str(r.get(key)) for r in everything})
        if unknown := [w for w in wanted or [] if w not in known]:
            raise ConfigError(
                f"{opt}: no results for {', '.join(map(repr, unknown))} in {results_path(cfg.output_dir)} "
                f"(recorded: {', '.join(known) or 'none yet'})"
            )
    records = [r for r in everything if (not task or r.get("task") in task) and (not model or r.get("model") in model)]
    if json_out:
        emit_json({"results": records, **({"study": plan} if plan else {})})
        return
    for title, columns, rows in tables(plan) if plan else ():
        print_table(title, columns, rows)
    if not records:
        err_console().print(f"no results in {results_path(cfg.output_dir)}; run `lessctl eval --task TASK` first")
        return
    by_task: dict[str, list[dict]] = {}
    for r in records:
        by_task.setdefault(str(r.get("task")), []).append(r)
    for t, rows in by_task.items():
        metric = rows[0].get("metric", "score")
        transfer = any(r.get("transfer") for r in rows)  # LESS-T rows: selected with one model, trained on another
        extra = _extra_metrics(rows, metric)
        print_table(
            f"{t} ({metric})",
            COLUMNS + (["transfer to"] if transfer else []) + extra,
            [
                [
                    r.get("model"),
                    r.get("method"),
                    r.get("target"),
                    _score(r.get("score")),
                    r.get("n"),
                    r.get("limit"),
                    r.get("time"),
                    r.get("lessctl_version"),
                ]
                + ([_transfer(r)] if transfer else [])
                + [_metric_cell((r.get("metrics") or {}).get(c)) for c in extra]
                for r in rows
            ],
        )


def _transfer(r: dict) -> str:
    """The base model a transfer row trained (its data selected with the workspace's model), else empty."""
    m = r.get("base_model")
    if not r.get("transfer") or not m:
        return ""
    return Path(str(m)).name or str(m)


def _score(v) -> str:
    return f"{v:.2f}" if isinstance(v, (int, float)) else str(v)


def register(app: typer.Typer) -> None:
    app.command("results", epilog="Example: lessctl results --task tydiqa --json")(results)


def _extra_metrics(rows: list[dict], headline: str) -> list[str]:
    """Metrics a record carries besides its headline score (its `metrics` table, e.g. IR's mrr@5 and
    malformed answers), in first-seen order: extra columns of the task's table."""
    names: dict[str, None] = {}
    for r in rows:
        for k in r.get("metrics") or {}:
            if k != headline:
                names.setdefault(k, None)
    return list(names)


def _metric_cell(v) -> str:
    """A count as it is, a score with two decimals, nothing for a metric the row lacks."""
    if v is None:
        return ""
    return str(v) if isinstance(v, int) and not isinstance(v, bool) else _score(v)
