"""`lessctl warmup` and `lessctl finetune`: LoRA training through one shared loop."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lessctl.commands._common import (
    ForceOpt,
    JsonOpt,
    ProgressBar,
    complete_methods,
    complete_targets,
    emit_json,
    err_console,
    load_config,
    truncation_line,
)
from lessctl.outputs import layout

EpochsOpt = Annotated[Optional[int], typer.Option("--epochs", help="Training epochs (overrides the file).")]
LrOpt = Annotated[Optional[float], typer.Option("--learning-rate", "--lr", help="Peak learning rate.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda or cuda:N (default: cuda if available).")]


def _progress_logger(bar: ProgressBar):
    def on_log(rec: dict) -> None:
        if "plan" in rec:
            bar.log(describe_plan(rec["plan"]))
        bar.update(completed=rec["step"], total=rec["max_steps"])
        if "loss" in rec:
            bar.update(status=f"loss {rec['loss']:.3f}")

    return on_log


def describe_plan(plan: dict) -> str:
    """The training plan in one or two lines: examples, batch, steps per epoch, the checkpoints to come."""
    text = (
        f"{plan['examples']} examples, {plan['examples_per_step']} per optimizer step ({plan['batch_size']} x "
        f"{plan['gradient_accumulation_steps']} accumulation x {plan['devices']} device(s)), "
        f"{plan['steps_per_epoch']} steps per epoch x {plan['epochs']} epochs"
        + (
            " in LESS's step stream (a step may straddle two epochs): {} steps".format(plan["max_steps"])
            if plan.get("step_stream") == "less"
            else ""
        )
        + f", {plan['loss_weighting']}-weighted loss"
    )
    if plan["checkpoints"]:
        text += "\ncheckpoints: " + ", ".join(layout.checkpoint_name(s) for s in plan["checkpoints"])
    return text


def warmup(
    percentage: Annotated[
        Optional[float], typer.Option("--percentage", help="Share of the pool to warm up on (LESS: 0.05).")
    ] = None,
    epochs: EpochsOpt = None,
    learning_rate: LrOpt = None,
    device: DeviceOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Train the warmup LoRA on a seeded subset of the pool, one checkpoint per epoch."""
    from lessctl.training import run_warmup

    cfg = load_config({"warmup.percentage": percentage, "warmup.epochs": epochs, "warmup.learning_rate": learning_rate})
    with ProgressBar("warmup", unit="steps", quiet=json_out) as bar:
        res = run_warmup(cfg, force=force, device=device, on_log=_progress_logger(bar))
    summary = {
        "output_dir": str(res.output_dir),
        "checkpoints": res.checkpoints,
        "counts": res.counts,
        "truncation": res.truncation,
        "seconds": round(res.seconds, 1),
        "resumed_from": res.resumed_from,
        "plan": res.plan,
    }
    if json_out:
        emit_json(summary)
        return
    con = err_console()
    if res.counts.get("dropped_no_labels"):
        con.print(f"[yellow]{res.counts['dropped_no_labels']} examples had no trainable tokens and were skipped")
    con.print(
        f"warmup on {res.counts['subset'] - res.counts['dropped_no_labels']} of {res.counts['pool']} examples "
        f"in {res.seconds:.0f}s -> {res.output_dir}"
    )
    for c in res.checkpoints:
        con.print(f"  {layout.checkpoint_name(c['step'])}  epoch {c['epoch']}  lr_mean {c['lr_mean']:.6g}")
    if line := truncation_line(res.truncation, "warmup subset"):
        con.print(line, markup=False, highlight=False, soft_wrap=True)


def finetune(
    train_file: Annotated[
        Optional[Path], typer.Option("--train-file", help="A data file to train on (.jsonl, .jsonl.gz or .parquet).")
    ] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Output folder name under finetune/.")] = None,
    target: Annotated[
        Optional[str],
        typer.Option(
            "--target",
            autocompletion=complete_targets,
            help="Train on this target's selection (selected/<target>/<method>/).",
        ),
    ] = None,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            autocompletion=complete_methods,
            help="Which selection of --target: a method (less, random, bm25, rds, dsir) or an ablation's "
            "less-ckpt<subset>.",
        ),
    ] = "less",
    base_model: Annotated[
        Optional[str], typer.Option("--base-model", help="Train another base model on the selection (LESS-T).")
    ] = None,
    epochs: EpochsOpt = None,
    learning_rate: LrOpt = None,
    device: DeviceOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Train a fresh LoRA on a selection (--target) or any data file (--train-file)."""
    from lessctl.data.records import data_stem
    from lessctl.errors import ConfigError
    from lessctl.training import run_finetune

    cfg = load_config({"finetune.epochs": epochs, "finetune.learning_rate": learning_rate})
    meta: dict = {}
    if target:
        from lessctl.select.match import selection_file

        train_file = selection_file(cfg, target, method)
        meta = {"target": target, "method": method}
        auto = layout.transfer_model(target, base_model, selection=method) if base_model else None
        name = name or auto or layout.finetune_name(target, method)
    if train_file is None:
        raise ConfigError("finetune needs --target NAME or --train-file FILE")
    name = name or data_stem(train_file)
    if base_model:
        meta["transfer"] = True
    with ProgressBar(f"finetune {name}", unit="steps", quiet=json_out) as bar:
        res = run_finetune(
            cfg,
            Path(train_file),
            name,
            base_model=base_model,
            meta=meta,
            force=force,
            device=device,
            on_log=_progress_logger(bar),
        )
    summary = {
        "output_dir": str(res.output_dir),
        "counts": res.counts,
        "truncation": res.truncation,
        "seconds": round(res.seconds, 1),
        **meta,
    }
    if json_out:
        emit_json(summary)
        return
    con = err_console()
    con.print(f"finetuned on {res.counts['subset']} examples in {res.seconds:.0f}s -> {res.output_dir}")
    if line := truncation_line(res.truncation, "training set"):
        con.print(line, markup=False, highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("warmup", epilog="Example: lessctl warmup --epochs 4")(warmup)
    app.command("finetune", epilog="Example: lessctl finetune --target tydiqa --method less")(finetune)
