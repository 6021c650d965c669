"""Options that take several values after one flag: `--dims 64 128` as well as `--dims 64 --dims 128`.

Click has no variadic options, so the command line is read once before Click reads it: for the command
being run (found by walking the app's own command tree, `typer.main.get_command`), an option declared with a
list type takes every bare word after it, and an option that takes one value refuses a second one. What
takes several values is read from each command's declaration, never from a list of names kept here.

A command with positional arguments (`store verify PATHS`, `slurm render STAGE ...`) or one that passes
unknown options on (`slurm render`) is left to Click: there a bare word is one of its arguments. Nothing
after `--` is touched. A number that starts with a minus (`--weights -1 1`) is a value, not an option.
"""

from __future__ import annotations

from typing import Any


def _is_number(tok: str) -> bool:
    try:
        float(tok)
    except ValueError:
        return False
    return True


def _is_option(tok: str) -> bool:
    return tok.startswith("-") and tok != "-" and not _is_number(tok)


def _options(command: Any) -> dict[str, Any]:
    """Every name of the command's options (`--merge` and `--no-merge` alike) -> its parameter."""
    return {name: p for p in command.params if p.param_type_name == "option" for name in (*p.opts, *p.secondary_opts)}


def _takes_value(param: Any) -> bool:
    return not (param.is_flag or param.count)


def takes_bare_words(command: Any) -> bool:
    """Whether a bare word on this command's line can be one of its own arguments (so it is left to Click)."""
    return (
        any(p.param_type_name == "argument" for p in command.params)
        or command.allow_extra_args
        or command.ignore_unknown_options
    )


def multi_value_options(command: Any) -> list[str]:
    """The options of a command that take several values (declared with a list type), by their first name."""
    return [p.opts[0] for p in command.params if p.param_type_name == "option" and p.multiple]


def leaf_commands(root: Any) -> dict[str, Any]:
    """Every command under `root` that runs something (not a group), by its path: 'grads', 'store verify'."""
    found: dict[str, Any] = {}

    def walk(cmd: Any, path: list[str]) -> None:
        subs = getattr(cmd, "commands", None)
        if subs is None:
            found[" ".join(path)] = cmd
            return
        for name, sub in subs.items():
            walk(sub, [*path, name])

    walk(root, [])
    return found


def spread_values(root: Any, argv: list[str], prog: str = "lessctl") -> list[str]:
    """argv with `--opt a b` written as `--opt a --opt b` for the options of the command run that take several
    values. Raises ConfigError when an option that takes one value is given several (`--target mmlu bbh` where
    the command takes one target), naming the option."""
    out: list[str] = []
    cmd, path, i = root, [prog], 0
    while (subs := getattr(cmd, "commands", None)) is not None:  # the group options, then the command's name
        opts = _options(cmd)
        while i < len(argv) and _is_option(argv[i]) and argv[i] != "--":
            tok = argv[i]
            out.append(tok)
            i += 1
            p = opts.get(tok)
            if p is not None and _takes_value(p) and i < len(argv):
                out.append(argv[i])
                i += 1
        if i >= len(argv) or argv[i] not in subs:  # no command, `--` or an unknown one: Click says what is wrong
            return out + argv[i:]
        cmd = subs[argv[i]]
        path.append(argv[i])
        out.append(argv[i])
        i += 1
    rest = argv[i:]
    if takes_bare_words(cmd):
        return out + rest
    end = rest.index("--") if "--" in rest else len(rest)
    if "--help" in rest[:end]:  # help wins, as it does in Click
        return out + rest
    return out + _spread(_options(cmd), rest[:end], " ".join(path)) + rest[end:]


def _spread(opts: dict[str, Any], words: list[str], command: str) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(words):
        tok = words[i]
        i += 1
        if not _is_option(tok):
            out.append(tok)  # not after an option's value: Click refuses it as an extra argument
            continue
        name, eq, inline = tok.partition("=") if tok.startswith("--") else (tok, "", "")
        p = opts.get(name)
        if p is None or not _takes_value(p):
            out.append(tok)
            continue
        if eq:
            values = [inline]
        elif i < len(words):
            values = [words[i]]  # the first value is taken as it is, as Click takes it (`--weights -1`)
            i += 1
        else:
            out.append(tok)  # Click says the value is missing
            continue
        while i < len(words) and not _is_option(words[i]):
            values.append(words[i])
            i += 1
        if len(values) > 1 and not p.multiple:
            from lessctl.errors import ConfigError

            got = ", ".join(repr(v) for v in values)
            raise ConfigError(f"{name}: takes one value, got {got} ({command} takes one {p.opts[0]})")
        for v in values:
            out += [name, v]
    return out
