"""`lessctl eval`: MMLU, BBH and TydiQA scores of the finetuned models (or any model folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lessctl.commands._common import BarCallback, JsonOpt, ProgressBar, emit_json, err_console, load_config, print_table
from lessctl.vocab import EVAL_TASKS, spelled

COLUMNS = ["model", "method", "target", "task", "metric", "score", "n", "seconds"]


def eval_(
    task: Annotated[Optional[list[str]], typer.Option("--task", help=f"{spelled(EVAL_TASKS)} (one or more).")] = None,
    model: Annotated[
        Optional[str],
        typer.Option(
            "--model",
            help="A model folder, a LoRA adapter folder (merged into its base) or 'base' (default: every finetuned "
            "model of the workspace).",
        ),
    ] = None,
    data_dir: Annotated[
        Optional[Path],
        typer.Option("--data-dir", help="LESS-layout data folder holding eval/mmlu, eval/bbh, eval/tydiqa."),
    ] = None,
    limit: Annotated[
        Optional[int], typer.Option("--limit", help="Examples per subject/task/language, for quick runs (0: all).")
    ] = None,
    batch_size: Annotated[
        Optional[int], typer.Option("--batch-size", help="Prompts per forward pass / generation batch.")
    ] = None,
    examples_per_task: Annotated[
        Optional[int], typer.Option("--bbh-examples", help="Seeded sample per BBH task (0: all; LESS: 40).")
    ] = None,
    device: Annotated[
        Optional[str], typer.Option("--device", help="cpu, cuda or cuda:N (default: cuda if available).")
    ] = None,
    kv_cache: Annotated[
        Optional[str],
        typer.Option(
            "--kv-cache",
            help="BBH and TydiQA generation's KV cache: auto (static on a GPU, dynamic on the CPU), static or dynamic.",
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Evaluate models on MMLU (accuracy), BBH (exact match) or TydiQA (F1); results go to eval/ and results.jsonl."""
    from lessctl.errors import ConfigError
    from lessctl.evaluation.runner import check_data, models_to_evaluate, run_evaluation, task_options
    from lessctl.models import load_model_for_eval, resolve_device
    from lessctl.outputs import artifacts, provenance
    from lessctl.outputs.artifacts import model_id

    tasks = list(dict.fromkeys(task or []))
    if not tasks:
        raise ConfigError(f"eval needs --task ({', '.join(EVAL_TASKS)}; several: --task mmlu bbh)")
    for t in tasks:
        if t not in EVAL_TASKS:
            raise ConfigError(f"--task: unknown task {t!r}; expected one of {', '.join(EVAL_TASKS)}")
    cfg = load_config(
        {
            # Paths given on the command line are relative to the current folder, not the workspace.
            "eval.data_dir": str(data_dir.expanduser().resolve()) if data_dir else None,
            "eval.limit": limit,
            "eval.batch_size": batch_size,
            "eval.bbh_examples_per_task": examples_per_task,
            "eval.kv_cache": kv_cache,
        }
    )
    resolve_device(device)
    data = cfg.resolve(cfg.eval.data_dir or cfg.data.data_dir)
    specs = models_to_evaluate(model, cfg.output_dir, cfg.model_ref())

    for t in tasks:  # a missing data file stops us before any model is loaded
        check_data(t, data)
    options = {"limit": cfg.eval.limit or None, "batch_size": cfg.eval.batch_size}
    records = []
    con = err_console()
    for spec in specs:
        loaded = load_model_for_eval(spec.path, dtype=cfg.model.dtype, device=device)  # once for all tasks
        for t in tasks:
            extra = task_options(cfg.eval, t)
            with ProgressBar(f"{t} {spec.name}", unit="examples", quiet=json_out) as bar:
                made_from = provenance.eval_fingerprint(
                    cfg, t, eval_file=None, model=model_id(cfg, spec.name, spec.path)
                )
                outcome = run_evaluation(
                    spec, t, data, cfg.output_dir, loaded=loaded, progress=BarCallback(bar), **options, **extra
                )
                artifacts.stamp(outcome.path, made_from)
            records.append(outcome.record)
            if not json_out:
                con.print(
                    f"{spec.name} {t}: {outcome.record['metric']} {outcome.record['score']:.2f} -> {outcome.path}"
                )
        del loaded
    if json_out:
        emit_json({"results": records})
        return
    print_table("evaluation", COLUMNS, [_row(r) for r in records])


def _row(r: dict) -> list:
    return [
        r.get("model"),
        r.get("method"),
        r.get("target"),
        r.get("task"),
        r.get("metric"),
        f"{r['score']:.2f}",
        r.get("n"),
        r.get("elapsed_s"),
    ]


def register(app: typer.Typer) -> None:
    app.command(
        "eval",
        epilog="Examples: lessctl eval --task tydiqa  |  lessctl eval --task mmlu --model out/finetune/mmlu-less "
        "--limit 5",
    )(eval_)
