"""How a target's models are evaluated, decided once for `lessctl run`, `slurm submit`, `ablate --eval` and `results`.

A built-in target (`{name = "mmlu"}`) runs its benchmark. A custom target's `eval_file` is scored one of two ways,
read off the file itself: a file `lessctl ir prepare` wrote (its records hold `candidates`) is a reranking
evaluation, NDCG@5 as `lessctl ir eval` computes it (task `ir-<collection>`); any other file is answered
greedily and scored by exact match and F1 (task: the target's name). A custom target without `eval_file` has no
evaluation, and says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lessctl.config import Config
    from lessctl.evaluation.runner import EvalOutcome, ModelSpec

BENCHMARK, ANSWERS, RANKING, NONE = "benchmark", "answers", "ranking", "none"


@dataclass(frozen=True)
class TargetEval:
    """The evaluation of one target: its task in eval/<model>/<task>.json, the file it reads, how it scores."""

    task: str | None
    kind: str = BENCHMARK  # benchmark | answers | ranking | none
    eval_file: Path | None = None
    reason: str = ""  # set when there is no evaluation (task None)


def target_eval(cfg: Config, target: str) -> TargetEval:
    spec = cfg.data.targets[target]
    if isinstance(spec, str):
        return TargetEval(spec)
    if not spec.get("eval_file"):
        return TargetEval(None, NONE, reason=f"custom target '{target}' has no eval_file in [data] targets")
    path = cfg.resolve(spec["eval_file"])
    first = _first_record(path)
    if first is not None and "candidates" in first:
        from lessctl.evaluation.ranking import dataset_name, task_name

        return TargetEval(task_name(dataset_name(path, [first])), RANKING, path)
    return TargetEval(target, ANSWERS, path)


def _first_record(path: Path) -> dict | None:
    """The file's first object, or None when it cannot be read (the evaluation then names the problem)."""
    from lessctl.data.records import iter_objects
    from lessctl.errors import LessctlError

    try:
        for _, _, obj in iter_objects(path, "one example a line"):
            return obj
    except (OSError, LessctlError, ValueError):
        return None
    return None


def run_target_eval(
    cfg: Config, te: TargetEval, spec: ModelSpec | None, *, device: str | None = None, **extra: Any
) -> EvalOutcome:
    """Evaluates a model on the target and records it; `spec` None scores the BM25 first stage (ranking only)."""
    if te.kind not in RUNNERS:
        raise ValueError(f"no evaluation for a target of kind {te.kind!r} ({te.reason})")
    opts: dict[str, Any] = {
        "dtype": cfg.model.dtype,
        "device": device,
        "batch_size": cfg.eval.batch_size,
        "limit": cfg.eval.limit or None,
        **extra,
    }
    return RUNNERS[te.kind](cfg, te, spec, opts)


def _ranking(cfg: Config, te: TargetEval, spec: ModelSpec | None, opts: dict) -> EvalOutcome:
    from lessctl.evaluation.ranking import run_ir_evaluation

    return run_ir_evaluation(spec, te.eval_file, cfg.output_dir, chat_format=cfg.model.chat_format, **opts)


def _answers(cfg: Config, te: TargetEval, spec: ModelSpec | None, opts: dict) -> EvalOutcome:
    from lessctl.evaluation.runner import run_custom_evaluation

    assert spec is not None and te.eval_file is not None and te.task is not None
    return run_custom_evaluation(spec, te.task, te.eval_file, cfg.output_dir, chat_format=cfg.model.chat_format, **opts)


def _benchmark(cfg: Config, te: TargetEval, spec: ModelSpec | None, opts: dict) -> EvalOutcome:
    from lessctl.evaluation.runner import run_evaluation, task_options

    assert spec is not None and te.task is not None
    data_dir = cfg.resolve(cfg.eval.data_dir or cfg.data.data_dir)
    return run_evaluation(spec, te.task, data_dir, cfg.output_dir, **opts, **task_options(cfg.eval, te.task))


# How each kind of target is evaluated, keyed by TargetEval.kind (a target of kind `none` has no evaluation).
RUNNERS = {BENCHMARK: _benchmark, ANSWERS: _answers, RANKING: _ranking}
