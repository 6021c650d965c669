"""Where one batch of lessctl's per-example gradient path spends its time, variant by variant.

Builds the model once (random weights, LoRA on q/k/v/o as in the paper) and times, on the same batch,
with CUDA events (median of --reps runs, ms per example):
- forward: the model's forward alone, no gradients;
- floor: forward plus backward to the input embeddings with the adapter merged and no hooks (the cost of
  the activation gradients every method needs);
- lessctl: `PerExampleGradients.features` (forward, backward, per-example products, Adam transform), with
  the adapter unmerged (peft's forward) and merged (`--merge`);
for adapters in float32 (peft's default) and bfloat16 (as LESS's peft 0.7 made them). With --table, a
torch.profiler table of one lessctl pass (the first variant).

    python bench/profile_grads.py --shape 7b --examples 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grads_throughput as gt  # noqa: E402

from lessctl.grads.engine import PerExampleGradients, pad_batch
from lessctl.models import per_example_loss


def timed(fn, reps: int) -> float:
    """Median milliseconds of `fn()` over `reps` runs after one untimed run."""
    fn()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        out = fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
        del out
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="7b", choices=sorted(gt.SHAPES))
    ap.add_argument("--examples", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--adapter-dtypes", default="float32,bfloat16")
    ap.add_argument(
        "--compile", action="store_true", help="also time the merged compiled pass (PerExampleGradients.compile)"
    )
    ap.add_argument("--table", action="store_true", help="also print a torch.profiler table of one lessctl pass")
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    ex = gt.make_examples(args.examples, gt.SHAPES[args.shape]["vocab_size"], 0, 355, 32, 2048, 0.4)
    seqs, labels = [e.ids for e in ex], [e.labels for e in ex]
    n = len(seqs)
    tokens = sum(map(len, seqs))
    results: dict = {
        "shape": args.shape,
        "examples": n,
        "tokens": tokens,
        "padded_tokens": n * max(map(len, seqs)),
        "gpu": torch.cuda.get_device_name(dev),
        "ms_per_example": {},
    }
    model = None
    for adt in args.adapter_dtypes.split(","):
        del model
        torch.cuda.empty_cache()
        model = gt.build_model(
            args.shape, dev, torch.bfloat16, 0, 128, 512, 0.1, 1e-3, None if adt == "float32" else getattr(torch, adt)
        )
        probe = PerExampleGradients(model)
        adam = gt.synthetic_adam(probe.grad_dim, dev, 0, 1e-4, 1e-6)
        probe.remove()
        ids, lab, att = pad_batch(seqs, labels, 0, dev)
        res: dict[str, float] = {}
        with torch.no_grad():
            res["forward"] = timed(lambda: model(input_ids=ids, attention_mask=att).logits, args.reps)

        peg = PerExampleGradients(model, merge=True)
        for h in peg._handles[:-1]:  # keep only the embedding hook: no per-example work
            h.remove()
        peg._sink = lambda p, rows: None

        def floor():
            peg._sink = lambda p, rows: None
            loss, _ = per_example_loss(model(input_ids=ids, attention_mask=att).logits, lab)
            return torch.autograd.grad(loss.sum(), [peg._emb_out])

        res["floor (merged, no hooks)"] = timed(floor, args.reps)
        peg.remove()
        for merge in (False, True):
            peg = PerExampleGradients(model, merge=merge)
            res[f"lessctl{' merged' if merge else ''}"] = timed(
                lambda: peg.features(seqs, labels, 0, "adam", adam)[0], args.reps
            )
            if args.table and merge is False and adt == args.adapter_dtypes.split(",")[0]:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    peg.features(seqs, labels, 0, "adam", adam)
                    torch.cuda.synchronize()
                print(
                    prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60)
                )
            peg.remove()
        if args.compile:
            peg = PerExampleGradients(model, merge=True, compile=True)
            t0 = time.perf_counter()
            peg.features(seqs, labels, 0, "adam", adam)
            torch.cuda.synchronize()
            print(f"compiled the pass in {time.perf_counter() - t0:.1f} s", flush=True)
            res["lessctl merged compiled"] = timed(lambda: peg.features(seqs, labels, 0, "adam", adam)[0], args.reps)
            peg.remove()
        results["ms_per_example"][f"adapters {adt}"] = {k: round(v / n, 2) for k, v in res.items()}
        print(f"adapters {adt}: " + ", ".join(f"{k} {v / n:.1f} ms/ex" for k, v in res.items()), flush=True)
        adam = None  # free the synthetic state before the next dtype
    flops = (
        4
        * sum(p.numel() for p in model.get_base_model().parameters() if p is not model.get_input_embeddings().weight)
        * tokens
    )
    results["floor_tflop_per_example"] = flops / n / 1e12
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
