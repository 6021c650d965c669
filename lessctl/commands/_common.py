"""What every command shares: global state, the config loader, the consoles and JSON output."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from lessctl.outputs import layout as paths
from lessctl.vocab import METHODS, STAGES, spelled


@dataclass
class GlobalState:
    config_path: Optional[Path] = None
    debug: bool = False
    progress_seconds: Optional[float] = None


STATE = GlobalState()

JsonOpt = Annotated[bool, typer.Option("--json", metavar="", help="Print the result as one JSON object on stdout.")]
MethodsOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--methods",
        autocompletion=lambda incomplete: complete_methods(incomplete),
        help=f"Selection methods to compare ({spelled(METHODS)}), instead of the workspace's study "
        "methods (or, without a study table in the workspace file, its select method alone).",
    ),
]
ForceOpt = Annotated[
    bool, typer.Option("--force", metavar="", help="Recompute and replace outputs that already exist.")
]


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
    con = out_console()
    if not con.is_terminal:  # a file or a pipe: never cut a name (`run --dry-run > plan.txt` keeps what --items needs)
        from rich.console import Console

        con = Console(width=max(con.width, con.measure(table, options=con.options.update(width=10_000)).maximum))
    con.print(table)


PROGRESS_SECONDS = 60.0  # seconds between plain progress lines; LESSCTL_PROGRESS_SECONDS or --progress-seconds


def progress_seconds() -> float:
    """Seconds between progress lines without a terminal: --progress-seconds, $LESSCTL_PROGRESS_SECONDS, or 60."""
    if STATE.progress_seconds is not None:
        return STATE.progress_seconds
    raw = os.environ.get("LESSCTL_PROGRESS_SECONDS")
    if raw is None:
        return PROGRESS_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        from lessctl.errors import ConfigError

        raise ConfigError(f"LESSCTL_PROGRESS_SECONDS: expected a number of seconds >= 0, got {raw!r}")
    return value


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def truncation_line(truncation: dict | None, name: str) -> str | None:
    """What max_seq_length cut, in one line (None when it cut nothing or was not recorded)."""
    from lessctl.data.encoding import TruncationReport

    if not truncation or not truncation.get("truncated"):
        return None
    return TruncationReport.from_dict(truncation).describe(name)


class ProgressBar:
    """Progress of a long command on stderr.

    On a terminal: a rich bar with a rate (none under --json). Without a terminal (a Slurm log, a file, a pipe):
    plain lines with no carriage returns or colour codes, at the start, every `progress_seconds()` and at the end
    of each item (a store, a model, a task): stage, item, done/total, rate, elapsed and ETA.
    """

    def __init__(self, description: str, total: int | None = None, unit: str = "it", quiet: bool = False):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        from lessctl.distributed import is_main

        console = err_console()
        self._plain = not console.is_terminal
        self._mute = not is_main()  # under torchrun one rank's lines tell it all
        quiet = quiet or self._mute
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=quiet or self._plain,
            transient=False,
        )
        self._unit = unit
        self._task = self._progress.add_task(description, total=total, rate="")
        self._stage, self._item = description, description
        self._item_name = description
        self._done, self._total = 0, total
        self._t0 = self._item_t0 = self._last = time.monotonic()
        self._item_start = 0
        self._every = progress_seconds() if self._plain else 0.0
        self._status = ""
        self._started = False

    def __enter__(self) -> "ProgressBar":
        self._progress.__enter__()
        self._started = False  # the stage's first line waits for its first update: an error before it prints alone
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._progress.__exit__(exc_type, *exc)
        if self._plain and self._started and not self._mute:
            if self._item != self._stage:
                self._line("done" if exc_type is None else "stopped")
            self._stage_line("stopped" if exc_type else "finished")

    def _stage_line(self, event: str) -> None:
        elapsed = _clock(time.monotonic() - self._t0)
        sys.stderr.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {self._stage} | elapsed {elapsed} | {event}\n")
        sys.stderr.flush()

    def _line(self, event: str = "") -> None:
        now = time.monotonic()
        self._last = now
        elapsed = now - self._item_t0
        rows = self._done - self._item_start
        rate = rows / elapsed if elapsed > 0 and rows > 0 else None
        eta = (self._total - self._done) / rate if rate and self._total is not None else None
        item = "" if self._item == self._stage else f" | {self._item}"
        status = f" | {self._status}" if self._status else ""
        total = "?" if self._total is None else self._total
        rate_s = "-" if rate is None else f"{rate:.2f} {self._unit}/s"
        sys.stderr.write(
            f"{time.strftime('%Y-%m-%d %H:%M:%S')} {self._stage}{item} | {self._done}/{total} {self._unit} | "
            f"{rate_s} | elapsed {_clock(elapsed)} | ETA {_clock(eta if self._total is not None else None)}{status}"
            f"{' | ' + event if event else ''}\n"
        )
        sys.stderr.flush()

    def update(
        self,
        *,
        completed: int | None = None,
        advance: int = 0,
        total: int | None = None,
        description: str | None = None,
        status: str | None = None,
        unit: str | None = None,
    ) -> None:
        """`description` names the item in progress (a new one starts a new count of its rate); `status` is a
        note on it (a loss), shown beside it; `unit` what the item counts (from now on)."""
        if unit is not None and description is not None:  # a new kind of item: its own unit, its own total
            if self._plain and self._started and description != self._item and self._item != self._stage:
                self._line("done")  # the previous item ends in its own unit
                self._item = self._stage
            self._unit, self._total = unit, total
        kw = {}
        if total is not None:
            kw["total"] = total
        if description is not None:
            self._item_name = description
        if status is not None:
            self._status = status
        if description is not None or status is not None:
            name = self._item_name
            kw["description"] = f"{name} ({self._status})" if self._status else name
        self._progress.update(self._task, completed=completed, advance=advance or None, **kw)
        task = self._progress.tasks[0]
        speed = task.finished_speed or task.speed
        if speed:
            self._progress.update(self._task, rate=f"{speed:.1f} {self._unit}/s")
        if not self._plain or self._mute:
            return
        counts = bool(completed) or bool(advance) or total is not None
        if not self._started and not counts:  # nothing done yet: an error now prints alone, so wait
            if description is not None:
                self._item, self._item_t0 = description, time.monotonic()
            return
        announce = False
        if not self._started:
            self._started = True
            self._stage_line("started")
            announce = self._item != self._stage  # an item named before the first count starts now
        new_item = description is not None and description != self._item
        if new_item and self._item != self._stage and not announce:
            self._line("done")  # the end of the previous item
        if new_item:
            self._item, self._item_t0 = description, time.monotonic()
        if total is not None:
            self._total = total
        if completed is not None:
            self._done = completed
        self._done += advance
        if new_item or announce:
            self._item_start = self._done if completed is not None else self._done - advance
            self._line("start")
        elif time.monotonic() - self._last >= self._every:
            self._line()

    def log(self, message: str) -> None:
        if not self._mute:
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
    return [s for s in STAGES if s.startswith(incomplete)]


def complete_methods(incomplete: str) -> list[str]:
    return [m for m in METHODS if m.startswith(incomplete)]


def split_values(values: list[str] | None) -> list[str] | None:
    """`--methods a b` and `--methods a,b` alike ('finetune x' keeps its space: items are split on commas only)."""
    if values is None:
        return None
    return [v.strip() for x in values for v in x.split(",") if v.strip()]
