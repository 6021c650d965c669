"""The exception types the core raises (`lessctl.cli.main` alone maps them to exit codes), and the user warnings
it logs (`warn`: one `warning: ...` line on stderr).
"""

import logging

_WARNING_LINE = "lessctl_warning_line"


def warn(logger: logging.Logger, message: str) -> None:
    """Logs `message` as a warning the user should act on: `LogFormatter` prints it as `warning: message`."""
    logger.warning(message, extra={_WARNING_LINE: True})


class LogFormatter(logging.Formatter):
    """The commands' log lines: `fmt` (`logger: message`), and `warning: message` for what `warn` logs."""

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, _WARNING_LINE, False):
            return f"warning: {record.getMessage()}"
        return super().format(record)


def log_handler(fmt: str = "%(name)s: %(message)s") -> logging.Handler:
    """A stderr handler with `LogFormatter` (for `logging.basicConfig(handlers=[...])`)."""
    handler = logging.StreamHandler()
    handler.setFormatter(LogFormatter(fmt))
    return handler


class LessctlError(Exception):
    """A problem the user can fix: printed as one `error:` line, exit code 2."""

    exit_code = 2


class ConfigError(LessctlError):
    """The workspace file or a command option is invalid."""


class InputError(LessctlError):
    """A data file is malformed; the message names `file:line`."""


class MissingArtifactError(LessctlError):
    """An earlier stage's output is missing; the message names the command that makes it."""


class AlreadyExistsError(LessctlError):
    """An output exists and was made with other settings; `--force`/`--overwrite` replaces it."""


class VerifyError(LessctlError):
    """A stored artifact failed verification (exit code 1)."""

    exit_code = 1


class WorkerError(LessctlError):
    """A worker process of a multi-device run died without a lessctl error (exit code 1); names its device."""

    exit_code = 1
