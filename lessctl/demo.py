"""`lessctl demo`: the whole method on the tiny offline workspace, with selection precision as the proof."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from lessctl.config import CONFIG_NAME, load_config
from lessctl.outputs import artifacts
from lessctl.outputs import layout as paths
from lessctl.vocab import METHODS

BASE = "base"

EVAL_LIMIT = 12  # held-out examples per target in the demo's before/after evaluation


def selection_precision(selected_file: Path, family: str) -> float:
    """Share of the selected examples that come from the target's own family."""
    rows = [json.loads(line) for line in Path(selected_file).read_text().splitlines() if line.strip()]
    return sum(r.get("family") == family for r in rows) / max(1, len(rows))


def run_demo(
    folder: Path,
    *,
    epochs: int | None = None,
    device: str | None = None,
    train: bool = True,
    step: Callable[[str], None] | None = None,
) -> dict:
    """init --preset tiny (once), then the study plan of every method through lessctl run's executor: warmup,
    grads at every checkpoint (and reps at the last), a match per target and method, and (train=True) a finetune
    on each selection with the target's held-out set evaluated before (base) and after. Current artifacts are
    kept (a re-run redoes only what changed). Returns the report."""
    from lessctl.data.records import read_examples
    from lessctl.study.pipeline import run_pipeline
    from lessctl.study.plan import Plan
    from lessctl.workspace import init_workspace

    say = step or (lambda s: None)
    t0 = time.time()
    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file():
        say("init: building the tiny model, tokenizer and synthetic data")
        init_workspace(folder, "tiny")
    overrides = {"warmup.epochs": epochs, "grads.projector": "basic", "eval.limit": EVAL_LIMIT, "eval.batch_size": 12}
    cfg = load_config(folder / CONFIG_NAME, overrides)
    plan = Plan(tuple(METHODS), (cfg.experiment.seed,), base=train, study=True)
    timings: dict[str, float] = {}
    for stage in ("warmup", "grads", "match", *(("finetune", "eval") if train else ())):
        say(f"{stage}: " + STAGE_NOTES[stage])
        t = time.time()
        run_pipeline(cfg, start=stage, until=stage, device=device, plan=plan)
        timings[stage] = round(time.time() - t, 1)
    pool = [r.data.get("family") for p in cfg.train_files().values() for r in read_examples(p)]
    report: dict = {"workspace": str(folder.resolve()), "targets": {}}
    for target in cfg.data.targets:
        expected = sum(f == target for f in pool) / len(pool)
        entry: dict = {"random_expected_precision": round(expected, 4)}
        for method in METHODS:
            rec = artifacts.selection_record(cfg.output_dir, target, method) or {}
            file = artifacts.selection_jsonl(cfg.output_dir, target, method)
            entry[method] = {
                "precision": round(selection_precision(file, target), 4),
                "selected": rec.get("selected"),
                "file": str(file),
            }
            if train:
                entry[method].update(_scores(cfg, paths.selection_model(target, method, method), target))
        if train:
            entry["base"] = _scores(cfg, BASE, target)
        report["targets"][target] = entry
    report["timings"] = timings
    report["seconds"] = round(time.time() - t0, 1)
    return report


STAGE_NOTES = {
    "warmup": "LoRA on the warmup subset",
    "grads": "gradient features at every checkpoint, representations (RDS) at the last",
    "match": "every method for every target",
    "finetune": "a LoRA on each selection",
    "eval": "each target's held-out examples, base model and finetuned",
}


def _scores(cfg, model: str, target: str) -> dict:
    """Exact match and F1 of one model's evaluation on a target's held-out file."""
    res = artifacts.eval_record(cfg.output_dir, model, target) or {}
    return {"exact_match": round(res.get("exact_match", 0.0), 2), "f1": round(res.get("f1", 0.0), 2)}
