"""The study plan ([study]): validation, `lessctl run` over methods x targets x seeds, `--dry-run`, results."""

from __future__ import annotations

import json

import pytest

TARGETS = ("arithmetic", "antonyms", "sorting")


def add_study(ws, body: str) -> None:
    cfgp = ws / "lessctl.toml"
    cfgp.write_text(cfgp.read_text() + "\n[study]\n" + body + "\n")


def snapshot(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_run_methods_trains_and_evaluates_every_selection_then_does_nothing(tiny_ws, cli):
    add_study(tiny_ws, "random_seeds = [3, 4]")
    cfg = ("--config", tiny_ws / "lessctl.toml")
    res = cli(*cfg, "run", "--methods", "less", "random", "bm25", "--device", "cpu", "--json")
    assert res.code == 0, res
    first = json.loads(res.out)["stages"]
    out = tiny_ws / "out"
    selections = ("less", "random", "random-seed4", "bm25")
    for t in TARGETS:
        for sel in selections:
            summary = json.loads((out / "selected" / t / sel / "summary.json").read_text())
            assert summary["method"] == sel.split("-")[0]
            model = sel if sel.startswith("random") else f"{t}-{sel}"  # a random draw: one model for every target
            assert (out / "finetune" / model / "adapter_config.json").is_file()
            run = json.loads((out / "finetune" / model / "lessctl_run.json").read_text())
            assert (run["target"], run["method"]) == (TARGETS[0] if model == sel else t, sel.split("-")[0])
            assert json.loads((out / "eval" / model / f"{t}.json").read_text())["task"] == t
        assert (out / "eval" / "base" / f"{t}.json").is_file()
    assert not (out / "finetune" / "sorting-random").exists()
    # the two random draws differ and each records its seed
    a, b = ((out / "selected" / "sorting" / s / "top_p0.05.jsonl").read_text() for s in ("random", "random-seed4"))
    assert a != b
    seeds = [
        json.loads((out / "selected" / "sorting" / s / "summary.json").read_text())["seed"]
        for s in ("random", "random-seed4")
    ]
    assert seeds == [3, 4]
    done = {(r["stage"], r["item"]) for r in first if r["status"] == "done"}
    assert ("finetune", "random-seed4") in done and ("eval", "base/sorting") in done
    assert ("eval", "random-seed4/sorting") in done and ("eval", "random-seed4/arithmetic") in done
    assert not any(r["stage"] == "grads" and r["item"].endswith("-reps.h5") for r in first)  # no rds: no reps

    res = cli(*cfg, "results", "--study", "--methods", "less", "random", "bm25", "--json")
    assert res.code == 0, res
    study = json.loads(res.out)["study"]
    for t in TARGETS:
        row = study["targets"][t]
        assert row["task"] == t and row["paper"] == {}  # the tiny model is none of the paper's
        assert set(row["methods"]) == {"less", "random", "bm25"} and row["base"]["n"] == 1
        rnd = row["methods"]["random"]
        draws = [
            json.loads((out / "eval" / s / f"{t}.json").read_text())["exact_match"] for s in ("random", "random-seed4")
        ]
        assert rnd["n"] == 2 and rnd["draws"] == pytest.approx(draws) and rnd["score"] == pytest.approx(sum(draws) / 2)
        assert row["methods"]["less"]["score"] is not None
    res = cli(*cfg, "results", "--study", "--methods", "less", "random", "bm25")
    assert res.code == 0 and "±" in res.out and "random" in res.out
    res = cli(*cfg, "report")
    assert res.code == 0, res
    page = (out / "report" / "index.html").read_text()
    assert "<h2>study: model</h2>" in page and " ± " in page

    stamps = snapshot(out)
    res = cli(*cfg, "run", "--methods", "less", "random", "bm25", "--device", "cpu", "--json")
    assert res.code == 0, res
    second = json.loads(res.out)
    assert second["done"] == 0 and {r["status"] for r in second["stages"]} == {"skipped"}
    assert snapshot(out) == stamps

    res = cli(*cfg, "run", "--methods", "less", "random", "bm25", "--dry-run", "--json")
    assert res.code == 0, res
    view = json.loads(res.out)
    assert view["to_run"] == 0 and {j["status"] for j in view["jobs"]} == {"done"}
    assert snapshot(out) == stamps


def test_dry_run_lists_every_job_with_its_edges_and_estimate(tiny_ws, cli):
    add_study(tiny_ws, 'methods = ["less", "random", "bm25", "rds"]\nablation = ["1"]\nrandom_seeds = [3, 4, 5]')
    before = snapshot(tiny_ws)
    res = cli("--config", tiny_ws / "lessctl.toml", "run", "--dry-run", "--json")
    assert res.code == 0, res
    view = json.loads(res.out)
    jobs = {j["key"]: j for j in view["jobs"]}
    assert jobs["warmup"]["status"] == "done"  # the fixture warmed up
    assert jobs["grads"]["after"] == ["warmup"] and jobs["grads reps"]["after"] == ["warmup"]
    assert jobs["match sorting/less"]["after"] == ["grads"] and jobs["match sorting/rds"]["after"] == ["grads reps"]
    assert jobs["match sorting/bm25"]["after"] == [] and jobs["match sorting/random-seed5"]["seed"] == 5
    assert jobs["match sorting/less-ckpt1"]["after"] == ["grads"] and jobs["match sorting/less-ckpt1"]["subset"] == [1]
    assert jobs["finetune sorting-less-ckpt1"]["after"] == ["match sorting/less-ckpt1"]
    assert jobs["eval random-seed4/sorting"]["after"] == ["finetune random-seed4"]
    assert jobs["finetune random-seed4"]["after"] == ["match arithmetic/random-seed4"]  # the first target's draw
    assert jobs["eval base/sorting"]["after"] == []
    assert len([k for k in jobs if k.startswith("finetune ")]) == 3 * (1 + 1 + 1 + 1) + 3  # random: once a draw
    # the grads estimate is the pool's rows x checkpoints at the measured rate
    pool = view["pool_examples"]
    assert pool == 360 and jobs["grads"]["gpu_seconds"] == pytest.approx(pool * 2 / 33.8)
    assert jobs["grads reps"]["gpu_seconds"] is None and view["not_estimated"] > 0
    # training at the packed rate (the default), or at the paper's batch-of-one rate when packing is off
    from lessctl.config import load_config

    cfg = load_config(tiny_ws / "lessctl.toml")
    n = int(int(pool * cfg.select.percentage) * cfg.finetune.percentage) * cfg.finetune.epochs
    assert cfg.finetune.packing and jobs["finetune sorting-less"]["gpu_seconds"] == pytest.approx(n / 34.5)
    n = int(pool * cfg.warmup.percentage) * cfg.warmup.epochs
    assert jobs["warmup"]["gpu_seconds"] == pytest.approx(n / 34.5)
    assert any("bench/RESULTS.md" in r["source"] for r in view["rates"])
    assert snapshot(tiny_ws) == before
    res = cli("--config", tiny_ws / "lessctl.toml", "run", "--dry-run")
    assert res.code == 0 and "finetune sorting-less-ckpt1" in res.out and "GPU time" in res.out
    text = (tiny_ws / "lessctl.toml").read_text()
    (tiny_ws / "lessctl.toml").write_text(text.replace("[finetune]", "[finetune]\npacking = false", 1))
    res = cli("--config", tiny_ws / "lessctl.toml", "run", "--dry-run", "--json")
    jobs = {j["key"]: j for j in json.loads(res.out)["jobs"]}
    n = int(int(pool * cfg.select.percentage) * cfg.finetune.percentage) * cfg.finetune.epochs
    assert jobs["finetune sorting-less"]["gpu_seconds"] == pytest.approx(
        n / (13_533 * 4 / (6 * 3600))
    )  # the paper: 6 h for its warmup


def test_only_text_methods_need_no_warmup_or_gradients(tmp_path, cli):
    from lessctl.workspace import init_workspace

    path = init_workspace(tmp_path / "ws", "tiny")
    res = cli("--config", path, "run", "--methods", "random", "bm25", "--until", "match", "--json")
    assert res.code == 0, res
    stages = json.loads(res.out)["stages"]
    assert {r["stage"] for r in stages} == {"match"} and len(stages) == 3 * 4  # random x 3 seeds + bm25, per target
    out = tmp_path / "ws" / "out"
    assert not (out / "warmup").exists() and not (out / "grads").exists()
    assert (out / "selected" / "sorting" / "random-seed5" / "summary.json").is_file()


@pytest.mark.parametrize(
    "body, message",
    [
        ('methods = ["less", "bm52"]', "study.methods: unknown method 'bm52' (did you mean 'bm25'?)"),
        ('ablation = ["1", "13"]', "study.ablation: position 3 in '13' is beyond the 2 checkpoints"),
        ('transfer = ["models/nope"]', "study.transfer: 'models/nope' is neither a model folder"),
        ("random_seeds = [1, 1]", "study.random_seeds: a seed is named twice"),
        ("warmup_seeds = [4, 4]", "study.warmup_seeds: a seed is named twice"),
        ('warmup_seeds = ["four"]', "study.warmup_seeds: expected an integer"),
        ("full = 1", "study.full: expected"),
    ],
)
def test_bad_plans_fail_before_anything_runs(tiny_ws, cli, body, message):
    add_study(tiny_ws, body)
    before = snapshot(tiny_ws)
    for argv in (("run",), ("run", "--dry-run"), ("slurm", "submit", "--dry-run")):
        res = cli("--config", tiny_ws / "lessctl.toml", *argv)
        assert res.code == 2, (argv, res)
        assert res.err.startswith("error: ") and res.err.count("\n") == 1 and message in res.err, res.err
        assert "lessctl.toml" in res.err
    assert snapshot(tiny_ws) == before


def test_methods_option_is_checked(tiny_ws, cli):
    res = cli("--config", tiny_ws / "lessctl.toml", "run", "--methods", "less", "rnd", "--dry-run")
    assert res.code == 2 and res.err.strip().startswith("error: --methods: unknown method 'rnd'"), res
    res = cli("--config", tiny_ws / "lessctl.toml", "run", "--items", "finetune nope", "--dry-run")
    assert res.code == 2 and "error: --items: no job 'finetune nope'" in res.err, res


def _eval_file(out, model: str, task: str, metric: str, score: float) -> None:
    """An evaluation as record_result writes it: the headline metric first, then the breakdown."""
    p = out / "eval" / model / f"{task}.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({metric: score, "task": task, "metric": metric, "n": 10}))


def test_results_table_has_the_papers_numbers_and_the_spread_of_random(tmp_path, cli):
    """The table's layout from eval files (as record_result writes them), every result taken as current: which
    results are current is test_provenance.py's (a stale one is left out of its cell)."""
    from lessctl.config import load_config
    from lessctl.study.graph import expand
    from lessctl.study.plan import resolve_plan
    from lessctl.study.results import study_table, tables

    (tmp_path / "lessctl.toml").write_text(
        '[model]\nname_or_path = "meta-llama/Llama-2-7b-hf"\n[data]\ntargets = {tydiqa = "tydiqa", mmlu = "mmlu"}\n'
        '[study]\nmethods = ["less", "random"]\nrandom_seeds = [3, 4, 5]\nablation = ["1"]\n'
    )
    out = tmp_path / "out"
    for model, score in (("tydiqa-less", 57.0), ("random", 50.0), ("random-seed4", 52.0),
                         ("random-seed5", 54.0), ("base", 40.0), ("tydiqa-less-ckpt1", 55.5)):  # fmt: skip
        _eval_file(out, model, "tydiqa", "f1", score)
    _eval_file(out, "random", "mmlu", "accuracy", 45.0)
    cfg = load_config(tmp_path / "lessctl.toml")
    plan = resolve_plan(cfg, check_models=False)
    study = study_table(cfg, plan, expand(cfg, plan), lambda job: "current")
    assert study["paper_model"] == "Llama-2-7B"
    ty = study["targets"]["tydiqa"]
    assert ty["paper"] == {"less": 56.2, "random": 52.7, "full": 54.0}
    assert ty["base"]["score"] == 40.0 and ty["methods"]["less"]["score"] == 57.0
    assert ty["methods"]["random"] == {
        "score": 52.0, "n": 3, "of": 3, "stale": 0, "spread": 2.0, "draws": [50.0, 52.0, 54.0]
    }  # fmt: skip
    mm = study["targets"]["mmlu"]
    assert mm["methods"]["random"]["n"] == 1 and mm["methods"]["random"]["of"] == 3 and mm["methods"]["less"]["n"] == 0
    assert study["ablation"]["tydiqa"]["subsets"]["less-ckpt1"]["score"] == 55.5
    text = "\n".join(" | ".join(row) for _, _, rows in tables(study) for row in rows)
    assert "52.00 ± 2.00" in text and "56.2" in text and "45.00 (1/3)" in text
    assert [title for title, _, _ in tables(study)][1].startswith("ablation")
    # through the command, with the workspace's real states: results no lessctl run made are not current
    res = cli("--config", tmp_path / "lessctl.toml", "results", "--study", "--json")
    assert res.code == 0, res
    assert json.loads(res.out)["study"]["targets"]["tydiqa"]["methods"]["random"]["n"] == 0


@pytest.mark.slow
def test_ablation_and_transfer_branches_run_and_fill_their_tables(tiny_ws, cli):
    import shutil

    shutil.copytree(tiny_ws / "model", tiny_ws / "model2")  # another base model folder (LESS-T)
    add_study(tiny_ws, 'methods = ["less"]\nablation = ["1"]\ntransfer = ["model2"]\nbase = false')
    cfg = ("--config", tiny_ws / "lessctl.toml")
    res = cli(*cfg, "run", "--device", "cpu", "--json")
    assert res.code == 0, res
    out = tiny_ws / "out"
    for t in TARGETS:
        summary = json.loads((out / "selected" / t / "less-ckpt1" / "summary.json").read_text())
        steps = [c["step"] for c in json.loads((out / "warmup" / "checkpoints.json").read_text())]
        assert summary["checkpoints"] == steps[:1] and summary["weights"] == [1.0]
        run = json.loads((out / "finetune" / f"{t}-less-model2" / "lessctl_run.json").read_text())
        assert run["transfer"] is True and run["base_model"] == str((tiny_ws / "model2").resolve())
        assert run["train_file"].endswith(f"selected/{t}/less/top_p0.05.jsonl")
        for model in (f"{t}-less", f"{t}-less-ckpt1", f"{t}-less-model2"):
            assert (out / "eval" / model / f"{t}.json").is_file()
    res = cli(*cfg, "results", "--study", "--json")
    study = json.loads(res.out)["study"]
    assert study["ablation"]["sorting"]["subsets"]["less-ckpt1"]["n"] == 1
    assert study["transfer"]["sorting"]["models"]["model2"]["n"] == 1
    assert study["transfer"]["sorting"]["selection_model"]["n"] == 1
    res = cli(*cfg, "run", "--device", "cpu", "--json")
    assert json.loads(res.out)["done"] == 0


@pytest.mark.slow
def test_full_pool_finetune_is_one_model_evaluated_on_every_target(tiny_ws, cli):
    """`[study] full = true`: finetune/full/ trains on pool/full.jsonl (every pool example, in config order), is
    evaluated on each target and fills the table's full column; an edited pool file makes it stale."""
    from lessctl.files import sha256_file

    text = (tiny_ws / "lessctl.toml").read_text().replace("[finetune]\nepochs = 30", "[finetune]\nepochs = 1")
    (tiny_ws / "lessctl.toml").write_text(text)
    add_study(tiny_ws, 'methods = ["bm25"]\nbase = false\nfull = true')
    cfg = ("--config", tiny_ws / "lessctl.toml")
    view = json.loads(cli(*cfg, "run", "--dry-run", "--json").out)
    jobs = {j["key"]: j for j in view["jobs"]}
    assert jobs["finetune full"]["after"] == [] and "warmup" not in jobs  # bm25 and the full pool need no warmup
    assert all(jobs[f"eval full/{t}"]["after"] == ["finetune full"] for t in TARGETS)
    assert jobs["finetune full"]["gpu_seconds"] == pytest.approx(view["pool_examples"] * 1 / 34.5)
    items = ["--items", "finetune full", *(w for t in TARGETS for w in ("--items", f"eval full/{t}"))]
    res = cli(*cfg, "run", *items, "--device", "cpu", "--json")
    assert res.code == 0, res
    out = tiny_ws / "out"
    pool = out / "pool" / "full.jsonl"
    data = tiny_ws / "data"
    want = [ln for f in ("synth_a", "synth_b") for ln in (data / f"{f}.jsonl").read_text().splitlines() if ln.strip()]
    assert pool.read_text().splitlines() == want and len(want) == view["pool_examples"]
    run = json.loads((out / "finetune" / "full" / "lessctl_run.json").read_text())
    assert run["train_file_sha256"] == sha256_file(pool) and run["method"] == "full"
    study = json.loads(cli(*cfg, "results", "--study", "--json").out)["study"]
    for t in TARGETS:
        saved = json.loads((out / "eval" / "full" / f"{t}.json").read_text())
        assert study["targets"][t]["full"]["score"] == pytest.approx(saved["exact_match"], abs=1e-4)
    table = cli(*cfg, "results", "--study").out
    assert "full" in table.splitlines()[2] or " full " in table
    # a re-run keeps everything; a changed pool file makes the model stale and it trains again
    again = json.loads(cli(*cfg, "run", *items, "--device", "cpu", "--json").out)
    assert again["done"] == 0
    lines = (data / "synth_a.jsonl").read_text().splitlines(keepends=True)
    (data / "synth_a.jsonl").write_text("".join([lines[1], lines[0], *lines[2:]]))
    jobs = {j["key"]: j for j in json.loads(cli(*cfg, "run", "--dry-run", "--json").out)["jobs"]}
    assert jobs["finetune full"]["status"] != "done"
    res = cli(*cfg, "run", "--items", "finetune full", "--device", "cpu", "--json")
    assert res.code == 0 and json.loads(res.out)["done"] == 1, res
    assert pool.read_text().splitlines()[0] == want[1]
    jobs = {j["key"]: j for j in json.loads(cli(*cfg, "run", "--dry-run", "--json").out)["jobs"]}
    assert jobs["finetune full"]["status"] == "done" and jobs["eval full/sorting"]["status"] != "done"


@pytest.mark.slow
def test_further_warmup_runs_have_their_own_folder_and_average_in_the_table(tiny_ws, cli):
    """`[study] warmup_seeds = [0, 4]`: seed 0 (the tiny preset's, LESS's) is the workspace's own run; seed 4
    warms up again (seed and data_seed 4) into out/warmup-seed4/, computes its stores and LESS selections
    there, and the table's LESS cell is the mean of both runs' evaluations."""
    text = (tiny_ws / "lessctl.toml").read_text().replace("[finetune]\nepochs = 30", "[finetune]\nepochs = 1")
    (tiny_ws / "lessctl.toml").write_text(text)
    add_study(tiny_ws, 'methods = ["less"]\nwarmup_seeds = [0, 4]\nbase = false')
    cfg = ("--config", tiny_ws / "lessctl.toml")
    keys = [j["key"] for j in json.loads(cli(*cfg, "run", "--dry-run", "--json").out)["jobs"]]
    assert "seed0 warmup" not in keys and {"seed4 warmup", "seed4 grads", "seed4 eval sorting-less/sorting"} <= set(
        keys
    )
    items = [w for k in keys if k.endswith("sorting/less") or "sorting-less" in k or k.endswith(("warmup", "grads"))
             for w in ("--items", k)]  # fmt: skip
    res = cli(*cfg, "run", *items, "--device", "cpu", "--json")
    assert res.code == 0, res
    main, other = tiny_ws / "out", tiny_ws / "out" / "warmup-seed4"
    run = json.loads((other / "warmup" / "lessctl_run.json").read_text())
    assert run["config"]["warmup"]["seed"] == 4 == run["config"]["warmup"]["data_seed"]
    assert len(list((other / "grads").glob("*.h5"))) == len(list((main / "grads").glob("*.h5")))
    a, b = ((d / "selected" / "sorting" / "less" / "top_p0.05.jsonl").read_text() for d in (main, other))
    assert a and b  # both selections exist (they may or may not coincide on the tiny pool)
    scores = [
        json.loads((d / "eval" / "sorting-less" / "sorting.json").read_text())["exact_match"] for d in (main, other)
    ]
    cell = json.loads(cli(*cfg, "results", "--study", "--json").out)["study"]["targets"]["sorting"]["methods"]["less"]
    assert cell["n"] == 2 and cell["draws"] == pytest.approx(scores) and cell["score"] == pytest.approx(sum(scores) / 2)
    again = cli(*cfg, "run", *items, "--device", "cpu", "--json")
    assert again.code == 0 and json.loads(again.out)["done"] == 0


def test_an_evaluation_with_another_limit_is_not_complete(tiny_ws, cli):
    """A saved evaluation counts as done only for the `[eval] limit` it ran with: raising the limit (or lifting
    it) makes the study evaluate again."""
    cfgp = tiny_ws / "lessctl.toml"
    base = cfgp.read_text()
    cfgp.write_text(base + '\n[eval]\nlimit = 2\n\n[study]\nmethods = ["bm25"]\n')
    res = cli("--config", cfgp, "run", "--items", "eval base/sorting", "--device", "cpu", "--json")
    assert res.code == 0 and json.loads(res.out)["done"] == 1, res

    def status() -> str:
        jobs = json.loads(cli("--config", cfgp, "run", "--dry-run", "--json").out)["jobs"]
        return {j["key"]: j for j in jobs}["eval base/sorting"]["status"]

    assert status() == "done"
    cfgp.write_text(base + '\n[eval]\nlimit = 3\n\n[study]\nmethods = ["bm25"]\n')
    assert status() == "to run"
    res = cli("--config", cfgp, "run", "--items", "eval base/sorting", "--device", "cpu", "--json")
    assert res.code == 0 and json.loads(res.out)["done"] == 1, res
    assert json.loads((tiny_ws / "out" / "eval" / "base" / "sorting.json").read_text())["n"] == 3
    assert status() == "done"
