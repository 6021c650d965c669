"""The environment check behind `lessctl doctor`: versions, the GPU, TRAK, and known-answer tests of fast_jl and of
lessctl's Triton kernel for the same projection."""

from __future__ import annotations

import logging
import platform
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# The known-answer test: the full matrix of a small projection, read off the identity rows 8 at a time.
CHECK_GRAD_DIM = 2048
CHECK_PROJ_DIM = 512
CHECK_ROWS = 8
TRITON_CHECK_DIM = 8192  # LESS's dimension: the Triton kernel's known-answer test covers 8192 columns' generators


@dataclass
class FastJLCheck:
    """What the fast_jl known-answer test found; `ok` is None when it did not run (no GPU or no fast_jl)."""

    imports: bool = False
    ok: bool | None = None
    detail: str = ""
    sm_count: int | None = None
    entry_magnitude: float | None = None  # every entry of the matrix has this absolute value (1.0)
    positive_share: float | None = None  # share of + signs among the matrix entries (about 0.5)
    linearity_rel_err: float | None = None  # max |fast_jl(x) - x @ M| / max |x @ M|
    deterministic: bool | None = None  # two calls on the same input are bitwise equal
    batch_kernels_agree: bool | None = None  # project_rademacher_8, _16 and _32 give the same rows


@dataclass
class TritonProjectionCheck:
    """lessctl's Triton kernel for TRAK's CUDA projection (grads.projection.rademacher) against fast_jl; `ok` is
    None when it did not run (no GPU, or no working fast_jl to compare with). Without it, projection runs on fast_jl."""

    imports: bool = False  # triton imports
    triton_version: str | None = None
    ok: bool | None = None
    detail: str = ""


@dataclass
class SketchKernelCheck:
    """lessctl's gather kernel for `--projector sketch` (grads.projection.sketch) against the torch gather, at D = 8192;
    `ok` is None when it did not run (no GPU). Without it, the sketch projects with torch gathers (slower)."""

    ok: bool | None = None
    detail: str = ""


@dataclass
class DoctorReport:
    python: str
    platform: str
    lessctl: str
    torch: str | None
    torch_cuda_build: str | None  # the CUDA version torch was built with
    transformers: str | None
    peft: str | None
    cuda_available: bool
    pyarrow: str | None = None  # reads .parquet data files
    gpu_count: int = 0
    gpu_name: str | None = None
    gpu_capability: str | None = None  # e.g. "9.0" on H100
    sm_count: int | None = None
    gpu_memory_gib: float | None = None
    bf16_supported: bool = False
    traker: bool = False
    traker_version: str | None = None
    traker_error: str | None = None
    fast_jl: FastJLCheck = field(default_factory=FastJLCheck)
    fast_jl_fix: str | None = None
    triton_projection: TritonProjectionCheck = field(default_factory=TritonProjectionCheck)
    sketch_kernel: SketchKernelCheck = field(default_factory=SketchKernelCheck)
    projector_auto: str = "basic"
    projector_auto_reason: str = ""
    problems: list[str] = field(default_factory=list)  # broken things: `--strict` exits 1 when any
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - a broken install is exactly what the report is for
        return None
    return str(getattr(mod, "__version__", "unknown"))


def check_fast_jl(device: Any = "cuda", grad_dim: int = CHECK_GRAD_DIM, proj_dim: int = CHECK_PROJ_DIM) -> FastJLCheck:
    """Known-answer test of fast_jl's Rademacher projection on `device`.

    The identity rows e_1..e_grad_dim, projected CHECK_ROWS at a time, give the matrix M [grad_dim, proj_dim];
    every entry must be +-1 of one magnitude with both signs about equally often; a random x must project
    to x @ M (linearity, within fp16 input rounding); two calls must agree bitwise; and the 8-, 16- and
    32-row kernels (which TRAK picks by batch size) must give the same rows.
    """
    import torch

    res = FastJLCheck()
    try:
        import fast_jl
    except Exception as exc:  # noqa: BLE001 - ImportError, or an OSError from a bad build
        res.detail = f"cannot import fast_jl ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        return res
    res.imports = True
    if not torch.cuda.is_available():
        res.detail = "not run: no CUDA GPU is visible"
        return res
    dev = torch.device(device)
    n_sms = torch.cuda.get_device_properties(dev).multi_processor_count
    res.sm_count = int(n_sms)
    try:
        eye = torch.eye(grad_dim, device=dev, dtype=torch.float16)
        M = torch.cat(
            [
                fast_jl.project_rademacher_8(eye[i : i + CHECK_ROWS].contiguous(), proj_dim, 0, n_sms)
                for i in range(0, grad_dim, CHECK_ROWS)
            ]
        )  # [grad_dim, proj_dim] float32
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(32, grad_dim, generator=gen).to(dev, torch.float16)
        y8 = torch.cat(
            [fast_jl.project_rademacher_8(x[i : i + 8].contiguous(), proj_dim, 0, n_sms) for i in range(0, 32, 8)]
        )
        y8_again = torch.cat(
            [fast_jl.project_rademacher_8(x[i : i + 8].contiguous(), proj_dim, 0, n_sms) for i in range(0, 32, 8)]
        )
        y16 = torch.cat(
            [fast_jl.project_rademacher_16(x[i : i + 16].contiguous(), proj_dim, 0, n_sms) for i in range(0, 32, 16)]
        )
        y32 = fast_jl.project_rademacher_32(x.contiguous(), proj_dim, 0, n_sms)
        torch.cuda.synchronize(dev)
    except Exception as exc:  # noqa: BLE001 - RuntimeError from the kernel (e.g. no kernel image for this GPU)
        res.ok = False
        res.detail = f"its kernel failed ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        return res

    mag = M.abs()
    res.entry_magnitude = float(mag.max())
    equal = bool((mag == mag.max()).all()) and res.entry_magnitude > 0
    res.positive_share = float((M > 0).float().mean())
    ref = x.float() @ M
    res.linearity_rel_err = float((y8 - ref).abs().max() / ref.abs().max().clamp(min=1e-30))
    res.deterministic = bool(torch.equal(y8, y8_again))
    res.batch_kernels_agree = bool(
        torch.allclose(y8, y16, rtol=1e-5, atol=1e-3) and torch.allclose(y8, y32, rtol=1e-5, atol=1e-3)
    )
    failures = []
    if not equal:
        failures.append(
            f"the matrix entries are not all of one magnitude (max {res.entry_magnitude:g}, min {float(mag.min()):g})"
        )
    if not 0.45 <= res.positive_share <= 0.55:
        failures.append(f"{res.positive_share:.1%} of the matrix entries are positive (expected about 50%)")
    if not res.linearity_rel_err < 1e-3:
        failures.append(f"projecting x differs from x @ M by {res.linearity_rel_err:.2e} (relative)")
    if not res.deterministic:
        failures.append("two projections of the same input differ")
    if not res.batch_kernels_agree:
        failures.append("the 8-, 16- and 32-row kernels disagree")
    res.ok = not failures
    res.detail = "ok" if res.ok else "; ".join(failures)
    return res


def check_triton_projection(device: Any, sm_count: int | None, fast_jl_ok: bool | None) -> TritonProjectionCheck:
    """Whether `--projector cuda` can use lessctl's Triton kernel here: triton imports, and the kernel gives
    fast_jl's result for dim TRITON_CHECK_DIM with this GPU's tile count (`rademacher.check_against_fast_jl`,
    the test every projector runs before using it)."""
    res = TritonProjectionCheck()
    try:
        import triton

        res.imports, res.triton_version = True, str(getattr(triton, "__version__", "unknown"))
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install
        res.detail = f"cannot import triton ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        return res
    if sm_count is None:
        res.detail = "not run: no CUDA GPU is visible"
        return res
    if not fast_jl_ok:
        res.detail = "not run: needs a working fast_jl to compare with"
        return res
    from lessctl.grads.projection.rademacher import check_against_fast_jl
    from lessctl.grads.projection.trak import TRITON_MAX_ROWS

    res.ok, res.detail = check_against_fast_jl(device, TRITON_CHECK_DIM, 0, sm_count, TRITON_MAX_ROWS)
    return res


def check_sketch_kernel(device: Any, cuda_available: bool) -> SketchKernelCheck:
    """Whether `--projector sketch` can use its Triton kernel here: the known-answer test against the torch gather
    that every sketch projector runs before using it (`sketch.check_triton`), at LESS's dimension."""
    if not cuda_available:
        return SketchKernelCheck(None, "not run: no CUDA GPU is visible (the CPU uses torch gathers)")
    from lessctl.grads.projection.sketch import check_triton

    return SketchKernelCheck(*check_triton(device, TRITON_CHECK_DIM))


def fast_jl_fix(capability: str | None, why: str) -> str:
    """FAST_JL_FIX with the GPU's arch filled in."""
    from lessctl.grads.projection.trak import FAST_JL_FIX

    text = FAST_JL_FIX.format(why=why)
    if capability:
        text = text.replace("(e.g. '9.0' on H100)", f"('{capability}' on this GPU)")
        text += f"; e.g. `TORCH_CUDA_ARCH_LIST={capability}` before the build"
    return text


def run_doctor(device: str | None = None) -> DoctorReport:
    """Checks the environment lessctl's gradient stage needs; never raises for a broken component."""
    from lessctl import __version__

    rep = DoctorReport(
        python=f"{platform.python_version()} ({sys.executable})",
        platform=platform.platform(),
        lessctl=__version__,
        torch=_version("torch"),
        torch_cuda_build=None,
        transformers=_version("transformers"),
        peft=_version("peft"),
        cuda_available=False,
        pyarrow=_version("pyarrow"),
    )
    if rep.pyarrow is None:
        rep.problems.append("pyarrow does not import: .parquet data files cannot be read (pip install pyarrow)")
    if rep.torch is None:
        rep.problems.append("torch does not import; install it first (see the README)")
        return rep
    import torch

    rep.torch_cuda_build = torch.version.cuda
    rep.cuda_available = bool(torch.cuda.is_available())
    if rep.cuda_available:
        dev = torch.device(device or "cuda")
        props = torch.cuda.get_device_properties(dev)
        rep.gpu_count = torch.cuda.device_count()
        rep.gpu_name = props.name
        rep.gpu_capability = f"{props.major}.{props.minor}"
        rep.sm_count = int(props.multi_processor_count)
        rep.gpu_memory_gib = round(props.total_memory / 2**30, 1)
        rep.bf16_supported = bool(torch.cuda.is_bf16_supported())
        rep.notes.append(
            f"fast_jl's random matrix depends on the SM count ({rep.sm_count} here): "
            "features made on GPUs with other SM counts are not comparable"
        )
    else:
        rep.notes.append("no CUDA GPU is visible: gradients run on the CPU with TRAK's BasicProjector")
        if rep.torch_cuda_build is None:
            rep.notes.append("this torch is a CPU-only build")

    try:
        import trak

        rep.traker = True
        rep.traker_version = str(getattr(trak, "__version__", "unknown"))
    except Exception as exc:  # noqa: BLE001
        rep.traker_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        rep.problems.append(f"traker does not import ({rep.traker_error}); `pip install traker==0.3.2`")

    rep.fast_jl = check_fast_jl(device or "cuda") if rep.cuda_available else _fast_jl_import_only()
    if rep.cuda_available and not rep.fast_jl.ok:
        rep.fast_jl_fix = fast_jl_fix(rep.gpu_capability, rep.fast_jl.detail)
        rep.problems.append(f"fast_jl: {rep.fast_jl.detail}")
    rep.triton_projection = check_triton_projection(device or "cuda", rep.sm_count, rep.fast_jl.ok)
    if rep.triton_projection.ok is False or (rep.fast_jl.ok and not rep.triton_projection.imports):
        rep.notes.append(
            "--projector cuda projects with fast_jl, 32 rows per call, instead of lessctl's Triton "
            f"kernel ({rep.triton_projection.detail})"
        )
    rep.sketch_kernel = check_sketch_kernel(device or "cuda", rep.cuda_available)
    if rep.sketch_kernel.ok is False:
        rep.notes.append(
            f"--projector sketch projects with torch gathers, slower, instead of lessctl's Triton kernel "
            f"({rep.sketch_kernel.detail})"
        )

    if rep.traker:
        from lessctl.grads.projection.choose import choose_projector_kind

        try:
            rep.projector_auto, rep.projector_auto_reason = choose_projector_kind(
                "auto", str(device or ("cuda" if rep.cuda_available else "cpu"))
            )
        except Exception as exc:  # noqa: BLE001
            rep.projector_auto, rep.projector_auto_reason = "none", f"cannot choose ({exc})"
            rep.problems.append(f"--projector auto fails: {exc}")
    else:
        rep.projector_auto, rep.projector_auto_reason = "none", "traker does not import"
    return rep


def _fast_jl_import_only() -> FastJLCheck:
    res = FastJLCheck()
    try:
        import fast_jl  # noqa: F401

        res.imports = True
        res.detail = "not run: no CUDA GPU is visible"
    except Exception as exc:  # noqa: BLE001
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        res.detail = f"not installed or not importable ({why}); only needed on a GPU"
    return res
