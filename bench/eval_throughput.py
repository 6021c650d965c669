"""Generation throughput of the evaluations: `model.generate` with a decoded-text stop check against lessctl's path.

The same prompts (BBH's LESS protocol or TydiQA's, built by the harnesses' own functions from the data
folder) go through, in one run:

- **baseline**: `lessctl._reference.text_stop_generate`, plain `model.generate` calls over length-sorted,
  left-padded batches with a stop check that decodes every unfinished row's last 16 tokens at every step
  (lessctl's path before the token-id stops);
- **lessctl**: `lessctl.evaluation.generation.generate_greedy` (token-id stop check, dynamic cache);
- **lessctl-static** (`--paths lessctl,static`): the same with `cache="static"` (on a GPU transformers then
  compiles the decoding step; the first batch includes that compilation, reported apart).

Each path's outputs are compared with the baseline's on the prompts both ran (`--baseline-prompts`).
Shapes: `tiny` (the tests' 2-layer Llama and its BPE tokenizer, CPU CI size); `1b` (TinyLlama-1.1B) and
`7b` (Llama-2-7B) with random weights in bf16 and a 4,000-token BPE tokenizer trained on the evaluation
texts (BBH: 3.4 characters a token, near Llama-2's; the output layer has 4,000 rows, not 32,000). Random
weights rarely write a stop string, so nearly every generation runs to its token limit: the figures are
the worst case of a real model's.

    python bench/eval_throughput.py --shape tiny --task bbh --prompts 12 --max-new-tokens 16 --batch-size 4
    python bench/eval_throughput.py --shape 7b --task bbh --batch-size 64 --baseline-prompts 128 --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {
    "1b": dict(
        hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, intermediate_size=5632
    ),
    "7b": dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008
    ),
}
# The 1b/7b tokenizer's size: trained on the evaluation texts themselves, 4,000 tokens split BBH's prompts into
# 3.4 characters a token (886 tokens on average), about what Llama-2's tokenizer does with English.
TOKENIZER_VOCAB = 4000
NOTE = "random weights: nearly every generation runs to its token limit (a real model stops earlier)"


def log(msg: str) -> None:
    print(f"[eval-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def data_dir(arg: str | None) -> Path:
    import os

    return Path(arg or os.environ.get("LESSCTL_TEST_DATA") or REPO.parent / "shared" / "data")


def eval_texts(data: Path) -> list[str]:
    """Text for the tokenizer: the BBH few-shot prompts, the TydiQA passages and some MMLU."""
    texts = [p.read_text(encoding="utf-8") for p in sorted((data / "eval/bbh/cot-prompts").glob("*.txt"))]
    texts += [p.read_text(encoding="utf-8") for p in sorted((data / "eval/mmlu/dev").glob("*.csv"))[:20]]
    for exs in json.loads((data / "eval/tydiqa/tydiqa-one-shot.json").read_text(encoding="utf-8")).values():
        texts.append(f"<|user|>\n{exs[0]['context']}\n{exs[0]['question']}\n<|assistant|>\n")
    return texts


def build(shape: str, data: Path, device: str, dtype: str, seed: int, out: Path):
    """(model, tokenizer) in eval mode, the tokenizer padding on the left."""
    import torch

    from lessctl.models import load_model_for_eval
    from lessctl.tiny import build_tiny_model, train_tokenizer

    if shape == "tiny":
        return load_model_for_eval(build_tiny_model(out, eval_texts(data), seed=seed), device=device)
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = train_tokenizer(eval_texts(data), out, vocab_size=TOKENIZER_VOCAB, max_length=4096)
    tok.padding_side = "left"
    cfg = LlamaConfig(
        **SHAPES[shape],
        vocab_size=len(tok),
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval(), tok


def task_prompts(task: str, data: Path, tok, n: int | None, seed: int) -> tuple[list[str], tuple[str, ...], dict]:
    """The harness's prompts and stop strings: BBH's seeded 40 per task, TydiQA's dev set (cycled up to n)."""
    from lessctl.data.targets import read_json
    from lessctl.evaluation import bbh, tydiqa

    info: dict = {}
    if task == "bbh":
        root = data / "eval/bbh"
        prompts = []
        for t in bbh.bbh_tasks(root):
            cot = bbh.read_cot_prompt(root / "cot-prompts" / f"{t}.txt")
            examples = read_json(root / "bbh" / f"{t}.json", bbh.TASK_LAYOUT)["examples"]
            prompts += [bbh.build_prompt(cot, ex["input"]) for ex in bbh.sample_examples(examples, t, 40, 42)]
        info["protocol_prompts"] = len(prompts)
        if n and n < len(prompts):
            prompts = random.Random(seed).sample(prompts, n)
        return prompts, bbh.STOP, info
    root = data / "eval/tydiqa"
    shots = tydiqa.read_shots(root / "tydiqa-one-shot.json")
    for shot in shots.values():
        shot["context"] = tydiqa.trim_context(tok, shot["context"], 512)
    dev = tydiqa.read_dev(tydiqa.dev_file(root))
    prompts = [
        tydiqa.build_prompt(
            ex["lang"], shots[ex["lang"]], tydiqa.trim_context(tok, ex["context"], 512), ex["question"], "tulu"
        )
        for ex in dev
    ]
    info["dev_questions"] = len(prompts)
    if n:
        prompts = [prompts[i % len(prompts)] for i in range(n)]
        info["cycled"] = n > len(dev)
    return prompts, tydiqa.STOP, info


def timed(fn, device: str) -> tuple[object, float]:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    res = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return res, time.perf_counter() - t


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=["tiny", *SHAPES], default="tiny")
    ap.add_argument("--task", choices=["bbh", "tydiqa"], default="bbh")
    ap.add_argument("--prompts", type=int, default=None, help="prompts (default: the protocol's: BBH 1,080)")
    ap.add_argument("--baseline-prompts", type=int, default=None, help="the baseline runs the first N (default all)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the harness's (BBH 512, TydiQA 50)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--paths", default="lessctl", help="comma list of lessctl, static")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="bfloat16", help="1b/7b weights (tiny: the saved float32)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch
    import transformers

    from lessctl._reference import text_stop_generate
    from lessctl.evaluation.generation import generate_greedy, max_positions

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    data = data_dir(args.data_dir)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    bad = sorted(set(paths) - {"lessctl", "static"})
    if bad:
        ap.error(f"--paths: unknown {bad}; expected lessctl, static")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model, tok = build(args.shape, data, device, args.dtype, args.seed, Path(tmp) / "model")
        log(f"{args.shape} model built on {device} in {time.perf_counter() - t0:.1f} s")
        prompts, stop, info = task_prompts(args.task, data, tok, args.prompts, args.seed)
    new = args.max_new_tokens or (512 if args.task == "bbh" else 50)
    m = args.baseline_prompts or len(prompts)
    base_prompts = prompts[:m]
    lengths = [len(tok(p, verbose=False)["input_ids"]) for p in prompts]
    log(f"{len(prompts)} {args.task} prompts, {sum(lengths) / len(lengths):.0f} tokens on average; baseline on {m}")
    opts = dict(max_new_tokens=new, stop=stop, batch_size=args.batch_size)

    # warm-up: one small batch through each path (kernels, allocator), not timed
    warm = prompts[: min(2, len(prompts))]
    text_stop_generate(model, tok, warm, **{**opts, "max_new_tokens": 4})
    generate_greedy(model, tok, warm, **{**opts, "max_new_tokens": 4})

    runs: list[dict] = []
    failed: list[dict] = []
    stats: dict = {}
    log(f"baseline on {m} prompts")
    ref, sec = timed(lambda: text_stop_generate(model, tok, base_prompts, **opts, stats=stats), device)
    runs.append(dict(path="baseline", prompts=m, seconds=sec, **stats))
    outputs = {"baseline": ref}
    for p in paths:
        stats = {}
        cache = "static" if p == "static" else "dynamic"
        name = "lessctl-static" if p == "static" else "lessctl"
        first = None
        log(f"{name} on {len(prompts)} prompts")
        try:
            if cache == "static":  # the compilation, on one batch of the longest prompts
                order = sorted(range(len(prompts)), key=lambda i: -lengths[i])[: args.batch_size]
                _, first = timed(
                    lambda: generate_greedy(model, tok, [prompts[i] for i in order], **opts, cache=cache), device
                )
            (out, _), sec = timed(
                lambda: generate_greedy(model, tok, prompts, **opts, cache=cache, stats=stats), device
            )
        except Exception as e:  # a path that fails is reported, the others still run
            log(f"{name} failed: {e!r}")
            failed.append(dict(path=name, error=repr(e)[:2000]))
            continue
        outputs[name] = out
        runs.append(dict(path=name, prompts=len(prompts), seconds=sec, first_batch_seconds=first, **stats))
        log(f"{name}: {sec:.1f} s")
    for r in runs:
        r["prompts_per_s"] = r["prompts"] / r["seconds"]
        r["tokens_per_s"] = r["new_tokens"] / r["seconds"]
        r["ms_per_step"] = 1000 * r["seconds"] / max(1, r["steps"])
        r["identical_to_baseline"] = outputs[r["path"]][:m] == ref
        r["differing_outputs"] = sum(a != b for a, b in zip(outputs[r["path"]][:m], ref))
        r["x_baseline_tokens_per_s"] = r["tokens_per_s"] / runs[0]["tokens_per_s"]
        r["x_baseline_prompts_per_s"] = r["prompts_per_s"] / runs[0]["prompts_per_s"]
        if r["path"] != "baseline":
            r["projected_protocol_seconds"] = r["seconds"] * info.get("protocol_prompts", r["prompts"]) / r["prompts"]
    dev = {"type": torch.device(device).type}
    if dev["type"] == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        dev.update(name=props.name, sms=props.multi_processor_count, peak_gib=torch.cuda.max_memory_allocated() / 2**30)
    report = {
        "command": "python bench/eval_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": dev,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": sys.version.split()[0],
        },
        "settings": dict(vars(args), max_new_tokens=new, stop=list(stop)),
        "model": {
            "shape": args.shape,
            "parameters": sum(p.numel() for p in model.parameters()),
            "context": max_positions(model),
            "vocab": len(tok),
        },
        "prompts": dict(info, n=len(prompts), mean_tokens=sum(lengths) / len(lengths), max_tokens=max(lengths)),
        "note": NOTE if args.shape != "tiny" else "tiny random model (CPU CI size): " + NOTE,
        "runs": runs,
        "failed": failed,
        "sample_outputs": {k: v[:2] for k, v in outputs.items()},
    }
    print(f"{args.shape} {args.task}: {len(prompts)} prompts, max {new} new tokens, batch {args.batch_size}; {NOTE}")
    print(f"{'path':16} {'prompts':>7} {'s':>8} {'prompts/s':>9} {'tok/s':>9} {'ms/step':>8} {'x base':>7} same")
    for r in runs:
        print(
            f"{r['path']:16} {r['prompts']:7d} {r['seconds']:8.2f} {r['prompts_per_s']:9.2f} {r['tokens_per_s']:9.1f} "
            f"{r['ms_per_step']:8.1f} {r['x_baseline_tokens_per_s']:7.2f} {r['identical_to_baseline']}"
        )
    for f in failed:
        print(f"{f['path']:16} failed: {f['error'][:300]}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
