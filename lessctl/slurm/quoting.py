"""What may reach sbatch and the shell: `#SBATCH` values validated and quoted for sbatch's parser; `Raw` text.

`Raw` marks text that is already quoted for its place in the script.
"""

from __future__ import annotations

import logging
import re
import shlex
from typing import Any

from lessctl.errors import ConfigError

log = logging.getLogger(__name__)


# The placeholder in `task_args` that becomes the array task id in the job.
TASK = "{task}"
TASK_VAR = '"${SLURM_ARRAY_TASK_ID}"'

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TIME = re.compile(
    r"^(?:\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2}"
    r"|UNLIMITED|INFINITE|unlimited|infinite)$"
)
_MEMORY = re.compile(r"^\d+[KMGTkmgt]?$")
_ARRAY = re.compile(r"^\d+(?:-\d+(?::\d+)?)?(?:,\d+(?:-\d+(?::\d+)?)?)*(?:%\d+)?$")
_DEPENDENCY = re.compile(r"^[A-Za-z0-9_:+,?]+$")
_COMMAND = re.compile(r"^[a-z][a-z0-9-]*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Raw(str):
    """Text already quoted for its place in the script: printed by templates as is."""


def _shell_finalize(value: Any) -> str:
    # Every `{{ value }}` in a template passes through here: Raw stays, anything else is shell-quoted.
    if isinstance(value, Raw):
        return value
    if value is None:
        return "''"
    if isinstance(value, bool):
        value = "true" if value else "false"
    return shlex.quote(str(value))


def sbatch_quote(value: str) -> str:
    """Quotes a value for sbatch's `#SBATCH` parser (not the shell's): "..." with \\ and " escaped."""
    if value and not re.search(r"[\s\"'\\#]", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _check_text(name: str, value: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    m = _CONTROL.search(value)
    if m:
        what = "a newline" if m.group() in "\r\n" else f"a control character ({m.group()!r})"
        raise ConfigError(f"{name}: {value!r} contains {what}, which cannot go into an #SBATCH line")
    return value


def _directive(option: str, value: Any, name: str) -> Raw:
    """One `#SBATCH --option=value` line; `name` is what the user calls the value (key or option)."""
    text = _check_text(name, str(value))
    return Raw(f"#SBATCH --{option}={sbatch_quote(text)}")


def _task_word(arg: str) -> Raw:
    """Shell-quotes an argument, except that `{task}` becomes the array task id."""
    pieces = arg.split(TASK)
    return Raw(TASK_VAR.join(shlex.quote(p) if p else "" for p in pieces) or "''")
