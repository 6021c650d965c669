"""`lessctl results`: every evaluation of the workspace (results.jsonl), one table per task."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from lessctl.commands._common import JsonOpt, emit_json, err_console, load_config, print_table

COLUMNS = ["model", "method", "target", "score", "n", "limit", "time", "version"]


def results(
    task: Annotated[Optional[list[str]], typer.Option("--task", help="Only these tasks (repeat for several).")] = None,
    model: Annotated[Optional[list[str]], typer.Option("--model", help="Only these model names (repeat for several).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Show the recorded evaluation results, grouped by task."""
    from lessctl.results import read_results, results_path

    cfg = load_config()
    records = [
        r for r in read_results(cfg.output_dir)
        if (not task or r.get("task") in task) and (not model or r.get("model") in model)
    ]
    if json_out:
        emit_json({"results": records})
        return
    if not records:
        err_console().print(f"no results in {results_path(cfg.output_dir)}; run `lessctl eval --task TASK` first")
        return
    by_task: dict[str, list[dict]] = {}
    for r in records:
        by_task.setdefault(str(r.get("task")), []).append(r)
    for t, rows in by_task.items():
        metric = rows[0].get("metric", "score")
        print_table(
            f"{t} ({metric})",
            COLUMNS,
            [[r.get("model"), r.get("method"), r.get("target"), _score(r.get("score")), r.get("n"), r.get("limit"),
              r.get("time"), r.get("lessctl_version")] for r in rows],
        )


def _score(v) -> str:
    return f"{v:.2f}" if isinstance(v, (int, float)) else str(v)


def register(app: typer.Typer) -> None:
    app.command("results", epilog="Example: lessctl results --task tydiqa --json")(results)
