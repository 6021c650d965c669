"""Chat formats (tulu, llama2) and tokenization with label masks exactly as LESS encodes its training data."""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

from lessctl.data.records import Record
from lessctl.errors import InputError, warn
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
    untruncated_tokens: int | None = None  # the length before the cut at max_seq_length
    untruncated_label_tokens: int | None = None  # label tokens before the cut (counted as n_label_tokens)

    @property
    def n_label_tokens(self) -> int:
        # The first token is never predicted (labels are shifted), so it does not count.
        return sum(1 for x in self.labels[1:] if x != IGNORE_INDEX)

    @property
    def truncated(self) -> bool:
        return self.untruncated_tokens is not None and self.untruncated_tokens > len(self.input_ids)


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


def _tokenize(tokenizer: Any, text: str, special: bool = True) -> list[int]:
    """The token ids of `text`, untruncated (the caller cuts them; no warning about the model's context)."""
    return list(tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"])


_PREFIX_CUT: "weakref.WeakKeyDictionary[Any, dict[bool, bool]]" = weakref.WeakKeyDictionary()


def _truncation_is_a_prefix(tokenizer: Any, special: bool) -> bool:
    """Whether the tokenizer's truncation at max_length is the first max_length ids of the untruncated encoding
    (true unless it appends special tokens after the text); checked once per tokenizer."""
    try:
        known = _PREFIX_CUT.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: check every time
        known = {}
    if special not in known:
        probe = "one two three four five six seven eight"
        full = _tokenize(tokenizer, probe, special)
        n = max(1, len(full) - 2)
        cut = list(tokenizer(probe, max_length=n, truncation=True, add_special_tokens=special)["input_ids"])
        known[special] = cut == full[:n]
    return known[special]


def _encode_masked(
    tokenizer: Any, text: str, masked_spans: list[tuple[int, int]], max_len: int, special: bool
) -> tuple[list[int], list[int], int, int]:
    """(ids, labels) of `text` truncated at `max_len` as the tokenizer truncates, with the token spans
    [start, end) of the untruncated encoding masked; plus the untruncated encoding's token and label counts.

    The text is tokenized once, untruncated; the cut is its first max_len ids (tokenized again, with truncation,
    only for a tokenizer that appends special tokens after the text and only when the text is too long).
    """
    full = _tokenize(tokenizer, text, special)
    keep = [True] * len(full)
    for start, end in masked_spans:
        for k in range(max(0, start), min(end, len(full))):
            keep[k] = False
    full_labels = sum(keep[1:])  # the first token is never predicted
    if len(full) <= max_len:
        ids = full
    elif _truncation_is_a_prefix(tokenizer, special):
        ids = full[:max_len]
    else:
        ids = list(tokenizer(text, max_length=max_len, truncation=True, add_special_tokens=special)["input_ids"])
    labels = [x if k < len(keep) and keep[k] else IGNORE_INDEX for k, x in enumerate(ids)]
    return ids, labels, len(full), full_labels


def _encode_messages(
    messages: Sequence[dict], tokenizer: Any, max_len: int, chat_format: str
) -> tuple[list[int], list[int], int, int]:
    segs = chat_segments(messages, tokenizer, chat_format)
    text = "".join(t for t, _ in segs)
    special = chat_format != "llama2"  # llama2 text already holds its <s>: adding one more would double it
    spans = []
    prefix = ""
    for j, (seg, trained) in enumerate(segs):
        start_text = prefix
        prefix += seg
        if trained:
            continue
        start = 0 if j == 0 else len(_tokenize(tokenizer, start_text, special))
        spans.append((start, len(_tokenize(tokenizer, prefix, special))))
    return _encode_masked(tokenizer, text, spans, max_len, special)


def encode_messages(
    messages: Sequence[dict], tokenizer: Any, max_len: int, chat_format: str = "tulu"
) -> tuple[list[int], list[int]]:
    """Tokenizes the whole conversation once; masks every non-trained span by prefix token lengths."""
    ids, labels, _, _ = _encode_messages(messages, tokenizer, max_len, chat_format)
    return ids, labels


def join_prompt_completion(prompt: str, completion: str) -> str:
    if not prompt.endswith((" ", "\n", "\t")) and not completion.startswith((" ", "\n", "\t")):
        return prompt + " " + completion
    return prompt + completion


def _encode_prompt_completion(prompt: str, completion: str, tokenizer: Any, max_len: int):
    text = join_prompt_completion(prompt, completion) + tokenizer.eos_token
    return _encode_masked(tokenizer, text, [(0, len(_tokenize(tokenizer, prompt)))], max_len, True)


def encode_prompt_completion(prompt: str, completion: str, tokenizer: Any, max_len: int) -> tuple[list[int], list[int]]:
    """Training-pool prompt/completion: prompt [+ ' '] + completion + eos; the prompt's tokens are masked."""
    ids, labels, _, _ = _encode_prompt_completion(prompt, completion, tokenizer, max_len)
    return ids, labels


def encode_target_example(
    prompt: str, completion: str, tokenizer: Any, max_len: int, line: int = -1, source: str = "", meta=None
) -> Encoded:
    """A target example as LESS tokenizes it (`encode_target`), with its untruncated counts."""
    spans = [(0, len(_tokenize(tokenizer, prompt)))]
    ids, labels, n_full, n_labels = _encode_masked(tokenizer, prompt + completion, spans, max_len, True)
    return Encoded(ids, labels, line, source, dict(meta or {}), n_full, n_labels)


def encode_target(prompt: str, completion: str, tokenizer: Any, max_len: int) -> tuple[list[int], list[int]]:
    """Target examples as LESS tokenizes them: encode(prompt + completion), the prompt's tokens masked."""
    enc = encode_target_example(prompt, completion, tokenizer, max_len)
    return enc.input_ids, enc.labels


def encode_record(rec: Record, tokenizer: Any, max_len: int, chat_format: str = "tulu", source: str = "") -> Encoded:
    obj = rec.data
    if "messages" in obj:
        ids, labels, n_full, n_labels = _encode_messages(obj["messages"], tokenizer, max_len, chat_format)
    else:
        ids, labels, n_full, n_labels = _encode_prompt_completion(obj["prompt"], obj["completion"], tokenizer, max_len)
    return Encoded(ids, labels, rec.line, source, {}, n_full, n_labels)


# --------------------------------------------------------------------------- what truncation costs

LOST_LABEL_SHARE_WARNING = 0.05
"""A data set whose cut at max_seq_length loses more than this share of its label tokens gets a warning."""


@dataclass
class TruncationReport:
    """What the cut at max_seq_length cost a data set: examples cut, and their label tokens lost.

    Label tokens are counted as `Encoded.n_label_tokens` counts them, before the cut (untruncated encoding) and
    after; an example left without a label token by the cut lost all of its own.
    """

    max_seq_length: int
    examples: int = 0
    truncated: int = 0  # examples longer than max_seq_length
    label_tokens: int = 0  # of every example, before the cut
    truncated_label_tokens: int = 0  # of the examples cut, before the cut
    lost_label_tokens: int = 0

    @classmethod
    def of(cls, encoded: Sequence[Encoded], max_seq_length: int) -> "TruncationReport":
        rep = cls(max_seq_length)
        for e in encoded:
            full = e.n_label_tokens if e.untruncated_label_tokens is None else e.untruncated_label_tokens
            rep.examples += 1
            rep.label_tokens += full
            if e.truncated:
                rep.truncated += 1
                rep.truncated_label_tokens += full
                rep.lost_label_tokens += max(0, full - e.n_label_tokens)
        return rep

    @classmethod
    def from_dict(cls, d: dict) -> "TruncationReport":
        return cls(**{k: int(d[k]) for k in cls.__dataclass_fields__ if k in d})

    @property
    def lost_label_share(self) -> float:
        """The share of the data set's label tokens the cut removed."""
        return self.lost_label_tokens / self.label_tokens if self.label_tokens else 0.0

    @property
    def lost_label_share_of_truncated(self) -> float:
        """The share of the cut examples' own label tokens the cut removed."""
        return self.lost_label_tokens / self.truncated_label_tokens if self.truncated_label_tokens else 0.0

    @property
    def too_costly(self) -> bool:
        return self.lost_label_share > LOST_LABEL_SHARE_WARNING

    def to_dict(self) -> dict:
        return {
            "max_seq_length": self.max_seq_length,
            "examples": self.examples,
            "truncated": self.truncated,
            "label_tokens": self.label_tokens,
            "truncated_label_tokens": self.truncated_label_tokens,
            "lost_label_tokens": self.lost_label_tokens,
            "lost_label_share": round(self.lost_label_share, 6),
            "lost_label_share_of_truncated": round(self.lost_label_share_of_truncated, 6),
        }

    def describe(self, name: str) -> str:
        """One line: `NAME: max_seq_length L cut C of N examples; X% of the label tokens lost (...)`."""
        text = f"{name}: max_seq_length {self.max_seq_length} cut {self.truncated} of {self.examples} examples"
        if not self.truncated:
            return text
        return (
            f"{text}; {self.lost_label_share:.1%} of the label tokens lost ({self.lost_label_tokens:,} of "
            f"{self.label_tokens:,}; the cut examples lost {self.lost_label_share_of_truncated:.1%} of theirs)"
        )

    def log(self, name: str) -> None:
        """A `warning:` line when the cut loses more than LOST_LABEL_SHARE_WARNING of the label tokens; otherwise
        the figures at info level (shown with --debug)."""
        if self.too_costly:
            warn(
                log,
                f"{self.describe(name)}. Over {LOST_LABEL_SHARE_WARNING:.0%} of the label tokens are lost: raise "
                "[model] max_seq_length or shorten the examples",
            )
        elif self.truncated:
            log.info("%s", self.describe(name))
