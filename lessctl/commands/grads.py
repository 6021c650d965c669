"""`lessctl grads`: per-example gradient features into HDF5 stores; `lessctl store`: inspect them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lessctl.commands._common import (
    ForceOpt,
    JsonOpt,
    ProgressBar,
    complete_ckpts,
    complete_targets,
    complete_train,
    emit_json,
    err_console,
    load_config,
    print_table,
    truncation_line,
)
from lessctl.outputs import layout
from lessctl.vocab import GRAD_TYPES, spelled


def grads(
    ckpt: Annotated[
        Optional[list[int]],
        typer.Option(
            "--ckpt",
            autocompletion=complete_ckpts,
            help="Checkpoint step(s) (default: every checkpoint in warmup/checkpoints.json).",
        ),
    ] = None,
    ckpt_index: Annotated[
        Optional[int], typer.Option("--ckpt-index", help="1-based position in checkpoints.json (for Slurm arrays).")
    ] = None,
    dims: Annotated[
        Optional[list[int]], typer.Option("--dims", help="Projection dimension(s), e.g. --dims 4096 8192.")
    ] = None,
    train: Annotated[
        Optional[list[str]],
        typer.Option(
            "--train", autocompletion=complete_train, help="Training set name(s) (default: all; adam features)."
        ),
    ] = None,
    target: Annotated[
        Optional[list[str]],
        typer.Option("--target", autocompletion=complete_targets, help="Target name(s) (default: all; sgd features)."),
    ] = None,
    grad_type: Annotated[
        Optional[str],
        typer.Option(
            "--type",
            help=f"Override the feature type: {spelled(GRAD_TYPES)}; or reps: RDS's representations (the last "
            "layer's hidden state at each example's last token, unprojected) for every data set.",
        ),
    ] = None,
    projector: Annotated[
        Optional[str],
        typer.Option(
            "--projector",
            help="auto, cuda (TRAK's CUDA projection: fast_jl's matrix, on lessctl's Triton kernel or fast_jl), "
            "basic (TRAK's BasicProjector; a GPU draws another matrix than the CPU) or sketch (a count sketch: "
            "far cheaper, not LESS's matrix).",
        ),
    ] = None,
    shard: Annotated[
        Optional[str], typer.Option("--shard", help="K/N: compute only the K-th of N contiguous row ranges.")
    ] = None,
    batch_tokens: Annotated[
        Optional[int], typer.Option("--batch-tokens", help="Token budget per batch (longest x examples).")
    ] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda or cuda:N.")] = None,
    devices: Annotated[
        Optional[str],
        typer.Option(
            "--devices",
            help="N GPUs (cuda:0..N-1) or a list (cuda:0,cuda:2 or cpu,cpu): one worker per device, worker k "
            "computes --shard k/N.",
        ),
    ] = None,
    merge: Annotated[
        Optional[bool],
        typer.Option(
            "--merge/--no-merge",
            metavar="",
            help="Merge the adapter into the base weights for the pass (default: grads.merge in lessctl.toml, true): "
            "faster, same gradients up to rounding.",
        ),
    ] = None,
    compile_: Annotated[
        Optional[bool],
        typer.Option(
            "--compile/--no-compile",
            metavar="",
            help="torch.compile the decoder layers for the gradient pass (default: grads.compile in lessctl.toml, "
            "false): about a third less model time on a GPU, after ~35 s of compiling at 7B.",
        ),
    ] = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Compute LESS gradient features (adam for pools, sgd for targets) or RDS's reps into HDF5 stores.

    `--type reps` stores RDS's representations instead of gradients."""
    from lessctl.errors import ConfigError
    from lessctl.grads.stage import collect_gradients, parse_shard, resolve_steps
    from lessctl.vocab import FEATURE_TYPES, REPS

    if devices is not None and shard is not None:
        raise ConfigError("--devices and --shard cannot be combined: with --devices N, worker k computes shard k/N")
    if devices is not None and device is not None:
        raise ConfigError(
            "--devices and --device cannot be combined: give one device as --devices DEVICE or --device DEVICE"
        )
    if grad_type is not None and grad_type not in FEATURE_TYPES:
        raise ConfigError(f"--type: expected one of {', '.join(FEATURE_TYPES)}, got {grad_type!r}")
    if grad_type == REPS:
        given = [opt for opt, v in (("--dims", dims), ("--projector", projector), ("--compile", compile_)) if v]
        if given:
            raise ConfigError(f"{given[0]}: does not apply to --type reps (representations are not projected)")
    cfg = load_config(
        {
            "grads.dims": dims,
            "grads.projector": projector,
            "grads.batch_tokens": batch_tokens,
            "grads.merge": merge,
            "grads.compile": compile_,
        }
    )
    steps = resolve_steps(cfg, ckpt, ckpt_index)
    if devices is not None:
        from lessctl.grads.devices import parse_devices

        device_list = parse_devices(devices)
    con = err_console()
    with ProgressBar("grads", unit="ex", quiet=json_out) as bar:
        state = {"key": None}

        def progress(name, step, done, total):
            key = (name, step)
            if state["key"] != key:
                state["key"] = key
                bar.update(completed=done, total=total, description=f"{name} ckpt {step}")
            else:
                bar.update(completed=done, total=total)  # with --devices the total grows as workers start a store

        common = dict(
            steps=steps,
            dims=list(cfg.grads.dims),
            train=train,
            targets=target,
            grad_type=grad_type,
            projector=cfg.grads.projector,
            force=force,
            progress=progress,
            announce=None if json_out else con.print,
        )
        if devices is not None:
            from lessctl.grads.devices import collect_on_devices

            results = collect_on_devices(cfg, device_list, **common)
        else:
            results = collect_gradients(cfg, shard=parse_shard(shard), device=device, **common)
    rows = [
        {
            "store": str(r.path),
            "name": r.name,
            "step": r.step,
            "type": r.grad_type,
            "rows": r.rows,
            "status": r.status,
            "seconds": round(r.seconds, 2),
            "examples_per_s": round(r.examples_per_s, 2),
            "rows_without_labels": r.zero_label_rows,
            "truncation": r.truncation,
            **{k: v for k, v in r.extra.items() if k in ("shard", "device")},
        }
        for r in results
    ]
    if json_out:
        emit_json({"stores": rows})
        return
    table = _per_store(rows) if devices is not None else rows
    print_table(
        "gradient stores",
        ["name", "ckpt", "type", "rows", "status", "ex/s", "file"],
        [
            [r["name"], r["step"], r["type"], r["rows"], r["status"], r["examples_per_s"], Path(r["store"]).name]
            for r in table
        ],
    )
    for name, truncation in {r["name"]: r["truncation"] for r in table if r["truncation"]}.items():
        if line := truncation_line(truncation, name):
            con.print(line, markup=False, highlight=False, soft_wrap=True)
    for r in table:
        if r["rows_without_labels"]:
            con.print(
                f"[yellow]{r['name']}: {r['rows_without_labels']} examples have no label tokens after truncation: "
                f"zero feature rows, never selected by match"
            )


def _per_store(rows: list[dict]) -> list[dict]:
    """--devices: one table line per store, its shards summed (ex/s: new rows over the slowest shard's time)."""
    import re

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["name"], r["step"], r["type"]), []).append(r)
    out = []
    for shards in groups.values():
        secs = max(r["seconds"] for r in shards)
        new = sum(r["examples_per_s"] * r["seconds"] for r in shards)
        out.append(
            {
                **shards[0],
                "rows": sum(r["rows"] for r in shards),
                "status": "+".join(dict.fromkeys(r["status"] for r in shards)),
                "examples_per_s": round(new / secs, 2) if secs > 0 else 0.0,
                "store": re.sub(r"-shard\d+of", "-shard*of", shards[0]["store"]),
                "rows_without_labels": sum(r["rows_without_labels"] for r in shards),
            }
        )
    return out


store_app = typer.Typer(help="Inspect gradient stores.", no_args_is_help=True)


@store_app.command("ls")
def store_ls(json_out: JsonOpt = False) -> None:
    """List the workspace's gradient stores."""
    from lessctl.grads.store.reader import list_stores

    cfg = load_config()
    stores = list_stores(layout.grads_dir(cfg.output_dir))
    if json_out:
        emit_json({"stores": stores})
        return
    print_table(
        "gradient stores",
        ["name", "ckpt", "type", "dims", "rows", "projector", "complete"],
        [
            [
                s["name"],
                s["step"],
                s["grad_type"],
                ",".join(map(str, s["dims"])),
                s["rows"],
                s["projector"],
                "yes"
                if s["complete"]
                else ("missing shards " + ",".join(map(str, s["missing_shards"])) if s["missing_shards"] else "no"),
            ]
            for s in stores
        ],
    )


@store_app.command("verify")
def store_verify(
    paths: Annotated[
        Optional[list[Path]], typer.Argument(help="Store files (default: every store of the workspace).")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Check stores: schema, completeness, finite values, unit rows. Exit 1 on a problem."""
    from lessctl.errors import VerifyError

    if not paths:
        cfg = load_config()
        grads_dir = layout.grads_dir(cfg.output_dir)
        paths = sorted([*grads_dir.glob("*.h5"), *grads_dir.glob("*.h5.part")])  # a .part is an incomplete store
        if not paths:
            from lessctl.errors import MissingArtifactError

            raise MissingArtifactError(f"no gradient stores in {cfg.output_dir / 'grads'}; run `lessctl grads` first")
    report = _verify_all(paths, quiet=json_out)
    bad = {p: probs for p, probs in report.items() if probs}
    if json_out:
        emit_json({"ok": not bad, "stores": report})
    else:
        for p, probs in report.items():
            err_console().print(
                f"{'[red]FAIL' if probs else '[green]ok'}[/] {p}" + "".join(f"\n    {x}" for x in probs)
            )
    if bad:
        first = next(iter(bad))
        raise VerifyError(f"{len(bad)} of {len(report)} stores failed verification; first: {first}: {bad[first][0]}")


VERIFY_PROGRESS_ROWS = 200_000  # stores with more rows than this (per dim) show a progress bar while read


def _verify_all(paths: list[Path], quiet: bool) -> dict[str, list[str]]:
    """verify_store of each path; a progress bar (rows of each dim read) for stores larger than
    VERIFY_PROGRESS_ROWS."""
    import h5py

    from lessctl.grads.store.reader import verify_store

    report = {}
    for p in paths:
        try:
            with h5py.File(p, "r", locking=False) as f:
                n = int(f.attrs.get("rows_completed", 0)) * sum(1 for g in f if g.startswith("dim"))
        except (OSError, TypeError, ValueError):
            n = 0
        if n <= VERIFY_PROGRESS_ROWS:
            report[str(p)] = verify_store(p)
            continue
        with ProgressBar(f"store verify {Path(p).name}", total=n, unit="rows", quiet=quiet) as bar:
            report[str(p)] = verify_store(p, progress=lambda k: bar.update(advance=k))
    return report


def register(app: typer.Typer) -> None:
    app.command("grads", epilog="Example: lessctl grads --ckpt 105 --dims 8192")(grads)
    app.add_typer(store_app, name="store", help="Inspect gradient stores (ls, verify).")
