"""`lessctl demo`: the whole method on the tiny offline workspace, with selection precision as the proof."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from lessctl import paths
from lessctl.config import CONFIG_NAME, load_config
from lessctl.vocab import METHODS, REPS

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
    """init --preset tiny (once), warmup, grads at every checkpoint (and reps at the last), match with each method,
    and (train=True) finetune on each selection and evaluate the target's held-out set before and after; returns
    the report."""
    from lessctl.data.records import read_examples
    from lessctl.grads.stage import collect_gradients
    from lessctl.select.match import run_match
    from lessctl.training import checkpoints_path, run_warmup
    from lessctl.workspace import init_workspace

    say = step or (lambda s: None)
    t0 = time.time()
    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file():
        say("init: building the tiny model, tokenizer and synthetic data")
        init_workspace(folder, "tiny")
    overrides = {"warmup.epochs": epochs}
    cfg = load_config(folder / CONFIG_NAME, overrides)
    timings = {}
    if not checkpoints_path(cfg).is_file():
        say("warmup: LoRA on the warmup subset")
        t = time.time()
        run_warmup(cfg, device=device)
        timings["warmup"] = round(time.time() - t, 1)
    say("grads: gradient features at every checkpoint")
    t = time.time()
    steps = [c["step"] for c in json.loads(checkpoints_path(cfg).read_text())]
    collect_gradients(cfg, steps=steps, dims=list(cfg.grads.dims), projector="basic", device=device or "cpu")
    timings["grads"] = round(time.time() - t, 1)
    say("grads --type reps: representations (RDS) at the last checkpoint")
    collect_gradients(cfg, steps=steps[-1:], dims=[], grad_type=REPS, device=device or "cpu")
    pool = [r.data.get("family") for p in cfg.train_files().values() for r in read_examples(p)]
    report: dict = {"workspace": str(folder.resolve()), "targets": {}}
    t = time.time()
    for target in cfg.data.targets:
        say(f"match: {target}")
        expected = sum(f == target for f in pool) / len(pool)
        entry: dict = {"random_expected_precision": round(expected, 4)}
        for method in METHODS:
            res = run_match(cfg, target, method=method, force=True)  # the demo's own workspace
            entry[method] = {
                "precision": round(selection_precision(res.file, target), 4),
                "selected": res.n_selected,
                "file": str(res.file),
            }
        report["targets"][target] = entry
    timings["match"] = round(time.time() - t, 1)
    if train:
        t = time.time()
        _train_and_evaluate(cfg, report, device, say)
        timings["finetune_eval"] = round(time.time() - t, 1)
    report["timings"] = timings
    report["seconds"] = round(time.time() - t0, 1)
    return report


def _train_and_evaluate(cfg, report: dict, device, say) -> None:
    """Finetunes a LoRA on each selection and scores the target's eval_file before (base) and after."""
    from lessctl.evaluation.results import eval_json_path
    from lessctl.evaluation.runner import ModelSpec, describe_model, run_custom_evaluation
    from lessctl.models import is_adapter_dir
    from lessctl.select.match import selection_file
    from lessctl.training import adapter_is_stale, run_finetune

    def evaluate(spec, target: str) -> dict:
        p = eval_json_path(cfg.output_dir, spec.name, target)
        if p.is_file():
            res = json.loads(p.read_text())
        else:
            eval_file = cfg.resolve(cfg.data.targets[target]["eval_file"])
            res = run_custom_evaluation(
                spec,
                target,
                eval_file,
                cfg.output_dir,
                dtype=cfg.model.dtype,
                device=device,
                chat_format=cfg.model.chat_format,
                limit=EVAL_LIMIT,
                max_new_tokens=24,
                batch_size=12,
            ).result
        return {"exact_match": round(res["exact_match"], 2), "f1": round(res["f1"], 2)}

    base = cfg.model_ref()
    for target, entry in report["targets"].items():
        say(f"evaluate: base model on {target}")
        entry["base"] = evaluate(ModelSpec("base", base), target)
        for method in METHODS:
            name = f"{target}-{method}"
            out = paths.finetune_dir(cfg.output_dir, name)
            if not is_adapter_dir(out) or adapter_is_stale(out, selection_file(cfg, target, method)):
                say(f"finetune: {name}")
                run_finetune(
                    cfg,
                    selection_file(cfg, target, method),
                    name,
                    meta={"target": target, "method": method},
                    device=device,
                    force=True,
                )
            entry[method].update(evaluate(describe_model(out, output_dir=cfg.output_dir), target))
