"""Target (validation) sets as prompt/completion pairs grouped into subtasks: LESS's built-ins and custom jsonl.

The built-ins follow LESS.md section 4 literally (LESS's `get_validation_dataset`):

- ``mmlu``: for every subject (sorted names of ``test/*_test.csv``) the first 5 rows of
  ``dev/<subject>_dev.csv``, zero-shot;
- ``bbh``: for every task of ``bbh-three-shot.json`` each of its 3 exemplars, the other two in context;
- ``tydiqa``: for every language of ``tydiqa-one-shot.json`` its first example.

Tokenization (``encode(prompt)``, ``encode(prompt + completion)``, labels masking the prompt) is
``lessctl.data``'s job; this module only builds the strings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config is passed in; data sits below config in the layout
    from lessctl.config import Config

import csv
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lessctl.data.encoding import join_prompt_completion
from lessctl.data.records import iter_objects, read_text, where
from lessctl.errors import ConfigError, InputError
from lessctl.files import not_a_file
from lessctl.vocab import BUILTIN_TARGETS, PROMPT_FORMATS

log = logging.getLogger(__name__)


def _target_spec(cfg: Config, name: str):
    spec = cfg.data.targets.get(name)
    if spec is None:
        known = ", ".join(cfg.data.targets) or "none"
        raise ConfigError(f"--target: unknown target {name!r} (the workspace's targets: {known})")
    if isinstance(spec, dict):
        spec = {**spec, "file": str(cfg.resolve(spec["file"]))}
    return spec


def load_target_examples(cfg: Config, name: str, tokenizer=None):
    """The target's examples; with the tokenizer, earlier assistant turns of custom targets end with eos."""
    from lessctl.data.targets import load_target

    return load_target(
        _target_spec(cfg, name),
        cfg.resolve(cfg.data.data_dir),
        name,
        cfg.model.chat_format,
        cfg.root,
        tokenizer=tokenizer,
    )


MMLU_CHOICES = ("A", "B", "C", "D")
MMLU_DEV_SHOTS = 5

# language -> (instruction, passage word, question word, answer word): open-instruct's TydiQA
# templates (with context), kept verbatim so that prompts match LESS's and open-instruct's.
TYDIQA_TEMPLATES: dict[str, tuple[str, str, str, str]] = {
    "english": (
        "Answer the following question based on the information in the given passage.",
        "Passage:",
        "Question:",
        "Answer:",
    ),
    "arabic": (
        "أجب على السؤال التالي بناءً على المعلومات في المقطع المعطى.",
        "المقطع:",
        "السؤال:",
        "الإجابة:",
    ),
    "bengali": (
        "প্রদত্ত অধ্যায়ের তথ্যের উপর ভিত্তি করে নিম্নলিখিত প্রশ্নের উত্তর দিন।",
        "অধ্যায়:",
        "প্রশ্ন:",
        "উত্তর:",
    ),
    "finnish": (
        "Vastaa seuraavaan kysymykseen annetun kappaleen tiedon perusteella.",
        "Kappale:",
        "Kysymys:",
        "Vastaus:",
    ),
    "indonesian": (
        "Jawab pertanyaan berikut berdasarkan informasi di bagian yang diberikan.",
        "Bagian:",
        "Pertanyaan:",
        "Jawaban:",
    ),
    "korean": (
        "주어진 문단의 정보에 기반하여 다음 질문에 답하십시오.",
        "문단:",
        "질문:",
        "답변:",
    ),
    "russian": (
        "Ответьте на следующий вопрос на основе информации в данном отрывке.",
        "Отрывок:",
        "Вопрос:",
        "Ответ:",
    ),
    "swahili": (
        "Jibu swali lifuatalo kulingana na habari kwenye kifungu kilichotolewa.",
        "Kifungu:",
        "Swali:",
        "Jibu:",
    ),
    "telugu": (
        "ఇచ్చిన పేరాలోని సమాచారం ఆధారంగా కింది ప్రశ్నకు సమాధానం ఇవ్వండి.",
        "పేరా:",
        "ప్రశ్న:",
        "సమాధానం:",
    ),
}

_LAYOUT = {
    "mmlu": "<data_dir>/eval/mmlu/dev/<subject>_dev.csv and <data_dir>/eval/mmlu/test/<subject>_test.csv "
    "(headerless: question,A,B,C,D,answer)",
    "bbh": "<data_dir>/eval/bbh/bbh-three-shot.json (task -> 3-shot CoT prompt)",
    "tydiqa": "<data_dir>/eval/tydiqa/tydiqa-one-shot.json (language -> [{context, question, answers}])",
}


@dataclass
class TargetExample:
    """One target example: the model sees `prompt`, the loss is taken on `completion`."""

    prompt: str
    completion: str
    subtask: str


# ----------------------------------------------------------------------------------------------
# Paths and small readers (shared with lessctl.evaluation)


def task_dir(data_dir: str | os.PathLike, task: str) -> Path:
    """The folder of one task in a LESS-layout data folder: `<data_dir>/eval/<task>`.

    `data_dir` may also be the `eval` folder itself. Raises InputError naming the layout when absent.
    """
    base = Path(data_dir)
    for cand in (base / "eval" / task, base / task):
        if cand.is_dir():
            return cand
    if not base.is_dir():
        raise InputError(
            f"data folder {base} does not exist; expected a LESS-layout folder holding eval/mmlu, eval/bbh "
            "and eval/tydiqa (set [data] data_dir or pass --data-dir)"
        )
    raise InputError(
        f"no {task} data in {base}: expected the folder {base / 'eval' / task} ({_LAYOUT.get(task, 'LESS layout')})"
    )


def require_file(path: Path, layout: str) -> Path:
    if problem := not_a_file(path, "file"):
        raise InputError(f"{problem}; expected {layout}")
    return path


def read_json(path: Path, layout: str) -> Any:
    require_file(path, layout)
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}); expected {layout}") from None


def read_mmlu_csv(path: Path) -> list[list[str]]:
    """Rows [question, A, B, C, D, answer] of a headerless MMLU csv, strings kept verbatim."""
    layout = "a headerless MMLU csv with 6 columns: question,A,B,C,D,answer"
    require_file(path, layout)
    rows: list[list[str]] = []
    for lineno, row in enumerate(csv.reader(io.StringIO(read_text(path), newline="")), start=1):
        if not row:
            continue
        if len(row) != 6 or row[5].strip() not in MMLU_CHOICES:
            raise InputError(f"{path}: row {lineno} has {len(row)} columns or a bad answer; expected {layout}")
        rows.append(row)
    return rows


def mmlu_subjects(mmlu_dir: Path) -> list[str]:
    """Sorted subject names of `test/*_test.csv` (LESS's and open-instruct's order)."""
    test = mmlu_dir / "test"
    subjects = sorted(p.name[: -len("_test.csv")] for p in test.glob("*_test.csv")) if test.is_dir() else []
    if not subjects:
        raise InputError(f"no MMLU subjects in {test}: expected files {test}/<subject>_test.csv ({_LAYOUT['mmlu']})")
    return subjects


def mmlu_header(subject: str) -> str:
    """The MMLU header; the subject gets a leading space, hence the double space after 'about'."""
    return f"The following are multiple choice questions (with answers) about {' ' + subject.replace('_', ' ')}.\n\n"


# The strings pandas.read_csv reads as NaN by default (pandas' STR_NA_VALUES): LESS reads MMLU with pandas and
# shows such a cell as "nan" (choice "None" in 10 of the 14,042 test questions).
PANDAS_NA = frozenset(
    ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA"]
    + ["NULL", "NaN", "None", "n/a", "nan", "null"]
)


def _as_pandas(cell: str) -> str:
    return "nan" if cell in PANDAS_NA else cell


def mmlu_question(row: list[str], include_answer: bool) -> str:
    """`question`, `\\n{L}. {choice}` per choice, `\\nAnswer:` (and ` {X}\\n\\n` when solved); a cell pandas
    reads as NaN is shown as "nan", as in LESS's prompts."""
    text = _as_pandas(row[0])
    for letter, choice in zip(MMLU_CHOICES, row[1:5]):
        text += f"\n{letter}. {_as_pandas(choice)}"
    text += "\nAnswer:"
    if include_answer:
        text += f" {row[5].strip()}\n\n"
    return text


# ----------------------------------------------------------------------------------------------
# Chat formats


def _check_chat_format(chat_format: str) -> None:
    if chat_format not in PROMPT_FORMATS:
        raise ConfigError(f"unknown chat format {chat_format!r}; expected one of {', '.join(PROMPT_FORMATS)}")


def wrap_user_turn(user_text: str, assistant_prefix: str, chat_format: str, *, sep: str = "\n") -> str:
    """One user turn followed by the start of the assistant's turn.

    tulu: `<|user|>\\n{user}{sep}<|assistant|>\\n{prefix}`; llama2: `[INST] {user} [/INST] {prefix}`;
    plain: `{user}{sep}{prefix}`.
    """
    if chat_format == "tulu":
        return "<|user|>\n" + user_text + sep + "<|assistant|>\n" + assistant_prefix
    if chat_format == "llama2":
        return "[INST] " + user_text.strip() + " [/INST] " + assistant_prefix
    return user_text + sep + assistant_prefix


def split_messages(messages: list[dict], chat_format: str, tokenizer: Any = None) -> tuple[str, str]:
    """(prompt, completion) of a conversation whose last message is the assistant reply to learn.

    tulu and llama2 are `lessctl.data`'s chat formats (the training text) cut before the final reply;
    the completion is that reply as training writes it (llama2: with its leading space), without
    the eos. The tokenizer gives the eos (and llama2's bos) strings written after earlier turns
    (none without one). plain: every earlier content, stripped, followed by a blank line; the reply
    stripped.
    """
    if chat_format == "plain":
        return "".join(m["content"].strip() + "\n\n" for m in messages[:-1]), messages[-1]["content"].strip()
    from types import SimpleNamespace

    from lessctl.data.encoding import chat_segments

    eos = getattr(tokenizer, "eos_token", None) or ""
    bos = getattr(tokenizer, "bos_token", None) or ""
    segments = chat_segments(messages, SimpleNamespace(eos_token=eos, bos_token=bos), chat_format)
    reply = chat_segments(messages, SimpleNamespace(eos_token="", bos_token=""), chat_format)[-1][0]
    return "".join(text for text, _ in segments[:-1]), reply.rstrip()


# ----------------------------------------------------------------------------------------------
# Built-in targets


def _mmlu_target(data_dir: Path, chat_format: str) -> list[TargetExample]:
    mmlu = task_dir(data_dir, "mmlu")
    out: list[TargetExample] = []
    for subject in mmlu_subjects(mmlu):
        rows = read_mmlu_csv(mmlu / "dev" / f"{subject}_dev.csv")[:MMLU_DEV_SHOTS]
        for row in rows:
            prompt = mmlu_header(subject) + mmlu_question(row, include_answer=False)
            if chat_format != "plain":
                prompt = wrap_user_turn(prompt, "The answer is:", chat_format)
            out.append(TargetExample(prompt=prompt, completion=" " + row[5].strip(), subtask=subject))
    return out


def _bbh_target(data_dir: Path, chat_format: str) -> list[TargetExample]:
    path = task_dir(data_dir, "bbh") / "bbh-three-shot.json"
    shots = read_json(path, _LAYOUT["bbh"])
    if not isinstance(shots, dict) or not all(isinstance(v, str) for v in shots.values()):
        raise InputError(f"{path}: expected a JSON object mapping each task to its 3-shot prompt text")
    out: list[TargetExample] = []
    for task, text in shots.items():
        blocks = text.split("\n\n")
        exemplars, task_prompt = blocks[-3:], "\n\n".join(blocks[:-3])
        if len(blocks) < 4 or not all(b.count("\nA:") == 1 for b in exemplars):
            raise InputError(
                f"{path}: task {task!r} does not end in three exemplars 'Q: ...\\nA: ...' separated by blank lines"
            )
        for i, exemplar in enumerate(exemplars):
            icl = "".join(
                q + "\nA:" + a + "\n\n" for q, a in (e.split("\nA:") for j, e in enumerate(exemplars) if j != i)
            )
            question, answer = exemplar.split("\nA:")
            user = task_prompt.strip() + "\n\n" + icl + question
            prompt = wrap_user_turn(user, "A:", chat_format)
            out.append(TargetExample(prompt=prompt, completion=answer, subtask=task))
    return out


def tydiqa_user_text(lang: str, context: str, question: str) -> str:
    """instruction + passage word + ' ' + context + '\\n' + question word + ' ' + question + '\\n'.

    No separator after the instruction: LESS's quirk, kept for comparability (LESS.md section 4).
    """
    instruction, passage_word, question_word, _ = TYDIQA_TEMPLATES[lang]
    return instruction + passage_word + " " + context + "\n" + question_word + " " + question + "\n"


def _tydiqa_target(data_dir: Path, chat_format: str) -> list[TargetExample]:
    path = task_dir(data_dir, "tydiqa") / "tydiqa-one-shot.json"
    data = read_json(path, _LAYOUT["tydiqa"])
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected {_LAYOUT['tydiqa']}")
    out: list[TargetExample] = []
    for lang, examples in data.items():
        if lang not in TYDIQA_TEMPLATES:
            raise InputError(f"{path}: unknown language {lang!r}; expected one of {', '.join(TYDIQA_TEMPLATES)}")
        try:
            ex = examples[0]
            context, question, answer = ex["context"], ex["question"], ex["answers"][0]["text"]
        except (IndexError, KeyError, TypeError):
            raise InputError(f"{path}: language {lang!r} needs [{{context, question, answers: [{{text}}]}}]") from None
        answer_word = TYDIQA_TEMPLATES[lang][3]
        prompt = wrap_user_turn(tydiqa_user_text(lang, context, question), answer_word, chat_format, sep="")
        out.append(TargetExample(prompt=prompt, completion=" " + answer, subtask=lang))
    return out


_BUILTIN_LOADERS = {"mmlu": _mmlu_target, "bbh": _bbh_target, "tydiqa": _tydiqa_target}


# ----------------------------------------------------------------------------------------------
# Custom targets


def _custom_path(spec: dict, root: Path | None) -> Path:
    if "file" not in spec or not isinstance(spec["file"], (str, os.PathLike)):
        raise ConfigError(f"custom target {spec!r} needs file = \"path.jsonl\"")
    p = Path(os.path.expanduser(str(spec["file"])))
    return p if p.is_absolute() or root is None else Path(root) / p


def _custom_target(spec: dict, name: str, chat_format: str, root: Path | None, tokenizer: Any) -> list[TargetExample]:
    path = _custom_path(spec, root)
    key = spec.get("subtask_key") or "subtask"
    layout = 'one JSON object a line, {"messages": [...]} or {"prompt": ..., "completion": ...}, optional "' + key + '"'
    require_file(path, layout)
    out: list[TargetExample] = []
    for number, _, rec in iter_objects(path, layout, (("messages",), ("prompt", "completion"))):
        at = where(path, number)
        subtask = rec.get(key)
        subtask = name if subtask is None else str(subtask)
        if "messages" in rec:
            msgs = rec["messages"]
            if (
                not isinstance(msgs, list)
                or not msgs
                or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs)
                or not all(m.get("role") in ("system", "user", "assistant") for m in msgs)
            ):
                raise InputError(f"{at}: messages must be a list of {{role: system|user|assistant, content: str}}")
            if msgs[-1]["role"] != "assistant":
                raise InputError(f"{at}: the last message must be the assistant's (the completion)")
            prompt, completion = split_messages(msgs, chat_format, tokenizer)
            out.append(TargetExample(prompt, completion, subtask))
        elif isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str):
            # The completion gets the space that training's join puts between the two sides.
            prompt = rec["prompt"]
            joined = join_prompt_completion(prompt, rec["completion"])
            out.append(TargetExample(prompt, joined[len(prompt) :], subtask))
        else:
            raise InputError(f"{at}: expected {layout}")
    if not out:
        raise InputError(f"{path}: no examples; expected {layout}")
    return out


# ----------------------------------------------------------------------------------------------
# Public entry points


def load_target(
    spec: str | dict,
    data_dir: str | os.PathLike,
    name: str,
    chat_format: str = "tulu",
    root: Path | None = None,
    *,
    tokenizer: Any = None,
) -> list[TargetExample]:
    """The examples of one target, in LESS's order, each tagged with its subtask.

    spec: "mmlu" | "bbh" | "tydiqa" (read from the LESS-layout `data_dir`) or {"file": path,
    "subtask_key": key} (a jsonl of messages or prompt/completion records; relative paths are
    relative to `root`). chat_format: "tulu" (LESS's default), "llama2" or "plain" (LESS's
    non-chat variant). The tokenizer only gives the eos/bos strings that the chat formats write
    after earlier assistant turns of multi-turn custom targets.
    """
    _check_chat_format(chat_format)
    if isinstance(spec, str):
        if spec not in _BUILTIN_LOADERS:
            raise ConfigError(
                f"target {name!r}: unknown built-in target {spec!r}; expected one of {', '.join(BUILTIN_TARGETS)} "
                'or {file = "path.jsonl"}'
            )
        return _BUILTIN_LOADERS[spec](Path(data_dir), chat_format)
    if isinstance(spec, dict):
        return _custom_target(spec, name, chat_format, root, tokenizer)
    raise ConfigError(f"target {name!r}: expected a built-in name or {{file = \"path.jsonl\"}}, got {spec!r}")


def target_source_files(spec: str | dict, data_dir: str | os.PathLike, root: Path | None = None) -> list[Path]:
    """The files `load_target` reads for `spec`, in a fixed order (for hashing into provenance)."""
    if isinstance(spec, dict):
        return [_custom_path(spec, root)]
    if spec == "mmlu":
        mmlu = task_dir(data_dir, "mmlu")
        return [mmlu / "dev" / f"{s}_dev.csv" for s in mmlu_subjects(mmlu)]
    if spec == "bbh":
        return [task_dir(data_dir, "bbh") / "bbh-three-shot.json"]
    if spec == "tydiqa":
        return [task_dir(data_dir, "tydiqa") / "tydiqa-one-shot.json"]
    raise ConfigError(f"unknown built-in target {spec!r}; expected one of {', '.join(BUILTIN_TARGETS)}")


def subtask_names(examples: list[TargetExample]) -> list[str]:
    """Subtask names in order of first appearance (LESS's order for the built-ins)."""
    return list(dict.fromkeys(e.subtask for e in examples))


def subtask_indices(examples: list[TargetExample]) -> dict[str, list[int]]:
    """{subtask: [row indices]} in order of first appearance: the groups that selection averages over."""
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(e.subtask, []).append(i)
    return groups
