"""Profiles one batch of lessctl's per-example gradient path at a given shape: the CUDA kernels by time.

    python bench/profile_grads.py --shape 7b --examples 10 [--tf32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grads_throughput as gt  # noqa: E402

from lessctl.gradients import PerExampleGradients, transform  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--examples", type=int, default=10)
    ap.add_argument("--tf32", action="store_true", help="allow TF32 for float32 matmuls (the LoRA path runs in fp32)")
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    dev = torch.device("cuda")
    model = gt.build_model(args.shape, dev, torch.bfloat16, 0, 128, 512, 0.1, 1e-3)
    vocab = model.config.vocab_size
    ex = gt.make_examples(args.examples, vocab, 0, 355, 32, 2048, 0.4)
    peg = PerExampleGradients(model)
    adam = gt.synthetic_adam(peg.grad_dim, dev, 0, 1e-4, 1e-6)
    seqs, labels = [e.ids for e in ex], [e.labels for e in ex]
    for _ in range(2):  # warm-up
        g, _, _ = peg(seqs, labels, 0)
        del g
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        g, _, _ = peg(seqs, labels, 0)
        f = transform(g, "adam", adam, inplace=True)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    for label, fn in (("forward only", lambda: model(input_ids=torch.tensor([s + [0] * (max(map(len, seqs)) - len(s)) for s in seqs], device=dev)).logits),
                      ("per-example grads", lambda: peg(seqs, labels, 0))):
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        print(f"{label}: {start.elapsed_time(end):.1f} ms for {len(seqs)} examples")
        del out


if __name__ == "__main__":
    main()
