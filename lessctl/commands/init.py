"""`lessctl init`: create a workspace file (and, for the tiny preset, its model and data)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lessctl.commands._common import err_console
from lessctl.workspace import EXTRA_PRESETS, PRESETS


def init(
    preset: Annotated[
        str,
        typer.Option(
            "--preset",
            "-p",
            help=f"One of: {', '.join(PRESETS + EXTRA_PRESETS)} (tiny-ir: --data-dir is a folder of BEIR collections).",
        ),
    ] = "tiny",
    directory: Annotated[Path, typer.Option("--dir", "-d", help="Workspace folder (created if missing).")] = Path("."),
    data_dir: Annotated[
        str, typer.Option("--data-dir", help="LESS-layout data folder for real presets; BEIR folders for tiny-ir.")
    ] = "data",
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            metavar="",
            help="Overwrite an existing lessctl.toml (only that file: data and model folders already there are kept).",
        ),
    ] = False,
) -> None:
    """Create lessctl.toml for a preset (tiny builds an offline model and synthetic data too)."""
    from lessctl.workspace import init_workspace

    path = init_workspace(directory, preset, data_dir=data_dir, force=force)
    err_console().print(f"wrote {path}")


def register(app: typer.Typer) -> None:
    app.command("init", epilog="Example: lessctl init --preset tiny --dir demo && cd demo && lessctl warmup")(init)
