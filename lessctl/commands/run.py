"""`lessctl run`: every stage not yet done, in order, on this machine."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from lessctl.commands._common import JsonOpt, complete_stages, emit_json, err_console, load_config, print_table


def run(
    start: Annotated[
        Optional[str],
        typer.Option(
            "--from", autocompletion=complete_stages, help="First stage to run (warmup, grads, match, finetune, eval)."
        ),
    ] = None,
    until: Annotated[
        Optional[str], typer.Option("--until", autocompletion=complete_stages, help="Last stage to run.")
    ] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda or cuda:N.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Run warmup, grads, match, finetune and eval, skipping whatever is already complete."""
    from lessctl.study.pipeline import run_pipeline, stage_range

    stage_range(start, until)  # validate before loading anything
    cfg = load_config()
    con = err_console()
    reports = run_pipeline(
        cfg, start=start, until=until, device=device, say=None if json_out else (lambda s: con.print(f"[bold]>[/] {s}"))
    )
    rows = [{"stage": r.stage, "item": r.item, "status": r.status, "detail": r.detail} for r in reports]
    if json_out:
        emit_json({"stages": rows, "done": sum(r["status"] == "done" for r in rows)})
    else:
        print_table(
            "lessctl run",
            ["stage", "item", "status", "detail"],
            [[r["stage"], r["item"], r["status"], r["detail"]] for r in rows],
        )


def register(app: typer.Typer) -> None:
    app.command("run", epilog="Example: lessctl run --until match")(run)
