"""`lessctl config show`: the resolved workspace config."""

from __future__ import annotations

from typing import Annotated

import typer

from lessctl.commands._common import JsonOpt, emit_json, load_config, out_console

app = typer.Typer(help="Inspect the workspace config.", no_args_is_help=True)


@app.command("show")
def show(
    json_out: JsonOpt = False,
    docs: Annotated[
        bool, typer.Option("--docs", metavar="", help="Print every key with its one-line description.")
    ] = False,
) -> None:
    """Print the resolved config (defaults < lessctl.toml < options) as TOML or JSON."""
    from lessctl.config import describe_fields, to_toml

    if docs:
        from rich.markup import escape  # "[warmup]" and docs like "[slurm.stages.grads]" are text, not markup

        for sec, fields in describe_fields().items():
            out_console().print(f"[bold]{escape(f'[{sec}]')}[/bold]")
            for k, d in fields.items():
                out_console().print(f"  {k}: {escape(d)}", highlight=False)
        return
    cfg = load_config()
    if json_out:
        emit_json({"path": str(cfg.path) if cfg.path else None, **cfg.to_dict()})
    else:
        print(f"# {cfg.path}\n" + to_toml(cfg.to_dict()))


def register(main_app: typer.Typer) -> None:
    main_app.add_typer(app, name="config", help="Inspect the workspace config.")
