"""The exception types the core raises; `lessctl.cli.main` alone maps them to exit codes."""


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
