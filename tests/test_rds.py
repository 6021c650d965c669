"""RDS: `grads --type reps` stores the last-token hidden states of the checkpoint's model (checked against a direct
`output_hidden_states=True` forward), resumably and by shards; `match --method rds` is their cosine, LESS-aggregated."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest


def _steps(ws: Path) -> list[int]:
    return [c["step"] for c in json.loads((ws / "out" / "warmup" / "checkpoints.json").read_text())]


def _reps(ws: Path, name: str, step: int) -> tuple[np.ndarray, np.ndarray, dict]:
    with h5py.File(ws / "out" / "grads" / f"{name}-ckpt{step}-reps.h5", "r") as f:
        (key,) = [k for k in f if k.startswith("dim")]
        return f[f"{key}/features"][:].astype(np.float32), f["index"][:], dict(f.attrs)


@pytest.fixture
def reps_ws(tiny_ws, cli):
    res = cli("--config", tiny_ws / "lessctl.toml", "grads", "--type", "reps", "--ckpt", _steps(tiny_ws)[-1], "--json")
    assert res.code == 0, res
    stores = json.loads(res.out)["stores"]
    assert {s["type"] for s in stores} == {"reps"} and all(s["status"] == "written" for s in stores)
    return tiny_ws


def test_stored_reps_equal_a_direct_forward(reps_ws):
    import torch

    from lessctl.config import load_config
    from lessctl.grads.stage import data_sets
    from lessctl.models import load_adapter_model
    from lessctl.training import checkpoint_dir

    ws = reps_ws
    cfg = load_config(ws / "lessctl.toml")
    step = _steps(ws)[-1]
    model, tok = load_adapter_model(checkpoint_dir(cfg, step), base=cfg.model_ref(), device="cpu")
    model.eval()
    hidden = model.config.hidden_size
    for ds in data_sets(cfg, None, ["arithmetic"], "reps")[:1] + data_sets(cfg, ["synth_a"], None, "reps"):
        feats, index, attrs = _reps(ws, ds.name, step)
        enc = ds.encode(cfg, tok)
        assert feats.shape == (len(enc), hidden) and list(index) == [e.line for e in enc]
        assert attrs["grad_type"] == "reps" and attrs["step"] == step and attrs["complete"]
        for i in (0, len(enc) // 2, len(enc) - 1):
            with torch.no_grad():  # one example alone: no padding at all
                out = model(input_ids=torch.tensor([enc[i].input_ids]), output_hidden_states=True)
            h = out.hidden_states[-1][0, -1].float().numpy()
            np.testing.assert_allclose(feats[i], h / np.linalg.norm(h), atol=2e-3)  # float16 rows
        np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1, atol=2e-3)


def test_store_ls_verify_and_refusals(reps_ws, cli):
    cfg = reps_ws / "lessctl.toml"
    res = cli("--config", cfg, "store", "verify", "--json")
    assert res.code == 0 and json.loads(res.out)["ok"], res
    res = cli("--config", cfg, "store", "ls", "--json")
    assert {s["grad_type"] for s in json.loads(res.out)["stores"]} == {"reps"}
    res = cli("--config", cfg, "grads", "--type", "reps", "--dims", "64")
    assert res.code == 2 and res.err.startswith("error: --dims") and len(res.err.strip().splitlines()) == 1
    res = cli("--config", cfg, "grads", "--type", "reprs")
    assert res.code == 2 and "--type" in res.err and "reps" in res.err


def test_shards_and_resume_give_the_same_store(reps_ws, cli, tmp_path):
    import shutil

    from lessctl.grads.store.reader import open_store

    ws = reps_ws
    step = _steps(ws)[-1]
    whole, _, _ = _reps(ws, "synth_a", step)
    grads = ws / "out" / "grads"
    path = grads / f"synth_a-ckpt{step}-reps.h5"
    shutil.move(path, tmp_path / "whole.h5")
    for k in (1, 2):
        res = cli(
            "--config",
            ws / "lessctl.toml",
            "grads",
            "--type",
            "reps",
            "--train",
            "synth_a",
            "--ckpt",
            step,
            "--shard",
            f"{k}/2",
        )
        assert res.code == 0, res
    with open_store(grads, "synth_a", step, "reps") as r:
        assert r.attrs["grad_type"] == "reps"
        # other batches (other padding) round differently in the last bits of a float16 row
        np.testing.assert_allclose(r.read(whole.shape[1]).astype(np.float32), whole, atol=2e-4)
    for p in grads.glob("synth_a-*shard*"):
        p.unlink()
    # an interrupted store: the first 100 rows written, the rest not; a re-run resumes it
    part = path.with_name(path.name + ".part")
    shutil.copy(tmp_path / "whole.h5", part)
    with h5py.File(part, "r+") as f:
        (key,) = [k for k in f if k.startswith("dim")]
        f[f"{key}/features"][100:] = 0
        f.attrs["rows_completed"], f.attrs["complete"] = 100, False
    cfg = ws / "lessctl.toml"
    res = cli("--config", cfg, "grads", "--type", "reps", "--train", "synth_a", "--ckpt", step, "--json")
    assert res.code == 0, res
    assert [s["status"] for s in json.loads(res.out)["stores"]] == ["resumed"]
    again, _, attrs = _reps(ws, "synth_a", step)
    assert attrs["complete"] and not part.exists()
    np.testing.assert_array_equal(again[:100], whole[:100])
    np.testing.assert_allclose(again, whole, atol=2e-4)


def test_match_rds_is_the_aggregated_cosine(reps_ws, cli):
    from lessctl.select.match import read_sorted_csv

    ws = reps_ws
    step = _steps(ws)[-1]
    res = cli("--config", ws / "lessctl.toml", "match", "--target", "arithmetic", "--method", "rds", "--json")
    assert res.code == 0, res
    sel = json.loads(res.out)["selections"][0]
    assert sel["method"] == "rds" and sel["checkpoint"] == step and sel["selected"] == 18
    Y, _, _ = _reps(ws, "arithmetic", step)
    subtasks = [json.loads(x)["subtask"] for x in (ws / "data" / "arithmetic_target.jsonl").read_text().splitlines()]
    expected = {}
    for name in ("synth_a", "synth_b"):
        X, index, _ = _reps(ws, name, step)
        S = X @ Y.T
        per = np.stack([S[:, [j for j, t in enumerate(subtasks) if t == u]].mean(1) for u in dict.fromkeys(subtasks)])
        expected.update({(name, int(i)): v for i, v in zip(index, per.max(0))})
    rows = read_sorted_csv(Path(sel["file"]).parent / "sorted.csv")
    assert len(rows) == len(expected)
    for n, i, v in rows:
        assert v == pytest.approx(expected[(n, i)], abs=2e-6)
    # the tiny pool's families are distinct: the selection leans to the target's own family
    fams = [json.loads(x).get("family") for x in Path(sel["file"]).read_text().splitlines()]
    assert fams.count("arithmetic") > len(fams) / 6
    res = cli("--config", ws / "lessctl.toml", "match", "--target", "arithmetic", "--method", "rds", "--ckpts", "1")
    assert res.code == 2 and "--ckpts" in res.err


def test_match_rds_without_reps_names_the_command(tiny_ws, cli):
    res = cli("--config", tiny_ws / "lessctl.toml", "match", "--target", "sorting", "--method", "rds")
    assert res.code == 2 and "lessctl grads --type reps" in res.err, res


def test_stale_reps_are_recomputed(reps_ws, cli):
    """A reps store, like a gradient store, is current only for its source and its warmup: a re-run skips it,
    another warmup (what `warmup --force` leaves) or an edited source has it written again, in place."""
    ws = reps_ws
    step = _steps(ws)[-1]
    cfg = ("--config", ws / "lessctl.toml")
    args = (*cfg, "grads", "--type", "reps", "--train", "synth_a", "--ckpt", step, "--json")

    def status() -> str:
        res = cli(*args)
        assert res.code == 0, res
        (s,) = [s for s in json.loads(res.out)["stores"] if s["name"] == "synth_a"]
        return s["status"]

    _, _, attrs = _reps(ws, "synth_a", step)
    assert attrs["warmup_run"] and attrs["batch_tokens"] > 0
    assert status() == "skipped"
    run = ws / "out" / "warmup" / "lessctl_run.json"
    run.write_text(json.dumps({**json.loads(run.read_text()), "run_id": "another-warmup"}))
    assert status() == "written"
    assert _reps(ws, "synth_a", step)[2]["warmup_run"] == "another-warmup"
    assert status() == "skipped"
    pool = ws / "data" / "synth_a.jsonl"
    lines = pool.read_text().splitlines(keepends=True)
    pool.write_text("".join([lines[1], lines[0], *lines[2:]]))
    assert status() == "written"
    _, index, attrs = _reps(ws, "synth_a", step)
    assert attrs["complete"] and len(index) == len(lines)
