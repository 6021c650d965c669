"""GPU time of the study's jobs, from measured rates and the workspace's data sizes (`run --dry-run`).

The rates are measurements at Llama-2-7B shape on one GPU, each with its source; a job whose rate was never
measured (MMLU evaluation, RDS representations, custom evaluations) gets no estimate rather than a guess.
"""

from __future__ import annotations

from dataclasses import dataclass

from lessctl.config import Config
from lessctl.evaluation.ranking import BM25_MODEL
from lessctl.study.graph import Job

BBH_TASKS = 27  # BBH's tasks (LESS's eval/bbh/bbh/*.json)
TYDIQA_LANGUAGES = 9  # TydiQA GoldP's languages


@dataclass(frozen=True)
class Rate:
    per_second: float  # units of work per second
    unit: str
    source: str


RATES: dict[str, Rate] = {
    "train": Rate(
        4 * 13533 / (6 * 3600),
        "example passes/s",
        "LESS.md section 8: the paper's warmup, 4 epochs of 13,533 examples, took 6 h on one A100-80GB",
    ),
    "train-packed": Rate(
        34.5,
        "example passes/s",
        "bench/RESULTS.md, 'Training: batch-of-one Trainer against packed passes, H200' (packing, 8192-token packs)",
    ),
    "grads": Rate(
        33.8,
        "examples/s per checkpoint",
        "bench/RESULTS.md, 'Gradients with every projection kernel warmed, H200, 2026-12-02' (--projector cuda)",
    ),
    "grads-sketch": Rate(47.4, "examples/s per checkpoint", "the same run, --projector sketch"),
    "match": Rate(1 / 60, "selections/s", "LESS.md section 8: selection under a minute"),
    "eval-bbh": Rate(
        1080 / 291,
        "prompts/s",
        "bench/RESULTS.md, 'Evaluation generation through lessctl's path, H200' (static cache: the BBH protocol's "
        "1,080 prompts in 291 s)",
    ),
    "eval-tydiqa": Rate(512 / 23.1, "prompts/s", "the same run: 512 TydiQA prompts in 23.1 s (static cache)"),
}


def pool_size(cfg: Config) -> int:
    """Examples in the pooled training files (non-empty lines)."""
    n = 0
    for p in cfg.train_files().values():
        try:
            with open(p, "rb") as fh:
                n += sum(1 for line in fh if line.strip())
        except OSError:
            pass
    return n


def _train_rate(tcfg) -> float:
    """Packed passes (the default) at their measured rate; batch-of-one passes at the paper's."""
    return RATES["train-packed" if tcfg.packing else "train"].per_second


def estimate_seconds(cfg: Config, job: Job, pool: int) -> tuple[float | None, str]:
    """(seconds of GPU time or None, how it was reckoned) for one job at the measured rates."""
    if job.reason:
        return 0.0, "not applicable"
    n_ckpts = cfg.warmup.epochs
    if job.stage == "warmup":
        n = int(pool * cfg.warmup.percentage) * cfg.warmup.epochs
        rate = _train_rate(cfg.warmup)
        return n / rate, f"{n:,} example passes at {rate:.2f}/s"
    if job.stage == "grads":
        if job.method is not None:  # reps: a forward pass per example, not measured
            return None, "representations: rate not measured"
        rate = RATES["grads-sketch" if cfg.grads.projector == "sketch" else "grads"].per_second
        n = pool * n_ckpts
        return n / rate, f"{pool:,} pool rows x {n_ckpts} checkpoints at {rate:g}/s"
    if job.stage == "match":
        if job.method in ("less", "rds"):
            return 60.0, "under a minute (LESS.md section 8)"
        return 0.0, "CPU only"
    if job.stage == "finetune":
        chosen = pool if job.branch == "full" else int(pool * cfg.select.percentage)
        n = int(chosen * cfg.finetune.percentage) * cfg.finetune.epochs
        rate = _train_rate(cfg.finetune)
        return n / rate, f"{n:,} example passes at {rate:.2f}/s"
    limit = cfg.eval.limit or None
    if job.model == BM25_MODEL:
        return 0.0, "CPU only"
    if job.task == "bbh":
        per = [x for x in (cfg.eval.bbh_examples_per_task, limit) if x]
        if not per:
            return None, "bbh: every example (count not read)"
        n = BBH_TASKS * min(per)
        return n / RATES["eval-bbh"].per_second, f"{n:,} prompts at {RATES['eval-bbh'].per_second:.1f}/s"
    if job.task == "tydiqa":
        per = [x for x in (cfg.eval.tydiqa_questions_per_language, limit) if x]
        if not per:
            return None, "tydiqa: every question (count not read)"
        n = TYDIQA_LANGUAGES * min(per)
        return n / RATES["eval-tydiqa"].per_second, f"{n:,} prompts at {RATES['eval-tydiqa'].per_second:.1f}/s"
    return None, f"{job.task}: rate not measured"


def sources() -> list[dict]:
    """The rates and where they come from (printed under the dry run's table)."""
    return [
        {"rate": k, "per_second": round(r.per_second, 4), "unit": r.unit, "source": r.source} for k, r in RATES.items()
    ]


def clock(seconds: float | None) -> str:
    """'2 h 05 min', '4 min', '12 s'; '?' when unknown."""
    if seconds is None:
        return "?"
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def plan_rows(cfg: Config, stages: list[str], methods: list[str] | None, items: list[str] | None) -> dict:
    """The dry run: every job with what it waits for, done or to run, and its estimated GPU time."""
    from lessctl.study.graph import describe, plan_states
    from lessctl.study.pipeline import study_jobs

    jobs = study_jobs(cfg, stages, methods, items)
    states = plan_states(cfg, jobs)
    pool = pool_size(cfg)
    rows, total, unknown = [], 0.0, 0
    for job in jobs:
        state = states[job.key]
        seconds, how = estimate_seconds(cfg, job, pool)
        status = "not applicable" if job.reason else "done" if state.current else "to run"
        why = "" if job.reason or state.current else f"{state.status}: {state.reason}"
        if status == "to run":
            total += seconds or 0.0
            unknown += seconds is None
        rows.append({**describe(job), "status": status, "why": why, "gpu_seconds": seconds,
                     "gpu_time": clock(seconds), "estimate": how})  # fmt: skip
    return {
        "jobs": rows,
        "to_run": sum(r["status"] == "to run" for r in rows),
        "gpu_seconds_to_run": round(total, 1),
        "gpu_time_to_run": clock(total),
        "not_estimated": unknown,
        "pool_examples": pool,
        "rates": sources(),
    }
