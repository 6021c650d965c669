"""The tiny offline workspace: a synthetic instruction pool, a BPE tokenizer trained on it, a small Llama.

Everything is generated locally and saved as ordinary Hugging Face folders and jsonl files, so every
later command loads them exactly like a real model and real data. Each example carries its `family`,
so selection quality (the share of selected examples from the target's family) is measurable.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

WORDS = (
    "apple river stone cloud tiger maple ocean candle silver garden piano rocket forest lemon "
    "violet castle bridge desert winter yellow orange falcon pepper marble summer shadow"
).split()
ANTONYMS = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "happy": "sad",
    "light": "dark",
    "early": "late",
    "open": "closed",
    "up": "down",
    "full": "empty",
    "strong": "weak",
    "old": "new",
    "high": "low",
    "rich": "poor",
    "hard": "soft",
    "long": "short",
    "wet": "dry",
}


def _arith(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(2, 60), r.randint(2, 40)
    q = r.choice(["What is {a} plus {b}?", "Add {a} and {b}.", "Compute the sum of {a} and {b}."])
    return q.format(a=a, b=b), f"{a} + {b} = {a + b}. The answer is {a + b}."


def _sort(r: random.Random) -> tuple[str, str]:
    xs = r.sample(range(1, 99), r.randint(3, 6))
    q = r.choice(["Sort these numbers in ascending order: {x}", "Put in increasing order: {x}"])
    return q.format(x=", ".join(map(str, xs))), ", ".join(map(str, sorted(xs)))


def _reverse(r: random.Random) -> tuple[str, str]:
    ws = r.sample(WORDS, r.randint(3, 5))
    q = r.choice(["Reverse the order of these words: {w}", "Write these words backwards in order: {w}"])
    return q.format(w=" ".join(ws)), " ".join(reversed(ws))


def _upper(r: random.Random) -> tuple[str, str]:
    ws = r.sample(WORDS, r.randint(2, 4))
    q = r.choice(["Convert to upper case: {w}", "Shout this: {w}"])
    return q.format(w=" ".join(ws)), " ".join(ws).upper()


def _antonym(r: random.Random) -> tuple[str, str]:
    w = r.choice(sorted(ANTONYMS))
    q = r.choice(["What is the opposite of '{w}'?", "Give an antonym of the word {w}."])
    return q.format(w=w), f"The opposite of {w} is {ANTONYMS[w]}."


def _count(r: random.Random) -> tuple[str, str]:
    ws = [r.choice(WORDS) for _ in range(r.randint(2, 7))]
    q = r.choice(["How many words are in this list: {w}", "Count the words: {w}"])
    return q.format(w=" ".join(ws)), f"There are {len(ws)} words."


FAMILIES: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "arithmetic": _arith,
    "sorting": _sort,
    "reversal": _reverse,
    "uppercase": _upper,
    "antonyms": _antonym,
    "counting": _count,
}
# Targets are held-out examples of these families, split into two subtasks by prompt template.
TARGET_FAMILIES = ("arithmetic", "antonyms", "sorting")


def make_example(family: str, r: random.Random, idx: int, dataset: str) -> dict:
    q, a = FAMILIES[family](r)
    return {
        "dataset": dataset,
        "id": f"{dataset}_{idx}",
        "family": family,
        "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
    }


def write_tiny_data(data_dir: Path, n_per_family: int = 60, n_target: int = 6, seed: int = 0) -> dict:
    """Writes two training files (mixed families, shuffled) and one target file per target family.

    Returns {"train": {name: path}, "targets": {name: path}, "eval": {name: path}}.
    """
    r = random.Random(seed)
    data_dir.mkdir(parents=True, exist_ok=True)
    families = [f for f in FAMILIES for _ in range(n_per_family)]
    examples = [make_example(fam, r, i, "synth_a" if i % 2 == 0 else "synth_b") for i, fam in enumerate(families)]
    r.shuffle(examples)
    out: dict = {"train": {}, "targets": {}, "eval": {}}
    for ds in ("synth_a", "synth_b"):
        p = data_dir / f"{ds}.jsonl"
        with open(p, "w") as fh:
            for ex in examples:
                if ex["dataset"] == ds:
                    fh.write(json.dumps(ex) + "\n")
        out["train"][ds] = p
    for fam in TARGET_FAMILIES:
        for split, n in (("target", n_target), ("eval", 4 * n_target)):
            p = data_dir / f"{fam}_{split}.jsonl"
            with open(p, "w") as fh:
                for j in range(n):
                    ex = make_example(fam, r, j, f"{fam}_{split}")
                    ex["subtask"] = f"{fam}-{j % 2}"
                    fh.write(json.dumps(ex) + "\n")
            out["targets" if split == "target" else "eval"][fam] = p
    return out


SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 600, max_length: int = 512):
    """A byte-level BPE tokenizer trained on `texts`, with Llama-like BOS handling; saved to out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=max_length,
    )
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_model(
    out_dir: Path,
    texts: list[str],
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    *,
    vocab_size: int = 600,
    max_positions: int = 512,
) -> Path:
    """Trains the tokenizer and saves a randomly initialised small Llama beside it in `out_dir`.

    `max_positions` is the model's context and the tokenizer's `model_max_length`.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lessctl.models import quiet_hf

    quiet_hf()
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(texts, out_dir, vocab_size=vocab_size, max_length=max_positions)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max_positions,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out_dir))
    return out_dir


def corpus_texts(files: list[Path]) -> list[str]:
    """Text to train the tokenizer on: every message of the files, in the tulu format's markers too."""
    texts = []
    for p in files:
        for line in Path(p).read_text().splitlines():
            if not line.strip():
                continue
            obj = json.loads(line)
            for m in obj.get("messages", []):
                texts.append(f"<|{m['role']}|>\n{m['content']}\n")
    return texts
