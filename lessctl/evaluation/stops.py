"""Stop strings checked on token ids during generation, with a text check only where a stop may have ended.

A stop string first appears in the decoded continuation at the step whose token adds its last
character. So a row needs its text looked at only when its newest token's text holds the last
character of some stop string: a lookup of the token id in a table built once per tokenizer, on the
model's device. Those few rows (a newline token, for the stops "\\n" and "\\n\\n") get the text check
the evaluation has always used: the decoded last `window` new tokens hold a stop string. The table is
exact for stop strings ending in an ASCII character other than a space (a byte-level or SentencePiece
token that adds such a character shows it when decoded alone); for any other stop string every row
is checked at every step.
"""

from __future__ import annotations

import weakref
from typing import Any, Sequence

from transformers import StoppingCriteria

_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _prefilter_safe(stop: str) -> bool:
    return bool(stop) and stop[-1].isascii() and stop[-1] != " "


def candidate_table(tokenizer: Any, stops: Sequence[str]):
    """A bool tensor [len(tokenizer)]: the tokens whose decoded text holds the last character of a stop
    string (None when a stop string's last character is not one the table can vouch for)."""
    import torch

    if not stops or not all(_prefilter_safe(s) for s in stops):
        return None
    key = tuple(sorted({s[-1] for s in stops}))
    try:
        per_tok = _TABLES.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: no cache
        per_tok = {}
    if key not in per_tok:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
        per_tok[key] = torch.tensor([any(c in t for c in key) for t in texts], dtype=torch.bool)
    return per_tok[key]


def text_has_stop(text: str, stops: Sequence[str]) -> bool:
    return any(s in text for s in stops)


class StopOnTokenIds(StoppingCriteria):
    """Marks each row done (for good) once its new text holds a stop string.

    prompt_len: the width of the (left-padded) prompt batch; only tokens after it are new. `checks`
    counts the rows whose text was decoded, `steps` the calls. after_text: a stop counts only after the
    row's first non-blank character (LESS strips a BBH generation's leading blank lines and reads on): a
    row whose new text is all whitespace so far is decoded whole at every step, and once it has text its
    stop check starts at the token that brought it.
    """

    def __init__(
        self, tokenizer: Any, stops: Sequence[str], prompt_len: int, window: int = 16, after_text: bool = False
    ):
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.prompt_len = prompt_len
        self.window = window
        self.table = candidate_table(tokenizer, self.stops)
        self._on = None  # the table on the model's device
        self.done = None
        self.checks = 0
        self.steps = 0
        self.after_text = after_text
        self.lead: dict[int, int] = {}  # row -> new tokens before its first text (after_text)

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.steps += 1
        if self.done is None:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        n_new = input_ids.shape[1] - self.prompt_len
        if n_new <= 0:
            return self.done.clone()
        if self.table is None:
            rows = (~self.done).nonzero().flatten().tolist()
        else:
            if self._on is None:
                self._on = self.table.to(input_ids.device)
            last = input_ids[:, -1]
            size = self._on.shape[0]
            # ids beyond the tokenizer's vocabulary (a padded embedding) are checked, not trusted
            cand = torch.where(last < size, self._on[last.clamp(max=size - 1)], True) & ~self.done
            rows = cand.nonzero().flatten().tolist()
        if self.after_text:
            rows = sorted(set(rows) | {r for r in range(input_ids.shape[0]) if r not in self.lead and not self.done[r]})
        if rows:
            start = input_ids.shape[1] - min(n_new, self.window)
            self.checks += len(rows)
            decode = self.tokenizer.decode
            if self.after_text:
                hits = [r for r in rows if self._after_text_hit(input_ids, r, n_new, decode)]
            else:
                windows = input_ids[rows, start:].tolist()
                hits = [
                    r for r, w in zip(rows, windows) if text_has_stop(decode(w, skip_special_tokens=True), self.stops)
                ]
            if hits:
                self.done[torch.tensor(hits, device=input_ids.device)] = True
        return self.done.clone()

    def _after_text_hit(self, input_ids, r: int, n_new: int, decode) -> bool:
        if r not in self.lead:  # no text yet: the whole (blank) continuation
            text = decode(input_ids[r, self.prompt_len :].tolist(), skip_special_tokens=True)
            if not text.strip():
                return False
            self.lead[r] = n_new - 1  # the newest token brought the first text
            return text_has_stop(text.lstrip(), self.stops)
        first = self.prompt_len + self.lead[r]
        start = max(first, input_ids.shape[1] - self.window)
        text = decode(input_ids[r, start:].tolist(), skip_special_tokens=True)
        return text_has_stop(text.lstrip() if start == first else text, self.stops)
