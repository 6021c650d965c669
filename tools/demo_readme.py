"""Keeps the README's demo tables true: `make demo-check` runs `lessctl demo --json` and compares its numbers with
the two tables under README's "Quick start" (selection precision, held-out F1); `--write` puts the run's tables in.

    python tools/demo_readme.py REPORT.json [--readme README.md] [--write]

Exit 0 when they agree, 1 (with the differing cells) when they do not.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

METHODS = ("less", "random", "bm25", "rds", "dsir")
PRECISION = "    selection precision (share of the selected 5% from the target's own family)"
F1 = "    held-out F1 of the target family: base model, and after finetuning on each selection"


def tables(report: dict) -> str:
    """The two tables as the README writes them (4-space indent, columns aligned)."""

    def block(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        fmt = lambda r: "    " + "   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
        return [title, fmt(header), *(fmt(r) for r in rows)]

    targets = report["targets"]
    prec = [[t, f"{e['random_expected_precision']:.2f}", *(f"{e[m]['precision']:.2f}" for m in METHODS)]
            for t, e in targets.items()]  # fmt: skip
    lines = block(PRECISION, ["target", "random (expected)", *METHODS], prec)
    if all("base" in e for e in targets.values()):
        f1 = [[t, f"{e['base']['f1']:.1f}", *(f"{e[m]['f1']:.1f}" for m in METHODS)] for t, e in targets.items()]
        lines += ["", *block(F1, ["target", "base", *METHODS], f1)]
    return "\n".join(lines) + "\n"


def _section(text: str) -> tuple[int, int]:
    """Where the tables sit in the README: from the precision title to the blank line after the F1 table."""
    start = text.index(PRECISION)
    m = re.compile(r"\n\n(?!    )").search(text, text.index(F1, start))
    return start, (m.start() + 1) if m else len(text)


def cells(block: str) -> list[list[str]]:
    return [line.split() for line in block.splitlines() if line.strip() and not line.startswith("    selection")
            and not line.startswith("    held-out")]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path, help="the output of `lessctl demo --json`")
    ap.add_argument("--readme", type=Path, default=Path(__file__).resolve().parents[1] / "README.md")
    ap.add_argument("--write", action="store_true", help="replace the README's tables with the run's")
    args = ap.parse_args(argv)
    report = json.loads(args.report.read_text())
    text = args.readme.read_text()
    start, end = _section(text)
    now = tables(report)
    if args.write:
        args.readme.write_text(text[:start] + now + text[end:])
        return 0
    old, new = cells(text[start:end]), cells(now)
    if old == new:
        print(f"{args.readme}: the demo tables match the run")
        return 0
    for a, b in zip(old, new):
        if a != b:
            print(f"README: {' '.join(a)}\nrun:    {' '.join(b)}")
    if len(old) != len(new):
        print(f"README has {len(old)} table lines, the run {len(new)}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
