"""The count sketch behind `--projector sketch`: a hash laid out so that projecting is a gather, not a scatter.

A count sketch sends each of the P coordinates to one of D buckets with a random sign. With an arbitrary hash
the projection is a scatter-add (`index_add_`: atomics on a GPU, 30x the cost of reading the row at 7B). Here
the hash is built from permutations, so every output bucket receives exactly one coordinate per chunk of D
coordinates, and the projection is the gather out[:, j] = sum over chunks of +-x[:, source(chunk, j)]: no
atomics, each x element read once, on a GPU as fast as memory allows (lessctl.grads.projection.sketch_triton's kernel).

The definition (P coordinates, D outputs):
- segment size S = the largest power of two <= 256 that divides D (256 for D = 8192, 4096, 1024, 512; 8 for
  D = 1000; 1 for odd D); Nseg = D / S output blocks of S buckets;
- the coordinates are cut into C = ceil(P / D) chunks of D: chunk c holds coordinates c D .. c D + D - 1 (those
  >= P are absent, i.e. zero), and its segment s the S coordinates c D + s S .. c D + s S + S - 1;
- in chunk c, segment s goes to output block sigma_c(s) (a random permutation of Nseg per chunk), and its
  coordinate at offset t to bucket sigma_c(s) S + tau_{c,s}(t) (a random permutation of S per segment), with
  a random sign (+-1, independent per coordinate); so every bucket is hit by one coordinate of each chunk, a
  coordinate's bucket is uniform over the D buckets and independent across chunks (pairwise collisions have
  probability 1 / D, as in a count sketch with a fully random hash), and out[:, j] = sum over chunks of
  eps * x[:, source(c, j)];
- stored in gather form, for chunk c and output block b: seg[c, b] = sigma_c^-1(b) (int32 [C, Nseg]), and
  for bucket u of the block code[c, b, u] = tau^-1(u) + 256 * (eps == -1) (int16 [C, Nseg, S]): the source
  offset inside the segment in the low 8 bits, the sign in bit 8 (the signs are iid per coordinate, so
  drawing them in gather order gives the same distribution);
- generation, on the CPU whatever the device, so that the sketch is the same everywhere: the chunks go in
  groups of G = max(1, 2**22 // D) chunks (512 at D = 8192), group g with its own torch.Generator seeded by
  `group_seed(seed, model_id, g)`, which draws, in this order: its chunks' seg rows (`permutations` of
  Nseg: the drawn permutations are the inverses sigma_c^-1 directly, which are as random), its chunks' code
  offsets in (chunk, block) order (`permutations` of S: the tau^-1), and the signs (torch.randint(0, 2),
  int16 [chunks, Nseg, S], 1 meaning -1). `permutations` is a Fisher-Yates shuffle driven by float64
  torch.rand draws. At P = 2**27, D = 8192 this takes 4 s on 2 CPU cores (groups run in parallel threads).

`project_torch` computes it with torch gathers on any device (bounded memory: a few chunks at a time), the
Triton kernel (`project_triton`) on a GPU; both are checked against the explicit dense matrix in tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lessctl.grads.projection.base import Projector
from lessctl.grads.projection.kernel_check import cached, compare, triton_problem

log = logging.getLogger(__name__)


class CountSketchProjector(Projector):
    """A sparse JL projection (count sketch): each parameter adds +-x_j to one of the D outputs.

    Its hash is made of permutations (this module's docstring): every output receives exactly one parameter of
    each chunk of D parameters, so projecting is a gather (no atomics) that reads each parameter once, which on a
    GPU (`sketch_triton`'s kernel) runs at about the speed of reading the row. Its tables are drawn
    on the CPU from seeded generators, so the sketch is the same on every device and GPU model; they stay on
    the device (2 bytes per parameter). One row costs O(P) additions instead of O(P x D) multiply-adds; it
    is not LESS's projection, so its selection quality is measured separately (bench/projection_quality.py),
    and stores made with it are never matched against Rademacher ones, nor against sketches of another hash
    (`attrs` names the hash).

    The engine: the Triton kernel for rows on a CUDA device when triton imports and the kernel passes a
    known-answer test against the torch gather there (`check_triton`), else the torch gather
    (`project_torch`), which computes the same sketch on any device; the choice is logged once.
    """

    kind = "sketch"
    HASH = "segment-permutation"  # the layout of this module's tables

    def __init__(self, grad_dim, dim, device, seed=0, model_id=0):
        import time

        super().__init__(grad_dim, dim, device, seed, model_id)
        t0 = time.perf_counter()
        seg, code = make_tables(grad_dim, dim, seed, model_id)
        self.seg, self.code = seg.to(device), code.to(device)
        self.engines: dict[str, str] = {}  # x's device -> "triton" or "torch", decided on first use
        log.debug("count sketch tables (%d parameters, dim %d) in %.1f s", grad_dim, dim, time.perf_counter() - t0)

    def engine_for(self, device) -> str:
        """The engine that projects rows on `device`: decided (and logged) on the first rows seen there."""

        key = str(device)
        if key not in self.engines:
            if device.type == "cuda":
                ok, detail = check_triton(device, self.dim)
                if ok:
                    log.info("count sketch (dim %d) on %s: lessctl's Triton kernel (%s)", self.dim, key, detail)
                else:
                    log.warning(
                        "count sketch (dim %d) on %s: torch gathers, slower; the Triton kernel is not usable here: %s",
                        self.dim,
                        key,
                        detail,
                    )
                self.engines[key] = "triton" if ok else "torch"
            else:
                log.info("count sketch (dim %d) on %s: torch gathers", self.dim, key)
                self.engines[key] = "torch"
        return self.engines[key]

    def project(self, x):

        if x.device != self.seg.device:
            raise ValueError(f"count sketch: rows on {x.device}, tables on {self.seg.device}")
        fn = project_triton if self.engine_for(x.device) == "triton" else project_torch
        return fn(x, self.seg, self.code, self.grad_dim, self.dim)

    @property
    def attrs(self) -> dict:
        return {**super().attrs, "type": "count-sketch", "hash": self.HASH}


MAX_SEGMENT = 256  # the code's low 8 bits hold the offset inside a segment
SIGN_BIT = 256
GROUP_COORDINATES = 1 << 22  # coordinates per generator group (G = max(1, 2**22 // D) chunks): ~70 MB to generate
GENERATION_THREADS = 4  # groups generated at once
SHUFFLE_COLUMNS = 8192  # permutations shuffled together: their [S, 8192] int16 state (4 MB) stays in cache
TORCH_STEP_ELEMENTS = 1 << 25  # project_torch: rows x coordinates gathered per step (its float32 temporaries)

# project_triton's launch settings. Every program reads its rows' S-wide segment of each of its chunks, so
# x is read once per row block; the chunk range is split KSPLIT ways until the grid has about TARGET_PROGRAMS
# programs, and the [KSPLIT, B, D] partial sums are added afterwards (no atomics). Tuned on an H100 with
# bench/sketch_projection.py (63 rows of 2**27 at D = 8192: 22.7 ms a call, 2.8x a plain read of the rows;
# block_m 16 with 8 splits and 8 warps was the fastest of 36 launches, 4 warps 5% slower).
BLOCK_M = 16
TARGET_PROGRAMS = 1024
NUM_WARPS = 8
NUM_STAGES = 2


def segment_size(dim: int) -> int:
    """S: the largest power of two <= 256 that divides dim."""
    if dim < 1:
        raise ValueError(f"count sketch: dim must be positive, got {dim}")
    return min(MAX_SEGMENT, dim & -dim)


def chunks_per_group(dim: int) -> int:
    return max(1, GROUP_COORDINATES // dim)


def group_seed(seed: int, model_id: int, group: int) -> int:
    """The seed of group `group`'s generator: 63 bits of SHA-256 of (seed, model_id, group), so that no two
    (seed, model_id, group) share a stream, whatever their sizes."""
    digest = hashlib.sha256(f"lessctl-count-sketch/{seed}/{model_id}/{group}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def permutations(gen, count: int, n: int):
    """`count` uniformly random permutations of range(n), [count, n] int16 (int32 when n > 2**15).

    Fisher-Yates, vectorised over the permutations: u = torch.rand(n, count, float64) from `gen`; for i = n-1
    down to 1, entry i of permutation r swaps with entry floor(u[i, r] * (i + 1)). The same in any blocking:
    they are shuffled SHUFFLE_COLUMNS at a time, which keeps the state in cache (twice as fast as one sweep).
    2.5x faster on the CPU than argsort of random keys, which would also need a rule for ties (float32 keys
    tie in ~0.2% of rows of 256, and stable and unstable sorts then differ).
    """
    import torch

    dtype = torch.int16 if n <= 2**15 else torch.int32
    u = torch.rand(n, count, generator=gen, dtype=torch.float64)
    out = torch.empty(n, count, dtype=dtype)
    steps = torch.arange(1, n + 1, dtype=torch.float64)[:, None]
    for r0 in range(0, count, SHUFFLE_COLUMNS):
        w = min(SHUFFLE_COLUMNS, count - r0)
        state = torch.arange(n, dtype=dtype)[:, None].repeat(1, w)  # column r: permutation r0 + r
        flat = state.view(-1)
        # flat position of entry j of column r: j * w + r
        partner = (u[:, r0 : r0 + w] * steps).to(torch.int64).mul_(w).add_(torch.arange(w))
        for i in range(n - 1, 0, -1):
            idx = partner[i]
            mine = state[i].clone()
            state[i] = flat[idx]
            flat[idx] = mine
        out[:, r0 : r0 + w] = state
    return out.t().contiguous()


def make_tables(grad_dim: int, dim: int, seed: int = 0, model_id: int = 0):
    """The sketch's tables (seg int32 [C, Nseg], code int16 [C, Nseg, S]) on the CPU, as the module docstring
    defines them. At P = 2**27, D = 8192: 268 MB of codes. The groups are independent (a generator each, their
    own rows of the tables), so up to GENERATION_THREADS of them are generated at once, each with ~70 MB of
    temporaries; the result does not depend on the thread count."""
    import torch

    if grad_dim < 1:
        raise ValueError(f"count sketch: grad_dim must be positive, got {grad_dim}")
    S = segment_size(dim)
    nseg, C, G = dim // S, -(-grad_dim // dim), chunks_per_group(dim)
    seg = torch.empty(C, nseg, dtype=torch.int32)
    code = torch.empty(C, nseg, S, dtype=torch.int16)

    def group(g: int) -> None:
        c0 = g * G
        n = min(G, C - c0)
        gen = torch.Generator().manual_seed(group_seed(seed, model_id, g))
        seg[c0 : c0 + n] = permutations(gen, n, nseg)
        offsets = permutations(gen, n * nseg, S).view(n, nseg, S)
        signs = torch.randint(0, 2, (n, nseg, S), generator=gen, dtype=torch.int16)
        code[c0 : c0 + n] = offsets.to(torch.int16).add_(signs.mul_(SIGN_BIT))

    groups = -(-C // G)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = min(GENERATION_THREADS, groups, cpus)
    if threads <= 1:
        for g in range(groups):
            group(g)
    else:  # torch releases the GIL in its ops; most of them here (drawing, the shuffle's steps) are serial
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(group, range(groups)))
    return seg, code


def source_index(seg, code, dim: int):
    """For the n chunks whose tables are given: (the coordinate feeding bucket j of chunk i, counted from the
    first chunk's start, [n, D] int64; its sign, [n, D] float32)."""
    import torch

    n, nseg, S = code.shape
    base = torch.arange(n, device=seg.device, dtype=torch.int64)[:, None] * dim + seg.to(torch.int64) * S
    src = base[:, :, None] + (code & (SIGN_BIT - 1)).to(torch.int64)
    sign = 1 - 2 * (code >> 8).to(torch.float32)
    return src.view(n, dim), sign.view(n, dim)


def project_torch(x, seg, code, grad_dim: int, dim: int):
    """out [B, D] float32 = x [B, grad_dim] (any float dtype) times the sketch, with torch gathers on x's
    device: a step of chunks at a time (rows x coordinates <= TORCH_STEP_ELEMENTS), chunks summed in float32."""
    import torch

    if x.dim() != 2 or x.shape[1] != grad_dim:
        raise ValueError(f"count sketch: expected [B, {grad_dim}] rows, got {tuple(x.shape)}")
    B = x.shape[0]
    C = seg.shape[0]
    out = torch.zeros(B, dim, dtype=torch.float32, device=x.device)
    step = max(1, TORCH_STEP_ELEMENTS // (max(B, 4) * dim))
    for c0 in range(0, C, step):
        n = min(step, C - c0)
        lo, hi = c0 * dim, min(grad_dim, (c0 + n) * dim)
        xs = x[:, lo:hi]
        if hi - lo < n * dim:  # the last chunk is partial: its absent coordinates are zeros
            xs = torch.nn.functional.pad(xs, (0, n * dim - (hi - lo)))
        src, sign = source_index(seg[c0 : c0 + n], code[c0 : c0 + n], dim)
        vals = xs.index_select(1, src.view(-1)).to(torch.float32).mul_(sign.view(-1))
        out += vals.view(B, n, dim).sum(1)
    return out


def launch_config(rows: int, dim: int, chunks: int) -> dict:
    """project_triton's settings: BLOCK_M rows per program (fewer when there are fewer rows), and the chunks
    split so that about TARGET_PROGRAMS programs run (63 rows at D = 8192: 32 blocks x 4 row blocks x 8
    splits; 1 row: 32 x 1 x 32; 256 rows: 32 x 16 x 2)."""
    block_m = min(BLOCK_M, 1 << (max(rows, 1) - 1).bit_length())
    others = (dim // segment_size(dim)) * -(-max(rows, 1) // block_m)
    ksplit = max(1, min(chunks, (TARGET_PROGRAMS + others // 2) // others))
    return {"block_m": block_m, "ksplit": ksplit, "num_warps": NUM_WARPS, "num_stages": NUM_STAGES}


def _triton_kernel():
    """(triton, the kernel), imported on first use: importing triton is slow, and it is absent on some machines."""
    import triton

    from lessctl.grads.projection.sketch_triton import count_sketch

    return triton, count_sketch


def project_triton(
    x,
    seg,
    code,
    grad_dim: int,
    dim: int,
    *,
    block_m: int | None = None,
    ksplit: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
):
    """What project_torch computes, with sketch_triton's kernel: x [B, grad_dim] (float16, bfloat16 or
    float32; rows contiguous) and the tables on a CUDA device, or on the CPU under TRITON_INTERPRET=1.

    A program (output block b, row block, chunk split k) gathers its rows' segment seg[c, b] of every chunk c
    of its split and writes the sum to parts[k]; the [ksplit, B, D] float32 partial sums are added here, in a
    fixed order. Defaults: `launch_config`.
    """
    import torch

    B = x.shape[0]
    if x.dim() != 2 or x.shape[1] != grad_dim:
        raise ValueError(f"count sketch: expected [B, {grad_dim}] rows, got {tuple(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    C, nseg, S = code.shape
    if B == 0:
        return torch.zeros(0, dim, dtype=torch.float32, device=x.device)
    cfg = launch_config(B, dim, C)
    block_m, ksplit = block_m or cfg["block_m"], ksplit or cfg["ksplit"]
    per_split = -(-C // ksplit)
    ksplit = -(-C // per_split)  # no empty splits
    triton, kernel = _triton_kernel()
    parts = torch.empty(ksplit, B, dim, dtype=torch.float32, device=x.device)
    grid = (nseg, triton.cdiv(B, block_m), ksplit)  # output blocks first: programs running together read whole chunks
    # Triton launches on the current device
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        kernel[grid](
            x,
            seg,
            code,
            parts,
            B,
            grad_dim,
            C,
            x.stride(0),
            dim,
            nseg,
            per_split,
            S=S,
            BLOCK_M=block_m,
            num_warps=num_warps or cfg["num_warps"],
            num_stages=num_stages or cfg["num_stages"],
        )
    return parts[0] if ksplit == 1 else parts.sum(0)


CHECK_RTOL = 1e-5  # max |triton - torch| / max |torch|; one wrong sign or source costs ~1e-1
_checks: dict[tuple, tuple[bool, str]] = {}


def check_triton(device: Any, dim: int) -> tuple[bool, str]:
    """(ok, detail): does the Triton kernel give project_torch's result on this device for this dim?

    Known-answer test on a small sketch of the same dim (so the same segment size, the kernel's constexpr):
    19 rows (a partial row block) of 3 chunks and a partial one, in float16, split 1 and 2 ways. Cached per
    (device, dim); never raises (a missing triton or a failed compilation is a no).
    """
    return cached(_checks, (str(device), dim), lambda: _check(device, dim))


def _check(device, dim) -> tuple[bool, str]:
    import torch

    problem = triton_problem()
    if problem:
        return False, problem
    grad_dim = 3 * dim + max(1, dim // 3)
    seg, code = (t.to(device) for t in make_tables(grad_dim, dim, seed=12345))
    x = torch.randn(19, grad_dim, generator=torch.Generator().manual_seed(0)).to(device, torch.float16)
    ref = project_torch(x, seg, code, grad_dim, dim)
    pairs = [(lambda k=ksplit: project_triton(x, seg, code, grad_dim, dim, ksplit=k), ref) for ksplit in (1, 2)]
    return compare(pairs, "the torch gather", CHECK_RTOL)
