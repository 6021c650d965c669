"""The Typer app: registers every command, the global options, and the one error funnel."""

from __future__ import annotations

import errno
import logging
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from lessctl import __version__
from lessctl.commands._common import STATE
from lessctl.commands._options import spread_values
from lessctl.errors import LessctlError, log_handler

app = typer.Typer(
    name="lessctl",
    help="LESS data selection: the 5% of an instruction-tuning pool whose gradients best match a target task.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lessctl {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    config: Annotated[
        Optional[Path],
        typer.Option("--config", "-c", help="Workspace file (default: lessctl.toml in this folder or a parent)."),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", metavar="", help="Show tracebacks for every error.")] = False,
    progress_seconds: Annotated[
        Optional[float],
        typer.Option(
            "--progress-seconds",
            min=0,
            help="Without a terminal (a Slurm log), print a progress line this often (default: "
            "$LESSCTL_PROGRESS_SECONDS, else 60).",
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, metavar="", help="Print the version and exit."),
    ] = False,
) -> None:
    STATE.config_path = config
    STATE.debug = debug
    STATE.progress_seconds = progress_seconds
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, handlers=[log_handler()])


def _register() -> None:
    from lessctl.commands import register_all

    if not app.registered_commands:  # main() may run many times in one process (tests): register once
        register_all(app)


# errno values of OSErrors that are the machine's answer to a user's setup, not a bug in lessctl.
USER_ERRNOS = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
}


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the app and turns user errors into one `error:` line and exit code 2."""
    _register()
    _catch_ctrl_c()
    _one_voice()
    given = list(sys.argv[1:] if argv is None else argv)
    try:
        command = typer.main.get_command(app)  # built once: it reads the command line, then runs it
        command(args=spread_values(command, given), prog_name="lessctl")
    except LessctlError as exc:
        if STATE.debug:
            raise
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(exc.exit_code)
    except OSError as exc:  # the machine refused: permissions, a read-only or full disk, a file in a folder's place
        if STATE.debug or exc.errno not in USER_ERRNOS:
            raise
        where = exc.filename if exc.filename is not None else "a file"
        sys.stderr.write(
            f"error: {where}: {exc.strerror or exc}; finished outputs are kept as they were (check the folder's "
            "permissions and free space, then re-run)\n"
        )
        sys.exit(2)
    except KeyboardInterrupt:
        _interrupted(given)
    except SystemExit as exc:  # Typer turns Ctrl-C into exit code 130
        if exc.code == 130:
            _interrupted(given)
        raise


def _one_voice() -> None:
    """Under torchrun every rank runs the command: ranks other than 0 keep stderr (their errors) but print
    nothing on stdout, so `--json` is one document and a result table shows once."""
    from lessctl.distributed import is_main

    if not is_main():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)


def _catch_ctrl_c() -> None:
    """Ctrl-C as KeyboardInterrupt, except where Python would swallow it: a SIGINT that lands in a weakref or
    `__del__` callback (a garbage collection) is printed there as "Exception ignored" and lost, so a single
    Ctrl-C seemed to do nothing. The handler sends such a signal again a moment later, outside the callback."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return  # a caller (a test harness, an embedding program) handles it

    def handler(signum, frame) -> None:
        f, depth = frame, 0
        while f is not None and depth < 4:
            if f.f_code.co_name == "__del__" or f.f_code.co_filename.endswith(("weakref.py", "_weakrefset.py")):
                import threading

                threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
                return
            f, depth = f.f_back, depth + 1
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread
        pass


def _interrupted(given: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not cut this line or the exit short
    sys.stderr.write(
        "interrupted: finished outputs are kept as they were, a partial gradient store (.part) or warmup "
        f"checkpoint is kept to resume from; `lessctl {shlex.join(given)}` resumes\n"
    )
    sys.exit(130)


if __name__ == "__main__":
    main()
