"""Choosing a projector by kind (`--projector auto|cuda|basic|sketch`) and building it, never silently."""

from __future__ import annotations

import logging
from typing import Any

from lessctl.errors import ConfigError
from lessctl.grads.projection import trak
from lessctl.grads.projection.base import Projector
from lessctl.grads.projection.sketch import CountSketchProjector
from lessctl.grads.projection.trak import TrakBasicProjector, TrakCudaProjector
from lessctl.vocab import PROJECTOR_KINDS

log = logging.getLogger(__name__)


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
    ok, why = trak.fast_jl_status(device)
    if ok:
        return "cuda", "GPU with a working fast_jl: TRAK's CudaProjector"
    log.warning("--projector auto: a GPU but no working fast_jl (%s); using BasicProjector", why)
    return (
        "basic",
        f"GPU without a working fast_jl ({why}): TRAK's BasicProjector, a different matrix; see `lessctl doctor`",
    )


def make_projector(
    kind: str, grad_dim: int, dim: int, device: Any, *, seed: int = 0, block_size: int = 128, dtype=None
) -> Projector:
    if kind == "cuda":
        return TrakCudaProjector(grad_dim, dim, device, seed=seed)
    if kind == "basic":
        return TrakBasicProjector(grad_dim, dim, device, seed=seed, block_size=block_size, dtype=dtype)
    if kind == "sketch":
        return CountSketchProjector(grad_dim, dim, device, seed=seed)
    raise ConfigError(f"--projector: unknown projector {kind!r}")
