"""Chat formats (tulu, llama2) and tokenization with label masks exactly as LESS encodes its training data."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

from lessctl.data.records import Record
from lessctl.errors import InputError
from lessctl.vocab import CHAT_FORMATS

log = logging.getLogger(__name__)


IGNORE_INDEX = -100


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


def encode_messages(
    messages: Sequence[dict], tokenizer: Any, max_len: int, chat_format: str = "tulu"
) -> tuple[list[int], list[int]]:
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
