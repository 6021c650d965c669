"""`lessctl report`: one HTML page whose every figure exists and is referenced."""

from __future__ import annotations

import json
import re

from lessctl.study.ablation import HEATMAP_FILE


def test_report_writes_every_figure_and_references_it(tiny_grads_ws, cli):
    cfg = ["--config", tiny_grads_ws / "lessctl.toml"]
    assert cli(*cfg, "match", "--method", "less", "--method", "random", "--method", "bm25", "--json").code == 0
    heat = tiny_grads_ws / "out" / "selected" / "arithmetic" / HEATMAP_FILE
    heat.write_bytes(b"\x89PNG\r\n\x1a\n")  # stands where `ablate` draws its heat map: the report copies it
    r = cli(*cfg, "report", "--json")
    assert r.code == 0, r
    res = json.loads(r.out)
    page = (tiny_grads_ws / "out" / "report" / "index.html").read_text()
    assert res["report"].endswith("index.html") and page.startswith("<!doctype html>")
    referenced = set(re.findall(r'<img src="([^"]+)"', page))
    files = {p.rsplit("/", 1)[-1] for p in res["figures"]}
    assert referenced == files
    for name in files:
        assert (tiny_grads_ws / "out" / "report" / name).stat().st_size > 0
    targets = res["targets"]
    assert set(targets) == {"arithmetic", "antonyms", "sorting"}
    for t in targets:  # per target: LESS scores with the cut, overlap of methods, composition
        assert {f"scores-{t}.png", f"overlap-{t}.png", f"composition-{t}.png"} <= files
        assert f"Target: {t}" in page
    assert "ablation-arithmetic.png" in files and "checkpoint-weights.png" in files
    assert "<th>method</th>" in page and "<td>bm25</td>" in page


def test_report_without_selections_is_one_error_line(tiny_ws, cli):
    r = cli("--config", tiny_ws / "lessctl.toml", "report")
    lines = [ln for ln in r.err.splitlines() if ln.startswith("error:")]
    assert r.code == 2 and len(lines) == 1 and "lessctl match" in lines[0], r
