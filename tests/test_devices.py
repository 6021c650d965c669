"""lessctl.grads.devices: `grads --devices N`, one worker per device."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from grads_helpers import _checkpoint

from lessctl.grads.store.reader import open_store
from lessctl.grads.store.schema import store_path


def test_devices_write_shards_equal_to_a_single_device_run(tiny_ws, tmp_path, cli):
    """`--devices cpu,cpu`: two spawned workers write shard 1/2 and 2/2 of every store; read as one, they are the
    stores of a single-device run, row for row."""
    single = tmp_path / "single"
    shutil.copytree(tiny_ws, single, symlinks=True)
    _, step = _checkpoint(tiny_ws)
    args = [
        "grads",
        "--ckpt",
        str(step),
        "--train",
        "synth_b",
        "--target",
        "sorting",
        "--dims",
        "64",
        "--projector",
        "basic",
    ]
    res = cli("--config", tiny_ws / "lessctl.toml", *args, "--devices", "cpu,cpu", "--json")
    assert res.code == 0, res
    stores = json.loads(res.out)["stores"]
    assert [(s["name"], s["shard"], s["device"], s["status"]) for s in stores] == [
        ("synth_b", "1/2", "cpu", "written"),
        ("synth_b", "2/2", "cpu", "written"),
        ("sorting", "1/2", "cpu", "written"),
        ("sorting", "2/2", "cpu", "written"),
    ]
    res = cli("--config", single / "lessctl.toml", *args, "--device", "cpu", "--json")
    assert res.code == 0, res
    for name, kind in (("synth_b", "adam"), ("sorting", "sgd")):
        grads = tiny_ws / "out" / "grads"
        assert not store_path(grads, name, step, kind).exists()
        assert all(store_path(grads, name, step, kind, (k, 2)).exists() for k in (1, 2))
        with (
            open_store(grads, name, step, kind) as sharded,
            open_store(single / "out" / "grads", name, step, kind) as ref,
        ):
            assert len(sharded.paths) == 2 and sharded.n_rows == ref.n_rows
            np.testing.assert_array_equal(sharded.index, ref.index)
            np.testing.assert_allclose(
                sharded.read(64).astype(np.float32), ref.read(64).astype(np.float32), rtol=0, atol=5e-4
            )
            np.testing.assert_allclose(sharded.norms(64), ref.norms(64), rtol=1e-3)
    # a second run finds every shard complete
    res = cli("--config", tiny_ws / "lessctl.toml", *args, "--devices", "cpu,cpu", "--json")
    assert res.code == 0 and {s["status"] for s in json.loads(res.out)["stores"]} == {"skipped"}, res


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--devices", "2"], "--devices"),
        (["--devices", "cpu,cpu", "--shard", "1/2"], "--shard"),
        (["--devices", "cpu,cpu", "--device", "cpu"], "--device"),
        (["--devices", "cpu,gpu"], "--devices"),
    ],
)
def test_devices_user_errors(tiny_ws, cli, args, needle):
    if args[1] == "2" and torch.cuda.device_count() >= 2:
        pytest.skip("two CUDA GPUs are visible")
    res = cli("--config", tiny_ws / "lessctl.toml", "grads", *args)
    assert res.code == 2, res
    lines = [l for l in res.err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0] and "--devices" in lines[0], res


def test_devices_worker_error_is_raised_by_the_parent(tiny_ws, cli):
    """A lessctl error in a worker (here: adam features without optimizer.pt) ends the run with that error."""
    ckpt, step = _checkpoint(tiny_ws)
    (ckpt / "optimizer.pt").unlink()
    res = cli(
        "--config",
        tiny_ws / "lessctl.toml",
        "grads",
        "--ckpt",
        str(step),
        "--train",
        "synth_a",
        "--dims",
        "64",
        "--devices",
        "cpu,cpu",
    )
    assert res.code == 2 and res.err.count("error:") == 1 and "optimizer.pt" in res.err, res
    assert "Traceback" not in res.err


def test_devices_progress_sums_the_workers_rows_per_store():
    from lessctl.grads.devices import _ProgressSum

    seen = []
    p = _ProgressSum(lambda *a: seen.append(a))
    p.update(1, "a", 5, 0, 45)
    p.update(2, "a", 5, 0, 45)
    p.update(1, "a", 5, 45, 45)
    p.update(1, "b", 5, 0, 10)  # worker 1 is on the next store while worker 2 still works on the first
    p.update(2, "a", 5, 40, 45)
    p.update(2, "a", 5, 45, 45)
    p.update(2, "b", 5, 10, 10)
    assert seen == [
        ("a", 5, 0, 45),
        ("a", 5, 0, 90),
        ("a", 5, 45, 90),
        ("a", 5, 45, 90),
        ("a", 5, 85, 90),
        ("b", 5, 0, 10),
        ("b", 5, 10, 20),
    ]
