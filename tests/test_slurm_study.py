"""`lessctl slurm submit` of the study plan: the job graph, skipping complete items, and (marked `slurm`) a real
local Slurm where one cancelled finetune is all a resubmission runs again."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from lessctl.config import load_config
from lessctl.slurm.jobs import job_states
from lessctl.slurm.study import describe_specs, plan_study

TARGETS = ("arithmetic", "antonyms", "sorting")
SLURM = '\n[slurm]\ncpus = 1\ngpus = 0\ntime = "10:00"\n'


def wait_tasks(ids, timeout_s: float = 300):
    """The states once no job or array task is pending or running (a job's state is its worst task's, so it can
    read CANCELLED while other tasks still run)."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = job_states(ids)
        active = [
            s
            for s in states.values()
            for t in [s.state, *s.tasks.values()]
            if t in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING")
        ]
        if not active:
            return states
        assert time.monotonic() < deadline, states
        time.sleep(1)


def with_study(ws, body: str) -> None:
    p = ws / "lessctl.toml"
    p.write_text(p.read_text() + SLURM + "\n[study]\n" + body + "\n")


def test_submit_dry_run_graph_of_the_study(tiny_ws, cli, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch needed for a dry run
    with_study(tiny_ws, 'methods = ["less", "random", "bm25", "rds"]\nrandom_seeds = [3, 4]\nablation = ["2"]')
    r = cli("--config", tiny_ws / "lessctl.toml", "slurm", "submit", "--dry-run", "--json")
    assert r.code == 0, r
    jobs = {j["label"]: j for j in json.loads(r.out)["jobs"]}
    # the fixture warmed up: no warmup job; grads over the 2 checkpoints, reps at the last
    assert list(jobs) == ["grads", "grads reps", "match", "finetune", "eval", "eval more", "eval base"]
    assert jobs["grads"]["array"] == "1-2" and jobs["grads"]["after"] == []
    assert "--type reps --ckpt-index 2" in jobs["grads reps"]["script"]
    assert jobs["match"]["array"] is None and jobs["match"]["after"] == ["grads", "grads reps"]
    per_target = 1 + 2 + 1 + 1 + 1  # less, random x 2, bm25, rds, less-ckpt2
    assert len(jobs["match"]["items"]) == 3 * per_target
    n_ft = 3 * (per_target - 2) + 2  # a random draw is one model, evaluated on every target
    assert jobs["finetune"]["array"] == f"1-{n_ft}" and jobs["finetune"]["after"] == ["match"]
    assert jobs["eval"]["array"] == f"1-{n_ft}" and jobs["eval"]["after"] == ["finetune"]
    assert jobs["eval more"]["array"] == "1-4" and jobs["eval more"]["after"] == ["finetune"]
    assert jobs["eval more"]["sbatch"][2] == "--dependency=afterany:<finetune>"
    assert "finetune random-seed4" in jobs["finetune"]["items"]
    assert jobs["eval base"]["array"] == "1-3" and jobs["eval base"]["after"] == []
    assert "finetune sorting-less-ckpt2" in jobs["finetune"]["items"]
    script = jobs["finetune"]["script"]
    assert "run --items 'match" not in script and "run --items 'finetune arithmetic-less'" in script
    assert script.rstrip().endswith('--pick "${SLURM_ARRAY_TASK_ID}"')
    assert jobs["eval"]["sbatch"][2] == "--dependency=aftercorr:<finetune>"  # eval task k after finetune task k
    assert [i.split()[1].split("/")[0] for i in jobs["eval"]["items"]] == [
        i.split()[1] for i in jobs["finetune"]["items"]
    ]
    assert jobs["grads"]["gpu_seconds"] == pytest.approx(
        360 * 2 / 33.8, abs=0.05
    )  # pool rows x checkpoints at the rate
    assert jobs["grads reps"]["gpu_time"] == "?" and jobs["finetune"]["gpu_seconds"] > 0
    assert not (tiny_ws / "out" / "slurm").exists()

    r = cli("--config", tiny_ws / "lessctl.toml", "slurm", "submit", "--dry-run", "--methods", "bm25", "--json")
    jobs = {j["label"]: j for j in json.loads(r.out)["jobs"]}
    assert list(jobs) == ["match", "finetune", "eval", "eval base"] and jobs["match"]["after"] == []
    assert "run --methods bm25 --items" in jobs["finetune"]["script"]


def test_submit_skips_complete_items(tiny_ws, cli):
    with_study(tiny_ws, 'methods = ["random", "bm25"]\nrandom_seeds = [3]\nbase = false')
    cfgp = tiny_ws / "lessctl.toml"
    assert cli("--config", cfgp, "run", "--until", "match").code == 0
    cfg = load_config(cfgp)
    specs = describe_specs(plan_study(cfg))
    assert [(s["label"], s["array"]) for s in specs] == [("finetune", "1-4"), ("eval", "1-4"), ("eval more", "1-2")]
    assert plan_study(cfg)[0].after == ()  # the selections exist: the finetunes wait for nothing
    res = cli("--config", cfgp, "run", "--items", "finetune sorting-bm25", "--items", "eval sorting-bm25/sorting")
    assert res.code == 0, res
    specs = describe_specs(plan_study(cfg))
    assert [(s["label"], s["array"]) for s in specs] == [("finetune", "1-3"), ("eval", "1-3"), ("eval more", "1-2")]
    assert "finetune sorting-bm25" not in specs[0]["items"]
    # a changed selection makes its finetune and evaluation pending again
    assert (
        cli("--config", cfgp, "match", "--target", "sorting", "--method", "bm25", "--percentage", "0.1", "--force").code
        == 0
    )
    specs = describe_specs(plan_study(cfg))
    # the forced selection is not the plan's ([select] percentage 0.05): the match is redone, then what follows it
    assert specs[0]["label"] == "match" and specs[0]["items"] == ["match sorting/bm25"]
    assert "finetune sorting-bm25" in specs[1]["items"] and "eval sorting-bm25/sorting" in specs[2]["items"]
    res = cli("--config", cfgp, "run", "--items", "finetune sorting-bm25", "--pick", "2")
    assert res.code == 2 and "error: --pick: 2 is not one of the 1 --items" in res.err


@pytest.mark.slurm
@pytest.mark.slow
def test_cancelled_finetune_is_all_a_resubmission_runs(local_slurm, tiny_ws, cli):
    with_study(tiny_ws, 'methods = ["random", "bm25"]\nrandom_seeds = [3]\nbase = false')
    cfgp = tiny_ws / "lessctl.toml"
    r = cli("--config", cfgp, "slurm", "submit", "--json")
    assert r.code == 0, r
    jobs = {j["label"]: j for j in json.loads(r.out)["jobs"]}
    assert list(jobs) == ["match", "finetune", "eval", "eval more"]
    assert jobs["finetune"]["after"] == [jobs["match"]["job_id"]]
    ft, ev = jobs["finetune"]["job_id"], jobs["eval"]["job_id"]
    victim = jobs["finetune"]["items"][1]  # array task 2, pending while the match job runs
    subprocess.run(["scancel", f"{ft}_2"], check=True)
    states = wait_tasks([jobs["match"]["job_id"], ft, ev, jobs["eval more"]["job_id"]])
    # the random draw's other targets ran after the finetune array, although one of its tasks was cancelled
    assert set(states[jobs["eval more"]["job_id"]].tasks.values()) == {"COMPLETED"}, states
    assert states[jobs["match"]["job_id"]].state == "COMPLETED", states
    # a pending task cancelled before it started leaves the array's records; the other three ran
    assert states[ft].tasks == {k: "COMPLETED" for k in ("1", "3", "4")}, states
    # aftercorr: the evaluation of the cancelled finetune can never start; the other three ran
    assert {k: v for k, v in states[ev].tasks.items() if v == "COMPLETED"}.keys() == {"1", "3", "4"}, states
    out = tiny_ws / "out"
    name = victim.split(" ", 1)[1]
    assert not (out / "finetune" / name / "adapter_config.json").exists()
    trained = {p: p.stat().st_mtime_ns for p in (out / "finetune").rglob("adapter_model.safetensors")}
    assert len(trained) == 3

    r = cli("--config", cfgp, "slurm", "submit", "--json")
    assert r.code == 0, r
    again = {j["label"]: j for j in json.loads(r.out)["jobs"]}
    assert list(again) == ["finetune", "eval"] and again["finetune"]["items"] == [victim]
    assert again["finetune"]["array"] == "1-1" and again["eval"]["items"] == [f"eval {name}/{name.split('-')[0]}"]
    states = wait_tasks([again["finetune"]["job_id"], again["eval"]["job_id"]])
    assert all(s.state == "COMPLETED" for s in states.values()), states
    for t in TARGETS:
        for model in ("random", f"{t}-bm25"):
            assert (out / "eval" / model / f"{t}.json").is_file()
    assert {p: p.stat().st_mtime_ns for p in trained} == trained  # the three were not trained again
    r = cli("--config", cfgp, "slurm", "submit", "--json")
    assert r.code == 0 and json.loads(r.out)["jobs"] == []


def test_submit_dry_run_of_further_warmup_runs(tiny_ws, cli, monkeypatch, tmp_path):
    """`[study] warmup_seeds`: each further run's warmup and grads are one job each running `lessctl run
    --items` (its own folder), chained before its matches, finetunes and evaluations."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with_study(tiny_ws, 'methods = ["less"]\nwarmup_seeds = [0, 4]\nbase = false')
    r = cli("--config", tiny_ws / "lessctl.toml", "slurm", "submit", "--dry-run", "--json")
    assert r.code == 0, r
    jobs = {j["label"]: j for j in json.loads(r.out)["jobs"]}
    assert list(jobs) == ["seed4 warmup", "grads", "seed4 grads", "match", "finetune", "eval"]
    assert "run --items 'seed4 warmup'" in jobs["seed4 warmup"]["script"] and jobs["seed4 warmup"]["after"] == []
    assert (
        jobs["seed4 grads"]["after"] == ["seed4 warmup"]
        and "run --items 'seed4 grads'" in jobs["seed4 grads"]["script"]
    )
    assert jobs["match"]["after"] == ["grads", "seed4 grads"]
    assert "seed4 match sorting/less" in jobs["match"]["items"] and "match sorting/less" in jobs["match"]["items"]
    assert len(jobs["finetune"]["items"]) == len(jobs["eval"]["items"]) == 2 * 3
    assert "seed4 eval sorting-less/sorting" in jobs["eval"]["items"]
