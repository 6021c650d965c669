"""One module per subcommand: parse options, call the core, print. No math here."""


def register_all(app) -> None:
    """Registers every command module on the app (the one place that lists them)."""
    import importlib

    for name in _MODULES:
        mod = importlib.import_module(f"lessctl.commands.{name}")
        mod.register(app)


# Each module exposes register(app): app.command(...)(fn) or app.add_typer(sub_app, name=...).
_MODULES: list[str] = [
    "init",
    "config",
    "train",
    "grads",
    "match",
    "eval",
    "results",
    "demo",
    "run",
    "slurm",
    "ir",
    "ablate",
    "report",
    "doctor",
]
