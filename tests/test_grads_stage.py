"""lessctl.grads.stage through `lessctl grads`: stores, schema, skip and force, kill -9 and resume, shards, errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
from grads_helpers import _checkpoint, _wait_rows

from lessctl.config import load_config
from lessctl.grads.store.reader import open_store
from lessctl.grads.store.schema import store_path


def test_store_schema_and_verify(tiny_grads_ws, cli):
    res = cli("--config", tiny_grads_ws / "lessctl.toml", "store", "verify")
    assert res.code == 0, res
    res = cli("--config", tiny_grads_ws / "lessctl.toml", "store", "ls", "--json")
    stores = json.loads(res.out)["stores"]
    assert {(s["name"], s["grad_type"]) for s in stores} >= {
        ("synth_a", "adam"),
        ("synth_b", "adam"),
        ("arithmetic", "sgd"),
        ("antonyms", "sgd"),
        ("sorting", "sgd"),
    }
    assert all(s["complete"] and s["dims"] == [64, 128] for s in stores)
    _, step = _checkpoint(tiny_grads_ws)
    p = store_path(tiny_grads_ws / "out" / "grads", "synth_a", step, "adam")
    with h5py.File(p) as f:
        n = f["index"].shape[0]
        assert f["dim128/features"].dtype == np.float16 and f["dim128/features"].shape == (n, 128)
        assert f["dim128/norms"].dtype == np.float32 and f["index"].dtype == np.int64
        assert len(f.attrs["source_sha256"]) == 64 and bool(f.attrs["complete"])
    size = p.stat().st_size
    assert size < (2 * n * (64 + 128) + 8 * n) * 1.5 + 64_000
    # a corrupted row makes verify fail with exit 1
    with h5py.File(p, "r+") as f:
        f["dim64/features"][0] = np.full(64, np.nan, dtype=np.float16)
    res = cli("--config", tiny_grads_ws / "lessctl.toml", "store", "verify")
    assert res.code == 1 and "error:" in res.err


def test_complete_store_is_skipped_unless_force(tiny_grads_ws, cli):
    cfgp = tiny_grads_ws / "lessctl.toml"
    res = cli("--config", cfgp, "grads", "--dims", "64", "128", "--target", "sorting", "--json")
    assert res.code == 0, res
    assert {s["status"] for s in json.loads(res.out)["stores"]} == {"skipped"}
    res = cli(
        "--config",
        cfgp,
        "grads",
        "--dims",
        "64",
        "128",
        "--target",
        "sorting",
        "--ckpt-index",
        "1",
        "--force",
        "--json",
    )
    assert res.code == 0, res
    assert [s["status"] for s in json.loads(res.out)["stores"]] == ["written"]


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted(tiny_ws, tmp_path, cli):
    other = tmp_path / "uninterrupted"
    shutil.copytree(tiny_ws, other, symlinks=True)
    _, step = _checkpoint(tiny_ws)
    args = ["grads", "--ckpt", str(step), "--train", "synth_a", "--dims", "64", "--batch-tokens", "256"]
    env = {**os.environ, "LESSCTL_FLUSH_ROWS": "8"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lessctl.cli", "--config", str(tiny_ws / "lessctl.toml"), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    final = store_path(tiny_ws / "out" / "grads", "synth_a", step, "adam")
    part = final.with_name(final.name + ".part")
    done = _wait_rows(part, 16, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not final.exists() and part.exists()
    assert 16 <= done < 180
    # resume (same flush size, in-process) and compare with an uninterrupted run
    os.environ["LESSCTL_FLUSH_ROWS"] = "8"
    try:
        from lessctl.grads import stage as collect

        old, collect.FLUSH_ROWS = collect.FLUSH_ROWS, 8
        res = cli("--config", tiny_ws / "lessctl.toml", *args, "--json")
        assert res.code == 0, res
        assert json.loads(res.out)["stores"][0]["status"] == "resumed"
        res = cli("--config", other / "lessctl.toml", *args, "--json")
        assert res.code == 0, res
    finally:
        collect.FLUSH_ROWS = old
        os.environ.pop("LESSCTL_FLUSH_ROWS", None)
    with (
        open_store(tiny_ws / "out" / "grads", "synth_a", step, "adam") as a,
        open_store(other / "out" / "grads", "synth_a", step, "adam") as b,
    ):
        np.testing.assert_array_equal(a.index, b.index)
        np.testing.assert_array_equal(a.read(64), b.read(64))
        np.testing.assert_array_equal(a.norms(64), b.norms(64))


def test_three_shards_read_as_one(tiny_grads_ws, cli):
    cfgp = tiny_grads_ws / "lessctl.toml"
    _, step = _checkpoint(tiny_grads_ws)
    for k in (1, 2, 3):
        res = cli(
            "--config",
            cfgp,
            "grads",
            "--ckpt",
            str(step),
            "--train",
            "synth_b",
            "--dims",
            "64",
            "128",
            "--shard",
            f"{k}/3",
            "--device",
            "cpu",
            "--json",
        )  # as the template's stores were made
        assert res.code == 0, res
    grads = tiny_grads_ws / "out" / "grads"
    whole = store_path(grads, "synth_b", step, "adam")
    moved = whole.with_name("whole.h5")
    whole.rename(moved)
    from lessctl.grads.store.reader import StoreReader

    with open_store(grads, "synth_b", step, "adam") as sharded, StoreReader([moved]) as ref:
        assert len(sharded.paths) == 3 and sharded.n_rows == ref.n_rows
        np.testing.assert_array_equal(sharded.index, ref.index)
        for d in (64, 128):
            np.testing.assert_allclose(sharded.read(d).astype(np.float32), ref.read(d).astype(np.float32), atol=2e-3)
    # a missing shard is named
    store_path(grads, "synth_b", step, "adam", (2, 3)).unlink()
    res = cli("--config", cfgp, "match", "--target", "sorting", "--ckpts", str(step))
    assert res.code == 2 and "shard 2/3" in res.err and "--shard 2/3" in res.err


def test_changed_source_refuses_to_resume(tiny_ws, cli):
    cfgp = tiny_ws / "lessctl.toml"
    _, step = _checkpoint(tiny_ws)
    # make a partial store by killing a subprocess early
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lessctl.cli",
            "--config",
            str(cfgp),
            "grads",
            "--ckpt",
            str(step),
            "--train",
            "synth_a",
            "--dims",
            "64",
            "--batch-tokens",
            "256",
        ],
        env={**os.environ, "LESSCTL_FLUSH_ROWS": "8"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    final = store_path(tiny_ws / "out" / "grads", "synth_a", step, "adam")
    _wait_rows(final.with_name(final.name + ".part"), 8, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with open(tiny_ws / "data" / "synth_a.jsonl", "a") as fh:
        fh.write(
            json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n"
        )
    res = cli("--config", cfgp, "grads", "--ckpt", str(step), "--train", "synth_a", "--dims", "64")
    assert res.code == 2 and res.err.count("error:") == 1 and "source" in res.err and "--force" in res.err, res


@pytest.mark.parametrize(
    "args, needle",
    [
        (["grads", "--type", "adamw"], "--type"),
        (["grads", "--shard", "4/3"], "--shard"),
        (["grads", "--shard", "x"], "--shard"),
        (["grads", "--ckpt", "99999"], "--ckpt"),
        (["grads", "--train", "nope"], "--train"),
        (["grads", "--target", "nope"], "--target"),
        (["grads", "--projector", "magic"], "projector"),
        (["grads", "--ckpt-index", "9"], "--ckpt-index"),
    ],
)
def test_grads_user_errors(tiny_ws, cli, args, needle):
    res = cli("--config", tiny_ws / "lessctl.toml", *args)
    assert res.code == 2, res
    lines = [l for l in res.err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res
    assert "Traceback" not in res.err


def test_adam_without_optimizer_state_is_a_user_error(tiny_ws, cli):
    ckpt, step = _checkpoint(tiny_ws)
    (ckpt / "optimizer.pt").unlink()
    res = cli("--config", tiny_ws / "lessctl.toml", "grads", "--ckpt", str(step), "--train", "synth_a", "--dims", "64")
    assert res.code == 2 and "optimizer.pt" in res.err and "--type sgd" in res.err, res
    # sgd works without it
    res = cli("--config", tiny_ws / "lessctl.toml", "grads", "--ckpt", str(step), "--target", "sorting", "--dims", "64")
    assert res.code == 0, res


def test_grads_without_warmup_names_the_command(tmp_path, cli):
    from lessctl.config import to_toml
    from lessctl.workspace import preset_config

    (tmp_path / "lessctl.toml").write_text(to_toml(preset_config("tiny")))
    res = cli("--config", tmp_path / "lessctl.toml", "grads")
    assert res.code == 2 and "lessctl warmup" in res.err
    assert load_config(tmp_path / "lessctl.toml").grads.dims == [128]


def test_sketch_stores_are_recorded_and_not_matched_with_rademacher(tiny_grads_ws, cli):
    ws = tiny_grads_ws
    step = json.loads((ws / "out" / "warmup" / "checkpoints.json").read_text())[0]["step"]
    res = cli(
        "--config",
        ws / "lessctl.toml",
        "grads",
        "--ckpt",
        str(step),
        "--target",
        "sorting",
        "--dims",
        "64",
        "128",
        "--projector",
        "sketch",
        "--force",
    )
    assert res.code == 0, res
    assert "projector: sketch" in res.out + res.err
    assert "TRAK's CUDA projection" not in res.out + res.err  # the engine line is the CUDA projector's only
    with open_store(ws / "out" / "grads", "sorting", step, "sgd") as r:
        assert r.projector["kind"] == "sketch"
    res = cli("--config", ws / "lessctl.toml", "match", "--target", "sorting")
    assert res.code == 2 and "projected differently" in res.err


def test_merged_and_unmerged_passes_write_the_same_stores(tiny_grads_ws, cli):
    """`lessctl grads` merges the adapter by default; --no-merge runs peft's LoRA branch: same features."""
    ws = tiny_grads_ws
    grads = ws / "out" / "grads"
    _, step = _checkpoint(ws)
    with open_store(grads, "synth_a", step, "adam") as r:
        merged_train = r.read(64)
    with open_store(grads, "sorting", step, "sgd") as r:
        merged_target = r.read(64)
    res = cli(
        "--config",
        ws / "lessctl.toml",
        "grads",
        "--no-merge",
        "--force",
        "--ckpt",
        str(step),
        "--dims",
        "64",
        "--train",
        "synth_a",
        "--target",
        "sorting",
        "--projector",
        "basic",
        "--device",
        "cpu",
    )
    assert res.code == 0, res.err
    with open_store(grads, "synth_a", step, "adam") as r:
        np.testing.assert_allclose(r.read(64), merged_train, rtol=1e-3, atol=1e-3)
    with open_store(grads, "sorting", step, "sgd") as r:
        np.testing.assert_allclose(r.read(64), merged_target, rtol=1e-3, atol=1e-3)


def test_windows_hold_whole_projection_calls():
    from lessctl.grads.stage import window_rows

    assert window_rows(256, 63) == 315 and window_rows(256, 64) == 256 and window_rows(256, 100) == 300
    assert window_rows(256, 4096) == 256 and window_rows(4, 4) == 4
