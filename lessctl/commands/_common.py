"""What every command shares: global state, the config loader, the consoles and JSON output."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from lessctl import paths


@dataclass
class GlobalState:
    config_path: Optional[Path] = None
    debug: bool = False


STATE = GlobalState()

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Recompute and replace outputs that already exist.")]


def load_config(overrides: dict[str, Any] | None = None):
    """The resolved workspace config: defaults < lessctl.toml < the command's options."""
    from lessctl.config import load_config as _load

    return _load(STATE.config_path, overrides or {})


def err_console():
    """The rich console for logs and progress bars (stderr)."""
    from rich.console import Console

    return Console(stderr=True)


def out_console():
    from rich.console import Console

    return Console()


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*["" if v is None else str(v) for v in r])
    out_console().print(table)


class ProgressBar:
    """A rich progress bar with a rate on stderr; silent without a terminal or under --json."""

    def __init__(self, description: str, total: int | None = None, unit: str = "it", quiet: bool = False):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        console = err_console()
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=quiet or not console.is_terminal,
            transient=False,
        )
        self._unit = unit
        self._task = self._progress.add_task(description, total=total, rate="")

    def __enter__(self) -> "ProgressBar":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def update(
        self,
        *,
        completed: int | None = None,
        advance: int = 0,
        total: int | None = None,
        description: str | None = None,
    ) -> None:
        kw = {}
        if total is not None:
            kw["total"] = total
        if description is not None:
            kw["description"] = description
        self._progress.update(self._task, completed=completed, advance=advance or None, **kw)
        task = self._progress.tasks[0]
        speed = task.finished_speed or task.speed
        if speed:
            self._progress.update(self._task, rate=f"{speed:.1f} {self._unit}/s")

    def log(self, message: str) -> None:
        self._progress.console.print(message)


class BarCallback:
    """The core's progress callback protocol (call with an advance; set_total(n)) drawn on a ProgressBar."""

    def __init__(self, bar: ProgressBar):
        self._bar = bar

    def __call__(self, n: int) -> None:
        self._bar.update(advance=n)

    def set_total(self, n: int) -> None:
        self._bar.update(completed=0, total=n)


# ----------------------------------------------------------------------------- shell completion
# Each returns the candidates that start with what was typed, read from the current workspace; they
# never raise (a shell completion must not print errors).


def _quiet_config():
    try:
        return load_config()
    except Exception:  # noqa: BLE001 - completion must stay silent
        return None


def complete_ckpts(incomplete: str) -> list[str]:
    import json

    cfg = _quiet_config()
    if cfg is None:
        return []
    try:
        steps = [str(c["step"]) for c in json.loads(paths.checkpoints_file(cfg.output_dir).read_text())]
    except (OSError, ValueError, KeyError):
        return []
    return [s for s in steps if s.startswith(incomplete)]


def complete_train(incomplete: str) -> list[str]:
    cfg = _quiet_config()
    return [n for n in (cfg.data.train if cfg else {}) if n.startswith(incomplete)]


def complete_targets(incomplete: str) -> list[str]:
    cfg = _quiet_config()
    return [n for n in (cfg.data.targets if cfg else {}) if n.startswith(incomplete)]


def complete_stages(incomplete: str) -> list[str]:
    from lessctl.study.pipeline import STAGES

    return [s for s in STAGES if s.startswith(incomplete)]


def complete_methods(incomplete: str) -> list[str]:
    from lessctl.vocab import METHODS

    return [m for m in METHODS if m.startswith(incomplete)]
