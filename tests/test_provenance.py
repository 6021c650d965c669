"""Provenance (lessctl.outputs): every artifact records what made it; `run --dry-run` lists exactly the jobs whose
artifacts a config or data edit makes stale, with the reason; `run` redoes those and nothing else; a second run does
nothing. Plus the stand-alone commands' refusals, renamed stores, missing dims and names owned by lessctl/outputs/."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

TARGET = "sorting"
STUDY = 'methods = ["less", "random", "bm25"]\nrandom_seeds = [3, 4]'


def set_key(ws: Path, section: str, key: str, value: str) -> None:
    """Sets `key = value` (TOML text) in `[section]` of the workspace file, adding the key or the section."""
    path = ws / "lessctl.toml"
    text = path.read_text()
    m = re.search(rf"^\[{re.escape(section)}\]\n(.*?)(?=^\[|\Z)", text, re.S | re.M)
    if m is None:
        path.write_text(text.rstrip() + f"\n\n[{section}]\n{key} = {value}\n")
        return
    body = re.sub(rf"^{re.escape(key)} = .*\n", "", m.group(1), flags=re.M)
    path.write_text(text[: m.start(1)] + f"{key} = {value}\n" + body + text[m.end(1) :])


def one_target(ws: Path) -> None:
    spec = f'{TARGET} = {{file = "data/{TARGET}_target.jsonl", eval_file = "data/{TARGET}_eval.jsonl"}}'
    set_key(ws, "data", "targets", "{" + spec + "}")


@pytest.fixture(scope="session")
def study_template(tiny_template, tmp_path_factory) -> Path:
    """The tiny workspace with one target and a finished study (less, random x 2 draws, bm25, base)."""
    from lessctl.config import load_config
    from lessctl.study.pipeline import run_pipeline

    ws = tmp_path_factory.mktemp("study") / "ws"
    shutil.copytree(tiny_template, ws, symlinks=True)
    one_target(ws)
    set_key(ws, "finetune", "epochs", "2")
    set_key(ws, "eval", "limit", "4")
    (ws / "lessctl.toml").write_text((ws / "lessctl.toml").read_text() + "\n[study]\n" + STUDY + "\n")
    run_pipeline(load_config(ws / "lessctl.toml"), device="cpu")
    return ws


@pytest.fixture
def study_ws(study_template, tmp_path) -> Path:
    dst = tmp_path / "ws"
    shutil.copytree(study_template, dst, symlinks=True)
    return dst


def dry_run(cli, ws: Path) -> dict[str, dict]:
    res = cli("--config", ws / "lessctl.toml", "run", "--dry-run", "--json")
    assert res.code == 0, res
    return {j["key"]: j for j in json.loads(res.out)["jobs"]}


def run_done(cli, ws: Path) -> set[str]:
    """The keys of the jobs `lessctl run` did work for."""
    res = cli("--config", ws / "lessctl.toml", "run", "--device", "cpu", "--json")
    assert res.code == 0, res
    done = set()
    for r in json.loads(res.out)["stages"]:
        if r["status"] == "done":
            done.add(r["stage"] if r["stage"] in ("grads", r["item"]) else f"{r['stage']} {r['item']}")
    return done


MATCHES = {f"match {TARGET}/{s}" for s in ("less", "random", "random-seed4", "bm25")}
MODELS = (f"{TARGET}-less", "random", "random-seed4", f"{TARGET}-bm25")  # a random draw: one model, every target
FINETUNES = {f"finetune {m}" for m in MODELS}
EVALS = {f"eval {m}/{TARGET}" for m in MODELS}
LESS_CHAIN = {"grads", f"match {TARGET}/less", f"finetune {TARGET}-less", f"eval {TARGET}-less/{TARGET}"}


def _pool_line(ws: Path) -> None:
    pool = ws / "data" / "synth_a.jsonl"
    first = pool.read_text().splitlines()[0]
    pool.write_text(pool.read_text() + first + "\n")


def _other_eval_file(ws: Path) -> None:
    lines = (ws / "data" / f"{TARGET}_eval.jsonl").read_text().splitlines()
    (ws / "data" / "other_eval.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    spec = f'{TARGET} = {{file = "data/{TARGET}_target.jsonl", eval_file = "data/other_eval.jsonl"}}'
    set_key(ws, "data", "targets", "{" + spec + "}")


def _warmup_retrained(cli, ws: Path) -> None:
    set_key(ws, "warmup", "seed", "1")
    res = cli("--config", ws / "lessctl.toml", "warmup", "--force", "--device", "cpu")
    assert res.code == 0, res


# edit -> (the jobs the dry run must list, a phrase its reasons must hold)
EDITS = {
    "warmup seed": (
        lambda cli, ws: set_key(ws, "warmup", "seed", "7"),
        {"warmup"} | LESS_CHAIN,
        "[warmup] seed 0 -> 7",  # the tiny preset trains with LESS's seed 0
    ),
    "warmup retrained": (_warmup_retrained, LESS_CHAIN, "warmup was made again"),
    "pool line added": (
        lambda cli, ws: _pool_line(ws),
        {"warmup", "grads"} | MATCHES | FINETUNES | EVALS,
        "training set 'synth_a' changed",
    ),
    "select percentage": (
        lambda cli, ws: set_key(ws, "select", "percentage", "0.25"),
        MATCHES | FINETUNES | EVALS,
        "[select] percentage 0.05 -> 0.25",
    ),
    "eval file": (lambda cli, ws: _other_eval_file(ws), EVALS | {f"eval base/{TARGET}"}, "eval file changed"),
    "finetune settings": (
        lambda cli, ws: set_key(ws, "finetune", "learning_rate", "0.02"),
        FINETUNES | EVALS,
        "[finetune] learning_rate 0.01 -> 0.02",
    ),
    "experiment seed": (
        lambda cli, ws: set_key(ws, "experiment", "seed", "4"),
        {
            job
            for s in ("random", "random-seed3")
            for job in (f"match {TARGET}/{s}", f"finetune {s}", f"eval {s}/{TARGET}")
        },
        "seed 3 -> 4",
    ),  # fmt: skip
    "projection seed": (
        lambda cli, ws: set_key(ws, "grads", "projection_seed", "1"),
        LESS_CHAIN,
        "[grads] projection_seed 0 -> 1",
    ),
    "eval limit": (
        lambda cli, ws: set_key(ws, "eval", "limit", "3"),
        EVALS | {f"eval base/{TARGET}"},
        "[eval] limit 4 -> 3",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edit_makes_exactly_its_artifacts_stale_and_run_redoes_them(study_ws, cli, edit):
    change, expected, phrase = EDITS[edit]
    assert {k for k, j in dry_run(cli, study_ws).items() if j["status"] == "to run"} == set()
    change(cli, study_ws)
    jobs = dry_run(cli, study_ws)
    listed = {k for k, j in jobs.items() if j["status"] == "to run"}
    assert listed == expected
    assert all(jobs[k]["why"] for k in listed)
    assert any(phrase in jobs[k]["why"] for k in listed), {k: jobs[k]["why"] for k in listed}
    # the property: what the dry run lists is exactly what run redoes, and then nothing is left
    assert run_done(cli, study_ws) == listed
    assert {k for k, j in dry_run(cli, study_ws).items() if j["status"] == "to run"} == set()
    assert run_done(cli, study_ws) == set()


@pytest.mark.slow
def test_a_stale_eval_is_not_a_number_of_the_table(study_ws, cli):
    cfg = ("--config", study_ws / "lessctl.toml")
    res = cli(*cfg, "results", "--study", "--json")
    assert res.code == 0, res
    row = json.loads(res.out)["study"]["targets"][TARGET]
    assert row["methods"]["less"]["score"] is not None and row["methods"]["random"]["n"] == 2
    set_key(study_ws, "finetune", "learning_rate", "0.02")
    res = cli(*cfg, "results", "--study", "--json")
    row = json.loads(res.out)["study"]["targets"][TARGET]
    assert row["methods"]["less"]["score"] is None and row["methods"]["less"]["stale"] == 1
    assert row["methods"]["random"]["n"] == 0 and row["methods"]["random"]["stale"] == 2
    assert row["base"]["score"] is not None  # the base model's result did not depend on the finetune
    res = cli(*cfg, "results", "--study")
    assert res.code == 0 and "stale" in res.out


# ----------------------------------------------------------------------------- stand-alone commands


def test_match_refusal_says_what_changed_for_every_method(tiny_grads_ws, cli):
    cfg = ("--config", tiny_grads_ws / "lessctl.toml")
    for method in ("less", "dsir", "bm25", "random"):
        assert cli(*cfg, "match", "--target", TARGET, "--method", method).code == 0
        summary = tiny_grads_ws / "out" / "selected" / TARGET / method / "summary.json"
        before = summary.read_bytes()
        res = cli(*cfg, "match", "--target", TARGET, "--method", method)
        assert res.code == 2 and "this very selection (current)" in res.err and "--force" in res.err, res
        res = cli(*cfg, "match", "--target", TARGET, "--method", method, "--percentage", "0.25")
        assert res.code == 2 and "[select] percentage 0.05 -> 0.25" in res.err, res
        assert res.err.count("error:") == 1 and summary.read_bytes() == before
    res = cli(*cfg, "match", "--target", TARGET, "--method", "less", "--percentage", "0.25", "--force")
    assert res.code == 0, res
    rec = json.loads((tiny_grads_ws / "out" / "selected" / TARGET / "less" / "summary.json").read_text())
    assert rec["fingerprint"]["config"]["select.percentage"] == 0.25 and len(rec["id"]) == 32


def test_finetune_refusal_says_what_changed(tiny_grads_ws, cli):
    cfg = ("--config", tiny_grads_ws / "lessctl.toml")
    assert cli(*cfg, "match", "--target", TARGET, "--method", "random").code == 0
    args = ("finetune", "--target", TARGET, "--method", "random", "--epochs", "1", "--device", "cpu")
    assert cli(*cfg, *args).code == 0
    res = cli(*cfg, *args)
    assert res.code == 2 and "(current)" in res.err, res
    res = cli(*cfg, *args[:-4], "--epochs", "2", "--device", "cpu")
    assert res.code == 2 and "[finetune] epochs 1 -> 2" in res.err, res


def test_warmup_resume_under_other_settings_is_refused(tiny_ws, cli):
    warm = tiny_ws / "out" / "warmup"
    steps = [c["step"] for c in json.loads((warm / "checkpoints.json").read_text())]
    # a warmup killed after its first checkpoint: no manifest, no later checkpoint
    (warm / "checkpoints.json").unlink()
    for s in steps[1:]:
        shutil.rmtree(warm / f"checkpoint-{s}")
    first = sorted(p.name for p in (warm / f"checkpoint-{steps[0]}").iterdir())
    set_key(tiny_ws, "warmup", "learning_rate", "0.001")
    res = cli("--config", tiny_ws / "lessctl.toml", "warmup", "--device", "cpu")
    assert res.code == 2 and res.err.count("error:") == 1, res
    assert "[warmup] learning_rate 0.002 -> 0.001" in res.err and "--force" in res.err
    assert sorted(p.name for p in (warm / f"checkpoint-{steps[0]}").iterdir()) == first
    assert not (warm / "checkpoints.json").exists()
    set_key(tiny_ws, "warmup", "learning_rate", "0.002")  # the settings it started with: it resumes
    res = cli("--config", tiny_ws / "lessctl.toml", "warmup", "--device", "cpu", "--json")
    assert res.code == 0, res
    assert [c["step"] for c in json.loads((warm / "checkpoints.json").read_text())] == steps


def test_a_copied_store_is_refused_by_match_grads_and_verify(tiny_grads_ws, cli):
    cfg = ("--config", tiny_grads_ws / "lessctl.toml")
    grads = tiny_grads_ws / "out" / "grads"
    steps = [c["step"] for c in json.loads((tiny_grads_ws / "out" / "warmup" / "checkpoints.json").read_text())]
    src, dst = (grads / f"synth_a-ckpt{s}-adam.h5" for s in steps)
    shutil.copyfile(src, dst)
    before = dst.read_bytes()
    res = cli(*cfg, "match", "--target", TARGET)
    assert res.code == 2 and dst.name in res.err and f"records step {steps[0]}" in res.err, res
    assert not (tiny_grads_ws / "out" / "selected" / TARGET / "less").exists()
    res = cli(*cfg, "store", "verify", str(dst))
    assert res.code == 1 and f"records step {steps[0]}" in res.out + res.err, res
    res = cli(*cfg, "grads", "--ckpt", str(steps[1]), "--train", "synth_a", "--dims", "128", "--device", "cpu")
    assert res.code == 2 and dst.name in res.err and "--force" in res.err, res
    assert dst.read_bytes() == before


def test_grads_writes_the_dims_a_complete_store_lacks(tiny_grads_ws, cli):
    import h5py
    import numpy as np

    cfg = ("--config", tiny_grads_ws / "lessctl.toml")
    step = json.loads((tiny_grads_ws / "out" / "warmup" / "checkpoints.json").read_text())[0]["step"]
    store = tiny_grads_ws / "out" / "grads" / f"{TARGET}-ckpt{step}-sgd.h5"
    with h5py.File(store) as f:
        assert sorted(f.attrs["dims"].tolist()) == [64, 128]
        old = f["dim128/features"][:]
    args = ("grads", "--ckpt", str(step), "--target", TARGET, "--dims", "32", "128", "--device", "cpu", "--json")
    res = cli(*cfg, *args, "--projector", "basic")
    assert res.code == 0, res
    assert "skipped" not in {s["status"] for s in json.loads(res.out)["stores"]}
    with h5py.File(store) as f:
        assert sorted(f.attrs["dims"].tolist()) == [32, 64, 128]  # what it held is kept
        assert f["dim32/features"].shape[1] == 32
        np.testing.assert_array_equal(f["dim128/features"][:], old)  # the same projection, recomputed
    res = cli(*cfg, *args, "--projector", "basic")
    assert {s["status"] for s in json.loads(res.out)["stores"]} == {"skipped"}


def test_transfer_models_with_one_folder_name_get_their_own_finetunes(tiny_ws, cli):
    from lessctl.outputs.layout import transfer_names

    assert transfer_names(["a/hf", "b/hf", "c/other"]) == {"a/hf": "a-hf", "b/hf": "b-hf", "c/other": "other"}
    assert transfer_names(["/"]) == {"/": "model"}
    for d in ("a", "b"):
        (tiny_ws / d).mkdir()
        (tiny_ws / d / "hf").symlink_to((tiny_ws / "model").resolve())
    (tiny_ws / "lessctl.toml").write_text(
        (tiny_ws / "lessctl.toml").read_text() + '\n[study]\nmethods = ["less"]\ntransfer = ["a/hf", "b/hf"]\n'
    )
    jobs = dry_run(cli, tiny_ws)
    assert {f"finetune {TARGET}-less-a-hf", f"finetune {TARGET}-less-b-hf"} <= set(jobs)


# ----------------------------------------------------------------------------- records and names


def test_changes_names_each_difference_and_an_old_record_is_never_current():
    from lessctl.outputs.provenance import NO_RECORD, Fingerprint, changes

    old = Fingerprint({"select.percentage": 0.05, "method": "less"}, {"pool": "a"}, {"warmup": "r1"})
    assert changes(old.to_dict(), old) == []
    new = Fingerprint({"select.percentage": 0.25, "method": "less"}, {"pool": "b", "target": "t"}, {"warmup": "r2"})
    assert changes(old.to_dict(), new) == [
        "[select] percentage 0.05 -> 0.25",
        "pool changed (sha256)",
        "target is new",
        "warmup was made again",
    ]
    assert changes(None, new) == [NO_RECORD] and changes({"config": {}}, new) == [NO_RECORD]


def test_stage_keys_leave_out_only_what_changes_how_a_stage_runs(tiny_ws):
    from lessctl.config import load_config
    from lessctl.outputs.provenance import HOW, stage_keys

    cfg = load_config(tiny_ws / "lessctl.toml")
    warmup = stage_keys(cfg, "warmup")
    assert {"warmup.learning_rate", "warmup.seed", "warmup.loss_weighting", "lora.r", "model.name_or_path"} <= set(
        warmup
    )
    assert "warmup.packing" not in warmup and "warmup.pack_tokens" not in warmup
    assert not set(stage_keys(cfg, "finetune")) & HOW


# Artifact names and record files built by hand: only lessctl/outputs/ may (ARCHITECTURE: "a stage reads another
# stage's results only through outputs/").
NAME_PATTERNS = [
    r'f"\{target\}-',
    r"-ckpt\{",
    r"random-seed\{",
    r"checkpoint-\{",
    r"rpartition\(\"-\"\)",
    r'"(summary\.json|lessctl_run\.json|checkpoints\.json|sorted\.csv|results\.jsonl)"',
]


def test_no_artifact_name_is_built_or_parsed_outside_outputs():
    root = Path(__file__).resolve().parents[1] / "lessctl"
    found = []
    for path in sorted(root.rglob("*.py")):
        if "outputs" in path.relative_to(root).parts:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if any(re.search(p, line) for p in NAME_PATTERNS):
                found.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)
