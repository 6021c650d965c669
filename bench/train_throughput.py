"""Training throughput: LESS's batch-of-one Trainer against lessctl's padding-free packed passes.

The same examples (random token ids with LESS's length distribution, as bench/grads_throughput.py makes
them) go through lessctl's own Trainer (`lessctl.training.loop.build_trainer`, the one warmup and finetune
use) twice in one run, from the same random-weight Llama and the same fresh LoRA:

- **batch1**: `packing = false`, one example a forward pass, the step's passes accumulated (LESS's setting:
  per_device_train_batch_size 1, gradient accumulation = examples per step);
- **packed**: `packing = true`, the step's examples packed into rows of at most `--pack-tokens` tokens.

Both train `--steps` optimizer steps of `--examples-per-step` examples (LESS: 128) with the example-weighted
loss, float32 base weights under bf16 autocast on a GPU (LESS's precision; `--no-autocast` loads bf16
weights), AdamW and the linear schedule. The first step is untimed (allocation, kernel choice). Reported:
examples/s, tokens/s, MFU, peak memory, the speed-up, and both runs' losses step by step (the same
examples in the same order: they agree up to bf16 rounding and LoRA dropout's different draws).

    python bench/train_throughput.py --shape tiny --steps 3 --examples-per-step 16
    python bench/train_throughput.py --shape 7b --steps 4 --json bench/results/train_7b.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from grads_throughput import SHAPES, make_examples  # noqa: E402

FLOPS_NOTE = (
    "model FLOPs = 4 x (base parameters other than the input embedding) x tokens: a forward (2N) and a backward "
    "through the frozen base for input gradients (2N); attention, the LoRA matmuls and the output layer's "
    "skipped prompt positions are not counted"
)


def log(msg: str) -> None:
    print(f"[train-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def pad_tokenizer(vocab: int, out: Path):
    """A word-level tokenizer whose only use here is its pad id (the batch-of-one collator never pads)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<unk>": 1, "<s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(words, unk_token="<unk>")))
    tok.add_special_tokens({"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>"})
    return tok


def build_model(shape: str, device: str, load_dtype, seed: int):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):  # allocate and initialise on the GPU: a 7B model in seconds
        return AutoModelForCausalLM.from_config(cfg, dtype=load_dtype, attn_implementation="sdpa")


def run_path(args, packing: bool, examples: list[Example], device: str, out: Path) -> dict:
    import torch
    from transformers import TrainerCallback, set_seed

    from lessctl.config import build_config
    from lessctl.models import add_lora
    from lessctl.training.loop import _precision, build_trainer

    raw = {
        "model": {"dtype": "bf16" if device != "cpu" else "fp32"},
        "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout},
        "warmup": {
            "epochs": 1,
            "batch_size": 1,
            "gradient_accumulation_steps": args.examples_per_step,
            "packing": packing,
            "pack_tokens": args.pack_tokens,
            "autocast": not args.no_autocast,
            "percentage": 1.0,
        },
    }
    cfg = build_config(raw)
    tcfg = cfg.warmup
    load_dtype, _ = _precision(cfg, tcfg, device)
    from lessctl.models import resolve_dtype
    from lessctl.training import varlen

    set_seed(tcfg.seed)
    base = build_model(args.shape, device, resolve_dtype(load_dtype, device), args.seed)
    if packing and varlen.available(device) and not args.no_varlen:  # as train_lora does
        varlen.enable(base)
    attention = base.config._attn_implementation
    model = add_lora(base, cfg.lora)
    tok = pad_tokenizer(SHAPES[args.shape]["vocab_size"], out)
    cuda = device.startswith("cuda")
    stamps: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer = build_trainer(cfg, tcfg, model, tok, examples, out, device, False, args.examples_per_step, [Clock()])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    trainer.train()
    steps = len(stamps)
    timed = examples[args.examples_per_step :]
    seconds = stamps[-1] - stamps[0] if steps > 1 else stamps[-1] - t0
    tokens = sum(len(e.input_ids) for e in timed)
    flop_params = sum(p.numel() for n, p in model.named_parameters() if not p.requires_grad and "embed_tokens" not in n)
    flops = 4 * flop_params * tokens
    res = {
        "path": "packed" if packing else "batch1",
        "attention": attention,
        "steps": steps,
        "timed_steps": steps - 1,
        "first_step_s": stamps[0] - t0,
        "seconds": seconds,
        "examples_per_s": len(timed) / seconds,
        "tokens_per_s": tokens / seconds,
        "mfu": flops / seconds / (args.peak_tflops * 1e12) if cuda else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "losses": losses,
    }
    del trainer, model
    if cuda:
        torch.cuda.empty_cache()
    return res


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per path (the first is untimed)")
    ap.add_argument("--examples-per-step", type=int, default=128, help="LESS: 128 (batch 1 x 32 x 4 GPUs)")
    ap.add_argument("--pack-tokens", type=int, default=8192)
    ap.add_argument("--paths", default="batch1,packed", help="comma-separated: batch1, packed")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--no-varlen", action="store_true", help="packed: sdpa with a block-diagonal mask on CUDA too")
    ap.add_argument("--no-autocast", action="store_true", help="bf16 base weights instead of float32 under autocast")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100/H200 SXM: 989)")
    ap.add_argument("--mean-tokens", type=float, default=355.0)
    ap.add_argument("--min-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--prompt-share", type=float, default=0.4, help="leading share of each example masked with -100")
    ap.add_argument("--lora-r", type=int, default=128)
    ap.add_argument("--lora-alpha", type=int, default=512)
    ap.add_argument("--lora-dropout", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the report here")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    import torch
    import transformers

    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.shape == "tiny" and args.max_tokens > 256:
        args.max_tokens, args.mean_tokens = 256, min(args.mean_tokens, 90.0)
    n = args.steps * args.examples_per_step
    raw = make_examples(
        n, SHAPES[args.shape]["vocab_size"], args.seed, args.mean_tokens, args.min_tokens, args.max_tokens,
        args.prompt_share,
    )  # fmt: skip
    examples = [Example(e.ids, e.labels) for e in raw]
    report = {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "examples": n,
        "mean_tokens": sum(len(e.input_ids) for e in examples) / n,
        "flops_note": FLOPS_NOTE,
        "paths": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.paths.split(","):
            log(f"{path}: {args.steps} steps x {args.examples_per_step} examples on {device}")
            r = run_path(args, path == "packed", examples, device, Path(tmp) / path)
            log(f"{path}: {r['examples_per_s']:.1f} examples/s, {r['tokens_per_s']:.0f} tokens/s")
            report["paths"].append(r)
    by = {p["path"]: p for p in report["paths"]}
    if "batch1" in by and "packed" in by:
        report["speedup"] = by["packed"]["examples_per_s"] / by["batch1"]["examples_per_s"]
        pairs = list(zip(by["batch1"]["losses"], by["packed"]["losses"]))
        report["max_loss_rel_diff"] = max(abs(a - b) / max(abs(a), 1e-12) for a, b in pairs) if pairs else None
    print_report(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def print_report(r: dict) -> None:
    print(f"training throughput: {r['settings']['shape']} on {r['device']}, {r['examples']} examples, "
          f"{r['mean_tokens']:.0f} tokens on average")  # fmt: skip
    print(f"{'path':8} {'examples/s':>11} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>9}  losses")
    for p in r["paths"]:
        mfu = f"{p['mfu']:.1%}" if p["mfu"] is not None else "-"
        mem = f"{p['peak_memory_gib']:.1f}" if p["peak_memory_gib"] is not None else "-"
        losses = " ".join(f"{x:.4f}" for x in p["losses"])
        print(f"{p['path']:8} {p['examples_per_s']:11.2f} {p['tokens_per_s']:10.0f} {mfu:>6} {mem:>9}  {losses}")
    if "speedup" in r:
        diff = r["max_loss_rel_diff"]
        print(f"packed / batch1: {r['speedup']:.2f}x examples/s; largest relative loss difference {diff:.2e}")


if __name__ == "__main__":
    main()
