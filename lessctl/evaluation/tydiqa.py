"""TydiQA GoldP as open-instruct evaluates it: 1-shot with the passage, tulu format, SQuAD F1 and EM per language."""

from __future__ import annotations

import logging
import random
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
TRAIN_FILE = "tydiqa-goldp-v1.1-train.json"  # open-instruct's source of demonstrations, SQuAD layout
STOP = ("\n",)
QUESTIONS_PER_LANGUAGE = 200  # LESS's eval_tydiqa.sh: --max_num_examples_per_lang 200


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


def read_exemplars(tydiqa_dir: Path) -> tuple[dict[str, list[dict]], Path]:
    """{language: [{id, context, question, answer}]}, the demonstrations to choose from, and their file:
    the GoldP train set when present (open-instruct samples its shot there), else every example of
    `tydiqa-one-shot.json`."""
    train = tydiqa_dir / TRAIN_FILE
    if train.is_file():
        pool: dict[str, list[dict]] = {}
        for ex in read_dev(train):
            pool.setdefault(ex["lang"], []).append({**ex, "answer": ex["answers"][0]})
        return pool, train
    path = tydiqa_dir / "tydiqa-one-shot.json"
    data = read_json(path, SHOTS_LAYOUT)
    try:
        return {
            lang: [
                {"id": e.get("id"), "context": e["context"], "question": e["question"]}
                | {"answer": e["answers"][0]["text"]}
                for e in exs
            ]
            for lang, exs in data.items()
        }, path
    except (KeyError, TypeError, IndexError, AttributeError):
        raise InputError(f"{path}: expected {SHOTS_LAYOUT}") from None


def is_same_question(shot: dict, ex: dict) -> bool:
    return (shot.get("id") is not None and shot.get("id") == ex["id"]) or shot["question"] == ex["question"]


def pick_demonstration(pool: list[dict], ex: dict, lang: str, seed: int) -> dict | None:
    """The demonstration of a question: the first of the language's exemplars in a seeded order (the same
    for every question of the language, as open-instruct samples one per language) that is not the question
    itself; None when the language has no other exemplar."""
    order = list(pool)
    random.Random(f"{seed}:{lang}").shuffle(order)
    return next((shot for shot in order if not is_same_question(shot, ex)), None)


def sample_questions(dev: list[dict], per_language: int | None, seed: int) -> list[dict]:
    """At most `per_language` questions of each language: a seeded sample (depending only on the seed and the
    language) when there are more, kept in file order; all of them when None."""
    by_lang: dict[str, list[int]] = {}
    for i, ex in enumerate(dev):
        by_lang.setdefault(ex["lang"], []).append(i)
    keep: set[int] = set()
    for lang, idx in by_lang.items():
        if per_language and len(idx) > per_language:
            idx = random.Random(f"{seed}:{lang}").sample(idx, per_language)
        keep.update(idx)
    return [ex for i, ex in enumerate(dev) if i in keep]


def trim_context(tokenizer: Any, context: str, max_tokens: int | None) -> str:
    """The context cut as LESS cuts it (evaluation/eval/tydiqa/run_eval.py): encoded with the tokenizer's special
    tokens, cut to its first `max_tokens` ids when longer, decoded; so `max_tokens` counts the leading BOS and a
    Llama context keeps 511 tokens of text at LESS's max_context_length 512 (unchanged when it fits).

    The cut is decoded without special tokens: LESS's decode leaves a literal `<s>` at the start of every cut
    context, mid-prompt; here the text is only cut."""
    if not max_tokens:
        return context
    ids = tokenizer.encode(context, verbose=False)
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
    questions_per_language: int | None = QUESTIONS_PER_LANGUAGE,
    seed: int = 42,
    kv_cache: str = "auto",
) -> dict:
    """F1 and exact match (percent): per language, and their mean over languages (`f1` is the headline).

    questions_per_language: LESS's cap, a seeded sample of that many questions per language (None: all);
    limit caps it further (the first ones, for quick runs). The demonstration of a question comes from the
    language's exemplars (`pick_demonstration`: the GoldP train set, else `tydiqa-one-shot.json`) and is
    never the question itself; a question with no other exemplar (the 9-example `_ini` dev file holds the
    one-shot exemplars themselves) runs without one, counted in `settings.no_demonstration`.
    """
    start = time.time()
    root = task_dir(data_dir, "tydiqa")
    dev_path = dev_file(root)
    dev = read_dev(dev_path)
    pool, exemplar_path = read_exemplars(root) if shots else ({}, None)
    if shots:
        missing = sorted({ex["lang"] for ex in dev} - set(pool))
        if missing:
            raise InputError(f"{exemplar_path}: no exemplar for {', '.join(missing)}; expected {SHOTS_LAYOUT}")

    picked = sample_questions(dev, questions_per_language, seed)
    if limit:
        per_lang_count: dict[str, int] = {}
        kept = []
        for ex in picked:
            n = per_lang_count.get(ex["lang"], 0)
            if n < limit:
                per_lang_count[ex["lang"]] = n + 1
                kept.append(ex)
        picked = kept

    prompts: list[str] = []
    shot_is_question = no_demonstration = 0
    trimmed: dict[int, dict] = {}
    for ex in picked:
        shot = None
        if shots:
            shot_is_question += any(is_same_question(s, ex) for s in pool[ex["lang"]])
            shot = pick_demonstration(pool[ex["lang"]], ex, ex["lang"], seed)
            if shot is None:
                no_demonstration += 1
            else:
                if id(shot) not in trimmed:
                    cut = trim_context(tokenizer, shot["context"], max_context_tokens)
                    trimmed[id(shot)] = {**shot, "context": cut}
                shot = trimmed[id(shot)]
        context = trim_context(tokenizer, ex["context"], max_context_tokens)
        prompts.append(build_prompt(ex["lang"], shot, context, ex["question"], chat_format))
    if no_demonstration:
        log.warning(
            "%d of %d TydiQA questions have no exemplar other than themselves in %s and run without a "
            "demonstration: scores are not comparable to the full dev set",
            no_demonstration,
            len(picked),
            exemplar_path.name if exemplar_path else "",
        )

    hook = ProgressHook(progress, "tydiqa")
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
            "exemplar_file": str(exemplar_path) if exemplar_path else None,
            "questions_per_language": questions_per_language,
            "seed": seed,
            "shot_is_question": shot_is_question,  # questions that are exemplars themselves (never their own shot)
            "no_demonstration": no_demonstration,
            "truncated_prompts": truncated,
        },
        "seconds": round(time.time() - start, 3),
        "predictions": predictions,
    }
