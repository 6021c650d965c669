"""A selection's files read back (summary.json, sorted.csv): each checked as it is read, so a damaged file is one
InputError naming `file:line` and the `match` that writes it again, never a traceback."""

from __future__ import annotations

import csv
from pathlib import Path

from lessctl.data.records import read_text
from lessctl.errors import InputError
from lessctl.files import read_json_file


def _rematch(d: Path) -> str:
    """The command that writes the selection in `selected/<target>/<method>/` again."""
    return f"`lessctl match --target {d.parent.name} --method {d.name} --force` writes it again"


def read_summary(path: Path) -> dict:
    """A selection's summary.json: a JSON object whose `file` names the selection's jsonl and `selected` counts it,
    and whose `by_*` counts are objects."""
    path = Path(path)
    summary = read_json_file(path, "a selection summary (a JSON object)", _rematch(path.parent))
    name = summary.get("file")
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise InputError(f"{path}: 'file' is not a file name ({name!r}); {_rematch(path.parent)}")
    selected = summary.get("selected", 0)
    if not isinstance(selected, int) or isinstance(selected, bool) or selected < 0:
        raise InputError(f"{path}: 'selected' is not a count ({selected!r}); {_rematch(path.parent)}")
    for key, value in summary.items():
        if (key.startswith("by_") or key in ("score", "selected_score")) and not isinstance(value, dict):
            raise InputError(f"{path}: {key!r} is not a JSON object ({value!r:.40}); {_rematch(path.parent)}")
    return summary


def read_sorted_csv(path: Path) -> list[tuple[str, int, float]]:
    """(training file, line, score) of every row of a selection's sorted.csv, best first."""
    path = Path(path)
    out = []
    for n, r in enumerate(csv.reader(read_text(path).splitlines(), skipinitialspace=True), start=1):
        if n == 1 or not r:
            continue
        try:
            out.append((r[0], int(r[1]), float(r[2])))
        except (IndexError, ValueError):
            got = ",".join(r)[:80]
            raise InputError(
                f"{path}:{n}: expected `file, line, score`, got {got!r}; {_rematch(path.parent)}"
            ) from None
    return out
