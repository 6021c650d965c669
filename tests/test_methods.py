"""RDS and DSIR wherever methods appear: config validation, completion, `run`, `slurm submit`, `finetune`."""

from __future__ import annotations

import json
import re

import pytest

from lessctl.vocab import METHODS


def test_methods_are_one_closed_set(tmp_path):
    from lessctl.commands._common import complete_methods
    from lessctl.config import load_config
    from lessctl.errors import ConfigError

    assert METHODS == ("less", "random", "bm25", "rds", "dsir")
    assert complete_methods("") == list(METHODS) and complete_methods("d") == ["dsir"]
    for m in METHODS:
        (tmp_path / "lessctl.toml").write_text(f'[select]\nmethod = "{m}"\n')
        assert load_config(tmp_path / "lessctl.toml").select.method == m
    (tmp_path / "lessctl.toml").write_text('[select]\nmethod = "rsd"\n')
    with pytest.raises(ConfigError, match="select.method: expected less, random, bm25, rds or dsir, got 'rsd'"):
        load_config(tmp_path / "lessctl.toml")


def test_slurm_submit_computes_reps_for_rds(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch needed for a dry run
    path = tmp_path / "lessctl.toml"
    for method, reps in (("rds", True), ("dsir", False)):
        path.write_text(
            f'[experiment]\nname = "t"\noutput_dir = "out"\n[slurm]\ncpus = 1\ngpus = 0\ntime = "10:00"\n'
            f'[select]\nmethod = "{method}"\n[data]\ntargets = {{tydiqa = "tydiqa"}}\n'
        )
        r = cli("--config", path, "slurm", "submit", "--dry-run", "--json")
        assert r.code == 0, r
        jobs = {j["label"]: j for j in json.loads(r.out)["jobs"]}
        assert ("grads --type reps --ckpt-index" in jobs["grads"]["script"]) is reps
        assert jobs["finetune tydiqa"]["script"].rstrip().endswith(f"finetune --target tydiqa --method {method}")
        assert f"finetune/tydiqa-{method}" in jobs["eval tydiqa"]["script"]


def test_run_with_rds_and_dsir_until_match(tiny_ws, cli):
    cfgp = tiny_ws / "lessctl.toml"
    for method in ("rds", "dsir"):
        text = cfgp.read_text()
        assert text.count('method = "') == 1
        cfgp.write_text(re.sub(r'method = "\w+"', f'method = "{method}"', text))
        skip_grads = ("--from", "match") if method == "dsir" else ()  # dsir reads no stores
        res = cli("--config", cfgp, "run", *skip_grads, "--until", "match", "--json")
        assert res.code == 0, res
        stages = json.loads(res.out)["stages"]
        grads = [r["item"] for r in stages if r["stage"] == "grads" and r["status"] == "done"]
        if method == "rds":
            assert grads and all(n.endswith("-reps.h5") for n in grads)
        for t in ("arithmetic", "antonyms", "sorting"):
            summary = json.loads((tiny_ws / "out" / "selected" / t / method / "summary.json").read_text())
            assert summary["method"] == method and summary["selected"] == 18
    res = cli("--config", cfgp, "finetune", "--target", "sorting", "--method", "bm25")
    assert res.code == 2 and "lessctl match --target sorting --method bm25" in res.err
