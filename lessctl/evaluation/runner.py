"""The evaluations of LESS.md section 6 (MMLU, BBH, TydiQA): which models to run, the harness per task, the outputs.

Each harness is a plain function `evaluate_<task>(model, tokenizer, data_dir, *, limit, batch_size,
progress, ...) -> dict` returning a JSON-ready result whose headline score (`accuracy`,
`exact_match` or `f1`, in percent) sits at the top level. `run_evaluation` loads a model, runs one
harness and records the result (`eval/<model>/<task>.json` and a line of `results.jsonl`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from lessctl.errors import MissingArtifactError
from lessctl.outputs import layout as paths
from lessctl.vocab import EVAL_TASKS

log = logging.getLogger(__name__)


HEADLINE = {"mmlu": "accuracy", "bbh": "exact_match", "tydiqa": "f1"}
RUN_FILE = paths.RUN_FILE  # written by `lessctl finetune` into its output folder
BASE_NAME = "base"


def harness(task: str) -> Callable[..., dict]:
    """The evaluation function of a task."""
    if task == "mmlu":
        from lessctl.evaluation.mmlu import evaluate_mmlu

        return evaluate_mmlu
    if task == "bbh":
        from lessctl.evaluation.bbh import evaluate_bbh

        return evaluate_bbh
    if task == "tydiqa":
        from lessctl.evaluation.tydiqa import evaluate_tydiqa

        return evaluate_tydiqa
    from lessctl.errors import ConfigError

    raise ConfigError(f"unknown evaluation task {task!r}; expected one of {', '.join(EVAL_TASKS)}")


def check_data(task: str, data_dir: str | Path) -> None:
    """Fails fast, before any model is loaded, when the task's data files are not where they should be."""
    from lessctl.data.targets import mmlu_subjects, require_file, task_dir

    root = task_dir(data_dir, task)
    if task == "mmlu":
        subject = mmlu_subjects(root)[0]
        require_file(
            root / "dev" / f"{subject}_dev.csv", "<data_dir>/eval/mmlu/dev/<subject>_dev.csv for every test subject"
        )
    elif task == "bbh":
        from lessctl.evaluation.bbh import PROMPT_LAYOUT, bbh_tasks

        require_file(root / "cot-prompts" / f"{bbh_tasks(root)[0]}.txt", PROMPT_LAYOUT)
    elif task == "tydiqa":
        from lessctl.evaluation.tydiqa import SHOTS_LAYOUT, dev_file

        dev_file(root)
        require_file(root / "tydiqa-one-shot.json", SHOTS_LAYOUT)
    else:
        harness(task)


def task_options(eval_cfg: Any, task: str) -> dict:
    """The [eval] settings a task's harness takes beyond limit and batch size: the seeded samples' sizes."""
    if task == "bbh":
        return {
            "examples_per_task": eval_cfg.bbh_examples_per_task or None,
            "kv_cache": eval_cfg.kv_cache,
            "sample": eval_cfg.bbh_sample,
        }
    if task == "tydiqa":
        return {"questions_per_language": eval_cfg.tydiqa_questions_per_language or None, "kv_cache": eval_cfg.kv_cache}
    return {}


def evaluate_task(task: str, model: Any, tokenizer: Any, data_dir: str | Path, **options: Any) -> dict:
    """Runs the harness of `task`; options are its keyword arguments (limit, batch_size, progress, ...)."""
    return harness(task)(model, tokenizer, data_dir, **options)


# ---------------------------------------------------------------------------------------------- models


@dataclass
class ModelSpec:
    """A model to evaluate: its name in the outputs, where it is, and the selection it was trained on."""

    name: str
    path: str
    method: str | None = None
    target: str | None = None
    base_model: str | None = None  # what the adapter was trained on (lessctl_run.json)
    selection_model: str | None = None  # whose gradients selected its training data
    transfer: bool = False  # base_model is not selection_model (LESS-T)


def describe_model(
    path: str | Path, *, output_dir: str | Path | None = None, base_model: str | None = None
) -> ModelSpec:
    """Names a model folder: `base` for the workspace's base model, else the folder name.

    method and target come from the folder's `lessctl_run.json` (a folder name is never parsed for them:
    `mmlu-random-seed4` could be read several ways).
    """
    p = Path(path).expanduser()
    if base_model is not None and (str(path) == BASE_NAME or _same(str(path), base_model)):
        return ModelSpec(BASE_NAME, base_model)
    name = p.name or str(path)
    method = target = None
    models: dict[str, Any] = {}
    run_file = p / RUN_FILE
    if run_file.is_file():
        try:
            run = json.loads(run_file.read_text(encoding="utf-8"))
            method, target = run.get("method"), run.get("target")
            models = {
                "base_model": run.get("base_model"),
                "selection_model": run.get("selection_model"),
                "transfer": bool(run.get("transfer", False)),
            }
        except (json.JSONDecodeError, AttributeError):
            log.warning("%s is not a JSON object; ignoring it", run_file)
    return ModelSpec(name, str(p), method, target, **models)


def _same(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def finetuned_models(output_dir: str | Path) -> list[ModelSpec]:
    """Every folder `<output_dir>/finetune/*/` holding an adapter, sorted by name."""
    from lessctl.models import is_adapter_dir

    root = paths.finetune_root(output_dir)
    folders = sorted(p for p in root.glob("*") if p.is_dir() and is_adapter_dir(p)) if root.is_dir() else []
    if not folders:
        raise MissingArtifactError(
            f"no finetuned models in {root}; run `lessctl finetune --target NAME` first, or pass --model PATH"
        )
    return [describe_model(p, output_dir=output_dir) for p in folders]


def models_to_evaluate(model: str | None, output_dir: str | Path, base_model: str) -> list[ModelSpec]:
    """What `--model` names: every finetuned model (None), the workspace's base model ('base'), or a folder."""
    if model is None:
        return finetuned_models(output_dir)
    if model == BASE_NAME:
        return [describe_model(BASE_NAME, base_model=base_model)]
    local = Path(model).expanduser()
    path = str(local.resolve()) if local.exists() else model
    return [describe_model(path, output_dir=output_dir, base_model=base_model)]


# ---------------------------------------------------------------------------------------------- runs


def load_for_eval(spec: ModelSpec, dtype: str = "auto", device: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of `spec`, an adapter merged into its base."""
    from lessctl.models import load_model_for_eval

    return load_model_for_eval(spec.path, dtype=dtype, device=device)


@dataclass
class EvalOutcome:
    """One finished evaluation: the results.jsonl record, the eval json path and the full result."""

    record: dict
    path: Path
    result: dict


def make_record(spec: ModelSpec, task: str, result: dict, elapsed_s: float) -> dict:
    """The line of results.jsonl for one evaluation."""
    from lessctl import __version__

    metric = result.get("metric") or HEADLINE[task]
    return {
        "model": spec.name,
        "method": spec.method,
        "target": spec.target,
        "task": task,
        "metric": metric,
        "score": round(float(result[metric]), 4),
        "n": result.get("n"),
        "limit": result.get("settings", {}).get("limit"),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "elapsed_s": round(elapsed_s, 1),
        "model_path": spec.path,
        "transfer": spec.transfer,
        "base_model": spec.base_model,
        "selection_model": spec.selection_model,
        "lessctl_version": __version__,
    }


def record_result(output_dir: str | Path, spec: ModelSpec, task: str, result: dict, elapsed_s: float) -> EvalOutcome:
    """Writes `eval/<model>/<task>.json` and appends the record to `results.jsonl`."""
    from lessctl.evaluation.results import append_result, write_eval_json

    record = make_record(spec, task, result, elapsed_s)
    metric = record["metric"]
    full = {metric: result[metric], **result, "model": asdict(spec), "lessctl_version": record["lessctl_version"]}
    path = write_eval_json(output_dir, spec.name, task, full)
    record["eval_json"] = str(path)
    append_result(output_dir, record)
    return EvalOutcome(record, path, full)


def run_evaluation(
    spec: ModelSpec,
    task: str,
    data_dir: str | Path,
    output_dir: str | Path,
    *,
    dtype: str = "auto",
    device: str | None = None,
    loaded: tuple[Any, Any] | None = None,
    **options: Any,
) -> EvalOutcome:
    """Runs the task's harness on `spec`'s model and records the result.

    The model is loaded (an adapter merged into its base) unless `loaded` = (model, tokenizer)
    already holds it, so that several tasks can share one load. options go to the harness
    (limit, batch_size, progress, examples_per_task, ...).
    """
    check_data(task, data_dir)
    start = time.time()
    model, tokenizer = loaded or load_for_eval(spec, dtype, device)
    result = evaluate_task(task, model, tokenizer, data_dir, **options)
    return record_result(output_dir, spec, task, result, time.time() - start)


def run_custom_evaluation(
    spec: ModelSpec,
    target: str,
    eval_file: str | Path,
    output_dir: str | Path,
    *,
    dtype: str = "auto",
    device: str | None = None,
    loaded: tuple[Any, Any] | None = None,
    chat_format: str = "tulu",
    **options: Any,
) -> EvalOutcome:
    """Evaluates a custom target's held-out `eval_file` (exact match and F1) and records it as task `target`."""
    from lessctl.evaluation.custom import evaluate_jsonl

    if not Path(eval_file).is_file():
        raise MissingArtifactError(f"{eval_file}: no such eval file for target '{target}'")
    start = time.time()
    model, tokenizer = loaded or load_for_eval(spec, dtype, device)
    result = evaluate_jsonl(model, tokenizer, eval_file, chat_format=chat_format, **options)
    result = {"task": target, "metric": "exact_match", **result}
    return record_result(output_dir, spec, target, result, time.time() - start)
