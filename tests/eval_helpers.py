"""Tiny models for the evaluation tests: a small Llama (lessctl.tiny) and a stub whose answer is fixed."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

DATA = Path(os.environ.get("LESSCTL_TEST_DATA", Path(__file__).parents[2] / "shared" / "data"))


def tokenizer_texts(data: Path) -> list[str]:
    """A little of every evaluation's text, so the tiny tokenizer has merges for all of them."""
    texts = []
    for p in sorted((data / "eval/mmlu/dev").glob("*.csv"))[:20]:
        texts.append(p.read_text(encoding="utf-8"))
    for p in sorted((data / "eval/bbh/cot-prompts").glob("*.txt"))[:5]:
        texts.append(p.read_text(encoding="utf-8"))
    for _lang, exs in json.loads((data / "eval/tydiqa/tydiqa-one-shot.json").read_text(encoding="utf-8")).items():
        texts.append(
            f"<|user|>\n{exs[0]['context']}\n{exs[0]['question']}\n<|assistant|>\n{exs[0]['answers'][0]['text']}"
        )
    return texts


def build_model_dir(out_dir: Path, data: Path = DATA) -> Path:
    """A randomly initialised 2-layer Llama and its BPE tokenizer saved as an ordinary HF folder."""
    from lessctl.tiny import build_tiny_model

    return build_tiny_model(out_dir, tokenizer_texts(data))


def save_lora_adapter(base_dir: Path, out_dir: Path, seed: int = 1, run: dict | None = None) -> Path:
    """A LoRA adapter on `base_dir` with non-zero weights (so merging it changes the model); `run`: the fields of
    the run record `lessctl finetune` writes beside it (target, method), which say what the folder is."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    peft.save_pretrained(str(out_dir))
    if run is not None:
        import json

        (Path(out_dir) / "lessctl_run.json").write_text(json.dumps({"kind": "finetune", **run}))
    return out_dir


class StubLM:
    """Not a network: next-token logits that always favour one token. For checking the MMLU plumbing."""

    def __new__(cls, vocab_size: int, favourite: int, max_positions: int = 1 << 16):
        import torch

        class _Stub(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.dummy = torch.nn.Parameter(torch.zeros(1))
                self.config = SimpleNamespace(max_position_embeddings=max_positions)

            def forward(self, input_ids, attention_mask=None, position_ids=None):
                logits = torch.zeros(*input_ids.shape, vocab_size)
                logits[..., favourite] = 5.0
                return SimpleNamespace(logits=logits)

        return _Stub()
