"""`lessctl doctor`: what this machine can run (GPU, TRAK, fast_jl) and how to fix what it cannot."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from lessctl.commands._common import JsonOpt, emit_json, err_console, print_table


def doctor(
    device: Annotated[
        Optional[str], typer.Option("--device", help="The GPU to check, e.g. cuda:1 (default: cuda).")
    ] = None,
    strict: Annotated[bool, typer.Option("--strict", metavar="", help="Exit 1 when something is broken.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Check the environment: torch, CUDA, the GPU, traker, and known-answer tests of the projection kernels.

    The known-answer tests run fast_jl and lessctl's Triton kernels against their references."""
    from rich.markup import escape

    from lessctl.doctor import run_doctor

    rep = run_doctor(device)
    if json_out:
        emit_json(rep.to_dict())
    else:
        fj = rep.fast_jl
        if fj.ok is None:
            fj_text = ("imports; " if fj.imports else "") + fj.detail
        else:
            fj_text = "ok (known-answer test passed)" if fj.ok else f"BROKEN: {fj.detail}"
        tp = rep.triton_projection
        if tp.ok is None:
            tp_text = (f"triton {tp.triton_version}; " if tp.imports else "") + tp.detail
        else:
            tp_text = f"ok ({tp.detail})" if tp.ok else f"not used: {tp.detail}"
        sk = rep.sketch_kernel
        sk_text = sk.detail if sk.ok is None else (f"ok ({sk.detail})" if sk.ok else f"not used: {sk.detail}")
        gpu = (
            (
                f"{rep.gpu_name}, {rep.sm_count} SMs, sm_{(rep.gpu_capability or '').replace('.', '')}, "
                f"{rep.gpu_memory_gib} GiB" + (f" (x{rep.gpu_count})" if rep.gpu_count > 1 else "")
            )
            if rep.cuda_available
            else "none visible"
        )
        rows = [
            ["python", rep.python],
            ["lessctl", rep.lessctl],
            ["torch", f"{rep.torch} (CUDA build {rep.torch_cuda_build or 'none'})"],
            ["transformers / peft", f"{rep.transformers} / {rep.peft}"],
            ["pyarrow (parquet data)", rep.pyarrow or "BROKEN: does not import"],
            ["GPU", gpu],
            ["bf16", "yes" if rep.bf16_supported else "no"],
            ["traker", rep.traker_version if rep.traker else f"BROKEN: {rep.traker_error}"],
            ["fast_jl", fj_text],
            ["Triton projection", tp_text],
            ["count sketch kernel", sk_text],
            ["--projector auto", f"{rep.projector_auto} ({rep.projector_auto_reason})"],
        ]
        print_table("lessctl doctor", ["check", "result"], [[escape(str(c)) for c in r] for r in rows])
        con = err_console()
        for n in rep.notes:
            con.print(f"note: {escape(n)}")
        if rep.fast_jl_fix:
            con.print(f"[yellow]fix: {escape(rep.fast_jl_fix)}")
        if rep.problems:
            con.print(f"[red]{len(rep.problems)} problem(s): " + escape("; ".join(rep.problems)))
    if strict and rep.problems:
        raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    app.command("doctor", epilog="Example: lessctl doctor --json")(doctor)
