#!/usr/bin/env python
"""Throughput and accuracy of LESS gradient features: the authors' batch-of-one loop against lessctl's batched path.

One run builds a random-weight Llama of a given shape with a LoRA adapter, synthetic Adam moments and
synthetic examples, then times (a) a re-implementation of the authors' loop (LESS's `collect_grads`:
one example per forward/backward, `.grad` vectorised, Adam transform, a projection every 16 examples
with TRAK's CudaProjector) and (b) lessctl's path (`lessctl.grads.collector.FeatureCollector`: batched gradients,
in-place transform,
lessctl's projectors), and checks both against fp32 ground truth. See bench/README.md.

    python bench/grads_throughput.py --shape tiny --examples 8 --dims 512 --projectors basic --fp32-check 4
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import platform
import shlex
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from lessctl._reference import naive_gradients
from lessctl.grads.adam import AdamState, transform
from lessctl.grads.batching import token_batches
from lessctl.grads.collector import FeatureCollector
from lessctl.grads.engine import PerExampleGradients

# Llama shapes. 7b and 13b are Llama-2's; 1b is TinyLlama-1.1B's (grouped-query attention).
SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=172,
        vocab_size=2048,
    ),
    "1b": dict(
        hidden_size=2048,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        intermediate_size=5632,
        vocab_size=32000,
    ),
    "7b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        vocab_size=32000,
    ),
    "13b": dict(
        hidden_size=5120,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        intermediate_size=13824,
        vocab_size=32000,
    ),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LESS_PROJECT_INTERVAL = 16  # the authors project (and use TRAK's max_batch_size) every 16 examples
LESS_BLOCK_SIZE = 128
FAST_JL_INDEX_LIMIT = 2**32  # fast_jl indexes its input with 32-bit integers: rows * grad_dim must stay below
FLOPS_NOTE = (
    "model FLOPs = 4 x (base parameters other than the input embedding) x non-padding tokens: a forward (2N) "
    "and a backward through the frozen base for input gradients only (2N); attention scores, the LoRA "
    "matmuls, per-example gradient assembly, padding, the Adam transform and the projection are not counted"
)
PARTS = ("fwd_bwd", "assemble", "transform", "projection", "other")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- set-up


@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # -100 on the prompt


def make_examples(
    n: int, vocab: int, seed: int, mean_len: float, min_len: int, max_len: int, prompt_share: float, sigma: float = 0.8
) -> list[Example]:
    """Random token ids with lognormal lengths clipped to [min_len, max_len], the leading share masked with -100.

    The lognormal's location is solved so that the clipped lengths average `mean_len` for this very sample
    (throughput depends on it). Example i's normal draw and tokens depend only on (seed, i).
    """
    z = np.array([np.random.default_rng([seed, i]).standard_normal() for i in range(n)])

    def lengths(mu: float) -> np.ndarray:
        return np.clip(np.rint(np.exp(mu + sigma * z)), min_len, max_len).astype(int)

    lo, hi = math.log(min_len) - 5 * sigma, math.log(max_len) + 5 * sigma
    for _ in range(60):  # bisection: the mean of the clipped lengths grows with mu
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if lengths(mid).mean() < mean_len else (lo, mid)
    out = []
    for i, L in enumerate(lengths((lo + hi) / 2)):
        ids = np.random.default_rng([seed, i, 1]).integers(3, vocab, size=max_len)[:L].tolist()
        k = int(L * prompt_share)
        out.append(Example(ids, [-100] * k + ids[k:]))
    return out


def build_model(
    shape: str,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    r: int,
    alpha: int,
    dropout: float,
    lora_b_std: float,
    adapter_dtype: torch.dtype | None = None,
):
    """A random-weight Llama created directly on `device` in `dtype`, with a LoRA adapter (peft) on q/k/v/o.

    peft keeps the adapter weights in float32 (autocast_adapter_dtype), as lessctl's loader does.
    lora_B starts at zero in peft, which would make every lora_A gradient zero; it is filled with
    N(0, lora_b_std) instead, like an adapter after warm-up training.
    """
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):  # allocate and initialise on the GPU: a 7B model in seconds, not minutes on the CPU
        base = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    with torch.device(device):
        model = get_peft_model(
            base,
            LoraConfig(
                task_type=TaskType.CAUSAL_LM, r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS
            ),
        )
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, lora_b_std, generator=gen)
        if adapter_dtype is not None:  # e.g. bf16 adapters, as peft made them before autocast_adapter_dtype
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.data = p.data.to(adapter_dtype)
    model.eval()  # LESS takes gradients without dropout
    return model.to(device)


def synthetic_adam(grad_dim: int, device: torch.device, seed: int, m_std: float, v_std: float) -> AdamState:
    """Seeded moments (made on the CPU so they do not depend on the device): m ~ N(0, m_std), v ~ |N(0, v_std)|."""
    gen = torch.Generator().manual_seed(seed + 2)
    m = torch.randn(grad_dim, generator=gen) * m_std
    v = torch.randn(grad_dim, generator=gen).abs_() * v_std
    return AdamState(m.to(device), v.to(device), 0.9, 0.999, 1e-8)


def count_params(model) -> dict[str, int]:
    base = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    embed = model.get_input_embeddings().weight
    return {
        "base_params": sum(p.numel() for _, p in base),
        "flop_params": sum(p.numel() for _, p in base if p is not embed),
        "lora_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


# ----------------------------------------------------------------------------- timing


class PartTimer:
    """Wall time per part; each part ends with a CUDA synchronisation so the time lands where the work is.

    `gpu_part` times work queued inside another part (lessctl's per-example products and transform run in
    the backward's hooks) with CUDA events, without synchronising; its time is moved out of the enclosing part.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)
        self.start = 0.0
        self.total = 0.0
        self.pending: list = []  # (name, start event, end event) or (name, seconds)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[name] += time.perf_counter() - t0 - self._collect()

    @contextlib.contextmanager
    def gpu_part(self, name: str) -> Iterator[None]:
        """Work queued inside a part (lessctl's hooks), timed with CUDA events; its time leaves the enclosing part."""
        if self.cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            try:
                yield
            finally:
                e.record()
                self.pending.append((name, s, e))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self.pending.append((name, time.perf_counter() - t0))

    def _collect(self) -> float:
        """After a synchronisation: adds the gpu parts to their names and returns their total time."""
        total = 0.0
        for item in self.pending:
            secs = item[1].elapsed_time(item[2]) / 1000 if len(item) == 3 else item[1]
            self.seconds[item[0]] += secs
            total += secs
        self.pending = []
        return total

    def __enter__(self) -> "PartTimer":
        self.sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.sync()
        self.total = time.perf_counter() - self.start
        self.seconds["other"] = max(0.0, self.total - sum(v for k, v in self.seconds.items() if k != "other"))


@dataclass
class PathRun:
    """One timed pass over the examples, and the features of the check examples."""

    features: dict[int, torch.Tensor] = field(default_factory=dict)  # dim -> [N, D] float32 (CPU): adam features
    raw: dict[int, torch.Tensor] = field(
        default_factory=dict
    )  # dim -> [N, D]: the projected raw gradients (checks only)
    timer: PartTimer | None = None
    batches: int = 0
    padded_tokens: int = 0
    batch_log: list = field(default_factory=list)  # lessctl: per batch, its size, padded length and part times
    example_fwd_bwd_s: list = field(default_factory=list)  # baseline: forward/backward time per example
    pass_seconds: list = field(default_factory=list)  # with --repeats: every timed pass (the fastest is reported)
    project_rows: int = 0  # lessctl: rows gathered per projector call
    max_batch_examples: int | None = None  # lessctl: the cap on examples per batch it used


# ----------------------------------------------------------------------------- projectors


class LessProjector:
    """The projector the authors' code builds: TRAK's CudaProjector (max_batch_size 16), or the BasicProjector
    it silently falls back to (block size 128, the model's dtype) when fast_jl does not load."""

    def __init__(
        self,
        grad_dim: int,
        dim: int,
        device: torch.device,
        model_dtype: torch.dtype,
        use_cuda: bool,
        max_batch_size: int,
    ):
        from trak.projectors import BasicProjector, CudaProjector, ProjectionType

        if use_cuda:
            self.trak = CudaProjector(
                grad_dim=grad_dim,
                proj_dim=dim,
                seed=0,
                proj_type=ProjectionType.rademacher,
                device=device,
                max_batch_size=max_batch_size,
            )
            self.kind = f"cuda (TRAK CudaProjector, max_batch_size {max_batch_size})"
        else:
            self.trak = BasicProjector(
                grad_dim=grad_dim,
                proj_dim=dim,
                seed=0,
                proj_type=ProjectionType.rademacher,
                device=device,
                dtype=model_dtype,
                block_size=LESS_BLOCK_SIZE,
            )
            self.kind = f"basic (TRAK BasicProjector, block 128, {str(model_dtype).replace('torch.', '')})"

    def project(self, x16: torch.Tensor) -> torch.Tensor:
        """x16: [B, P] float16, as the authors pass it."""
        return self.trak.project(x16, model_id=0)


def free_cuda() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ----------------------------------------------------------------------------- the two paths


def run_baseline(
    model,
    examples: list[Example],
    adam: AdamState,
    projectors: dict[int, LessProjector],
    device: torch.device,
    interval: int,
    keep_raw: bool = False,
) -> PathRun:
    """The authors' loop, step by step: batch of one, `.grad` vectorised, Adam transform, project every `interval`."""
    b1, b2, eps = adam.beta1, adam.beta2, adam.eps
    avg, avg_sq = adam.exp_avg, adam.exp_avg_sq
    out: dict[int, list] = {d: [] for d in projectors}
    out_raw: dict[int, list] = {d: [] for d in projectors}
    full: list[torch.Tensor] = []
    raw: list[torch.Tensor] = []
    fb_times: list[float] = []

    def project_pending(t: PartTimer) -> None:
        with t.part("projection"):
            x = torch.stack(full).to(torch.float16)
            for d, proj in projectors.items():
                out[d].append(proj.project(x).cpu())
        if keep_raw:
            xr = torch.stack(raw).to(torch.float16)
            for d, proj in projectors.items():
                out_raw[d].append(proj.project(xr).cpu())
            raw.clear()
        full.clear()

    with PartTimer(device) as t:
        for count, ex in enumerate(examples, start=1):
            batch = {
                "input_ids": torch.tensor([ex.ids], device=device),
                "attention_mask": torch.ones(1, len(ex.ids), dtype=torch.long, device=device),
                "labels": torch.tensor([ex.labels], device=device),
            }
            fb0 = t.seconds["fwd_bwd"]
            with t.part("fwd_bwd"):
                loss = model(**batch).loss
                loss.backward()
            fb_times.append(t.seconds["fwd_bwd"] - fb0)
            with t.part("transform"):
                g = torch.cat([p.grad.view(-1) for _, p in model.named_parameters() if p.grad is not None])
                m = b1 * avg + (1 - b1) * g
                v = b2 * avg_sq + (1 - b2) * g**2
                f = m / torch.sqrt(v + eps)
            full.append(f)
            if keep_raw:
                raw.append(g)
            del g, m, v, f, loss
            model.zero_grad()
            if count % interval == 0:
                project_pending(t)
        if full:
            project_pending(t)
    run = PathRun(
        timer=t, batches=len(examples), padded_tokens=sum(len(e.ids) for e in examples), example_fwd_bwd_s=fb_times
    )
    run.features = {d: torch.cat(v).float() for d, v in out.items()}
    if keep_raw:
        run.raw = {d: torch.cat(v).float() for d, v in out_raw.items()}
    return run


def fastest(run_pass: Callable[[], PathRun], repeats: int) -> PathRun:
    """Runs `repeats` timed passes and keeps the fastest; every pass's time is kept in `pass_seconds`."""
    runs = [run_pass() for _ in range(max(1, repeats))]
    best = min(runs, key=lambda r: r.timer.total)
    best.pass_seconds = [round(r.timer.total, 4) for r in runs]
    return best


def run_lessctl(
    model,
    examples: list[Example],
    adam: AdamState,
    projectors: dict[int, Any],
    device: torch.device,
    batch_tokens: int,
    max_examples: int | None,
    keep_raw: bool = False,
    merge: bool = False,
    peg: PerExampleGradients | None = None,
) -> PathRun:
    """lessctl's grads stage without the store: `lessctl.grads.collector.FeatureCollector`, the code it runs.
    With `peg` (the compiled pass, built once) that pass is used and kept; otherwise one is made for the run."""
    own = peg is None
    if own:
        peg = PerExampleGradients(model, merge=merge)
    run = PathRun()
    try:
        with PartTimer(device) as t:
            collector = FeatureCollector(
                peg,
                projectors,
                "adam",
                adam,
                pad_id=0,
                batch_tokens=batch_tokens,
                max_batch_examples=max_examples,
                timer=t,
                keep_raw=keep_raw,
            )
            got = collector([e.ids for e in examples], [e.labels for e in examples])
    finally:
        if own:
            peg.remove()
    run.timer = t
    run.batches = len(got.batches)
    run.padded_tokens = sum(b * T for b, T in got.batches)
    run.batch_log = [{"examples": b, "tokens": T} for b, T in got.batches]
    run.features = {d: torch.from_numpy(v) for d, v in got.features.items()}
    if keep_raw:
        run.raw = {d: torch.from_numpy(v) for d, v in got.raw.items()}
    run.project_rows = collector.project_rows
    run.max_batch_examples = collector.max_batch_examples
    return run


def projection_calls(lengths: list[int], batch_tokens: int, max_examples: int | None, project_rows: int) -> list[int]:
    """The rows of each projector call `FeatureCollector` makes over examples of these lengths: rows are gathered
    across `token_batches` and projected in multiples of `project_rows`, the rest at the end."""
    calls, pending = [], 0
    for batch in token_batches(lengths, batch_tokens, max_examples):
        pending += len(batch)
        k = pending // project_rows * project_rows
        if k:
            calls.append(k)
            pending -= k
    if pending:
        calls.append(pending)
    return calls


def warm_projections(projectors: dict[int, Any], calls: list[int], grad_dim: int, device: torch.device) -> list[int]:
    """Projects zero rows once per distinct row count of `calls`, so that every kernel variant the timed pass
    launches (lessctl's Triton projection is compiled per row block and row-count specialisation) exists before
    it is timed. Returns the row counts warmed."""
    counts = sorted(set(calls))
    if not counts:
        return counts
    buf = torch.zeros(max(counts), grad_dim, dtype=torch.float16, device=device)
    for k in counts:
        for proj in projectors.values():
            proj.project(buf[:k])
    if device.type == "cuda":
        torch.cuda.synchronize()
    del buf
    return counts


def engines_after(projectors: dict[int, Any], before: dict[int, str]) -> dict[int, str]:
    """The engines after the timed pass; a change from `before` (an engine switched mid-run) is named."""
    now = engine_notes(projectors)
    return {d: n if n == before[d] else f"{n} (was {before[d]} before the timed pass)" for d, n in now.items()}


def engine_notes(projectors: dict[int, Any]) -> dict[int, str]:
    """What computes each projection (the projector's `engine_note()`, else its kind)."""
    out = {}
    for d, p in projectors.items():
        note = p.engine_note()
        if note is None and getattr(p, "engines", None):  # the count sketch: its engine per device, once used
            note = f"{type(p).__name__}: " + ", ".join(f"{e} on {dev}" for dev, e in p.engines.items())
        out[d] = note or f"{type(p).__name__} ({p.kind})"
    return out


# ----------------------------------------------------------------------------- figures


def cosines(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    """Row-wise cosine of two [N, D] feature matrices: median, minimum, and how many rows were not finite."""
    a, b = a.double(), b.double()
    ok = torch.isfinite(a).all(dim=1) & torch.isfinite(b).all(dim=1) & (a.norm(dim=1) > 0) & (b.norm(dim=1) > 0)
    c = torch.nn.functional.cosine_similarity(a[ok], b[ok], dim=1) if ok.any() else torch.empty(0, dtype=torch.double)
    return {
        "median": float(c.median()) if len(c) else None,
        "min": float(c.min()) if len(c) else None,
        "n": int(len(a)),
        "nonfinite_or_zero_rows": int((~ok).sum()),
    }


def path_figures(
    name: str,
    projector: str,
    run: PathRun,
    n_examples: int,
    tokens: int,
    flop_params: int,
    peak_tflops: float,
    device: torch.device,
) -> dict[str, Any]:
    t = run.timer
    total = t.total
    fig: dict[str, Any] = {
        "path": name,
        "projector": projector,
        "examples": n_examples,
        "seconds": round(total, 4),
        "examples_per_s": n_examples / total if total > 0 else None,
        "tokens_per_s": tokens / total if total > 0 else None,
        "times_s": {p: round(t.seconds.get(p, 0.0), 4) for p in PARTS},
        "shares": {p: (t.seconds.get(p, 0.0) / total if total > 0 else None) for p in PARTS},
        "batches": run.batches,
        "pass_seconds": run.pass_seconds or [round(total, 4)],
        "padding_share": 1 - tokens / run.padded_tokens if run.padded_tokens else 0.0,
    }
    flops = 4 * flop_params * tokens
    fig["mfu"] = flops / total / (peak_tflops * 1e12) if total > 0 else None
    fb = t.seconds.get("fwd_bwd", 0.0)
    fig["fwd_bwd_mfu"] = flops / fb / (peak_tflops * 1e12) if fb > 0 else None
    fig["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    if device.type == "cuda":  # allocator retries (free everything, malloc again) are slow: a sign of memory pressure
        fig["alloc_retries"] = int(torch.cuda.memory_stats().get("num_alloc_retries", 0))
    if run.batch_log:
        fig["batch_log"] = run.batch_log
    if run.example_fwd_bwd_s:
        fb = sorted(run.example_fwd_bwd_s)
        fig["example_fwd_bwd_s"] = {"median": fb[len(fb) // 2], "min": fb[0], "max": fb[-1]}
    return fig


def fmt(v: Any, spec: str = ".2f") -> str:
    if v is None:
        return "-"
    return format(v, spec)


def print_table(report: dict) -> None:
    rows = [
        [
            "path",
            "projector",
            "ex/s",
            "x base",
            "fwd/bwd",
            "assemble",
            "adam",
            "proj",
            "other",
            "MFU",
            "peak GiB",
            "cos adam med/min",
            "cos sgd med/min",
        ]
    ]
    dim = str(report["settings"]["dims"][0])
    for p in report["paths"]:
        if p.get("error"):
            rows.append([p["path"], p["projector"], "FAILED", "", "", "", "", "", "", "", "", p["error"][:60], ""])
            continue
        sh = p["shares"]
        cos = p.get("cosine", {}).get(dim, {})
        ca, cs = cos.get("adam", {}), cos.get("sgd", {})
        rows.append(
            [
                p["path"],
                p["projector"].split(" (")[0],
                fmt(p["examples_per_s"]),
                fmt(p.get("ratio_to_baseline"), ".1f"),
                fmt(sh["fwd_bwd"], ".0%"),
                fmt(sh["assemble"], ".0%"),
                fmt(sh["transform"], ".0%"),
                fmt(sh["projection"], ".0%"),
                fmt(sh["other"], ".0%"),
                fmt(p["mfu"], ".1%"),
                fmt(p["peak_memory_gib"], ".1f"),
                f"{fmt(ca.get('median'), '.5f')}/{fmt(ca.get('min'), '.5f')}" if ca else "-",
                f"{fmt(cs.get('median'), '.5f')}/{fmt(cs.get('min'), '.5f')}" if cs else "-",
            ]
        )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    s, d, m = report["settings"], report["data"], report["model"]
    print(
        f"\nLESS gradient features: {s['shape']} ({m['base_params'] / 1e9:.2f}B base, {m['lora_params']:,} LoRA "
        f"params), "
        f"{report['device']['name']}, {s['dtype']}, {d['examples']} examples of {d['mean_tokens']:.0f} tokens on "
        f"average, "
        f"dims {','.join(map(str, s['dims']))}"
    )
    for i, r in enumerate(rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for p in report["paths"]:
        for d, note in p.get("engines", {}).items():
            print(f"{p['path']}, dim {d}: projected by {note}; warmed row counts {p.get('warmed_row_counts')}")
    print(
        f"ex/s and shares: the fastest of {s['repeats']} timed pass(es) of each path; MFU: {FLOPS_NOTE}; "
        f"peak {s['peak_tflops']} TFLOP/s."
    )
    if s["fp32_check"]:
        print(
            f"cos: row cosine against fp32 ground truth (same transform and projector) on the first "
            f"{s['fp32_check']} examples, dim {dim}; sgd = the raw gradients, adam = the features LESS stores."
        )
    for note in report["notes"]:
        print(f"note: {note}")


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--examples", type=int, default=48, help="timed examples per path")
    ap.add_argument("--dims", default="8192", help="projection dimension(s), comma-separated")
    ap.add_argument(
        "--projectors",
        default="cuda,basic",
        help="lessctl projectors to time, comma-separated: cuda, basic, sketch, auto",
    )
    ap.add_argument(
        "--fp32-check", type=int, default=8, help="compare against fp32 ground truth on this many examples (0: skip)"
    )
    ap.add_argument("--no-baseline", action="store_true", help="skip the authors' batch-of-one loop")
    ap.add_argument("--json", type=Path, default=None, help="write every figure to this JSON file")
    ap.add_argument(
        "--batch-tokens", type=int, default=8192, help="lessctl's token budget per batch (its default: 8192)"
    )
    ap.add_argument(
        "--max-batch-examples",
        default="auto",
        help="split lessctl's batches to at most this many examples (0: never; auto: what the [B, P] "
        "gradient and transform buffers leave room for on a GPU, never on a CPU)",
    )
    ap.add_argument(
        "--oom-retries",
        type=int,
        default=3,
        help="on a GPU out-of-memory in lessctl's path, halve --batch-tokens and retry",
    )
    ap.add_argument(
        "--adapter-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="LoRA weights' dtype: peft keeps them in float32 by default; bfloat16 as older peft (and LESS's runs) did",
    )
    ap.add_argument(
        "--merge",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="lessctl's path merges the adapter into the base weights for the pass, as `lessctl grads` does "
        "by default ([grads] merge)",
    )
    ap.add_argument(
        "--compile",
        action="store_true",
        help="lessctl's path runs the compiled pass (lessctl grads --compile); its compilation is timed apart",
    )
    ap.add_argument("--tf32", action="store_true", help="allow TF32 for float32 matmuls (the float32 LoRA path)")
    ap.add_argument(
        "--basic-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="matrix dtype of lessctl's basic projector (lessctl uses float32; LESS used the model's dtype)",
    )
    ap.add_argument("--warmup", type=int, default=4, help="untimed examples run through each path first")
    ap.add_argument("--repeats", type=int, default=1, help="timed passes per path; the fastest is reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument(
        "--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 on a GPU, fp32 on the CPU"
    )
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100/H200 SXM: 989)")
    ap.add_argument("--mean-tokens", type=float, default=355.0)
    ap.add_argument("--min-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--prompt-share", type=float, default=0.4, help="leading share of each example masked with -100")
    ap.add_argument("--lora-r", type=int, default=128)
    ap.add_argument("--lora-alpha", type=int, default=512)
    ap.add_argument("--lora-dropout", type=float, default=0.1)
    ap.add_argument("--lora-b-std", type=float, default=1e-3, help="std of lora_B (peft starts it at zero)")
    ap.add_argument("--adam-m-std", type=float, default=1e-4)
    ap.add_argument("--adam-v-std", type=float, default=1e-6)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype) or (
        torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    dims = [int(x) for x in str(args.dims).split(",") if x.strip()]
    kinds = [k.strip() for k in args.projectors.split(",") if k.strip()]
    n_check = min(max(0, args.fp32_check), args.examples)
    notes: list[str] = []

    import peft
    import transformers

    from lessctl.grads.projection.choose import choose_projector_kind, make_projector
    from lessctl.grads.projection.trak import fast_jl_status

    dev_info: dict[str, Any] = {"type": device.type, "name": platform.processor() or platform.machine()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        dev_info.update(
            name=props.name,
            sm_count=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
        )
    fj_ok, fj_why = fast_jl_status(device) if device.type == "cuda" else (False, "no CUDA GPU")
    report: dict[str, Any] = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
        if argv is None
        else " ".join(shlex.quote(a) for a in ["grads_throughput.py", *argv]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "device": dev_info,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "traker": _version("trak"),
            "fast_jl": {"usable": fj_ok, "detail": fj_why},
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        | {
            "dims": dims,
            "projectors": kinds,
            "dtype": str(dtype).replace("torch.", ""),
            "fp32_check": n_check,
            "shape_config": SHAPES[args.shape],
            "cpu_threads": torch.get_num_threads(),
        },
        "flops_note": FLOPS_NOTE,
        "notes": notes,
        "paths": [],
    }

    # -- model, moments, examples
    t0 = time.perf_counter()
    log(f"building the {args.shape} model on {device} in {dtype}")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    adapter_dtype = None if args.adapter_dtype == "float32" else getattr(torch, args.adapter_dtype)
    model = build_model(
        args.shape,
        device,
        dtype,
        args.seed,
        args.lora_r,
        args.lora_alpha,
        args.lora_dropout,
        args.lora_b_std,
        adapter_dtype,
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    counts = count_params(model)
    P = counts["lora_params"]
    adam = synthetic_adam(P, device, args.seed, args.adam_m_std, args.adam_v_std)
    report["model"] = counts | {"build_s": round(time.perf_counter() - t0, 2)}
    vocab = SHAPES[args.shape]["vocab_size"]
    examples = make_examples(
        args.examples, vocab, args.seed, args.mean_tokens, args.min_tokens, args.max_tokens, args.prompt_share
    )
    lengths = [len(e.ids) for e in examples]
    tokens = sum(lengths)
    report["data"] = {
        "examples": len(examples),
        "mean_tokens": tokens / len(examples),
        "min_tokens": min(lengths),
        "max_tokens": max(lengths),
        "total_tokens": tokens,
        "label_tokens": sum(sum(1 for x in e.labels if x != -100) for e in examples),
    }
    log(
        f"model ready in {report['model']['build_s']} s: {counts['base_params'] / 1e9:.2f}B base, {P:,} LoRA "
        f"parameters; "
        f"{len(examples)} examples, {tokens} tokens"
    )
    keep_projectors = device.type != "cuda"  # on a GPU they are rebuilt for the fp32 check, to free their memory
    k_warm = min(len(examples), max(args.warmup, n_check))
    warm = examples[:k_warm]
    check_feats: dict[str, dict] = {}  # path name -> {"adam": {dim: [n, D]}, "sgd": ...}
    truth_projectors: dict[str, Callable[[], dict[int, Any]]] = {}

    # -- (a) the authors' loop
    base_fig = None
    if not args.no_baseline:
        use_cuda = device.type == "cuda" and fj_ok
        if device.type == "cuda" and not fj_ok:
            notes.append(f"fast_jl is not usable ({fj_why}): the baseline falls back to BasicProjector, as LESS does")
        interval = LESS_PROJECT_INTERVAL
        while interval > 8 and interval * P >= FAST_JL_INDEX_LIMIT:
            interval //= 2
        if interval != LESS_PROJECT_INTERVAL:
            notes.append(
                f"baseline projects every {interval} examples: 16 x {P} LoRA parameters exceeds fast_jl's 2^32 limit"
            )

        def base_projectors(interval=interval, use_cuda=use_cuda) -> dict[int, Any]:
            return {d: LessProjector(P, d, device, dtype, use_cuda, interval) for d in dims}

        log("baseline: warm-up and check run")
        projs = base_projectors()
        kind = next(iter(projs.values())).kind
        chk = run_baseline(model, warm, adam, projs, device, interval, keep_raw=True)
        check_feats["baseline"] = {
            "adam": {d: v[:n_check] for d, v in chk.features.items()},
            "sgd": {d: v[:n_check] for d, v in chk.raw.items()},
        }
        truth_projectors["baseline"] = (lambda p=projs: p) if keep_projectors else base_projectors
        del chk
        gc.collect()  # the allocator's cache stays warm, as in a long run
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.reset_accumulated_memory_stats()
        log(f"baseline: timing {len(examples)} examples x {args.repeats} pass(es)")
        run = fastest(lambda: run_baseline(model, examples, adam, projs, device, interval), args.repeats)
        base_fig = path_figures(
            "baseline", kind, run, len(examples), tokens, counts["flop_params"], args.peak_tflops, device
        )
        base_fig["project_interval"] = interval
        report["paths"].append(base_fig)
        log(f"baseline: {base_fig['examples_per_s']:.2f} examples/s")
        del run, projs
        free_cuda()

    # -- (b) lessctl's path, once per projector
    shared = None
    if args.compile:  # one compiled pass for every projector, compiled here on the timed batches' shapes
        t0 = time.perf_counter()
        shared = PerExampleGradients(model, merge=args.merge, compile=True)
        mb = _max_batch_examples(args.max_batch_examples, device, P)
        for batch in token_batches([len(e.ids) for e in examples], args.batch_tokens, mb):
            shared.features([examples[i].ids for i in batch], [examples[i].labels for i in batch], 0, "adam", adam)
        if device.type == "cuda":
            torch.cuda.synchronize()
        from torch._dynamo.utils import counters

        report["compile"] = {
            "seconds": round(time.perf_counter() - t0, 1),
            "graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values())),
        }
        log(
            f"lessctl: compiled the pass in {report['compile']['seconds']} s ({report['compile']['graphs']} graph(s), "
            f"{report['compile']['graph_breaks']} break(s))"
        )
    for req in kinds:
        name = f"lessctl-{req}"
        fig: dict[str, Any] = {"path": name, "projector": req}
        try:
            kind, why = choose_projector_kind(req, str(device), dims)
        except Exception as exc:  # noqa: BLE001 - an unknown kind is reported, the others still run
            fig["error"] = str(exc)
            report["paths"].append(fig)
            continue
        bt = args.batch_tokens
        retries: list[dict] = []
        bdtype = getattr(torch, args.basic_dtype)

        def less_projectors(kind=kind, bdtype=bdtype) -> dict[int, Any]:
            return {d: make_projector(kind, P, d, str(device), block_size=LESS_BLOCK_SIZE, dtype=bdtype) for d in dims}

        for attempt in range(args.oom_retries + 1):
            failure = None
            projs = None
            stage = "building the projectors"
            try:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                log(f"{name}: building projectors ({why})")
                projs = less_projectors()
                stage = "computing features"
                max_b = _max_batch_examples(args.max_batch_examples, device, P)
                log(f"{name}: warm-up and check run (batch tokens {bt}, at most {max_b or 'any'} examples per batch)")
                chk = run_lessctl(
                    model, warm, adam, projs, device, bt, max_b, keep_raw=True, merge=args.merge, peg=shared
                )
                check_feats[name] = {
                    "adam": {d: v[:n_check] for d, v in chk.features.items()},
                    "sgd": {d: v[:n_check] for d, v in chk.raw.items()},
                }
                calls = projection_calls(lengths, bt, chk.max_batch_examples, chk.project_rows)
                del chk
                warmed = warm_projections(projs, calls, P, device)
                engines = engine_notes(projs)
                log(f"{name}: projection warmed for the timed pass's row counts {warmed}")
                for d, note in engines.items():
                    log(f"{name}: dim {d}: {note}")
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    torch.cuda.reset_accumulated_memory_stats()
                log(f"{name}: timing {len(examples)} examples x {args.repeats} pass(es)")
                run = fastest(
                    lambda: run_lessctl(model, examples, adam, projs, device, bt, max_b, merge=args.merge, peg=shared),
                    args.repeats,
                )
                fig = path_figures(
                    name, f"{kind} ({why})", run, len(examples), tokens, counts["flop_params"], args.peak_tflops, device
                )
                fig.update(
                    batch_tokens=bt,
                    max_batch_examples=run.max_batch_examples,
                    project_rows=run.project_rows,
                    merge=args.merge,
                    compile=args.compile,
                    oom_retries=retries,
                    projector_attrs=projs[dims[0]].attrs,
                    projection_calls=calls,
                    warmed_row_counts=warmed,
                    engines={str(d): note for d, note in engines_after(projs, engines).items()},
                )
                if kind == "basic":
                    fig["projector_attrs"]["matrix_dtype"] = args.basic_dtype
                truth_projectors[name] = (lambda p=projs: p) if keep_projectors else less_projectors
                log(f"{name}: {fig['examples_per_s']:.2f} examples/s")
                del run
            except Exception as exc:  # noqa: BLE001 - one projector failing must not lose the others' figures
                text = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                if is_oom(exc) and device.type == "cuda" and stage == "computing features":
                    failure = text
                else:
                    fig = {"path": name, "projector": kind, "error": f"{stage}: {text}", "oom_retries": retries}
                    log(f"{name}: failed: {text}")
            projs = None
            free_cuda()
            if failure is None:
                break
            retries.append({"batch_tokens": bt, "error": failure})
            log(f"{name}: out of memory at batch tokens {bt}")
            if attempt == args.oom_retries or bt <= 256:
                fig = {"path": name, "projector": kind, "error": f"out of memory ({failure})", "oom_retries": retries}
                break
            bt //= 2
        report["paths"].append(fig)

    if shared is not None:
        shared.remove()
        del shared

    # -- ratios
    for p in report["paths"]:
        if base_fig and not p.get("error") and p is not base_fig:
            p["ratio_to_baseline"] = p["examples_per_s"] / base_fig["examples_per_s"]
        elif p is base_fig:
            p["ratio_to_baseline"] = 1.0

    # -- fp32 ground truth on the first n_check examples
    if n_check and check_feats:
        t0 = time.perf_counter()
        log(f"fp32 check: ground truth on {n_check} examples")
        truth = fp32_truth(model, examples[:n_check], adam)
        del model  # the projectors may need the memory
        free_cuda()
        report["fp32_check"] = compare_to_truth(truth, device, check_feats, truth_projectors, report)
        report["fp32_check"]["seconds"] = round(time.perf_counter() - t0, 2)
    else:
        del model
    free_cuda()

    print_table(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        log(f"wrote {args.json}")
    return report


def _version(module: str) -> str | None:
    try:
        return str(getattr(__import__(module), "__version__", "unknown"))
    except Exception:  # noqa: BLE001
        return None


def _max_batch_examples(spec: str, device: torch.device, grad_dim: int) -> int | None:
    """The cap on examples per lessctl batch: explicit (0: none), or None for lessctl's own choice
    (`lessctl.grads.batching.auto_max_batch_examples`)."""
    if str(spec) != "auto":
        return int(spec) or None
    return None


def fp32_truth(model, examples: list[Example], adam: AdamState) -> dict[str, torch.Tensor]:
    """Ground truth: naive per-example gradients of the same weights in float32 and the same Adam transform.

    bf16 -> fp32 is exact, so casting the model in place gives an fp32 copy of the very same weights (and frees
    the bf16 ones); TF32 is turned off. Returns {"adam": [n, P], "sgd": [n, P]} float32 on the CPU.
    """
    model.float()
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        rows_raw, rows_adam = [], []
        for ex in examples:
            g = naive_gradients(model, [ex.ids], [ex.labels], pad_id=0)  # [1, P] float32
            rows_adam.append(transform(g, "adam", adam).cpu())
            rows_raw.append(g.cpu())
            del g
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    return {"adam": torch.cat(rows_adam), "sgd": torch.cat(rows_raw)}


def compare_to_truth(
    truth: dict[str, torch.Tensor], device: torch.device, check_feats: dict, truth_projectors: dict, report: dict
) -> dict:
    """Projects the truth with each path's own projector (rebuilt: the matrices are seeded) and records the row
    cosines of each path's features against it in the path's figures."""
    n = len(truth["adam"])
    out: dict[str, Any] = {
        "examples": n,
        "grad_rms": float(truth["sgd"].pow(2).mean().sqrt()),
        "adam_feature_rms": float(truth["adam"].pow(2).mean().sqrt()),
    }
    # how alike the features of different examples are: near 1, the moments dominate and the cosines say little
    for kind in ("adam", "sgd"):
        x = truth[kind].to(device)
        gram = (x @ x.T).double().cpu()  # [n, n]
        nrm = gram.diagonal().sqrt().clamp(min=1e-300)
        cos = gram / nrm[:, None] / nrm[None, :]
        out[f"{kind}_cross_example_cosine_mean"] = (
            float((cos.sum() - cos.diagonal().sum()) / (n * (n - 1))) if n > 1 else None
        )
        del x
    for p in report["paths"]:
        name = p["path"]
        if p.get("error") or name not in check_feats:
            continue
        try:
            projs = truth_projectors[name]()
            p["cosine"] = {}
            for d, proj in projs.items():
                res = {}
                for kind in ("adam", "sgd"):
                    tp = torch.cat([_project(proj, truth[kind][i : i + 8].to(device), name) for i in range(0, n, 8)])
                    res[kind] = cosines(check_feats[name][kind][d], tp)
                p["cosine"][str(d)] = res
            del projs
        except Exception as exc:  # noqa: BLE001
            p["cosine_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log(f"fp32 check for {name} failed: {p['cosine_error']}")
        free_cuda()
    return out


def _project(proj, x: torch.Tensor, name: str) -> torch.Tensor:
    """Project fp32 rows the way the path does: the baseline casts to float16 itself, lessctl's projectors inside."""
    if name == "baseline":
        return proj.project(x.to(torch.float16)).float().cpu()
    return proj.project(x).float().cpu()


if __name__ == "__main__":
    main()
