"""`lessctl match`: influence scores and the top-p% selection (LESS, random, BM25, RDS or DSIR)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from lessctl.commands._common import (
    JsonOpt,
    ProgressBar,
    complete_ckpts,
    complete_methods,
    complete_targets,
    complete_train,
    emit_json,
    err_console,
    load_config,
    print_table,
)
from lessctl.vocab import METHODS, spelled


def match(
    target: Annotated[
        Optional[list[str]],
        typer.Option(
            "--target",
            autocompletion=complete_targets,
            help="Target name(s) from data.targets in lessctl.toml (default: all).",
        ),
    ] = None,
    method: Annotated[
        Optional[list[str]],
        typer.Option("--method", autocompletion=complete_methods, help=f"{spelled(METHODS)} (one or more)."),
    ] = None,
    ckpts: Annotated[
        Optional[list[int]],
        typer.Option(
            "--ckpts",
            autocompletion=complete_ckpts,
            help="Use only these checkpoint steps (weights renormalized); rds: the one checkpoint whose "
            "representations it uses (default: the last).",
        ),
    ] = None,
    weights: Annotated[
        Optional[list[float]],
        typer.Option("--weights", help="Checkpoint weights (default: lr_mean from checkpoints.json)."),
    ] = None,
    percentage: Annotated[
        Optional[float], typer.Option("--percentage", help="Share of the pool to select (default 0.05).")
    ] = None,
    max_samples: Annotated[
        Optional[int], typer.Option("--max-samples", help="Select this many examples instead of a share.")
    ] = None,
    train: Annotated[
        Optional[list[str]],
        typer.Option(
            "--train", autocompletion=complete_train, help="Training set name(s) to select from (default: all)."
        ),
    ] = None,
    dim: Annotated[
        Optional[int],
        typer.Option(
            "--dim", help="Projection dimension to match on (default: the largest of grads.dims in lessctl.toml)."
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", metavar="", help="Replace an existing selection of the same target and method.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Score every pool example against a target and write the top 5% as jsonl."""
    from lessctl.select.match import run_match

    cfg = load_config({"select.percentage": percentage})
    targets = target or list(cfg.data.targets)
    methods = method or [cfg.select.method]
    results = []
    with ProgressBar("match", unit="rows", quiet=json_out) as bar:
        for t in targets:
            for m in methods:
                bar.update(description=f"{t} ({m})", completed=0)
                res = run_match(
                    cfg,
                    t,
                    method=m,
                    ckpts=ckpts,
                    weights=weights,
                    percentage=cfg.select.percentage,
                    max_samples=max_samples,
                    train=train,
                    dim=dim,
                    force=force,
                    progress=lambda done, total: bar.update(completed=done, total=total),
                )
                results.append(res)
    if json_out:
        emit_json({"selections": [{**r.summary, "file": str(r.file)} for r in results]})
        return
    print_table(
        "selections",
        ["target", "method", "selected", "of", "by training set", "file"],
        [
            [
                r.target,
                r.method,
                r.n_selected,
                r.total,
                ", ".join(f"{k}: {v}" for k, v in r.summary["by_train_set"].items()),
                str(r.file),
            ]
            for r in results
        ],
    )
    for r in results:
        if r.summary.get("no_label_rows"):
            err_console().print(
                f"[yellow]{r.target}/{r.method}: {r.summary['no_label_rows']} examples have no label tokens (zero "
                f"features, no score): never selected"
            )
        if "weights" in r.summary:
            err_console().print(
                f"{r.target}: checkpoints {r.summary['checkpoints']} weights "
                + ", ".join(f"{w:.4f}" for w in r.summary["weights"])
            )


def register(app: typer.Typer) -> None:
    app.command("match", epilog="Example: lessctl match --target tydiqa --method less --method bm25")(match)
