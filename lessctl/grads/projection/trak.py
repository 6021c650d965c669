"""TRAK's projectors as LESS uses them: BasicProjector on the CPU, CudaProjector on a GPU.

CudaProjector's projection is computed by fast_jl or by lessctl's Triton kernel (checked equal to it).

fast_jl indexes its input with 32-bit integers and projects at most 32 rows a call; `fast_jl_chunks`
cuts large inputs so that every call stays within both limits and sums to the same projection.
"""

from __future__ import annotations

import logging
from typing import Any

from lessctl.errors import ConfigError
from lessctl.grads.projection.base import Projector
from lessctl.grads.projection.rademacher import FAST_JL_TILE_SEED
from lessctl.vocab import CUDA_ENGINES

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


class TrakBasicProjector(Projector):
    """TRAK's BasicProjector, with its matrix blocks generated once and kept when they fit in memory.

    The blocks are produced by TRAK's own generator states, so the result is exactly
    `BasicProjector.project(x.half(), model_id)`; TRAK itself regenerates every block on every call.
    TRAK draws the matrix with a generator on the projector's device, and a CUDA generator gives another
    matrix than the CPU's: stores made on a GPU record `generator` (absent means the CPU), so that matching
    refuses to compare them with CPU-made ones.
    """

    kind = "basic"

    def __init__(self, grad_dim, dim, device, seed=0, model_id=0, block_size=128, dtype=None):
        import torch
        from trak.projectors import BasicProjector, ProjectionType

        super().__init__(grad_dim, dim, device, seed, model_id)
        self.dtype = dtype or torch.float32
        self.block_size = block_size
        self.trak = BasicProjector(
            grad_dim=grad_dim,
            proj_dim=dim,
            seed=seed,
            proj_type=ProjectionType.rademacher,
            device=torch.device(device),
            block_size=block_size,
            dtype=self.dtype,
            model_id=model_id,
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


ENGINE_NAMES = {"triton": "lessctl's Triton kernel (checked equal to fast_jl on this GPU)", "fast_jl": "fast_jl"}
TRITON_MAX_ROWS = 256  # rows per call of lessctl's Triton kernel (rademacher.project); fast_jl takes 32


class TrakCudaProjector(Projector):
    """TRAK's CudaProjector (fast_jl). Its matrix depends on the GPU's SM count, which is recorded.

    fast_jl generates its random matrix once per call and shares it across up to 32 rows, so a call
    with 32 rows costs little more than one with 16. lessctl's Triton kernel (`lessctl.grads.projection.rademacher`)
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
            raise ConfigError(
                f"--dims {dim}: TRAK's CUDA projector (fast_jl) needs a multiple of 512; "
                "use such dimensions or --projector basic"
            )
        if engine not in CUDA_ENGINES:
            raise ConfigError(f"TrakCudaProjector: engine must be one of {', '.join(CUDA_ENGINES)}, got {engine!r}")
        ok, why = fast_jl_status(device)
        if not ok:
            raise ConfigError("--projector cuda: " + FAST_JL_FIX.format(why=why))
        self.trak = CudaProjector(
            grad_dim=grad_dim,
            proj_dim=dim,
            seed=seed,
            proj_type=ProjectionType.rademacher,
            device=torch.device(device),
            max_batch_size=32,
        )
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
            from lessctl.grads.projection.rademacher import check_against_fast_jl

            usable, detail = check_against_fast_jl(device, dim, self.fast_jl_seed, self.n_tiles, TRITON_MAX_ROWS)
            if usable:
                self.engine, self.max_rows = "triton", TRITON_MAX_ROWS
                log.info(
                    "TRAK's CUDA projection (dim %d): lessctl's Triton kernel, %d rows per call (%s)",
                    dim,
                    self.max_rows,
                    detail,
                )
            elif engine == "triton":
                raise ConfigError(f"TrakCudaProjector: the Triton engine is not usable here: {detail}")
            else:
                log.warning(
                    "TRAK's CUDA projection (dim %d) runs on fast_jl, %d rows per call: lessctl's Triton "
                    "kernel is not usable here (%s)",
                    dim,
                    self.max_rows,
                    detail,
                )

    def engine_note(self) -> str:
        return f"TRAK's CUDA projection computed by {ENGINE_NAMES.get(self.engine, self.engine)}"

    def project(self, x):
        import torch

        x = x.to(torch.float16)
        if self.engine == "triton":
            from lessctl.grads.projection.rademacher import project

            return torch.cat(
                [
                    project(x[i : i + self.max_rows].contiguous(), self.dim, self.fast_jl_seed, self.n_tiles)
                    for i in range(0, x.shape[0], self.max_rows)
                ]
            )
        if self.chunks is None or len(self.chunks) == 1:
            return torch.cat(
                [
                    self.trak.project(x[i : i + self.max_rows].contiguous(), model_id=self.model_id).float()
                    for i in range(0, x.shape[0], self.max_rows)
                ]
            )
        import fast_jl

        outs = []
        for i in range(0, x.shape[0], self.max_rows):
            xb = x[i : i + self.max_rows]
            fn = getattr(fast_jl, f"project_rademacher_{8 if len(xb) <= 8 else 16 if len(xb) <= 16 else 32}")
            acc = None
            for start, stop, t0, m in self.chunks:
                part = fn(
                    xb[:, start:stop].contiguous(), self.dim, (self.fast_jl_seed + FAST_JL_TILE_SEED * t0) % 2**32, m
                )
                acc = part if acc is None else acc.add_(part)
            outs.append(acc.float())
        return torch.cat(outs)

    @property
    def attrs(self) -> dict:
        return {**super().attrs, "dtype": "float16", "sm_count": int(self.sm_count)}
