"""ablate: checkpoint subsets matched from the existing stores, figures against a hand computation, the heat map,
refusals, finetuning each subset; LESS-T transfer (finetune --base-model) and its row in `lessctl results`."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest

from lessctl.errors import ConfigError
from lessctl.select.scores import Scored
from lessctl.study.ablation import jaccard, kept_share, overlap_matrix, parse_subsets, rank_correlation

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _manifest(ws: Path) -> list[dict]:
    return json.loads((ws / "out" / "warmup" / "checkpoints.json").read_text())


def _features(ws: Path, name: str, step: int, gtype: str, dim: int) -> np.ndarray:
    with h5py.File(ws / "out" / "grads" / f"{name}-ckpt{step}-{gtype}.h5", "r") as f:
        return f[f"dim{dim}/features"][:].astype(np.float64)


def _hand_scores(
    ws: Path, target: str, steps: list[int], weights: list[float], dim: int
) -> dict[tuple[str, int], float]:
    """score = sum_c w_c <x, y>, mean over each subtask's target rows, max over subtasks; by (train set, line)."""
    subtasks = [json.loads(l)["subtask"] for l in (ws / "data" / f"{target}_target.jsonl").read_text().splitlines()]
    out = {}
    for name in ("synth_a", "synth_b"):
        s = sum(
            w * _features(ws, name, st, "adam", dim) @ _features(ws, target, st, "sgd", dim).T
            for w, st in zip(weights, steps)
        )
        per_sub = np.stack(
            [s[:, [j for j, t in enumerate(subtasks) if t == u]].mean(1) for u in dict.fromkeys(subtasks)], 1
        )
        out.update({(name, i): float(v) for i, v in enumerate(per_sub.max(1))})
    return out


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n by argsort, tied values sharing their mean rank."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tied = x == v
        r[tied] = r[tied].mean()
    return r


def _spearman_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / np.sqrt((rx * rx).sum() * (ry * ry).sum()))


def _top(scores: dict, k: int) -> set:
    return set(sorted(scores, key=lambda key: -scores[key])[:k])


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" and data[-8:-4] == b"IEND"
    return struct.unpack(">II", data[16:24])


def _set_targets(ws: Path, line: str) -> None:
    """Replaces the `targets = ...` line of [data] in the workspace file."""
    p = ws / "lessctl.toml"
    lines = p.read_text().splitlines()
    [i] = [i for i, l in enumerate(lines) if l.startswith("targets = ")]
    lines[i] = line
    p.write_text("\n".join(lines) + "\n")


def _set_finetune_epochs(ws: Path, epochs: int) -> None:
    p = ws / "lessctl.toml"
    head, sep, tail = p.read_text().partition("[finetune]\n")
    p.write_text(head + sep + tail.replace("epochs = 4", f"epochs = {epochs}", 1))


# ----------------------------------------------------------------------------- units


def test_parse_subsets():
    assert parse_subsets("1,2,3,4,12,34,23,14", 4) == [(1,), (2,), (3,), (4,), (1, 2), (3, 4), (2, 3), (1, 4)]
    assert parse_subsets(None, 4) == [(1,), (2,), (3,), (4,), (1, 2), (2, 3), (3, 4), (1, 4)]
    assert parse_subsets(None, 2) == [(1,), (2,), (1, 2)]
    assert parse_subsets(" 21, 12 ,2", 2) == [(1, 2), (2,)]  # order inside a subset does not matter
    assert parse_subsets("1+10,3", 10) == [(1, 10), (3,)]
    for bad, where in (
        ("3", "beyond the 2 checkpoints"),
        ("0", "beyond"),
        ("1x", "not a subset"),
        ("1,,2", "not a subset"),
        ("11", "twice"),
        ("1+", "not a subset"),
    ):
        with pytest.raises(ConfigError, match="--subsets") as exc:
            parse_subsets(bad, 2)
        assert where in str(exc.value)


def test_overlap_and_rank_correlation_by_hand():
    assert jaccard({1, 2, 3}, {2, 3, 4}) == 2 / 4 and kept_share({1, 2, 3}, {2, 3, 4, 5}) == 2 / 4
    assert jaccard(set(), set()) == 1.0
    m = overlap_matrix([{1, 2}, {2, 3}, {1, 2}])
    np.testing.assert_allclose(m, [[1, 1 / 3, 1], [1 / 3, 1, 1 / 3], [1, 1 / 3, 1]])
    # the same rows in another order (joined by training set and line), with a tie
    a = Scored(["x", "x", "y", "y", "y"], np.array([0, 1, 0, 1, 2]), np.array([0.1, 0.4, 0.3, 0.3, 0.9]))
    b = Scored(["y", "y", "y", "x", "x"], np.array([2, 1, 0, 1, 0]), np.array([0.5, 0.2, 0.6, 0.7, -0.1]))
    x = np.array([0.1, 0.4, 0.3, 0.3, 0.9])
    y = np.array([-0.1, 0.7, 0.6, 0.2, 0.5])
    assert rank_correlation(a, b) == pytest.approx(_spearman_by_hand(x, y))
    assert rank_correlation(a, a) == pytest.approx(1.0)
    flat = Scored(a.names, a.index, np.zeros(5))
    assert rank_correlation(a, flat) is None


# ----------------------------------------------------------------------------- the command


def test_ablate_figures_equal_a_hand_computation_without_computing_gradients(tiny_grads_ws, cli):
    ws = tiny_grads_ws
    grads = ws / "out" / "grads"
    before = {p.name: p.stat().st_mtime_ns for p in grads.iterdir()}
    # nothing may load a model: the base model and the warmup adapters are out of reach during the run
    (ws / "model").rename(ws / "model.away")
    ckpt_dirs = sorted((ws / "out" / "warmup").glob("checkpoint-*"))
    for d in ckpt_dirs:
        d.rename(d.with_name("away-" + d.name))
    res = cli(
        "--config",
        ws / "lessctl.toml",
        "ablate",
        "--target",
        "arithmetic",
        "--subsets",
        "1,2,12",
        "--dim",
        "64",
        "--json",
    )
    assert res.code == 0, res
    assert {p.name: p.stat().st_mtime_ns for p in grads.iterdir()} == before
    (ws / "model.away").rename(ws / "model")

    report = json.loads(res.out)
    sel_dir = ws / "out" / "selected" / "arithmetic"
    assert report.pop("path") == str(sel_dir / "ablation.json")
    assert json.loads((sel_dir / "ablation.json").read_text()) == report
    subsets = {e["label"]: e for e in report["subsets"]}
    assert list(subsets) == ["1", "2", "12"] and report["reference"] == "12"
    assert [e["reference"] for e in report["subsets"]] == [False, False, True]

    manifest = _manifest(ws)
    steps = [c["step"] for c in manifest]
    lr = np.array([c["lr_mean"] for c in manifest])
    # single checkpoints weigh 1; the pair keeps its lr_mean ratio, renormalized to sum 1
    assert subsets["1"]["weights"] == [1.0] and subsets["2"]["weights"] == [1.0]
    assert subsets["12"]["weights"] == pytest.approx(list(lr / lr.sum())) and sum(
        subsets["12"]["weights"]
    ) == pytest.approx(1.0)
    assert [subsets[l]["checkpoints"] for l in ("1", "2", "12")] == [[steps[0]], [steps[1]], steps]

    hand = {
        "1": _hand_scores(ws, "arithmetic", [steps[0]], [1.0], 64),
        "2": _hand_scores(ws, "arithmetic", [steps[1]], [1.0], 64),
        "12": _hand_scores(ws, "arithmetic", steps, list(lr / lr.sum()), 64),
    }
    total = len(hand["12"])
    k = int(0.05 * total)
    chosen = {l: _top(s, k) for l, s in hand.items()}
    keys = sorted(hand["12"])
    for label, e in subsets.items():
        assert (e["selected"], e["total"]) == (k, total)
        inter = len(chosen[label] & chosen["12"])
        assert e["overlap"]["shared"] == inter
        assert e["overlap"]["jaccard"] == pytest.approx(inter / len(chosen[label] | chosen["12"]))
        assert e["overlap"]["kept"] == pytest.approx(inter / k)
        x = np.array([hand[label][key] for key in keys])
        y = np.array([hand["12"][key] for key in keys])
        assert e["spearman"] == pytest.approx(_spearman_by_hand(x, y), abs=1e-4)
        assert sum(e["composition"]["train_set"].values()) == k and sum(e["composition"]["family"].values()) == k
        # the subset's selection is on disk, in the selection layout `finetune --method` reads
        summary = json.loads((ws / "out" / e["selection"] / "summary.json").read_text())
        assert summary["checkpoint_positions"] == e["subset"] and summary["checkpoints"] == e["checkpoints"]
        assert len(Path(e["file"]).read_text().splitlines()) == k
    assert subsets["12"]["overlap"] == {"jaccard": 1.0, "kept": 1.0, "shared": k} and subsets["12"][
        "spearman"
    ] == pytest.approx(1.0)
    assert subsets["1"]["overlap"]["jaccard"] < 1.0 or subsets["2"]["overlap"]["jaccard"] < 1.0  # the subsets differ

    matrix = report["overlap_matrix"]
    assert matrix["labels"] == ["1", "2", "12"]
    for i, a in enumerate(matrix["labels"]):
        for j, b in enumerate(matrix["labels"]):
            assert matrix["jaccard"][i][j] == pytest.approx(jaccard(chosen[a], chosen[b]), abs=1e-6)

    png = sel_dir / "ablation_overlap.png"
    assert report["heatmap"] == str(png)
    w, h = _png_size(png)
    assert w > 100 and h > 100
    import matplotlib.image

    assert matplotlib.image.imread(str(png)).shape[:2] == (h, w)

    # the all-checkpoint subset is exactly what `lessctl match` selects
    for d in ckpt_dirs:
        d.with_name("away-" + d.name).rename(d)
    res = cli("--config", ws / "lessctl.toml", "match", "--target", "arithmetic", "--dim", "64", "--json")
    assert res.code == 0, res
    assert Path(json.loads(res.out)["selections"][0]["file"]).read_text() == Path(subsets["12"]["file"]).read_text()


def test_ablate_table_and_user_errors(tiny_grads_ws, cli):
    ws = tiny_grads_ws
    cfg = ("--config", ws / "lessctl.toml")
    res = cli(*cfg, "ablate", "--target", "sorting", "--subsets", "2", "--dim", "64")
    assert res.code == 0, res
    assert "spearman" in res.out and "12 (all)" in res.out and "ablation_overlap.png" in res.err
    for args, needle in (
        (("--target", "sorting", "--subsets", "1,3"), "--subsets"),
        (("--target", "sorting", "--subsets", "1,a"), "--subsets"),
        (("--target", "sorting", "--method", "bm25"), "--method"),
        (("--target", "sorting", "--eval"), "--eval"),
        (("--target", "nope"), "--target"),
    ):
        res = cli(*cfg, "ablate", *args)
        assert res.code == 2 and needle in res.err and res.err.count("\n") == 1, (args, res)
    _set_targets(ws, 'targets = {sorting = {file = "data/sorting_target.jsonl", eval_file = "data/nowhere.jsonl"}}')
    res = cli(*cfg, "ablate", "--target", "sorting", "--finetune", "--eval")  # refused before any training
    assert res.code == 2 and "nowhere.jsonl" in res.err and "eval_file" in res.err, res
    assert not (ws / "out" / "finetune").exists()
    step = _manifest(ws)[1]["step"]
    (ws / "out" / "grads" / f"sorting-ckpt{step}-sgd.h5").unlink()
    res = cli(*cfg, "ablate", "--target", "sorting", "--subsets", "1")
    assert res.code == 2 and "lessctl grads" in res.err and f"checkpoint {step}" in res.err, res


def test_ablate_renders_as_a_slurm_job(tiny_ws, cli):
    cfg = ("--config", tiny_ws / "lessctl.toml")
    res = cli(*cfg, "slurm", "render", "ablate", "--target", "arithmetic", "--subsets", "1,2,12", "--finetune")
    assert res.code == 0, res
    assert "ablate --target arithmetic --subsets 1,2,12 --finetune" in res.out and "#SBATCH" in res.out
    res = cli(*cfg, "slurm", "render", "ablate", "--gpus", "2", "--", "--target", "arithmetic", "--finetune")
    assert res.code == 0 and "gpu:2" in res.out and "ablate --target arithmetic --finetune" in res.out, res
    res = cli(*cfg, "slurm", "render", "finetune", "--target", "arithmetic", "--base-model", "/models/other")
    assert res.code == 0 and "finetune --target arithmetic --base-model /models/other" in res.out, res


@pytest.mark.slow
def test_ablate_finetunes_and_evaluates_each_subset_and_reuses_them(tiny_grads_ws, cli):
    ws = tiny_grads_ws
    _set_finetune_epochs(ws, 1)
    _set_targets(
        ws, 'targets = {sorting = {file = "data/sorting_target.jsonl", eval_file = "data/sorting_eval.jsonl"}}'
    )
    cfg = ("--config", ws / "lessctl.toml")
    args = (
        "ablate",
        "--target",
        "sorting",
        "--subsets",
        "1",
        "--dim",
        "64",
        "--finetune",
        "--eval",
        "--device",
        "cpu",
        "--json",
    )
    res = cli(*cfg, *args)
    assert res.code == 0, res
    entries = {e["label"]: e for e in json.loads(res.out)["subsets"]}
    assert list(entries) == ["1", "12"]
    for label, e in entries.items():
        out = ws / "out" / "finetune" / f"sorting-less-ckpt{label}"
        assert e["finetune"]["output_dir"] == str(out) and e["finetune"]["reused"] is False
        assert (out / "adapter_config.json").is_file()
        run = json.loads((out / "lessctl_run.json").read_text())
        assert (run["target"], run["method"], run["transfer"]) == ("sorting", f"less-ckpt{label}", False)
        assert run["train_file"] == e["file"] and run["checkpoint_positions"] == e["subset"]
        ev = e["eval"]
        assert (ev["status"], ev["task"], ev["metric"]) == ("done", "sorting", "exact_match") and 0 <= ev[
            "score"
        ] <= 100
        assert Path(ev["eval_json"]) == ws / "out" / "eval" / f"sorting-less-ckpt{label}" / "sorting.json"
    res = cli(*cfg, "results", "--json")
    recs = json.loads(res.out)["results"]
    assert sorted((r["model"], r["method"], r["task"]) for r in recs) == [
        ("sorting-less-ckpt1", "less-ckpt1", "sorting"),
        ("sorting-less-ckpt12", "less-ckpt12", "sorting"),
    ]

    res = cli(*cfg, *args)  # the same selections: nothing is trained or evaluated again
    assert res.code == 0, res
    again = {e["label"]: e for e in json.loads(res.out)["subsets"]}
    assert all(e["finetune"]["reused"] and e["eval"]["status"] == "reused" for e in again.values())
    assert [again[l]["eval"]["score"] for l in again] == [entries[l]["eval"]["score"] for l in entries]
    assert len(json.loads(cli(*cfg, "results", "--json").out)["results"]) == 2

    res = cli(
        *cfg, "ablate", "--target", "sorting", "--subsets", "1", "--dim", "64", "--percentage", "0.1", "--finetune"
    )
    assert res.code == 2 and "--force" in res.err, res  # another selection would silently mismatch the adapter

    _set_targets(ws, 'targets = {sorting = {file = "data/sorting_target.jsonl"}}')
    res = cli(*cfg, *args)
    assert res.code == 0, res
    for e in json.loads(res.out)["subsets"]:  # a custom target without eval_file: reported, not failed
        assert e["eval"]["status"] == "not applicable" and "eval_file" in e["eval"]["reason"]
    res = cli(
        *cfg,
        "ablate",
        "--target",
        "sorting",
        "--subsets",
        "1",
        "--dim",
        "64",
        "--percentage",
        "0.1",
        "--finetune",
        "--force",
        "--device",
        "cpu",
        "--json",
    )
    assert res.code == 0, res
    for e in json.loads(res.out)["subsets"]:
        assert e["finetune"]["reused"] is False and e["finetune"]["examples"] == e["selected"] == 36
        assert (
            json.loads((Path(e["finetune"]["output_dir"]) / "lessctl_run.json").read_text())["train_file"] == e["file"]
        )


@pytest.mark.slow
def test_ablate_under_torchrun_matches_on_rank_zero_and_trains_on_all(tiny_grads_ws):
    import os
    import subprocess
    import sys

    ws = tiny_grads_ws
    _set_finetune_epochs(ws, 1)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        "--nproc-per-node=2",
        "-m",
        "lessctl.cli",
        "--config",
        str(ws / "lessctl.toml"),
        "ablate",
        "--target",
        "antonyms",
        "--subsets",
        "2",
        "--dim",
        "64",
        "--finetune",
        "--device",
        "cpu",
        "--json",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # one report: rank 1 prints nothing
    assert [e["label"] for e in report["subsets"]] == ["2", "12"]
    for e in report["subsets"]:
        assert (Path(e["finetune"]["output_dir"]) / "adapter_config.json").is_file()
    assert not list((ws / "out" / "selected" / "antonyms").rglob("*.tmp")) and not list(
        (ws / "out" / "selected" / "antonyms").rglob("*.part")
    )


# ----------------------------------------------------------------------------- transfer (LESS-T)


def test_transfer_finetune_loads_the_other_model_and_results_show_it(tiny_grads_ws, tmp_path, cli, monkeypatch):
    from safetensors import safe_open

    from lessctl.evaluation.runner import describe_model, record_result
    from lessctl.tiny import build_tiny_model, corpus_texts

    ws = tiny_grads_ws
    _set_finetune_epochs(ws, 1)
    data = ws / "data"
    texts = corpus_texts([data / "synth_a.jsonl", data / "synth_b.jsonl"] + sorted(data.glob("*_target.jsonl")))
    other = build_tiny_model(tmp_path / "other-model", texts, seed=1, hidden_size=32)
    cfg = ("--config", ws / "lessctl.toml")
    assert cli(*cfg, "match", "--target", "arithmetic", "--dim", "64").code == 0
    res = cli(*cfg, "finetune", "--target", "arithmetic", "--base-model", other, "--device", "cpu", "--json")
    assert res.code == 0, res
    out = Path(json.loads(res.out)["output_dir"])
    assert out == ws / "out" / "finetune" / "arithmetic-less-other-model"

    adapter = json.loads((out / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]).resolve() == other.resolve()
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    lora_a = [s for k, s in shapes.items() if "q_proj.lora_A" in k]
    assert lora_a and all(s[1] == 32 for s in lora_a)  # the other model's hidden size, not the workspace's 64
    run = json.loads((out / "lessctl_run.json").read_text())
    assert run["base_model"] == str(other.resolve()) and run["selection_model"] == str((ws / "model").resolve())
    assert run["transfer"] is True and (run["target"], run["method"]) == ("arithmetic", "less")

    # `lessctl results` shows the evaluation of a transfer run as a transfer row
    spec = describe_model(out, output_dir=ws / "out")
    assert spec.transfer and spec.base_model == str(other.resolve())
    record_result(ws / "out", spec, "tydiqa", {"f1": 12.5, "n": 9}, 1.0)
    res = cli(*cfg, "results", "--json")
    [rec] = json.loads(res.out)["results"]
    assert rec["transfer"] is True and rec["base_model"] == str(other.resolve())
    assert rec["selection_model"] == str((ws / "model").resolve())
    monkeypatch.setenv("COLUMNS", "200")
    res = cli(*cfg, "results")
    assert res.code == 0 and "transfer to" in res.out, res
    [row] = [l for l in res.out.splitlines() if "arithmetic-less-other-model" in l]
    assert row.rstrip(" │").endswith("other-model"), res
