"""`lessctl run`: every stage not yet done, in order, on this machine."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from lessctl.commands._common import JsonOpt, ProgressBar, complete_stages, emit_json, load_config, print_table
from lessctl.vocab import STAGES, spelled


def run(
    start: Annotated[
        Optional[str],
        typer.Option("--from", autocompletion=complete_stages, help=f"First stage to run ({spelled(STAGES)})."),
    ] = None,
    until: Annotated[
        Optional[str], typer.Option("--until", autocompletion=complete_stages, help="Last stage to run.")
    ] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda or cuda:N.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Run warmup, grads, match, finetune and eval, skipping whatever is already complete."""
    from lessctl.study.pipeline import run_pipeline, stage_range

    stages = stage_range(start, until)  # validate before loading anything
    cfg = load_config()
    with ProgressBar("run", total=len(stages), unit="stages", quiet=json_out) as bar:

        def say(message: str) -> None:
            if message.startswith("stage "):
                bar.update(completed=stages.index(message.split()[1]), total=len(stages), description=message)
            elif not json_out:
                bar.log(f"[bold]>[/] {message}")

        reports = run_pipeline(cfg, start=start, until=until, device=device, say=say)
        bar.update(completed=len(stages))
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
