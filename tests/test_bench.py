"""The gradient throughput benchmark (bench/grads_throughput.py) runs on the CPU and its figures are sound."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "grads_throughput.py"
PATH_KEYS = {"path", "projector", "examples", "seconds", "examples_per_s", "tokens_per_s", "times_s", "shares",
             "mfu", "fwd_bwd_mfu", "peak_memory_gib", "ratio_to_baseline", "cosine"}


@pytest.fixture(scope="module")
def bench_report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "grads.json"
    # one CPU thread: a multi-threaded BLAS on a shared, busy machine is many times slower on these tiny matrices
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, str(SCRIPT), "--shape", "tiny", "--examples", "8", "--dims", "512", "--projectors", "basic",
           "--fp32-check", "4", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "baseline" in proc.stdout and "lessctl-basic" in proc.stdout, proc.stdout
    return json.loads(out.read_text())


@pytest.mark.slow
def test_bench_json_has_every_figure(bench_report):
    r = bench_report
    for key in ("command", "date", "device", "versions", "settings", "model", "data", "paths", "fp32_check", "flops_note"):
        assert key in r, key
    assert "--shape tiny" in r["command"]
    assert r["device"]["type"] == "cpu"
    assert {"torch", "transformers", "peft", "python"} <= set(r["versions"])
    assert r["model"]["lora_params"] == 2 * 4 * 128 * (64 + 64)  # 2 layers, q/k/v/o, r=128, hidden 64
    assert [p["path"] for p in r["paths"]] == ["baseline", "lessctl-basic"]
    for p in r["paths"]:
        assert "error" not in p, p
        assert PATH_KEYS <= set(p), PATH_KEYS - set(p)
        assert p["examples"] == 8 and p["examples_per_s"] > 0
        assert set(p["shares"]) == {"fwd_bwd", "assemble", "transform", "projection", "other"}
        assert sum(p["shares"].values()) == pytest.approx(1.0, abs=1e-6)
        assert p["peak_memory_gib"] is None  # CPU
    assert r["paths"][0]["ratio_to_baseline"] == 1.0
    assert r["paths"][1]["ratio_to_baseline"] == pytest.approx(
        r["paths"][1]["examples_per_s"] / r["paths"][0]["examples_per_s"])


@pytest.mark.slow
def test_bench_features_match_fp32_truth_on_cpu(bench_report):
    """On the CPU in float32 both paths compute the truth up to summation order and the float16 cast."""
    for p in bench_report["paths"]:
        for kind in ("adam", "sgd"):
            c = p["cosine"]["512"][kind]
            assert c["n"] == 4 and c["nonfinite_or_zero_rows"] == 0
            assert c["min"] > 0.99 and c["median"] > 0.99, (p["path"], kind, c)


def test_split_batches_respect_budget_and_cap_and_examples_are_seeded():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import grads_throughput as gt
    finally:
        sys.path.remove(str(REPO / "bench"))
    from lessctl.gradients import split_batches

    lengths = [300, 40, 900, 120, 120, 64, 500, 33]
    batches = list(split_batches(lengths, 1024, 2))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) <= 2 and len(b) * max(lengths[i] for i in b) <= 1024 for b in batches)
    ex = gt.make_examples(200, 1000, 0, 355, 32, 2048, 0.4)
    n = [len(e.ids) for e in ex]
    assert 32 <= min(n) and max(n) <= 2048 and abs(sum(n) / len(n) - 355) < 2
    assert all(e.labels[: int(len(e.ids) * 0.4)] == [-100] * int(len(e.ids) * 0.4) for e in ex)
    again = gt.make_examples(200, 1000, 0, 355, 32, 2048, 0.4)
    assert [e.ids for e in again] == [e.ids for e in ex]  # seeded
