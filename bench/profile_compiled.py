"""Where the compiled gradient pass (`grads --compile`) spends its time, step by step, on a GPU.

Builds the 7B-shaped model (random weights, LoRA on q/k/v/o as in the paper) and examples with the
benchmark's length distribution, batches them as `lessctl grads` does, and times every batch set with CUDA
events (ms per example, the fastest of --reps passes) for each step added in turn:
- floor: the merged model's forward and backward to the input embeddings, compiled, nothing per example;
- probes: plus the zero probes that capture each LoRA layer's output gradient (products skipped);
- products: plus the per-example products (the sink drops the rows);
- features: plus the Adam transform into float16 rows (what `PerExampleGradients.features` does).
Then a torch.profiler table of one `features` pass over a few batches, its kernels summed by kind (GEMM,
attention, Triton, elementwise, fill, copy), and with --cudnn the floor again with cuDNN's attention.

    python bench/profile_compiled.py --shape 7b --examples 128 --json bench/results/profile_compiled_7b.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grads_throughput as gt  # noqa: E402

from lessctl.grads.batching import auto_max_batch_examples, token_batches
from lessctl.grads.engine import PerExampleGradients

KINDS = [  # (kind, pattern of the kernel name), first match wins
    ("attention", r"flash|fmha|cudnn|attention|sdpa"),
    ("gemm", r"gemm|nvjet|cutlass|xmma|gemv|wgmma|sm90_|cublas"),
    ("triton", r"^triton"),
    ("fill", r"fill|zero"),
    ("copy", r"copy|memcpy|Memcpy|cat|index"),
    ("reduce/loss", r"reduce|softmax|nll|log_softmax|cross"),
    ("elementwise", r"elementwise|vectorized|unrolled"),
]


def kind_of(name: str) -> str:
    for kind, pat in KINDS:
        if re.search(pat, name, re.IGNORECASE):
            return kind
    return "other"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_passes(fn, batches, reps: int) -> float:
    """Fastest total milliseconds of fn(batch) over all batches, after one untimed pass."""
    for b in batches:
        fn(b)
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for b in batches:
            fn(b)
        sync()
        best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="7b", choices=sorted(gt.SHAPES))
    ap.add_argument("--examples", type=int, default=128)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--profile-batches", type=int, default=4)
    ap.add_argument("--rows", type=int, default=25, help="kernels listed in the table")
    ap.add_argument("--cudnn", action="store_true", help="also time the floor with cuDNN's attention")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script itself")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    ex = gt.make_examples(args.examples, gt.SHAPES[args.shape]["vocab_size"], 0, 355, 32, 2048, 0.4)
    seqs, labels = [e.ids for e in ex], [e.labels for e in ex]
    model = gt.build_model(
        args.shape, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32, 0, 128, 512, 0.1, 1e-3
    )
    peg = PerExampleGradients(model, merge=True, compile=True)
    adam = gt.synthetic_adam(peg.grad_dim, dev, 0, 1e-4, 1e-6)
    cap = auto_max_batch_examples(peg.grad_dim, dev)
    batches = [
        ([seqs[i] for i in b], [labels[i] for i in b])
        for b in token_batches([len(s) for s in seqs], args.batch_tokens, cap)
    ]
    tokens = sum(map(len, seqs))
    padded = sum(len(b[0]) * max(map(len, b[0])) for b in batches)
    n = len(seqs)
    res: dict = {
        "shape": args.shape,
        "examples": n,
        "tokens": tokens,
        "padded_tokens": padded,
        "batches": len(batches),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "ms_per_example": {},
        "compile_s": {},
    }

    emb = model.get_input_embeddings()
    emb_out: list = []

    def emb_hook(mod, inputs, output):
        out = output.detach().requires_grad_(True)
        emb_out[:] = [out]
        return out

    def floor(b):
        from lessctl.grads.engine import pad_batch

        ids, lab, _ = pad_batch(b[0], b[1], 0, dev)
        if ids.shape[0] == 1:
            ids, lab = torch.cat([ids, torch.zeros_like(ids)]), torch.cat([lab, torch.full_like(lab, -100)])
        loss, _ = peg._loss(ids, None, lab, b[1])  # the pass's own loss (the head on label positions)
        torch.autograd.grad(loss.sum(), emb_out)

    def record(name, fn, passes=None):
        t0 = time.perf_counter()
        fn(batches[0])
        sync()
        res["compile_s"][name] = round(time.perf_counter() - t0, 1)
        ms = time_passes(fn, passes or batches, args.reps)
        res["ms_per_example"][name] = round(ms / n, 3)
        print(f"{name}: {ms / n:.2f} ms/example (first batch {res['compile_s'][name]} s)", flush=True)

    h = emb.register_forward_hook(emb_hook)
    record("floor", floor)
    h.remove()

    layers = peg.layers
    peg.layers = [dataclasses.replace(hl, products=lambda x, g: None) for hl in layers]
    record("probes", lambda b: peg._backward(b[0], b[1], 0, lambda p, rows: None))
    peg.layers = layers
    record("products", lambda b: peg._backward(b[0], b[1], 0, lambda p, rows: None))
    record("features", lambda b: peg.features(b[0], b[1], 0, "adam", adam))

    from torch.profiler import ProfilerActivity, profile

    some = batches[: args.profile_batches]
    with profile(activities=[ProfilerActivity.CUDA if dev.type == "cuda" else ProfilerActivity.CPU]) as prof:
        for b in some:
            peg.features(b[0], b[1], 0, "adam", adam)
        sync()
    n_some = sum(len(b[0]) for b in some)
    by_kind: dict[str, float] = {}
    kernels = []
    for evt in prof.key_averages():
        t = evt.device_time_total if dev.type == "cuda" else evt.self_cpu_time_total
        if not t or evt.key.startswith("ProfilerStep"):
            continue
        if dev.type == "cuda" and any(
            evt.key.startswith(p)
            for p in ("aten::", "autograd::", "torch::", "cuda", "Torch-Compiled", "##", "CompiledFunction")
        ):
            continue  # CPU-side ops: their device time is their kernels', counted below
        by_kind[kind_of(evt.key)] = by_kind.get(kind_of(evt.key), 0.0) + t / 1e3
        kernels.append((t / 1e3, evt.count, evt.key))
    kernels.sort(reverse=True)
    total = sum(by_kind.values())
    res["profile"] = {
        "examples": n_some,
        "kernel_ms_per_example": round(total / n_some, 3),
        "by_kind_ms_per_example": {k: round(v / n_some, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top": [
            {"ms_per_example": round(t / n_some, 3), "calls": c, "kernel": k[:120]} for t, c, k in kernels[: args.rows]
        ],
    }
    print(json.dumps(res["profile"], indent=1), flush=True)

    if args.cudnn:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        peg.remove()
        torch._dynamo.reset()
        peg = PerExampleGradients(model, merge=True, compile=True)
        h = emb.register_forward_hook(emb_hook)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            record("floor cudnn", floor)
        h.remove()
    peg.remove()
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
