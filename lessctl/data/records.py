"""Reading jsonl training files: one example a line, `messages` or `prompt`/`completion`, errors naming file:line."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lessctl.errors import InputError
from lessctl.files import decode_utf8

log = logging.getLogger(__name__)


ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Record:
    """One line of a jsonl data file: its 0-based line number, the raw line, and the parsed object."""

    line: int
    raw: str
    data: dict


def text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line with its newline) of a UTF-8 text file, read line by line; a line that
    is not UTF-8 is an InputError naming `file:line`. Every text reader of data files goes through here."""
    try:
        fh = open(path, "rb")
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, expected a file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror})") from None
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(
                    f"{path}:{lineno}: byte 0x{raw[exc.start]:02x} at column {exc.start + 1} is not UTF-8; "
                    "save the file as UTF-8"
                ) from None
            yield lineno, line[:-2] + "\n" if line.endswith("\r\n") else line


def read_text(path: str | Path) -> str:
    """A whole UTF-8 text file, newlines as they are; bytes that are not UTF-8 are an InputError naming
    `file:line`."""
    try:
        data = Path(path).read_bytes()
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, expected a file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror})") from None
    return decode_utf8(data, path)


def iter_json_lines(path: str | Path, expected: str = "one JSON object a line") -> Iterator[tuple[int, str, dict]]:
    """(1-based line number, raw line, object) for every non-blank line of a jsonl file.

    A line that is not a JSON object, or not UTF-8, is an InputError naming `file:line` and what was expected.
    """
    for lineno, raw in text_lines(path):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InputError(
                f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno}); expected {expected}"
            ) from None
        if not isinstance(obj, dict):
            raise InputError(f"{path}:{lineno}: expected a JSON object per line ({expected})")
        yield lineno, raw, obj


def read_jsonl(path: str | Path) -> list[Record]:
    """Reads a jsonl data file, validating each record; a bad line is an InputError naming `file:line`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such data file")
    records: list[Record] = []
    for lineno, raw, obj in iter_json_lines(
        path, 'one example a line, {"messages": [...]} or {"prompt", "completion"}'
    ):
        validate_example(obj, f"{path}:{lineno}")
        records.append(Record(lineno - 1, raw.rstrip("\n"), obj))
    if not records:
        raise InputError(f"{path}: the file holds no examples")
    return records


def validate_example(obj: dict, where: str) -> None:
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise InputError(f"{where}: 'messages' must be a non-empty list")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise InputError(f"{where}: messages[{j}] needs 'role' and 'content'")
            if m["role"] not in ROLES:
                raise InputError(
                    f"{where}: messages[{j}] has unknown role {m['role']!r} (expected system, user or assistant)"
                )
            if not isinstance(m["content"], str):
                raise InputError(f"{where}: messages[{j}].content must be a string")
    elif "prompt" in obj and "completion" in obj:
        if not isinstance(obj["prompt"], str) or not isinstance(obj["completion"], str):
            raise InputError(f"{where}: 'prompt' and 'completion' must be strings")
    else:
        raise InputError(f"{where}: expected 'messages' or 'prompt' and 'completion'")


def example_text(obj: dict) -> str:
    """All message contents joined by a space (BM25's view of a training example)."""
    if "messages" in obj:
        return " ".join(m["content"] for m in obj["messages"])
    return obj["prompt"] + " " + obj["completion"]
