"""Random projections of gradient features: TRAK's projectors with LESS's settings, chosen explicitly.

LESS projects with TRAK (package `traker`): a Rademacher matrix, seed 0, model_id 0, the input cast
to float16. On a GPU that is `CudaProjector` (the fast_jl kernel); elsewhere `BasicProjector` with
block size 128. There is never a silent fallback: `auto` says what it chose, and `cuda` without a
working fast_jl is an error with the fix. Every projector records what makes its matrix unique
(kind, seed, block size, model_id, dtype, and for fast_jl the GPU's SM count) in the store, and
matching refuses to compare stores whose projections differ.
"""

from __future__ import annotations

import logging
from typing import Any

from lessctl.errors import ConfigError

log = logging.getLogger(__name__)

FAST_JL_FIX = (
    "fast_jl (TRAK's CUDA projector) is not usable here: {why}. Install it with `pip install lessctl[cuda]` "
    "(needs nvcc); with CUDA 13 its setup.py must be built for your GPU: unpack fast_jl-0.1.3, replace "
    "'7.0+PTX' by your arch (e.g. '9.0' on H100) in setup.py, then `pip install --no-build-isolation .`; "
    "or pass --projector basic (slower, and a different random matrix)"
)
# Cache BasicProjector's matrix blocks when they fit in this many bytes (TRAK regenerates them every call).
BASIC_CACHE_BYTES = 2 << 30


def fast_jl_status(device: Any = "cuda") -> tuple[bool, str]:
    """(usable, reason): imports fast_jl and runs TRAK's own test projection on the device."""
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible"
    try:
        import fast_jl

        n_sms = torch.cuda.get_device_properties(torch.device(device)).multi_processor_count
        fast_jl.project_rademacher_8(torch.zeros(8, 1000, device=device), 512, 0, n_sms)
        return True, "ok"
    except ImportError as exc:
        return False, f"cannot import fast_jl ({exc})"
    except RuntimeError as exc:
        return False, f"its kernel failed ({str(exc).splitlines()[0]})"


class Projector:
    """Projects rows of a [B, P] feature matrix to [B, D] float32, one fixed random matrix per dim."""

    kind = "base"

    def __init__(self, grad_dim: int, dim: int, device: Any, seed: int = 0, model_id: int = 0):
        self.grad_dim, self.dim, self.device, self.seed, self.model_id = grad_dim, dim, device, seed, model_id

    def project(self, x):  # x: [B, P] any float dtype
        raise NotImplementedError

    @property
    def attrs(self) -> dict:
        return {"kind": self.kind, "type": "rademacher", "seed": self.seed, "model_id": self.model_id, "grad_dim": self.grad_dim}


class TrakBasicProjector(Projector):
    """TRAK's BasicProjector, with its matrix blocks generated once and kept when they fit in memory.

    The blocks are produced by TRAK's own generator states, so the result is exactly
    `BasicProjector.project(x.half(), model_id)`; TRAK itself regenerates every block on every call.
    TRAK draws the matrix with a generator on the projector's device, and a CUDA generator gives another
    matrix than the CPU's: stores made on a GPU record `generator` (absent means the CPU, as in every earlier
    store), so that matching refuses to compare them with CPU-made ones.
    """

    kind = "basic"

    def __init__(self, grad_dim, dim, device, seed=0, model_id=0, block_size=128, dtype=None):
        import torch
        from trak.projectors import BasicProjector, ProjectionType

        super().__init__(grad_dim, dim, device, seed, model_id)
        self.dtype = dtype or torch.float32
        self.block_size = block_size
        self.trak = BasicProjector(
            grad_dim=grad_dim, proj_dim=dim, seed=seed, proj_type=ProjectionType.rademacher,
            device=torch.device(device), block_size=block_size, dtype=self.dtype, model_id=model_id,
        )
        esize = torch.finfo(self.dtype).bits // 8
        self.blocks = None
        if grad_dim * dim * esize <= BASIC_CACHE_BYTES and self.trak.num_blocks > 1:
            self.blocks = []
            for i in range(self.trak.num_blocks):
                self.trak.generate_sketch_matrix(self.trak.generator_states[i])
                self.blocks.append(self.trak.proj_matrix.clone())

    def project(self, x):
        import torch

        x = x.to(torch.float16)  # LESS casts the features to float16 before projecting
        if self.blocks is None:
            return self.trak.project(x, model_id=self.model_id).float()
        xd = x.to(self.dtype)
        out = torch.empty(x.shape[0], self.dim, dtype=self.dtype, device=x.device)
        for i, block in enumerate(self.blocks):
            st, ed = i * self.trak.block_size, min((i + 1) * self.trak.block_size, self.dim)
            out[:, st:ed] = xd @ block[:, : ed - st]
        return out.float()

    @property
    def attrs(self) -> dict:
        attrs = {**super().attrs, "block_size": self.block_size, "dtype": str(self.dtype).replace("torch.", "")}
        rng = self.trak.generator.device.type
        return attrs if rng == "cpu" else {**attrs, "generator": rng}


FAST_JL_TILE_SEED = 359124577  # fast_jl seeds the random stream of feature tile t with seed + 359124577 * t
FAST_JL_INDEX_LIMIT = 2**32  # fast_jl indexes its input with 32-bit integers: rows x features must stay below


def fast_jl_chunks(grad_dim: int, n_tiles: int, rows: int) -> list[tuple[int, int, int, int]] | None:
    """How to project `rows` rows with fast_jl in feature chunks that give exactly its full-width result.

    fast_jl splits the features into `n_tiles` tiles of ceil(grad_dim / n_tiles) and seeds tile t's random
    stream with seed + 359124577 * t. A call on the features of tiles t0 .. t0+m-1, with m tiles and the
    seed advanced by 359124577 * t0, therefore multiplies by the very same columns of the matrix, and the
    chunks' results add up to the full call's (up to the order of float32 additions). Chunks are sized so
    that rows x chunk features < 2**32. Returns [(start, stop, first tile, tiles)], or None when the
    tiling cannot be reproduced.
    """
    tile = -(-grad_dim // n_tiles)
    limit = (FAST_JL_INDEX_LIMIT - 1) // rows
    if grad_dim <= limit:
        return [(0, grad_dim, 0, n_tiles)]
    per = limit // tile
    if per < 1:
        return None
    per = -(-n_tiles // -(-n_tiles // per))  # as many tiles in each chunk as the chunk count allows, balanced
    chunks = []
    for t0 in range(0, n_tiles, per):
        m = min(per, n_tiles - t0)
        start, stop = t0 * tile, min(grad_dim, (t0 + m) * tile)
        if start >= grad_dim or -(-(stop - start) // m) != tile:
            return None
        chunks.append((start, stop, t0, m))
    return chunks


TRITON_MAX_ROWS = 256  # rows per call of lessctl's Triton kernel (lessctl.rademacher); fast_jl takes 32
CUDA_ENGINES = ("auto", "triton", "fast_jl")


class TrakCudaProjector(Projector):
    """TRAK's CudaProjector (fast_jl). Its matrix depends on the GPU's SM count, which is recorded.

    fast_jl generates its random matrix once per call and shares it across up to 32 rows, so a call
    with 32 rows costs little more than one with 16. lessctl's Triton kernel (`lessctl.rademacher`)
    computes the same projection for up to TRITON_MAX_ROWS rows per call on the tensor cores; it is used
    (`engine` "triton") when it passes a known-answer test against fast_jl on this GPU with this
    projector's dim, seed and tile count, else fast_jl is (`engine` "fast_jl", with a warning). Both give
    TRAK's result up to the order of float32 additions, so stores made with either are interchangeable and
    `attrs` does not name the engine. With fast_jl, where 32 rows x grad_dim would overflow its 32-bit
    indexing (LoRA r=128 at 7B: 2**27 parameters), the rows go through in feature chunks aligned with its
    tiles (`fast_jl_chunks`), which reproduce TRAK's projection exactly.
    """

    kind = "cuda"

    def __init__(self, grad_dim, dim, device, seed=0, model_id=0, engine: str = "auto"):
        import torch
        from trak.projectors import CudaProjector, ProjectionType

        super().__init__(grad_dim, dim, device, seed, model_id)
        if dim % 512:
            raise ConfigError(f"--dims {dim}: TRAK's CUDA projector (fast_jl) needs a multiple of 512; "
                              "use such dimensions or --projector basic")
        if engine not in CUDA_ENGINES:
            raise ConfigError(f"TrakCudaProjector: engine must be one of {', '.join(CUDA_ENGINES)}, got {engine!r}")
        ok, why = fast_jl_status(device)
        if not ok:
            raise ConfigError("--projector cuda: " + FAST_JL_FIX.format(why=why))
        self.trak = CudaProjector(grad_dim=grad_dim, proj_dim=dim, seed=seed, proj_type=ProjectionType.rademacher,
                                  device=torch.device(device), max_batch_size=32)
        self.sm_count = self.trak.num_sms
        self.n_tiles = min(grad_dim, self.sm_count)
        self.fast_jl_seed = (self.trak.seed + int(1e4) * model_id) % 2**32  # what TRAK passes to fast_jl
        self.chunks = fast_jl_chunks(grad_dim, self.n_tiles, 32)
        self.engine = "fast_jl"
        if self.chunks is None:  # unusual tilings: whole-width calls with as many rows as the indexing allows
            self.max_rows = max(1, min(32, (FAST_JL_INDEX_LIMIT - 1) // grad_dim))
        else:
            self.max_rows = 32
        if engine != "fast_jl":
            from lessctl.rademacher import check_against_fast_jl

            usable, detail = check_against_fast_jl(device, dim, self.fast_jl_seed, self.n_tiles, TRITON_MAX_ROWS)
            if usable:
                self.engine, self.max_rows = "triton", TRITON_MAX_ROWS
                log.info("TRAK's CUDA projection (dim %d): lessctl's Triton kernel, %d rows per call (%s)",
                         dim, self.max_rows, detail)
            elif engine == "triton":
                raise ConfigError(f"TrakCudaProjector: the Triton engine is not usable here: {detail}")
            else:
                log.warning("TRAK's CUDA projection (dim %d) runs on fast_jl, %d rows per call: lessctl's Triton "
                            "kernel is not usable here (%s)", dim, self.max_rows, detail)

    def project(self, x):
        import torch

        x = x.to(torch.float16)
        if self.engine == "triton":
            from lessctl.rademacher import project

            return torch.cat([project(x[i : i + self.max_rows].contiguous(), self.dim, self.fast_jl_seed, self.n_tiles)
                              for i in range(0, x.shape[0], self.max_rows)])
        if self.chunks is None or len(self.chunks) == 1:
            return torch.cat([self.trak.project(x[i : i + self.max_rows].contiguous(), model_id=self.model_id).float()
                              for i in range(0, x.shape[0], self.max_rows)])
        import fast_jl

        outs = []
        for i in range(0, x.shape[0], self.max_rows):
            xb = x[i : i + self.max_rows]
            fn = getattr(fast_jl, f"project_rademacher_{8 if len(xb) <= 8 else 16 if len(xb) <= 16 else 32}")
            acc = None
            for start, stop, t0, m in self.chunks:
                part = fn(xb[:, start:stop].contiguous(), self.dim, (self.fast_jl_seed + FAST_JL_TILE_SEED * t0) % 2**32, m)
                acc = part if acc is None else acc.add_(part)
            outs.append(acc.float())
        return torch.cat(outs)

    @property
    def attrs(self) -> dict:
        return {**super().attrs, "dtype": "float16", "sm_count": int(self.sm_count)}


class CountSketchProjector(Projector):
    """A sparse JL projection (count sketch): each parameter adds +-x_j to one of the D outputs.

    Its hash is made of permutations (`lessctl.sketch`): every output receives exactly one parameter of each
    chunk of D parameters, so projecting is a gather (no atomics) that reads each parameter once, which on a
    GPU (lessctl.sketch_triton's kernel) can run at the speed of reading the row; the scatter-add sketch it
    replaced (index_add_) cost 3.1 ms per row of 2**27 parameters on an H100, 30x that. Its tables are drawn
    on the CPU from seeded generators, so the sketch is the same on every device and GPU model; they stay on
    the device (2 bytes per parameter). One row costs O(P) additions instead of O(P x D) multiply-adds; it
    is not LESS's projection, so its selection quality is measured separately (bench/projection_quality.py),
    and stores made with it are never matched against Rademacher ones, nor against those of the earlier
    scatter-add sketch (`attrs` names the hash).

    The engine: the Triton kernel for rows on a CUDA device when triton imports and the kernel passes a
    known-answer test against the torch gather there (`sketch.check_triton`), else the torch gather
    (`sketch.project_torch`), which computes the same sketch on any device; the choice is logged once.
    """

    kind = "sketch"
    HASH = "segment-permutation"  # the layout of lessctl.sketch's tables

    def __init__(self, grad_dim, dim, device, seed=0, model_id=0):
        import time

        from lessctl import sketch

        super().__init__(grad_dim, dim, device, seed, model_id)
        t0 = time.perf_counter()
        seg, code = sketch.make_tables(grad_dim, dim, seed, model_id)
        self.seg, self.code = seg.to(device), code.to(device)
        self.engines: dict[str, str] = {}  # x's device -> "triton" or "torch", decided on first use
        log.debug("count sketch tables (%d parameters, dim %d) in %.1f s", grad_dim, dim, time.perf_counter() - t0)

    def engine_for(self, device) -> str:
        """The engine that projects rows on `device`: decided (and logged) on the first rows seen there."""
        from lessctl import sketch

        key = str(device)
        if key not in self.engines:
            if device.type == "cuda":
                ok, detail = sketch.check_triton(device, self.dim)
                if ok:
                    log.info("count sketch (dim %d) on %s: lessctl's Triton kernel (%s)", self.dim, key, detail)
                else:
                    log.warning("count sketch (dim %d) on %s: torch gathers, slower; the Triton kernel is not "
                                "usable here: %s", self.dim, key, detail)
                self.engines[key] = "triton" if ok else "torch"
            else:
                log.info("count sketch (dim %d) on %s: torch gathers", self.dim, key)
                self.engines[key] = "torch"
        return self.engines[key]

    def project(self, x):
        from lessctl import sketch

        if x.device != self.seg.device:
            raise ValueError(f"count sketch: rows on {x.device}, tables on {self.seg.device}")
        fn = sketch.project_triton if self.engine_for(x.device) == "triton" else sketch.project_torch
        return fn(x, self.seg, self.code, self.grad_dim, self.dim)

    @property
    def attrs(self) -> dict:
        return {**super().attrs, "type": "count-sketch", "hash": self.HASH}


PROJECTOR_KINDS = ("auto", "cuda", "basic", "sketch")


def choose_projector_kind(kind: str, device: Any, dims: list[int] | None = None) -> tuple[str, str]:
    """Resolves `auto` to cuda or basic and says why."""
    if kind not in PROJECTOR_KINDS:
        raise ConfigError(f"--projector: expected one of {', '.join(PROJECTOR_KINDS)}, got {kind!r}")
    if kind != "auto":
        return kind, "requested"
    if not str(device).startswith("cuda"):
        return "basic", "no GPU: TRAK's BasicProjector"
    odd = [d for d in dims or [] if d % 512]
    if odd:
        return "basic", f"--dims {odd[0]} is not a multiple of 512, which fast_jl needs: TRAK's BasicProjector"
    ok, why = fast_jl_status(device)
    if ok:
        return "cuda", "GPU with a working fast_jl: TRAK's CudaProjector"
    log.warning("--projector auto: a GPU but no working fast_jl (%s); using BasicProjector", why)
    return "basic", f"GPU without a working fast_jl ({why}): TRAK's BasicProjector, a different matrix; see `lessctl doctor`"


def make_projector(kind: str, grad_dim: int, dim: int, device: Any, *, seed: int = 0, block_size: int = 128, dtype=None) -> Projector:
    if kind == "cuda":
        return TrakCudaProjector(grad_dim, dim, device, seed=seed)
    if kind == "basic":
        return TrakBasicProjector(grad_dim, dim, device, seed=seed, block_size=block_size, dtype=dtype)
    if kind == "sketch":
        return CountSketchProjector(grad_dim, dim, device, seed=seed)
    raise ConfigError(f"--projector: unknown projector {kind!r}")


def same_projection(a: dict, b: dict) -> list[str]:
    """Differences between two stores' projector attributes that make their features incomparable."""
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
