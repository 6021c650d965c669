"""The fused per-example products (lessctl.kernels.segment_products_into, kernel in lessctl.products_triton).

On the CPU the kernel runs under Triton's interpreter (TRITON_INTERPRET must be set before triton is imported,
hence the subprocesses): against sums in float64 and `transform`, and end to end, where a LoRA model's features
through the kernel equal those of the batched-matmul path. The interpreter does not run bfloat16 dots, so
those checks use float16 and float32; bfloat16, the GPU's case, is checked on a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton (the dev extra installs it on Linux x86_64)")
# The interpreter checks are the CPU's stand-in for the GPU test below (and older Triton interpreters, such as
# 3.6's, cannot run a loop bound loaded from memory): on a GPU machine the kernel itself is tested.
on_cpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the compiled kernel is tested instead")

_KERNEL_SCRIPT = r"""
import json, torch
from lessctl.kernels import launch_segment_products
from lessctl.gradients import AdamState, transform

torch.manual_seed(0)
results = []
for dtype in (torch.float32, torch.float16):
    for B, T, M, N, lens, packed in ((3, 70, 24, 40, [70, 5, 33], False), (2, 9, 130, 17, [0, 9], False),
                                     (1, 90, 16, 150, [30, 1, 59], True)):
        lhs = torch.randn(B, T, M).to(dtype)
        rhs = torch.randn(B, T, 2 * N).to(dtype)[..., ::2]  # rows of stride 2N: only the last dim is contiguous
        rhs = rhs.contiguous() if packed else rhs.as_strided((B, T, N), (T * 2 * N, 2 * N, 1), 0)
        n = len(lens)
        if packed:  # several examples one after the other in one batch row
            starts = [sum(lens[:i]) for i in range(n)]
            seg = (torch.zeros(n, dtype=torch.int32), torch.tensor(starts, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32))
            pieces = [(0, s, l) for s, l in zip(starts, lens)]
        else:
            seg = (torch.arange(n, dtype=torch.int32), torch.zeros(n, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32))
            pieces = [(i, 0, l) for i, l in enumerate(lens)]
        P, off = M * N + 11, 7
        adam = AdamState(torch.randn(P) * 1e-2, torch.rand(P) * 1e-3, 0.9, 0.999, 1e-8)
        ref = torch.stack([lhs[r, s:s + l].double().T @ rhs[r, s:s + l].double() for r, s, l in pieces]).reshape(n, -1)
        # L^T as the kernel takes it, [B, M, T]: a transposed view of token-major rows, or stored transposed
        for lt, trans in ((lhs.transpose(1, 2), False), (lhs.transpose(1, 2).contiguous(), True)):
            exp = ref.reshape(n, M, N).transpose(1, 2).reshape(n, -1) if trans else ref  # trans_out: C^T's layout
            full = torch.zeros(n, P)
            full[:, off:off + M * N] = exp.float()
            for kind in ("adam", "sgd", "sign"):
                out = torch.full((n, P), 7.0, dtype=torch.float16)
                raw = torch.full_like(out, 7.0)
                launch_segment_products(lt, rhs, seg, kind, adam if kind == "adam" else None, off, out, raw,
                                        trans_out=trans, config={"BLOCK_N": 32, "BLOCK_K": 16})
                want = transform(full.clone(), kind, adam)[:, off:off + M * N]
                got = out[:, off:off + M * N].float()
                err = ((got - want).abs() / (want.abs() + 1e-3)).max().item()
                raw_err = ((raw[:, off:off + M * N].float() - exp.float()).abs() / (exp.float().abs() + 1e-3)).max().item()
                untouched = bool((out[:, :off] == 7).all() and (out[:, off + M * N:] == 7).all())
                results.append([str(dtype), kind, list(lens), trans, err, raw_err, untouched])
print(json.dumps(results))
"""

_FEATURES_SCRIPT = r"""
import json, sys, torch
from lessctl import kernels
from lessctl.data import encode_record, read_jsonl
from lessctl.gradients import PerExampleGradients, load_adam_state
from lessctl.models import load_adapter_model
from pathlib import Path

ws = Path(sys.argv[1])
manifest = json.loads((ws / "out" / "warmup" / "checkpoints.json").read_text())
ckpt = ws / "out" / "warmup" / f"checkpoint-{manifest[-1]['step']}"
model, tok = load_adapter_model(ckpt, base=str(ws / "model"), dtype="fp32", device="cpu", trainable=True)
model.eval()
model.get_base_model().half()  # the activations become float16; the adapter stays float32, as peft keeps it
recs = read_jsonl(ws / "data" / "synth_a.jsonl")[:7]
enc = [encode_record(r, tok, 128) for r in recs]
seqs, labels = [e.input_ids for e in enc], [e.labels for e in enc]
out = {}
for merge in (False, True):
    peg = PerExampleGradients(model, merge=merge)
    adam = load_adam_state(ckpt, peg.params, "cpu")
    try:
        for kind in ("adam", "sgd"):
            kernels._state["segment_products"] = None
            fused, fused_raw, _, _ = peg.features(seqs, labels, tok.pad_token_id, kind, adam, keep_raw=True)
            assert kernels.fast_paths()["segment_products"] is True
            kernels._state["segment_products"] = False  # the batched-matmul path
            ref, ref_raw, _, _ = peg.features(seqs, labels, tok.pad_token_id, kind, adam, keep_raw=True)
            kernels._state["segment_products"] = None
            rel = ((fused.float() - ref.float()).norm(dim=1) / ref.float().norm(dim=1)).max().item()
            rel_raw = ((fused_raw.float() - ref_raw.float()).norm(dim=1) / ref_raw.float().norm(dim=1)).max().item()
            out[f"{kind} merge={merge}"] = [rel, rel_raw, bool(torch.isfinite(fused).all())]
    finally:
        peg.remove()
print(json.dumps(out))
"""


def _interpreted(script: str, *args: str) -> object:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_triton
@on_cpu
def test_kernel_under_the_interpreter_equals_float64_sums_and_the_transform():
    """Each example's tokens only (padded rows, strided inputs, an empty example, examples packed in one row), every
    transform, the raw rows, and nothing written outside the weight's slice."""
    results = _interpreted(_KERNEL_SCRIPT)
    assert len(results) == 2 * 3 * 2 * 3
    for dtype, kind, lens, trans, err, raw_err, untouched in results:
        assert untouched, (dtype, kind, lens)
        assert err < 2e-3, (dtype, kind, lens, err)  # float16 output: 2^-11 relative
        assert raw_err < 2e-3, (dtype, kind, lens, raw_err)


@needs_triton
@on_cpu
def test_features_through_the_kernel_equal_the_batched_path(tiny_template):
    """`PerExampleGradients.features` of a float16 LoRA model, merged and not: the kernel's rows equal the
    batched matmuls' rows (float16 outputs of float32 sums in another order)."""
    out = _interpreted(_FEATURES_SCRIPT, str(tiny_template))
    assert set(out) == {"adam merge=False", "sgd merge=False", "adam merge=True", "sgd merge=True"}
    for case, (rel, rel_raw, finite) in out.items():
        assert finite, case
        assert rel < 3e-3 and rel_raw < 3e-3, (case, rel, rel_raw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernel_on_the_gpu_in_bfloat16_equals_the_batched_matmuls():
    from lessctl import kernels
    from lessctl.gradients import AdamState, transform

    gen = torch.Generator(device="cuda").manual_seed(0)
    B, T, M, N = 5, 300, 128, 4096
    lens = [300, 17, 250, 1, 128]
    lhs = torch.randn(B, T, M, device="cuda", generator=gen).bfloat16()
    rhs = torch.randn(B, T, N, device="cuda", generator=gen).bfloat16()
    for i, n in enumerate(lens):  # padding positions carry a zero gradient, as in a pass
        lhs[i, n:] = 0
    seg = (torch.arange(B, dtype=torch.int32, device="cuda"), torch.zeros(B, dtype=torch.int32, device="cuda"),
           torch.tensor(lens, dtype=torch.int32, device="cuda"))
    P = M * N
    adam = AdamState(torch.randn(P, device="cuda", generator=gen) * 1e-2, torch.rand(P, device="cuda", generator=gen) * 1e-3,
                     0.9, 0.999, 1e-8)
    out = torch.empty(B, P, dtype=torch.float16, device="cuda")
    assert kernels.segment_products_into(lhs.transpose(1, 2), rhs, seg, "adam", adam, 0, out)
    sums = kernels.bmm_f32(lhs.transpose(1, 2), rhs) if kernels.has_bmm_f32("cuda") else torch.bmm(lhs.float().transpose(1, 2), rhs.float())
    want = transform(sums.reshape(B, -1), "adam", adam).half()
    rel = ((out.float() - want.float()).norm(dim=1) / want.float().norm(dim=1)).max().item()
    assert rel < 2e-3, rel


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_features_on_the_gpu_through_the_kernel_equal_the_batched_path(tiny_template):
    """The GPU's case end to end: a bfloat16 LoRA model, merged and not, adam and sgd, kernel against batched matmuls."""
    from lessctl import kernels
    from lessctl.data import encode_record, read_jsonl
    from lessctl.gradients import PerExampleGradients, load_adam_state
    from lessctl.models import load_adapter_model

    manifest = json.loads((tiny_template / "out" / "warmup" / "checkpoints.json").read_text())
    ckpt = tiny_template / "out" / "warmup" / f"checkpoint-{manifest[-1]['step']}"
    model, tok = load_adapter_model(ckpt, base=str(tiny_template / "model"), dtype="bf16", device="cuda", trainable=True)
    model.eval()
    enc = [encode_record(r, tok, 128) for r in read_jsonl(tiny_template / "data" / "synth_a.jsonl")[:7]]
    seqs, labels = [e.input_ids for e in enc], [e.labels for e in enc]
    for merge in (False, True):
        peg = PerExampleGradients(model, merge=merge)
        adam = load_adam_state(ckpt, peg.params, "cuda")
        try:
            for kind in ("adam", "sgd"):
                kernels._state["segment_products"] = None
                fused = peg.features(seqs, labels, tok.pad_token_id, kind, adam)[0].float()
                assert kernels.fast_paths()["segment_products"] is True
                kernels._state["segment_products"] = False
                ref = peg.features(seqs, labels, tok.pad_token_id, kind, adam)[0].float()
                kernels._state["segment_products"] = None
                rel = ((fused - ref).norm(dim=1) / ref.norm(dim=1)).max().item()
                assert rel < 5e-3, (merge, kind, rel)
        finally:
            peg.remove()
