"""tools/demo_readme.py (`make demo-check`): the README's demo tables are compared with a demo run's report."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("demo_readme", ROOT / "tools" / "demo_readme.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _report(f1_less: float) -> dict:
    methods = ("less", "random", "bm25", "rds", "dsir")
    entry = lambda p, f: {m: {"precision": p, "f1": f} for m in methods}
    targets = {t: {**entry(0.5, 10.0), "random_expected_precision": 1 / 6, "base": {"f1": 0.0}} for t in ("a", "b")}
    targets["a"]["less"] = {"precision": 1.0, "f1": f1_less}
    return {"targets": targets}


def test_the_readme_tables_are_found_and_a_run_is_compared_cell_by_cell(tmp_path, capsys):
    tool = _tool()
    readme = tmp_path / "README.md"
    text = (ROOT / "README.md").read_text()
    readme.write_text(text)
    start, end = tool._section(text)
    assert "less" in text[start:end] and text[end:].startswith("\nThe synthetic")  # the two tables, whole
    report = tmp_path / "r.json"
    report.write_text(json.dumps(_report(40.4)))
    assert tool.main([str(report), "--readme", str(readme), "--write"]) == 0
    assert tool.main([str(report), "--readme", str(readme)]) == 0
    after = readme.read_text()
    assert "    a        0.17                1.00   0.50" in after and after.endswith(text[end:])
    report.write_text(json.dumps(_report(41.4)))
    assert tool.main([str(report), "--readme", str(readme)]) == 1
    out = capsys.readouterr().out
    assert "README: a 0.0 40.4" in out and "run:    a 0.0 41.4" in out
