"""`lessctl ablate`: how much each warmup checkpoint matters to a target's LESS selection."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from lessctl.commands._common import (
    ForceOpt,
    JsonOpt,
    ProgressBar,
    complete_targets,
    emit_json,
    err_console,
    load_config,
    print_table,
)

COLUMNS = ["subset", "steps", "weights", "jaccard", "kept", "spearman", "by training set"]


def ablate(
    target: Annotated[str, typer.Option("--target", autocompletion=complete_targets, help="The target to select for.")],
    subsets: Annotated[
        Optional[str],
        typer.Option(
            "--subsets",
            help="Checkpoint subsets, comma-separated; each is 1-based positions in checkpoints.json, e.g. "
            "1,2,3,4,12,34,23,14 "
            "(default: each checkpoint, each neighbouring pair, first with last).",
        ),
    ] = None,
    method: Annotated[str, typer.Option("--method", help="The checkpoint-based method to ablate (less).")] = "less",
    percentage: Annotated[
        Optional[float], typer.Option("--percentage", help="Share of the pool to select (default 0.05).")
    ] = None,
    dim: Annotated[
        Optional[int],
        typer.Option("--dim", help="Projection dimension to match on (default: the largest of the grads dims)."),
    ] = None,
    finetune: Annotated[
        bool, typer.Option("--finetune", metavar="", help="Train a LoRA on each subset's selection.")
    ] = False,
    eval_: Annotated[
        bool,
        typer.Option(
            "--eval",
            metavar="",
            help="Evaluate each finetuned selection on the target's benchmark or eval_file (needs --finetune).",
        ),
    ] = False,
    device: Annotated[
        Optional[str],
        typer.Option("--device", help="cpu, cuda or cuda:N for --finetune/--eval (default: cuda if available)."),
    ] = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Select with subsets of the warmup checkpoints and compare each selection with the all-checkpoint one."""
    from lessctl.study.ablation import run_ablation

    cfg = load_config({"select.percentage": percentage})
    with ProgressBar("ablate", unit="rows", quiet=json_out) as bar:

        def on_match(label: str, done: int, total: int) -> None:
            bar.update(description=f"ckpt {label}", completed=done, total=total)

        def on_log(rec: dict) -> None:
            bar.update(description="finetune", completed=rec["step"], total=rec["max_steps"])

        res = run_ablation(
            cfg,
            target,
            subsets=subsets,
            method=method,
            percentage=cfg.select.percentage,
            dim=dim,
            finetune=finetune,
            evaluate=eval_,
            force=force,
            device=device,
            progress=on_match,
            on_log=on_log,
        )
    if not res.report:  # a non-zero rank under torchrun: rank 0 reports
        return
    if json_out:
        emit_json({**res.report, "path": str(res.path)})
        return
    first = res.subsets[0]
    print_table(
        f"{target}: {first['selected']} of {first['total']} selected; overlap and rank correlation with all "
        f"checkpoints",
        COLUMNS + (["eval"] if eval_ else []),
        [_row(e)[: len(COLUMNS) + (1 if eval_ else 0)] for e in res.subsets],
    )
    con = err_console()
    con.print(f"report -> {res.path}")
    if res.heatmap:
        con.print(f"overlap heat map -> {res.heatmap}")
    elif res.report.get("heatmap_error"):
        con.print(f"[yellow]no heat map: {res.report['heatmap_error']}")


def _row(e: dict) -> list:
    ev = e.get("eval")
    if ev is None:
        score = ""
    elif "score" in ev:
        score = f"{ev['metric']} {ev['score']:.2f}" if isinstance(ev["score"], (int, float)) else str(ev["score"])
    else:
        score = ev.get("status", "")
    ov = e["overlap"]
    return [
        e["label"] + (" (all)" if e["reference"] else ""),
        ", ".join(map(str, e["checkpoints"])),
        ", ".join(f"{w:.3f}" for w in e["weights"]),
        f"{ov['jaccard']:.3f}",
        f"{ov['kept']:.1%}",
        "" if e["spearman"] is None else f"{e['spearman']:.3f}",
        ", ".join(f"{k}: {v}" for k, v in e["composition"].get("train_set", {}).items()),
        score,
    ]


def register(app: typer.Typer) -> None:
    app.command(
        "ablate",
        epilog="Examples: lessctl ablate --target tydiqa  |  lessctl ablate --target mmlu --subsets "
        "1,2,3,4,12,34,23,14 "
        "--finetune --eval --json",
    )(ablate)
