"""`lessctl report`: an HTML page with figures over what the workspace holds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lessctl.commands._common import JsonOpt, emit_json, err_console, load_config


def report(
    out: Annotated[
        Optional[Path],
        typer.Option("--out", help="Folder for index.html and its figures (default: <output_dir>/report)."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Write one HTML page with figures over the workspace's selections, checkpoints and results.

    Score distributions and cuts, selections by file and subtask, overlaps between methods, checkpoint
    weights, ablation heat maps and evaluation results."""
    from lessctl.study.report import build_report

    res = build_report(load_config(), out)
    if json_out:
        emit_json({"report": str(res.path), "figures": [str(p) for p in res.figures], "targets": res.targets})
        return
    err_console().print(f"report: {res.path} ({len(res.figures)} figures, targets {', '.join(res.targets)})")


def register(app: typer.Typer) -> None:
    app.command("report", epilog="Example: lessctl report && xdg-open out/report/index.html")(report)
