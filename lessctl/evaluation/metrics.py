"""The scoring rules of the three evaluations: SQuAD F1/EM, BBH answer extraction and exact match, MMLU's choice.

Written here (not downloaded at run time) to match the definitions open-instruct uses: the `squad`
metric of `evaluate` (TydiQA) and `exact_match` with `ignore_case` and `ignore_punctuation` (BBH).
Scores are fractions in [0, 1] here; the harnesses report percentages.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

_PUNCT = set(string.punctuation)
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# open-instruct's BBH pattern: "the answer is X." (so "So the answer is (B)." gives "(B)").
_ANSWER_IS = re.compile(r"So the answer is (.*?)\.")  # open-instruct's BBH pattern, exactly


def normalize_squad(text: str) -> str:
    """SQuAD's normalization: lower case, punctuation and articles removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def squad_exact_match(prediction: str, truth: str) -> float:
    return float(normalize_squad(prediction) == normalize_squad(truth))


def squad_f1(prediction: str, truth: str) -> float:
    """Token-overlap F1 of the normalized strings (0 when either side has no tokens and they differ)."""
    pred, gold = normalize_squad(prediction).split(), normalize_squad(truth).split()
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_scores(prediction: str, truths: Sequence[str]) -> tuple[float, float]:
    """(exact match, F1) of one prediction: the best over the gold answers, as SQuAD's script takes."""
    if not truths:
        return 0.0, 0.0
    return max(squad_exact_match(prediction, t) for t in truths), max(squad_f1(prediction, t) for t in truths)


def extract_bbh_answer(output: str) -> str:
    """The text of the first "So the answer is (.*?)." when the output has it, else its first paragraph, stripped
    (open-instruct's BBH extraction)."""
    m = _ANSWER_IS.search(output)
    if m:
        return m.group(1).strip()
    return output.strip().split("\n\n")[0].strip()


def normalize_em(text: str) -> str:
    """`exact_match` with ignore_case and ignore_punctuation: lower case, string.punctuation removed.

    Spaces are kept (not stripped): Dyck answers such as ") ] }" become only spaces, and their count
    still tells answers of different lengths apart.
    """
    return text.lower().translate(_PUNCT_TABLE)


def bbh_exact_match(prediction: str, target: str) -> float:
    return float(normalize_em(prediction) == normalize_em(target))


def pick_choice(choice_logits: Sequence[float]) -> int:
    """Index of the most likely choice (the first one on ties, like argmax)."""
    best = 0
    for i, v in enumerate(choice_logits):
        if v > choice_logits[best]:
            best = i
    return best


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0
