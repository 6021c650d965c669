"""The gradient throughput benchmark (bench/grads_throughput.py) runs on the CPU and its figures are sound."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "grads_throughput.py"
PATH_KEYS = {
    "path",
    "projector",
    "examples",
    "seconds",
    "examples_per_s",
    "tokens_per_s",
    "times_s",
    "shares",
    "mfu",
    "fwd_bwd_mfu",
    "peak_memory_gib",
    "ratio_to_baseline",
    "cosine",
}


@pytest.fixture(scope="module")
def bench_report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "grads.json"
    # one CPU thread: a multi-threaded BLAS on a shared, busy machine is many times slower on these tiny matrices
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--shape",
        "tiny",
        "--examples",
        "8",
        "--dims",
        "512",
        "--projectors",
        "basic",
        "--fp32-check",
        "4",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "baseline" in proc.stdout and "lessctl-basic" in proc.stdout, proc.stdout
    return json.loads(out.read_text())


@pytest.mark.slow
def test_bench_json_has_every_figure(bench_report):
    r = bench_report
    for key in (
        "command",
        "date",
        "device",
        "versions",
        "settings",
        "model",
        "data",
        "paths",
        "fp32_check",
        "flops_note",
    ):
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
        r["paths"][1]["examples_per_s"] / r["paths"][0]["examples_per_s"]
    )


@pytest.mark.slow
def test_bench_features_match_fp32_truth_on_cpu(bench_report):
    """On the CPU in float32 both paths compute the truth up to summation order and the float16 cast."""
    for p in bench_report["paths"]:
        for kind in ("adam", "sgd"):
            c = p["cosine"]["512"][kind]
            assert c["n"] == 4 and c["nonfinite_or_zero_rows"] == 0
            assert c["min"] > 0.99 and c["median"] > 0.99, (p["path"], kind, c)


def test_token_batches_respect_budget_and_cap_and_examples_are_seeded():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import grads_throughput as gt
    finally:
        sys.path.remove(str(REPO / "bench"))
    from lessctl.grads.batching import token_batches

    lengths = [300, 40, 900, 120, 120, 64, 500, 33]
    batches = list(token_batches(lengths, 1024, 2))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) <= 2 and len(b) * max(lengths[i] for i in b) <= 1024 for b in batches)
    ex = gt.make_examples(200, 1000, 0, 355, 32, 2048, 0.4)
    n = [len(e.ids) for e in ex]
    assert 32 <= min(n) and max(n) <= 2048 and abs(sum(n) / len(n) - 355) < 2
    assert all(e.labels[: int(len(e.ids) * 0.4)] == [-100] * int(len(e.ids) * 0.4) for e in ex)
    again = gt.make_examples(200, 1000, 0, 355, 32, 2048, 0.4)
    assert [e.ids for e in again] == [e.ids for e in ex]  # seeded


# ----------------------------------------------------------------------------- bench/match_throughput.py

MATCH_PASSES = [
    "plain-cold",
    "plain-warm",
    "plain-parallel-cold",
    "h5py-cold",
    "lessctl-cold",
    "lessctl-warm",
    "read-only-cold",
    "legacy-cold",
]


def _load_match_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("match_throughput", REPO / "bench" / "match_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_match_bench_figures_and_scores(tmp_path):
    """Tiny sizes on the CPU, several blocks per store: every figure is there, and the scores it reports for a
    sample of rows are the LESS scores computed here from the store files in float64."""
    import h5py
    import numpy as np

    from lessctl.grads.store.reader import verify_store
    from lessctl.select import scores as selection

    mt = _load_match_bench()
    stores, out = tmp_path / "stores", tmp_path / "match.json"
    argv = [
        "--rows",
        "2000",
        "--dim",
        "256",
        "--ckpts",
        "2",
        "--chunk-rows",
        "512",
        "--device",
        "cpu",
        "--dir",
        str(stores),
        "--json",
        str(out),
    ]
    r = mt.main(argv)
    assert selection.CHUNK_ROWS == 16384  # restored
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    for key in (
        "command",
        "date",
        "settings",
        "chunk_rows",
        "read_ahead",
        "weights",
        "device",
        "versions",
        "stores",
        "data",
        "passes",
        "summary",
        "check",
        "sample",
    ):
        assert key in r, key
    assert r["chunk_rows"] == 512 and r["device"]["type"] == "cpu"
    assert r["stores"]["written"] == 4 and r["data"]["feature_bytes"] == 2 * 2000 * 256 * 2
    assert [p["pass"] for p in r["passes"]] == MATCH_PASSES
    for p in r["passes"]:
        assert p["seconds"] > 0 and p["gb_per_s"] == pytest.approx(r["data"]["feature_bytes"] / 1e9 / p["seconds"])
        assert p["x_plain_cold"] == pytest.approx(p["gb_per_s"] / r["passes"][0]["gb_per_s"])
    s = r["summary"]
    for key in (
        "lessctl_vs_plain_cold",
        "lessctl_vs_h5py_cold",
        "h5py_vs_plain_cold",
        "read_share",
        "compute_bound_gb_per_s",
        "legacy_vs_plain_cold",
        "speedup_over_legacy",
    ):
        assert s[key] > 0, key
    assert {"warm_over_cold_plain", "resident_after_evict", "resident_warm", "worked"} <= set(s["eviction"])
    c = r["check"]
    assert c["ok"] and c["identical_to_legacy"] and c["warm_equals_cold"] and c["max_abs_diff_numpy"] < 1e-6

    # the sample's scores, recomputed here
    rows = np.array(r["sample"]["rows"])
    assert len(rows) >= 10 and rows[0] == 0 and rows[-1] == 1999
    assert r["weights"] == pytest.approx([2 / 3, 1 / 3])
    S = 0.0
    for w, step in zip(r["weights"], (100, 200)):
        assert verify_store(stores / f"pool-ckpt{step}-adam.h5") == []
        with (
            h5py.File(stores / f"pool-ckpt{step}-adam.h5") as fx,
            h5py.File(stores / f"target-ckpt{step}-sgd.h5") as fy,
        ):
            X = fx["dim256/features"][:].astype(np.float64)[rows]
            Y = fy["dim256/features"][:].astype(np.float64)
        assert Y.shape == (15, 256)
        S = S + w * X @ Y.T
    expected = np.stack([S[:, 5 * k : 5 * k + 5].mean(axis=1) for k in range(3)], axis=1).max(axis=1)  # 3 subtasks x 5
    np.testing.assert_allclose(r["sample"]["scores"], expected, atol=1e-6)
    assert np.ptp(expected) > 0.01  # not a degenerate sample

    # a second run over the same folder reuses the stores
    r2 = mt.main([*argv[:-2], "--no-legacy"])
    assert r2["stores"] == {**r2["stores"], "written": 0, "reused": 4}
    assert "legacy-cold" not in [p["pass"] for p in r2["passes"]] and r2["summary"]["speedup_over_legacy"] is None
    assert r2["sample"] == r["sample"]


@pytest.mark.slow
def test_profile_compiled_runs_every_step_on_cpu(tmp_path):
    """bench/profile_compiled.py end to end on the tiny shape (its --device cpu smoke run): every step timed, the
    kernel table summed by kind, the JSON written."""
    out = tmp_path / "pc.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "profile_compiled.py"),
            "--shape",
            "tiny",
            "--examples",
            "6",
            "--device",
            "cpu",
            "--reps",
            "1",
            "--rows",
            "3",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["ms_per_example"]) == {"floor", "probes", "products", "features"}
    assert all(v > 0 for v in res["ms_per_example"].values())
    assert res["examples"] == 6 and res["padded_tokens"] >= res["tokens"] > 0
    prof = res["profile"]
    assert len(prof["top"]) == 3 and prof["kernel_ms_per_example"] > 0
    assert sum(prof["by_kind_ms_per_example"].values()) == pytest.approx(prof["kernel_ms_per_example"], rel=1e-2)


# ----------------------------------------------------------------------------- bench/eval_throughput.py


def test_eval_bench_runs_both_paths_on_the_same_prompts_with_identical_outputs(tmp_path):
    """The tiny shape on the CPU: baseline and lessctl's generation over the same BBH prompts, every figure
    there, the outputs identical, the ratios the ratios of the rates."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_throughput", REPO / "bench" / "eval_throughput.py")
    et = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(et)
    data = Path(os.environ.get("LESSCTL_TEST_DATA", REPO.parent / "shared" / "data"))
    if not (data / "eval/bbh").is_dir():
        pytest.skip(f"real data not found at {data}")
    out = tmp_path / "eval.json"
    argv = ["--shape", "tiny", "--task", "bbh", "--prompts", "6", "--baseline-prompts", "4"]
    r = et.main([*argv, "--max-new-tokens", "6", "--batch-size", "3", "--data-dir", str(data), "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    assert r["prompts"]["protocol_prompts"] == 27 * 40 and r["prompts"]["n"] == 6
    assert r["settings"]["stop"] == ["\n\n"] and "random weights" in r["note"] and r["failed"] == []
    base, less = r["runs"]
    assert (base["path"], base["prompts"], less["path"], less["prompts"]) == ("baseline", 4, "lessctl", 6)
    assert less["identical_to_baseline"] and less["differing_outputs"] == 0
    for run in r["runs"]:
        assert 0 < run["new_tokens"] <= 6 * run["prompts"] and run["steps"] <= 6 * run["batches"]
        assert run["tokens_per_s"] == pytest.approx(run["new_tokens"] / run["seconds"])
    assert less["x_baseline_tokens_per_s"] == pytest.approx(less["tokens_per_s"] / base["tokens_per_s"])
    assert less["projected_protocol_seconds"] == pytest.approx(less["seconds"] * 1080 / 6)


class _Recording:
    """A projector that records the rows of each call before handing them to the real one."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []
        self.max_rows, self.kind = inner.max_rows, inner.kind

    def project(self, x):
        self.calls.append(int(x.shape[0]))
        return self.inner.project(x)

    def engine_note(self):
        return self.inner.engine_note()


def test_projection_warmup_covers_the_row_counts_of_the_timed_pass():
    """projection_calls predicts the collector's projector calls exactly, and the warm-up projects those counts."""
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    try:
        import grads_throughput as gt
    finally:
        sys.path.remove(str(REPO / "bench"))
    from lessctl.grads.collector import FeatureCollector
    from lessctl.grads.engine import PerExampleGradients
    from lessctl.grads.projection.sketch import CountSketchProjector

    cpu = torch.device("cpu")
    model = gt.build_model("tiny", cpu, torch.float32, 0, 8, 32, 0.0, 1e-3)
    examples = gt.make_examples(11, 2048, 0, 60, 16, 128, 0.4)
    peg = PerExampleGradients(model)
    adam = gt.synthetic_adam(peg.grad_dim, cpu, 0, 1e-4, 1e-6)
    rec = _Recording(CountSketchProjector(peg.grad_dim, 64, "cpu"))
    try:
        for rows, cap in ((3, 2), (4, None), (100, 5)):
            rec.calls = []
            col = FeatureCollector(
                peg, {64: rec}, "adam", adam, pad_id=0, batch_tokens=256, max_batch_examples=cap, project_rows=rows
            )
            col([e.ids for e in examples], [e.labels for e in examples])
            lengths = [len(e.ids) for e in examples]
            predicted = gt.projection_calls(lengths, 256, col.max_batch_examples, rows)
            assert predicted == rec.calls and sum(predicted) == 11, (rows, cap)
    finally:
        peg.remove()
    rec.calls = []
    assert gt.warm_projections({64: rec}, [6, 3, 6, 2], peg.grad_dim, cpu) == [2, 3, 6]
    assert rec.calls == [2, 3, 6]
    assert gt.engine_notes({64: rec.inner})[64] == "CountSketchProjector: torch on cpu"


def test_train_bench_runs_both_paths_with_equal_losses(tmp_path):
    """bench/train_throughput.py at the tiny shape on the CPU: the batch-of-one and packed Trainers train the same
    steps with equal losses (dropout off), every figure is there, the speed-up is the ratio of the rates."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_throughput", REPO / "bench" / "train_throughput.py")
    tt = importlib.util.module_from_spec(spec)
    sys.modules["train_throughput"] = tt  # its dataclass looks itself up there
    spec.loader.exec_module(tt)
    out = tmp_path / "train.json"
    argv = ["--shape", "tiny", "--steps", "3", "--examples-per-step", "8", "--pack-tokens", "300"]
    report = tt.main([*argv, "--lora-dropout", "0", "--device", "cpu", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    by = {p["path"]: p for p in report["paths"]}
    assert set(by) == {"batch1", "packed"}
    for p in by.values():
        assert p["steps"] == 3 and p["timed_steps"] == 2 and len(p["losses"]) == 3
        assert p["examples_per_s"] > 0 and p["tokens_per_s"] > p["examples_per_s"]
    assert report["speedup"] == by["packed"]["examples_per_s"] / by["batch1"]["examples_per_s"]
    assert report["max_loss_rel_diff"] < 1e-4
    # a random 2048-token model starts near ln(2048) = 7.62: the losses are the model's, not placeholders
    assert abs(by["batch1"]["losses"][0] - math.log(2048)) < 0.5
