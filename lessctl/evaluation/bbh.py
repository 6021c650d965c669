"""BIG-Bench-Hard as open-instruct evaluates it: 3-shot chain-of-thought prompts, greedy decoding, exact match."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from lessctl.data.records import read_text
from lessctl.data.targets import read_json, require_file, task_dir, wrap_user_turn
from lessctl.errors import ConfigError, InputError
from lessctl.evaluation.generation import ProgressHook, generate_greedy
from lessctl.evaluation.metrics import bbh_exact_match, extract_bbh_answer, mean

TASK_LAYOUT = '<data_dir>/eval/bbh/bbh/<task>.json ({"examples": [{"input", "target"}]})'
PROMPT_LAYOUT = "<data_dir>/eval/bbh/cot-prompts/<task>.txt (the task's 3-shot chain-of-thought prompt)"
STOP = ("\n\n",)
SAMPLES = ("less", "per_task")  # [eval] bbh_sample


def bbh_tasks(bbh_dir: Path) -> list[str]:
    """Sorted names of `bbh/*.json`."""
    tasks = sorted(p.stem for p in (bbh_dir / "bbh").glob("*.json"))
    if not tasks:
        raise InputError(f"no BBH tasks in {bbh_dir / 'bbh'}: expected {TASK_LAYOUT}")
    return tasks


def read_cot_prompt(path: Path) -> str:
    """The few-shot text of a cot-prompts file, without its canary line and the `-----` rule under it."""
    lines = read_text(require_file(path, PROMPT_LAYOUT)).splitlines(keepends=True)
    for k, line in enumerate(lines[:3]):
        if line.strip() == "-----":
            lines = lines[k + 1 :]
            break
    return "".join(lines).strip()


def build_prompt(cot_prompt: str, question: str, chat_format: str = "plain") -> str:
    """`{cot prompt}\\n\\nQ: {input}\\nA:` (chat formats: the answer's "A:" opens the assistant turn)."""
    prompt = cot_prompt.strip() + "\n\nQ: " + question
    if chat_format == "plain":
        return prompt + "\nA:"
    return wrap_user_turn(prompt, "A:", chat_format)


def sample_examples(examples: list[dict], task: str, n: int | None, seed: int) -> list[dict]:
    """The "per_task" sample: a seeded sample of `n` examples of a task (all of them, in file order, when n is
    None or larger), which depends only on (seed, task), not on which other tasks there are.
    """
    if not n or n >= len(examples):
        return list(examples)
    return random.Random(f"{seed}:{task}").sample(examples, n)


def less_sample(counts: dict[str, int], n: int | None, seed: int = 42) -> dict[str, list[int]]:
    """LESS's sample (evaluation/eval/bbh/run_eval.py): `random.seed(42)` once, then `random.sample(examples, n)`
    task after task, here in sorted task order (LESS's `glob` order, which the file system decides); indices
    into each task's examples, in the sampled order. random.sample draws from the population's size alone, so
    the indices are those of the examples LESS draws. A task with fewer than n examples (where LESS's
    random.sample fails) keeps all of them, in file order, and draws nothing."""
    rng = random.Random(seed)
    out = {}
    for task in sorted(counts):
        k = counts[task]
        out[task] = rng.sample(range(k), n) if n and n <= k else list(range(k))
    return out


def _read_examples(path: Path) -> list[dict]:
    data = read_json(path, TASK_LAYOUT)
    examples = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(examples, list) or not all(
        isinstance(e, dict) and "input" in e and "target" in e for e in examples
    ):
        raise InputError(f"{path}: expected {TASK_LAYOUT}")
    return examples


def select_examples(
    root: Path, all_tasks: list[str], chosen: list[str], n: int | None, seed: int = 42, sample: str = "less"
) -> dict[str, list[dict]]:
    """{task: its sampled examples} for the `chosen` tasks. "less": LESS's one draw over all the tasks (sorted),
    so a task's sample does not depend on which tasks are chosen; "per_task": `sample_examples`."""
    if sample not in SAMPLES:
        raise ConfigError(f"[eval] bbh_sample: expected less or per_task, got {sample!r}")
    if sample == "per_task":
        return {t: sample_examples(_read_examples(root / "bbh" / f"{t}.json"), t, n, seed) for t in chosen}
    examples = {t: _read_examples(root / "bbh" / f"{t}.json") for t in all_tasks}
    drawn = less_sample({t: len(v) for t, v in examples.items()}, n, seed)
    return {t: [examples[t][i] for i in drawn[t]] for t in chosen}


def evaluate_bbh(
    model: Any,
    tokenizer: Any,
    data_dir: str | Path,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    progress: Any = None,
    examples_per_task: int | None = 40,
    seed: int = 42,
    max_new_tokens: int = 512,
    chat_format: str = "plain",
    tasks: list[str] | None = None,
    kv_cache: str = "auto",
    sample: str = "less",
) -> dict:
    """Exact match (percent), the mean over tasks of each task's exact match, with the breakdown.

    examples_per_task: the seeded sample per task (None: all); limit caps it further for quick runs.
    sample: "less" (LESS's one seeded draw over the sorted tasks: `less_sample`) or "per_task" (a sample
    per (seed, task): `sample_examples`). A generation that opens with blank lines is read from its first
    text on, as LESS strips it (the stop applies after that text).
    """
    start = time.time()
    root = task_dir(data_dir, "bbh")
    all_tasks = bbh_tasks(root)
    if tasks:
        unknown = sorted(set(tasks) - set(all_tasks))
        if unknown:
            raise ConfigError(f"unknown BBH tasks {unknown}; the tasks are the names of {root / 'bbh'}/<task>.json")
    chosen = [t for t in all_tasks if not tasks or t in tasks]

    prompts: list[str] = []
    meta: list[tuple[str, dict]] = []
    for task, picked in select_examples(root, all_tasks, chosen, examples_per_task, seed, sample).items():
        cot = read_cot_prompt(root / "cot-prompts" / f"{task}.txt")
        if limit:
            picked = picked[:limit]
        for ex in picked:
            prompts.append(build_prompt(cot, ex["input"], chat_format))
            meta.append((task, ex))

    hook = ProgressHook(progress, "bbh")
    hook.start(len(prompts))
    outputs, truncated = generate_greedy(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        stop=STOP,
        batch_size=batch_size,
        hook=hook,
        cache=kv_cache,
        stop_after_text=True,
    )

    per_task: dict[str, list[float]] = {t: [] for t in chosen}
    predictions = []
    for (task, ex), output in zip(meta, outputs):
        answer = extract_bbh_answer(output)
        em = bbh_exact_match(answer, ex["target"])
        per_task[task].append(em)
        predictions.append(
            {
                "task": task,
                "input": ex["input"],
                "output": output,
                "prediction": answer,
                "target": ex["target"],
                "correct": bool(em),
            }
        )
    task_scores = {t: {"exact_match": 100.0 * mean(v), "n": len(v)} for t, v in per_task.items()}
    return {
        "task": "bbh",
        "metric": "exact_match",
        "exact_match": mean([s["exact_match"] for s in task_scores.values()]),
        "n": len(predictions),
        "tasks": task_scores,
        "settings": {
            "shots": 3,
            "examples_per_task": examples_per_task,
            "sample": sample,
            "seed": seed,
            "limit": limit,
            "max_new_tokens": max_new_tokens,
            "stop": list(STOP),
            "chat_format": chat_format,
            "truncated_prompts": truncated,
            "data_dir": str(root),
        },
        "seconds": round(time.time() - start, 3),
        "predictions": predictions,
    }
