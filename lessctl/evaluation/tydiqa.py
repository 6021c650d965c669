"""TydiQA GoldP as open-instruct evaluates it: 1-shot with the passage, tulu format, SQuAD F1 and EM per language."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from lessctl.data.targets import TYDIQA_TEMPLATES, read_json, task_dir, wrap_user_turn
from lessctl.errors import InputError
from lessctl.evaluation.generation import ProgressHook, generate_greedy
from lessctl.evaluation.metrics import mean, squad_scores

log = logging.getLogger(__name__)

DEV_FILES = ("tydiqa-goldp-v1.1-dev.json", "tydiqa-goldp-v1.1-dev_ini.json")
DEV_LAYOUT = (
    "<data_dir>/eval/tydiqa/tydiqa-goldp-v1.1-dev.json (or tydiqa-goldp-v1.1-dev_ini.json) in SQuAD layout: "
    '{"data": [{"paragraphs": [{"context", "qas": [{"id": "<language>-...", "question", "answers": [{"text"}]}]}]}]}'
)
SHOTS_LAYOUT = "<data_dir>/eval/tydiqa/tydiqa-one-shot.json (language -> [{context, question, answers}])"
STOP = ("\n",)


def dev_file(tydiqa_dir: Path) -> Path:
    """The full GoldP dev set when present, else the 9-example `_ini` file."""
    for name in DEV_FILES:
        if (tydiqa_dir / name).is_file():
            return tydiqa_dir / name
    raise InputError(f"no TydiQA dev set in {tydiqa_dir}: expected {DEV_LAYOUT}")


def read_dev(path: Path) -> list[dict]:
    """[{id, lang, context, question, answers: [text]}] in file order; the language is the id's prefix."""
    data = read_json(path, DEV_LAYOUT)
    out: list[dict] = []
    try:
        for article in data["data"]:
            for para in article["paragraphs"]:
                for qa in para["qas"]:
                    lang = qa["id"].split("-")[0]
                    if lang not in TYDIQA_TEMPLATES:
                        raise InputError(
                            f"{path}: question {qa['id']!r} has unknown language {lang!r}; "
                            f"ids start with one of {', '.join(TYDIQA_TEMPLATES)}"
                        )
                    answers = [a["text"] for a in qa["answers"]]
                    out.append(
                        {
                            "id": qa["id"],
                            "lang": lang,
                            "context": para["context"],
                            "question": qa["question"],
                            "answers": answers,
                        }
                    )
    except (KeyError, TypeError, AttributeError):
        raise InputError(f"{path}: expected {DEV_LAYOUT}") from None
    if not out:
        raise InputError(f"{path}: no questions; expected {DEV_LAYOUT}")
    return out


def read_shots(path: Path) -> dict[str, dict]:
    """{language: its first example} of the one-shot file."""
    data = read_json(path, SHOTS_LAYOUT)
    try:
        return {
            lang: {
                "id": ex[0].get("id"),
                "context": ex[0]["context"],
                "question": ex[0]["question"],
                "answer": ex[0]["answers"][0]["text"],
            }
            for lang, ex in data.items()
        }
    except (KeyError, TypeError, IndexError, AttributeError):
        raise InputError(f"{path}: expected {SHOTS_LAYOUT}") from None


def trim_context(tokenizer: Any, context: str, max_tokens: int | None) -> str:
    """The context cut to its first `max_tokens` tokens (unchanged when it is shorter)."""
    if not max_tokens:
        return context
    ids = tokenizer.encode(context, add_special_tokens=False, verbose=False)
    if len(ids) <= max_tokens:
        return context
    return tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)


def build_prompt(lang: str, shot: dict | None, context: str, question: str, chat_format: str = "tulu") -> str:
    """Instruction, a blank line, the solved shot, a blank line, passage and question; then the answer word.

    tulu: `<|user|>\\n{that}\\n<|assistant|>\\n{answer word}` (open-instruct's chat wrapping).
    """
    instruction, p_word, q_word, a_word = TYDIQA_TEMPLATES[lang]
    prompt = instruction + "\n\n"
    if shot is not None:
        prompt += (
            p_word
            + " "
            + shot["context"]
            + "\n"
            + q_word
            + " "
            + shot["question"]
            + "\n"
            + a_word
            + " "
            + shot["answer"]
            + "\n\n"
        )
    prompt += p_word + " " + context + "\n" + q_word + " " + question + "\n"
    if chat_format == "plain":
        return prompt + a_word
    return wrap_user_turn(prompt, a_word, chat_format)


def evaluate_tydiqa(
    model: Any,
    tokenizer: Any,
    data_dir: str | Path,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    progress: Any = None,
    max_context_tokens: int = 512,
    max_new_tokens: int = 50,
    chat_format: str = "tulu",
    shots: int = 1,
) -> dict:
    """F1 and exact match (percent): per language, and their mean over languages (`f1` is the headline).

    limit: questions per language (the first ones of the dev file). The shot of a language is the
    first example of that language in `tydiqa-one-shot.json`; with the 9-example `_ini` dev file it
    is the question itself, which is counted in `settings.shot_is_question`, not refused.
    """
    start = time.time()
    root = task_dir(data_dir, "tydiqa")
    dev_path = dev_file(root)
    dev = read_dev(dev_path)
    shot_by_lang = read_shots(root / "tydiqa-one-shot.json") if shots else {}
    if shots:
        missing = sorted({ex["lang"] for ex in dev} - set(shot_by_lang))
        if missing:
            raise InputError(
                f"{root / 'tydiqa-one-shot.json'}: no exemplar for {', '.join(missing)}; expected {SHOTS_LAYOUT}"
            )
        for shot in shot_by_lang.values():
            shot["context"] = trim_context(tokenizer, shot["context"], max_context_tokens)

    per_lang_count: dict[str, int] = {}
    picked: list[dict] = []
    for ex in dev:
        n = per_lang_count.get(ex["lang"], 0)
        if limit and n >= limit:
            continue
        per_lang_count[ex["lang"]] = n + 1
        picked.append(ex)

    prompts: list[str] = []
    shot_is_question = 0
    for ex in picked:
        shot = shot_by_lang.get(ex["lang"]) if shots else None
        if shot is not None and (shot.get("id") == ex["id"] or shot["question"] == ex["question"]):
            shot_is_question += 1
        context = trim_context(tokenizer, ex["context"], max_context_tokens)
        prompts.append(build_prompt(ex["lang"], shot, context, ex["question"], chat_format))
    if shot_is_question:
        log.warning(
            "%d of %d TydiQA questions are their own one-shot exemplar (%s has only the exemplars): "
            "scores are not comparable to the full dev set",
            shot_is_question,
            len(picked),
            dev_path.name,
        )

    hook = ProgressHook(progress, "tydiqa")
    hook.start(len(prompts))
    outputs, truncated = generate_greedy(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop=STOP, batch_size=batch_size, hook=hook
    )

    per_lang: dict[str, list[tuple[float, float]]] = {}
    predictions = []
    for ex, output in zip(picked, outputs):
        pred = output.strip()
        em, f1 = squad_scores(pred, ex["answers"])
        per_lang.setdefault(ex["lang"], []).append((em, f1))
        predictions.append(
            {
                "id": ex["id"],
                "lang": ex["lang"],
                "prediction": pred,
                "answers": ex["answers"],
                "exact_match": em,
                "f1": f1,
            }
        )
    languages = {
        lang: {
            "exact_match": 100.0 * mean([em for em, _ in v]),
            "f1": 100.0 * mean([f1 for _, f1 in v]),
            "n": len(v),
        }
        for lang, v in per_lang.items()
    }
    return {
        "task": "tydiqa",
        "metric": "f1",
        "f1": mean([s["f1"] for s in languages.values()]),
        "exact_match": mean([s["exact_match"] for s in languages.values()]),
        "n": len(predictions),
        "languages": languages,
        "settings": {
            "shots": shots,
            "limit": limit,
            "max_context_tokens": max_context_tokens,
            "max_new_tokens": max_new_tokens,
            "stop": list(STOP),
            "chat_format": chat_format,
            "dev_file": str(dev_path),
            "shot_is_question": shot_is_question,
            "truncated_prompts": truncated,
        },
        "seconds": round(time.time() - start, 3),
        "predictions": predictions,
    }
