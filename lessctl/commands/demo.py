"""`lessctl demo`: LESS end to end on an embedded tiny model and data, offline, in minutes on a CPU."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Optional

import typer

from lessctl.commands._common import JsonOpt, ProgressBar, emit_json, err_console, print_table


def demo(
    directory: Annotated[
        Path, typer.Option("--dir", "-d", help="Workspace folder for the demo (reused when it exists).")
    ] = Path("lessctl-demo"),
    epochs: Annotated[
        Optional[int], typer.Option("--epochs", help="Warmup epochs (default: the tiny preset's 4).")
    ] = None,
    device: Annotated[
        Optional[str], typer.Option("--device", help="cpu or cuda (default: cpu for the tiny model).")
    ] = None,
    fresh: Annotated[
        bool, typer.Option("--fresh", metavar="", help="Delete the demo folder first and start over.")
    ] = False,
    train: Annotated[
        bool,
        typer.Option(
            "--train/--no-train", metavar="", help="Also finetune on each selection and evaluate before/after."
        ),
    ] = True,
    json_out: JsonOpt = False,
) -> None:
    """Run LESS on the tiny offline workspace and report selection precision per target and method."""
    from lessctl.demo import run_demo
    from lessctl.errors import ConfigError
    from lessctl.models import resolve_device
    from lessctl.vocab import METHODS

    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"--dir: {directory} is a file; give a folder for the demo workspace")
    if epochs is not None and epochs < 1:
        raise ConfigError(f"--epochs: must be at least 1, got {epochs}")
    resolve_device(device or "cpu")
    if fresh and directory.exists():
        shutil.rmtree(directory)
    with ProgressBar("demo", unit="steps", quiet=json_out) as bar:

        def step(message: str) -> None:
            bar.update(advance=1, description=message)
            if not json_out:
                bar.log(f"[bold]>[/] {message}")

        report = run_demo(directory, epochs=epochs, device=device or "cpu", train=train, step=step)
    if json_out:
        emit_json(report)
        return
    rows = []
    for t, e in report["targets"].items():
        rows.append([t, f"{e['random_expected_precision']:.2f}"] + [f"{e[m]['precision']:.2f}" for m in METHODS])
    print_table(
        "selection precision (share of the selected 5% from the target's own family)",
        ["target", "random (expected)"] + list(METHODS),
        rows,
    )
    if train:
        rows = [
            [t, f"{e['base']['f1']:.1f}"] + [f"{e[m]['f1']:.1f}" for m in METHODS] for t, e in report["targets"].items()
        ]
        print_table(
            "held-out F1 of the target family: base model, and after finetuning on each selection",
            ["target", "base"] + list(METHODS),
            rows,
        )
    err_console().print(f"done in {report['seconds']:.0f}s; workspace: {report['workspace']}")


def register(app: typer.Typer) -> None:
    app.command("demo", epilog="Example: lessctl demo --json")(demo)
