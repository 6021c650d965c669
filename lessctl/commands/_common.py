"""What every command shares: global state, the config loader, the consoles and JSON output."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer


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
