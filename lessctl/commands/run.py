"""`lessctl run`: the study plan's jobs not yet done, in order, on this machine."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from lessctl.commands._common import (
    JsonOpt,
    MethodsOpt,
    ProgressBar,
    complete_stages,
    emit_json,
    load_config,
    print_table,
    split_values,
)
from lessctl.vocab import STAGES, spelled

ItemsOpt = Annotated[
    Optional[list[str]],
    typer.Option("--items", help="Run only these jobs, by the names --dry-run lists (e.g. 'finetune tydiqa-less')."),
]


def run(
    start: Annotated[
        Optional[str],
        typer.Option("--from", autocompletion=complete_stages, help=f"First stage to run ({spelled(STAGES)})."),
    ] = None,
    until: Annotated[
        Optional[str], typer.Option("--until", autocompletion=complete_stages, help="Last stage to run.")
    ] = None,
    methods: MethodsOpt = None,
    items: ItemsOpt = None,
    pick: Annotated[
        Optional[int],
        typer.Option("--pick", help="Run only the K-th of --items (1-based; Slurm array tasks pass their task id)."),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            metavar="",
            help="Print the plan: every job, what it waits for, whether it is done, and its GPU time estimated from "
            "measured rates and the data sizes; run nothing.",
        ),
    ] = False,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda or cuda:N.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Run the study: warmup, grads, match per target and method, finetune per selection, eval per model.

    Current jobs are skipped; a job whose artifact is missing, or stale (made from other settings, files or
    upstream artifacts than the plan's now), runs, and so does everything downstream of it.
    """
    from lessctl.study.pipeline import run_pipeline, stage_range

    stages = stage_range(start, until)  # validate before loading anything
    methods = split_values(methods)
    cfg = load_config()
    if dry_run:
        _dry_run(cfg, stages, methods, split_values(items), json_out)
        return
    # one item per job that does work (a skipped one is silent): its training steps and loss, store rows, prompts
    with ProgressBar("run", quiet=json_out) as bar:

        def say(message: str) -> None:
            if not message.startswith("stage ") and not json_out:
                bar.log(f"[bold]>[/] {message}")

        reports = run_pipeline(
            cfg,
            start=start,
            until=until,
            device=device,
            say=say,
            methods=methods,
            items=split_values(items),
            pick=pick,
            progress=bar,
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


def _dry_run(cfg, stages: list[str], methods, items, json_out: bool) -> None:
    from lessctl.study.estimate import plan_rows

    view = plan_rows(cfg, stages, methods, items)
    if json_out:
        emit_json(view)
        return
    print_table(
        "lessctl run --dry-run (nothing is run)",
        ["job", "waits for", "status", "why", "GPU time"],
        [[j["key"], ", ".join(j["after"]), j["status"], j["why"], j["gpu_time"]] for j in view["jobs"]],
    )
    typer.echo(f"to run: {view['to_run']} jobs, about {view['gpu_time_to_run']} of GPU time"
               + (f" plus {view['not_estimated']} not estimated" if view["not_estimated"] else ""))  # fmt: skip
    typer.echo("GPU time at measured rates (Llama-2-7B shape, one GPU; --json shows each job's reckoning):")
    for r in view["rates"]:
        typer.echo(f"  {r['rate']}: {r['per_second']:g} {r['unit']} ({r['source']})")


def register(app: typer.Typer) -> None:
    app.command("run", epilog="Example: lessctl run --methods less random bm25 --dry-run")(run)
