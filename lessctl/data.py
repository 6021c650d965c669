"""Reading training pools and targets, chat formats, and tokenization with label masks (LESS.md section 1)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from lessctl.errors import InputError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
CHAT_FORMATS = ("tulu", "llama2")


@dataclass(frozen=True)
class Record:
    """One line of a jsonl data file: its 0-based line number, the raw line, and the parsed object."""

    line: int
    raw: str
    data: dict


@dataclass
class Encoded:
    """A tokenized example: input ids, labels (-100 where masked), and where it came from."""

    input_ids: list[int]
    labels: list[int]
    line: int = -1
    source: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def n_label_tokens(self) -> int:
        # The first token is never predicted (labels are shifted), so it does not count.
        return sum(1 for x in self.labels[1:] if x != IGNORE_INDEX)


def iter_json_lines(path: str | Path, expected: str = "one JSON object a line") -> Iterator[tuple[int, str, dict]]:
    """(1-based line number, raw line, object) for every non-blank line of a jsonl file.

    A line that is not a JSON object is an InputError naming `file:line` and what was expected.
    """
    with open(path, encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno}); expected {expected}") from None
            if not isinstance(obj, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object per line ({expected})")
            yield lineno, raw, obj


def read_jsonl(path: str | Path) -> list[Record]:
    """Reads a jsonl data file, validating each record; a bad line is an InputError naming `file:line`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such data file")
    records: list[Record] = []
    for lineno, raw, obj in iter_json_lines(path, 'one example a line, {"messages": [...]} or {"prompt", "completion"}'):
        validate_example(obj, f"{path}:{lineno}")
        records.append(Record(lineno - 1, raw.rstrip("\n"), obj))
    if not records:
        raise InputError(f"{path}: the file holds no examples")
    return records


def validate_example(obj: dict, where: str) -> None:
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise InputError(f"{where}: 'messages' must be a non-empty list")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise InputError(f"{where}: messages[{j}] needs 'role' and 'content'")
            if m["role"] not in ROLES:
                raise InputError(f"{where}: messages[{j}] has unknown role {m['role']!r} (expected system, user or assistant)")
            if not isinstance(m["content"], str):
                raise InputError(f"{where}: messages[{j}].content must be a string")
    elif "prompt" in obj and "completion" in obj:
        if not isinstance(obj["prompt"], str) or not isinstance(obj["completion"], str):
            raise InputError(f"{where}: 'prompt' and 'completion' must be strings")
    else:
        raise InputError(f"{where}: expected 'messages' or 'prompt' and 'completion'")


# --------------------------------------------------------------------------- chat formats


def _segments_tulu(messages: Sequence[dict], eos: str) -> list[tuple[str, bool]]:
    """Text pieces and whether each is trained on, following LESS's encode_with_messages_format.

    A non-assistant message's masked span also covers the `<|assistant|>\\n` marker when the next
    message is the assistant's, exactly as LESS computes it from prefix token lengths.
    """
    segs: list[tuple[str, bool]] = []
    for i, m in enumerate(messages):
        content = m["content"].strip()
        if m["role"] == "assistant":
            prev_marked = i > 0 and messages[i - 1]["role"] != "assistant"
            text = ("" if prev_marked else "<|assistant|>\n") + content + eos + "\n"
            segs.append((text, True))
        else:
            text = f"<|{m['role']}|>\n{content}\n"
            if i + 1 < len(messages) and messages[i + 1]["role"] == "assistant":
                text += "<|assistant|>\n"
            segs.append((text, False))
    return segs


def _segments_llama2(messages: Sequence[dict], bos: str, eos: str) -> list[tuple[str, bool]]:
    """Llama-2 chat: `<s>[INST] <<SYS>>\\n{sys}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>` per turn."""
    segs: list[tuple[str, bool]] = []
    system = ""
    pending_user: str | None = None
    for m in messages:
        content = m["content"].strip()
        if m["role"] == "system":
            system = content
        elif m["role"] == "user":
            if pending_user is not None:  # two user turns in a row: close the first without an answer
                segs.append((pending_user + " [/INST]", False))
            sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else ""
            system = ""
            pending_user = f"{bos}[INST] {sys_block}{content}"
        else:
            if pending_user is not None:
                segs.append((pending_user + " [/INST]", False))
                pending_user = None
            segs.append((f" {content} {eos}", True))
    if pending_user is not None:
        segs.append((pending_user + " [/INST]", False))
    return segs


def chat_segments(messages: Sequence[dict], tokenizer: Any, chat_format: str = "tulu") -> list[tuple[str, bool]]:
    if chat_format == "tulu":
        return _segments_tulu(messages, tokenizer.eos_token)
    if chat_format == "llama2":
        return _segments_llama2(messages, tokenizer.bos_token or "", tokenizer.eos_token)
    raise InputError(f"unknown chat format {chat_format!r} (expected one of {', '.join(CHAT_FORMATS)})")


def format_chat(messages: Sequence[dict], tokenizer: Any, chat_format: str = "tulu") -> str:
    return "".join(t for t, _ in chat_segments(messages, tokenizer, chat_format))


def _n_tokens(tokenizer: Any, text: str, max_len: int, special: bool = True) -> int:
    return len(tokenizer(text, max_length=max_len, truncation=True, add_special_tokens=special)["input_ids"])


def encode_messages(messages: Sequence[dict], tokenizer: Any, max_len: int, chat_format: str = "tulu") -> tuple[list[int], list[int]]:
    """Tokenizes the whole conversation once; masks every non-trained span by prefix token lengths."""
    segs = chat_segments(messages, tokenizer, chat_format)
    text = "".join(t for t, _ in segs)
    special = chat_format != "llama2"  # llama2 text already holds its <s>: adding one more would double it
    ids = list(tokenizer(text, max_length=max_len, truncation=True, add_special_tokens=special)["input_ids"])
    labels = list(ids)
    prefix = ""
    for j, (seg, trained) in enumerate(segs):
        start_text = prefix
        prefix += seg
        if trained:
            continue
        start = 0 if j == 0 else _n_tokens(tokenizer, start_text, max_len, special)
        end = _n_tokens(tokenizer, prefix, max_len, special)
        for k in range(start, min(end, len(labels))):
            labels[k] = IGNORE_INDEX
        if end >= max_len:
            break
    return ids, labels


def join_prompt_completion(prompt: str, completion: str) -> str:
    if not prompt.endswith((" ", "\n", "\t")) and not completion.startswith((" ", "\n", "\t")):
        return prompt + " " + completion
    return prompt + completion


def encode_prompt_completion(prompt: str, completion: str, tokenizer: Any, max_len: int) -> tuple[list[int], list[int]]:
    """Training-pool prompt/completion: prompt [+ ' '] + completion + eos; the prompt's tokens are masked."""
    text = join_prompt_completion(prompt, completion) + tokenizer.eos_token
    ids = list(tokenizer(text, max_length=max_len, truncation=True)["input_ids"])
    labels = list(ids)
    n_prompt = _n_tokens(tokenizer, prompt, max_len)
    for k in range(min(n_prompt, len(labels))):
        labels[k] = IGNORE_INDEX
    return ids, labels


def encode_target(prompt: str, completion: str, tokenizer: Any, max_len: int) -> tuple[list[int], list[int]]:
    """Target examples as LESS tokenizes them: encode(prompt + completion), the prompt's tokens masked."""
    ids = list(tokenizer(prompt + completion, max_length=max_len, truncation=True)["input_ids"])
    labels = list(ids)
    n_prompt = _n_tokens(tokenizer, prompt, max_len)
    for k in range(min(n_prompt, len(labels))):
        labels[k] = IGNORE_INDEX
    return ids, labels


def encode_record(rec: Record, tokenizer: Any, max_len: int, chat_format: str = "tulu", source: str = "") -> Encoded:
    obj = rec.data
    if "messages" in obj:
        ids, labels = encode_messages(obj["messages"], tokenizer, max_len, chat_format)
    else:
        ids, labels = encode_prompt_completion(obj["prompt"], obj["completion"], tokenizer, max_len)
    return Encoded(ids, labels, rec.line, source)


def example_text(obj: dict) -> str:
    """All message contents joined by a space (BM25's view of a training example)."""
    if "messages" in obj:
        return " ".join(m["content"] for m in obj["messages"])
    return obj["prompt"] + " " + obj["completion"]


# --------------------------------------------------------------------------- subsets


def subset_indices(n: int, percentage: float, seed: int) -> np.ndarray:
    """LESS's warmup subset: `np.random.seed(seed); permutation(n)[:int(n * p)]`; p = 1 keeps file order."""
    size = int(n * percentage)
    if size >= n:
        return np.arange(n)
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return np.random.permutation(n)[:size]
    finally:
        np.random.set_state(state)


@dataclass
class Pool:
    """The training files of a workspace read in config order, concatenated (as LESS concatenates them)."""

    files: dict[str, Path]
    records: dict[str, list[Record]]

    @classmethod
    def read(cls, files: dict[str, Path]) -> "Pool":
        return cls(dict(files), {name: read_jsonl(p) for name, p in files.items()})

    def flat(self) -> list[tuple[str, Record]]:
        return [(name, r) for name, recs in self.records.items() for r in recs]

    def __len__(self) -> int:
        return sum(len(v) for v in self.records.values())


def build_training_set(
    files: dict[str, Path], tokenizer: Any, max_len: int, chat_format: str, percentage: float, seed: int
) -> tuple[list[Encoded], dict[str, int]]:
    """The examples one trains on: the seeded subset of the pooled files, tokenized, fully-masked ones dropped.

    Returns the examples and counts {"pool", "subset", "dropped_no_labels"}.
    """
    pool = Pool.read(files).flat()
    idx = subset_indices(len(pool), percentage, seed)
    out: list[Encoded] = []
    dropped = 0
    for i in idx:
        name, rec = pool[int(i)]
        enc = encode_record(rec, tokenizer, max_len, chat_format, source=name)
        if enc.n_label_tokens == 0:
            dropped += 1
            continue
        out.append(enc)
    if dropped:
        log.warning("%d of %d examples have no trainable tokens after truncation and were skipped", dropped, len(idx))
    return out, {"pool": len(pool), "subset": int(len(idx)), "dropped_no_labels": dropped}
