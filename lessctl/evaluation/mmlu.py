"""MMLU as open-instruct evaluates it: 5-shot plain prompts from dev, the answer read from the next-token scores."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lessctl.data.targets import (
    MMLU_CHOICES,
    mmlu_header,
    mmlu_question,
    mmlu_subjects,
    read_mmlu_csv,
    task_dir,
    wrap_user_turn,
)
from lessctl.errors import ConfigError
from lessctl.evaluation.generation import ProgressHook, encode, max_positions, next_token_scores
from lessctl.evaluation.metrics import pick_choice

# The four reporting categories of the MMLU paper, each with its subjects.
CATEGORY_SUBJECTS: dict[str, tuple[str, ...]] = {
    "STEM": (
        "abstract_algebra",
        "astronomy",
        "college_biology",
        "college_chemistry",
        "college_computer_science",
        "college_mathematics",
        "college_physics",
        "computer_security",
        "conceptual_physics",
        "electrical_engineering",
        "elementary_mathematics",
        "high_school_biology",
        "high_school_chemistry",
        "high_school_computer_science",
        "high_school_mathematics",
        "high_school_physics",
        "high_school_statistics",
        "machine_learning",
    ),
    "humanities": (
        "formal_logic",
        "high_school_european_history",
        "high_school_us_history",
        "high_school_world_history",
        "international_law",
        "jurisprudence",
        "logical_fallacies",
        "moral_disputes",
        "moral_scenarios",
        "philosophy",
        "prehistory",
        "professional_law",
        "world_religions",
    ),
    "social sciences": (
        "econometrics",
        "high_school_geography",
        "high_school_government_and_politics",
        "high_school_macroeconomics",
        "high_school_microeconomics",
        "high_school_psychology",
        "human_sexuality",
        "professional_psychology",
        "public_relations",
        "security_studies",
        "sociology",
        "us_foreign_policy",
    ),
    "other": (
        "anatomy",
        "business_ethics",
        "clinical_knowledge",
        "college_medicine",
        "global_facts",
        "human_aging",
        "management",
        "marketing",
        "medical_genetics",
        "miscellaneous",
        "nutrition",
        "professional_accounting",
        "professional_medicine",
        "virology",
    ),
}
SUBJECT_CATEGORY: dict[str, str] = {s: cat for cat, subjects in CATEGORY_SUBJECTS.items() for s in subjects}


def build_prompt(subject: str, dev_rows: list[list[str]], row: list[str], shots: int) -> str:
    """Header, `shots` solved dev examples, then the question ending in "Answer:"."""
    prompt = mmlu_header(subject)
    for dev in dev_rows[:shots]:
        prompt += mmlu_question(dev, include_answer=True)
    return prompt + mmlu_question(row, include_answer=False)


def choice_token_ids(tokenizer: Any) -> list[int]:
    """The ids of " A".." D" as the next token (the last token of each encoding, as open-instruct takes)."""
    ids = [tokenizer.encode(" " + c, add_special_tokens=False)[-1] for c in MMLU_CHOICES]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"the tokenizer maps the MMLU answer letters \" A\"..\" D\" to overlapping tokens {ids}")
    return ids


def evaluate_mmlu(
    model: Any,
    tokenizer: Any,
    data_dir: str | Path,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    progress: Any = None,
    shots: int = 5,
    max_prompt_tokens: int = 2048,
    chat_format: str = "plain",
    subjects: list[str] | None = None,
) -> dict:
    """Accuracy (percent, micro over all questions) with per-subject and per-category breakdowns.

    limit: questions per subject (the first ones of each test file). Shots are dropped as open-instruct's
    run_eval.py drops them: the count starts at `shots` for each subject and, question by question in file
    order, goes down by one while the prompt is over `max_prompt_tokens` tokens (counted without special
    tokens); it is not reset for the next question, so once reduced it stays reduced for the rest of the
    subject. Here it stops at zero (open-instruct's count would go negative, which means all shots again);
    a prompt still over the limit, or over the model's context, keeps its end.
    chat_format "plain" is open-instruct's protocol; "tulu"/"llama2" wrap the prompt as a user turn
    whose answer starts with "The answer is:".
    """
    start = time.time()
    root = task_dir(data_dir, "mmlu")
    all_subjects = mmlu_subjects(root)
    if subjects:
        unknown = sorted(set(subjects) - set(all_subjects))
        if unknown:
            raise ConfigError(
                f"unknown MMLU subjects {unknown}; the subjects are the names of {root / 'test'}/<subject>_test.csv"
            )
    chosen = [s for s in all_subjects if not subjects or s in subjects]
    cap = max_prompt_tokens
    ctx = max_positions(model)
    if ctx:
        cap = min(cap, ctx)

    prompts: list[list[int]] = []
    meta: list[tuple[str, int, str, int]] = []  # (subject, row index, answer, shots)
    fewer_shots = 0
    for subject in chosen:
        dev = read_mmlu_csv(root / "dev" / f"{subject}_dev.csv")
        test = read_mmlu_csv(root / "test" / f"{subject}_test.csv")
        if limit:
            test = test[:limit]
        k = shots  # per subject, carried from question to question
        for j, row in enumerate(test):
            while True:
                text = build_prompt(subject, dev, row, k)
                if chat_format != "plain":
                    text = wrap_user_turn(text, "The answer is:", chat_format)
                ids = encode(tokenizer, text)
                n = len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
                over = n > max_prompt_tokens or bool(ctx and len(ids) > ctx)
                if not over or k == 0:
                    break
                k -= 1
            if k < shots:
                fewer_shots += 1
            if over:  # even zero-shot is too long: keep the end, where the question is
                ids = ids[len(ids) - cap :]
            prompts.append(ids)
            meta.append((subject, j, row[5].strip(), k))

    hook = ProgressHook(progress, "mmlu")
    hook.start(len(prompts))
    scores = next_token_scores(model, tokenizer, prompts, choice_token_ids(tokenizer), batch_size=batch_size, hook=hook)

    per_subject: dict[str, list[int]] = {s: [0, 0] for s in chosen}
    predictions = []
    for (subject, j, answer, k), logp in zip(meta, scores):
        pred = MMLU_CHOICES[pick_choice(logp)]
        correct = pred == answer
        per_subject[subject][0] += int(correct)
        per_subject[subject][1] += 1
        predictions.append(
            {"subject": subject, "index": j, "shots": k, "prediction": pred, "answer": answer, "correct": correct}
        )
    per_cat: dict[str, list[int]] = {}
    for s, (c, n) in per_subject.items():
        acc = per_cat.setdefault(SUBJECT_CATEGORY.get(s, "other"), [0, 0])
        acc[0] += c
        acc[1] += n
    total_correct = sum(c for c, _ in per_subject.values())
    total = sum(n for _, n in per_subject.values())
    return {
        "task": "mmlu",
        "metric": "accuracy",
        "accuracy": _pct(total_correct, total),
        "n": total,
        "subjects": {s: {"accuracy": _pct(c, n), "n": n} for s, (c, n) in per_subject.items()},
        "categories": {cat: {"accuracy": _pct(c, n), "n": n} for cat, (c, n) in sorted(per_cat.items())},
        "settings": {
            "shots": shots,
            "limit": limit,
            "max_prompt_tokens": cap,
            "chat_format": chat_format,
            "prompts_with_fewer_shots": fewer_shots,
            "data_dir": str(root),
        },
        "seconds": round(time.time() - start, 3),
        "predictions": predictions,
    }


def _pct(correct: int, n: int) -> float:
    return 100.0 * correct / n if n else 0.0
