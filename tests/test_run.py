"""`lessctl run` (every stage not yet done) and dynamic shell completion."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_run_completes_then_does_nothing(tiny_ws, cli):
    cfgp = tiny_ws / "lessctl.toml"
    res = cli("--config", cfgp, "run", "--json")
    assert res.code == 0, res
    first = json.loads(res.out)
    stages = {r["stage"] for r in first["stages"]}
    assert stages == {"warmup", "grads", "match", "finetune", "eval"}
    assert [r["status"] for r in first["stages"] if r["stage"] == "warmup"] == ["skipped"]  # warmed up already
    assert first["done"] > 0
    for t in ("arithmetic", "antonyms", "sorting"):
        assert (tiny_ws / "out" / "selected" / t / "less" / "summary.json").is_file()
        assert (tiny_ws / "out" / "finetune" / f"{t}-less" / "adapter_config.json").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in (tiny_ws / "out").rglob("*") if p.is_file()}
    res = cli("--config", cfgp, "run", "--json")
    assert res.code == 0, res
    second = json.loads(res.out)
    assert second["done"] == 0
    assert {r["status"] for r in second["stages"]} <= {"skipped", "not applicable"}
    assert stamps == {p: p.stat().st_mtime_ns for p in (tiny_ws / "out").rglob("*") if p.is_file() and p in stamps}


def test_run_stage_range_errors(tiny_ws, cli):
    res = cli("--config", tiny_ws / "lessctl.toml", "run", "--from", "match", "--until", "grads")
    assert res.code == 2 and "--from" in res.err
    res = cli("--config", tiny_ws / "lessctl.toml", "run", "--until", "nope")
    assert res.code == 2 and "--until" in res.err and "stages:" in res.err


def _complete(ws, words: str) -> list[str]:
    env = {
        **os.environ,
        "_LESSCTL_COMPLETE": "complete_bash",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1)),
    }
    out = subprocess.run(
        [sys.executable, "-c", "from lessctl.cli import main; main()"],
        cwd=ws,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return out.stdout.split()


def test_completion_candidates_from_the_workspace(tiny_ws):
    assert _complete(tiny_ws, "lessctl grads --target ar") == ["arithmetic"]
    assert sorted(_complete(tiny_ws, "lessctl match --train synth_")) == ["synth_a", "synth_b"]
    steps = [str(c["step"]) for c in json.loads((tiny_ws / "out" / "warmup" / "checkpoints.json").read_text())]
    assert _complete(tiny_ws, "lessctl grads --ckpt ") == steps
    assert _complete(tiny_ws, "lessctl run --until f") == ["finetune"]
    assert "grads" in _complete(tiny_ws, "lessctl gr")


def test_show_completion_prints_a_script(tmp_path):
    # With shellingham installed, Typer makes --show-completion a flag and detects the shell from the parent
    # processes (none is a shell under some CI launchers); its test switch makes it take the shell named here.
    env = {**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    out = subprocess.run(
        [sys.executable, "-c", "from lessctl.cli import main; main()", "--show-completion", "bash"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0 and "_LESSCTL_COMPLETE" in out.stdout
