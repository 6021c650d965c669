"""bench/projection_quality.py: its scoring is lessctl's, and a small real-data run gives sound figures."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "projection_quality.py"
TARGETS = ("mmlu", "bbh", "tydiqa")
MAIN = ("rademacher0", "rademacher1", "sketch0", "sketch1", "exact")


@pytest.fixture(scope="module")
def pq():
    spec = importlib.util.spec_from_file_location("projection_quality", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Reader:
    """The part of a gradient store reader that lessctl.select.scores.less_scores uses."""

    def __init__(self, x: np.ndarray):
        self.x = x.astype(np.float16)
        self.n_rows = len(x)
        self.index = np.arange(len(x), dtype=np.int64)

    def read(self, dim):
        return self.x

    def iter_chunks(self, dim, rows):
        for i in range(0, self.n_rows, rows):
            yield i, self.x[i : i + rows]

    def read_into(self, dim, start, out):
        out[:] = self.x[start : start + len(out)]

    def norms(self, dim):
        return np.linalg.norm(self.x.astype(np.float32), axis=1)


def test_scores_and_selection_equal_lessctl_selection(pq):
    """The script's normalization, scores and top 5% are those of `lessctl match` on the same features."""
    from lessctl.select.scores import less_scores

    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 48)).astype(np.float32) * rng.uniform(0.1, 5, size=(400, 1)).astype(np.float32)
    X[7] = 0  # an example without label tokens: a zero row stays zero
    Y = rng.normal(size=(9, 48)).astype(np.float32)
    subtasks = ["a", "b", "a", "c", "b", "c", "c", "a", "d"]
    Xn, Yn = pq.normalize(X), pq.normalize(Y)
    assert np.all(Xn[7] == 0)
    assert np.allclose(np.linalg.norm(Xn[np.arange(400) != 7], axis=1), 1, atol=1e-3)
    _, ours = pq.less_scores(Xn, Yn, subtasks)
    ref = less_scores({"pool": [_Reader(Xn)]}, [_Reader(Yn)], np.array([1.0]), subtasks, 48)
    assert np.isnan(ref.scores[7]) and np.allclose(ours, ref.scores, atol=1e-5, equal_nan=True)
    sel = pq.selected(ours)
    assert len(sel) == 20 and list(sel) == list(np.argsort(-ref.scores, kind="stable")[:20])


def test_overlap_figures(pq):
    a, b = np.array([1, 2, 3, 4]), np.array([3, 4, 5, 6])
    assert pq.overlap(a, a) == {"intersection": 4, "jaccard": 1.0, "kept": 1.0}
    assert pq.overlap(a, b) == {"intersection": 2, "jaccard": 2 / 6, "kept": 0.5}
    assert pq.overlap(a, np.array([7, 8, 9, 10]))["jaccard"] == 0.0
    assert pq.method_spec("rademacher3") == ("basic", 3)
    assert pq.method_spec("sketch0") == ("sketch", 0)
    assert pq.method_spec("exact") == ("identity", None)
    assert pq.spearman(np.ones(5), np.arange(5.0)) is None


def test_identity_projector_is_a_no_op(pq):
    import torch

    x = torch.randn(3, 10).half()
    p = pq.IdentityProjector(10)
    assert p.kind == "identity" and p.dim == 10
    assert torch.equal(p.project(x), x.float())


@pytest.fixture(scope="module")
def report(data_dir, tmp_path_factory) -> tuple[dict, str, Path]:
    tmp = tmp_path_factory.mktemp("projection_quality")
    out, js = tmp / "ws", tmp / "report.json"
    env = {
        **os.environ,
        "LESSCTL_TEST_DATA": str(data_dir),
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--out",
        str(out),
        "--cot-lines",
        "200",
        "--dim",
        "256",
        "--lora-r",
        "16",
        "--epochs",
        "1",
        "--max-seq-length",
        "512",
        "--seeds",
        "3",
        "--device",
        "cpu",
        "--json",
        str(js),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(js.read_text()), proc.stdout, out


def _unit(x) -> bool:
    return isinstance(x, float) and 0.0 <= x <= 1.0


@pytest.mark.slow
def test_report_structure_and_figures(report):
    r, stdout, out = report
    for key in (
        "command",
        "date",
        "versions",
        "device",
        "settings",
        "sizes",
        "warmup",
        "seconds",
        "methods",
        "targets",
        "summary",
    ):
        assert key in r, key
    s = r["settings"]
    assert (s["cot_lines"], s["dim"], s["lora_r"], s["lora_alpha"], s["epochs"], s["seeds"]) == (200, 256, 16, 64, 1, 3)
    assert s["percentage"] == 0.05 and s["warmup_percentage"] == 0.2 and s["max_seq_length"] == 512
    # 2 layers x q/k/v/o x (A: r x 64 + B: 64 x r)
    assert r["sizes"]["P"] == 2 * 4 * 2 * 64 * 16
    assert r["sizes"]["pool"] == {"dolly": 151, "oasst1": 95, "cot": 200}
    assert r["sizes"]["N_pool"] == 446
    assert set(r["methods"]) == set(MAIN) | {"rademacher2", "sketch2"}
    assert r["methods"]["rademacher1"]["kind"] == "basic" and r["methods"]["sketch0"]["kind"] == "sketch"
    assert r["methods"]["exact"]["dim"] == r["sizes"]["P"] and r["methods"]["sketch1"]["dim"] == 256
    assert set(r["targets"]) == set(TARGETS)
    # the cot subset lives in the workspace, not in the repository
    assert len((out / "pool" / "cot_first200.jsonl").read_text().splitlines()) == 200
    for name, t in r["targets"].items():
        assert t["total"] == 446 and t["n_selected"] == int(0.05 * 446)
        assert 0 < t["examples_with_label_tokens"] <= t["examples"], name
        for comp, o in t["overlap"].items():
            assert _unit(o["jaccard"]) and _unit(o["kept"]), (name, comp, o)
            assert 0 <= o["intersection"] <= t["n_selected"]
            assert o["kept"] == pytest.approx(o["intersection"] / t["n_selected"])
        for comp in (
            "rademacher1_vs_rademacher0",
            "sketch0_vs_rademacher0",
            "sketch1_vs_rademacher0",
            "exact_vs_rademacher0",
            "rademacher0_vs_exact",
            "sketch0_vs_exact",
            "sketch1_vs_exact",
        ):
            assert comp in t["overlap"], comp
        # Jaccard is symmetric
        assert t["overlap"]["exact_vs_rademacher0"]["jaccard"] == t["overlap"]["rademacher0_vs_exact"]["jaccard"]
        for key in ("spearman_vs_rademacher0", "spearman_vs_exact"):
            for m, rho in t[key].items():
                assert rho is None or -1.0 <= rho <= 1.0, (name, key, m, rho)
        assert set(t["spearman_vs_rademacher0"]) == set(MAIN) - {"rademacher0"}
        for m, e in t["cosine_abs_error_vs_exact"].items():
            assert 0.0 <= e["mean"] <= e["p99"] <= e["max"] <= 2.0, (name, m, e)
        # the self-checks: the same selection computed twice
        for check, c in t["self_check"].items():
            assert c["jaccard"] == 1.0 and c["kept"] == 1.0, (name, check, c)
        assert t["self_check"]["exact_vs_exact_rerun"]["max_abs_score_diff"] < 1e-5
        v = t["sketch_at_least_yardstick"]
        yard = t["overlap"]["rademacher1_vs_rademacher0"]["jaccard"]
        for sk in ("sketch0", "sketch1"):
            assert v[sk]["jaccard"] == (t["overlap"][f"{sk}_vs_rademacher0"]["jaccard"] >= yard)
        assert v["holds"] == (v["sketch0"]["jaccard"] and v["sketch1"]["jaccard"])
        w = t["seed_sweep"]
        assert w["seeds"] == 3
        assert len(w["rademacher_vs_rademacher0"]["values"]) == 2 and len(w["sketch_vs_rademacher0"]["values"]) == 3
        assert w["rademacher_vs_rademacher0"]["values"][0] == yard
        assert w["sketch_vs_exact"]["values"][:2] == [
            t["overlap"]["sketch0_vs_exact"]["jaccard"],
            t["overlap"]["sketch1_vs_exact"]["jaccard"],
        ]
        for key in ("rademacher_vs_rademacher0", "sketch_vs_rademacher0", "rademacher_vs_exact", "sketch_vs_exact"):
            assert all(_unit(x) for x in w[key]["values"])
            assert w[key]["min"] <= w[key]["mean"] <= w[key]["max"]
        for ref in ("rademacher0", "exact"):
            dd = w[f"difference_vs_{ref}"]
            assert dd["sketch_minus_rademacher"] == pytest.approx(
                w[f"sketch_vs_{ref}"]["mean"] - w[f"rademacher_vs_{ref}"]["mean"]
            )
            assert dd["standard_error"] >= 0
    for name in ("dolly", "oasst1", "cot", *TARGETS):
        e = r["sizes"]["effective_coordinates"][name]
        assert 1.0 <= e["min"] <= e["median"] <= e["max"] <= r["sizes"]["P"] * (1 + 1e-9), (name, e)
    assert r["summary"]["self_checks_pass"] is True
    assert r["summary"]["targets"] == 3
    assert "rademacher1 (yardstick)" in stdout and "Self-checks (must be 1.000)" in stdout
    assert "Verdict:" in stdout and "P = 16,384" in stdout
