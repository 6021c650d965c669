"""Shared fixtures: offline settings, the real data folder, a tiny workspace built once per session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("LESSCTL_TEST_DATA", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = shared_data_dir()
    if not (d / "eval").is_dir():
        pytest.skip(f"real data folder not found at {d} (set LESSCTL_TEST_DATA)")
    return d


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def __repr__(self) -> str:
        return f"CliResult(code={self.code}, out={self.out[-2000:]!r}, err={self.err[-2000:]!r})"


@pytest.fixture
def cli(capsys, monkeypatch):
    """Runs `lessctl ARGS` through the real main() in-process; returns code, stdout, stderr."""
    from lessctl.cli import main
    from lessctl.commands._common import STATE

    def run(*args: str, cwd: Path | None = None) -> CliResult:
        if cwd is not None:
            monkeypatch.chdir(cwd)
        STATE.config_path, STATE.debug = None, False
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        cap = capsys.readouterr()
        return CliResult(code, cap.out, cap.err)

    return run


@pytest.fixture(scope="session")
def tiny_template(tmp_path_factory) -> Path:
    """A tiny workspace after `init --preset tiny` and `warmup` (2 epochs); copy it before changing it."""
    from lessctl.config import load_config
    from lessctl.training import run_warmup
    from lessctl.workspace import init_workspace

    root = tmp_path_factory.mktemp("tiny")
    path = init_workspace(root, "tiny")
    # a shorter warmup than the preset's (2 epochs on 25% of the pool), written into the file so that
    # every later command sees the same config
    text = path.read_text()
    text = text.replace("[warmup]\npercentage = 0.5\nepochs = 4\n", "[warmup]\npercentage = 0.25\nepochs = 2\n", 1)
    assert "percentage = 0.25\nepochs = 2" in text
    path.write_text(text)
    run_warmup(load_config(path), device="cpu")
    return root


@pytest.fixture
def tiny_ws(tiny_template, tmp_path) -> Path:
    """A private copy of the tiny warmed-up workspace."""
    dst = tmp_path / "ws"
    shutil.copytree(tiny_template, dst, symlinks=True)
    return dst


@pytest.fixture(scope="session")
def tiny_grads_template(tiny_template, tmp_path_factory) -> Path:
    """The tiny workspace with gradient stores (dims 64 and 128) at both checkpoints."""
    from lessctl.config import load_config
    from lessctl.grads.stage import collect_gradients

    root = tmp_path_factory.mktemp("tinygrads") / "ws"
    shutil.copytree(tiny_template, root, symlinks=True)
    cfg = load_config(root / "lessctl.toml")
    steps = [c["step"] for c in __import__("json").loads((cfg.output_dir / "warmup" / "checkpoints.json").read_text())]
    collect_gradients(cfg, steps=steps, dims=[64, 128], projector="basic", device="cpu")
    return root


@pytest.fixture
def tiny_grads_ws(tiny_grads_template, tmp_path) -> Path:
    dst = tmp_path / "wsg"
    shutil.copytree(tiny_grads_template, dst, symlinks=True)
    return dst


@pytest.fixture(scope="session")
def local_slurm(tmp_path_factory):
    """A single-node Slurm on localhost for the session (skipped, with the reason, where it cannot run)."""
    from slurm_cluster import LocalSlurm, unavailable_reason

    reason = unavailable_reason()
    if reason:
        if os.environ.get("LESSCTL_REQUIRE_SLURM"):
            pytest.fail(reason)
        pytest.skip(reason)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except Exception as exc:
        cluster.stop()
        msg = f"could not start a local Slurm: {exc}\n{cluster.log_tail()}"
        if os.environ.get("LESSCTL_REQUIRE_SLURM"):
            pytest.fail(msg)
        pytest.skip(msg)
    old = {k: os.environ.get(k) for k in cluster.env()}
    os.environ.update(cluster.env())
    yield cluster
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    cluster.stop()
