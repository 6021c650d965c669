"""The evaluation outputs on disk: `eval/<model>/<task>.json` and the `results.jsonl` log of every evaluation."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from lessctl.errors import InputError, warn
from lessctl.files import decode_utf8, write_atomic
from lessctl.outputs import layout as paths

log = logging.getLogger(__name__)


def results_path(output_dir: str | os.PathLike) -> Path:
    return paths.results_file(output_dir)


def eval_json_path(output_dir: str | os.PathLike, model_name: str, task: str) -> Path:
    return paths.eval_json(output_dir, model_name, task)


def write_eval_json(output_dir: str | os.PathLike, model_name: str, task: str, result: dict) -> Path:
    """Writes one evaluation's result (through a `.part` file, so readers never see half of it)."""
    path = eval_json_path(output_dir, model_name, task)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(result, indent=2, ensure_ascii=False, default=str) + "\n")
    return path


def append_result(output_dir: str | os.PathLike, record: dict) -> Path:
    """Appends one evaluation record as a line of `<output_dir>/results.jsonl`.

    The line goes in one `os.write` on a file opened with O_APPEND, so it is never interleaved with another
    writer's, and it starts on a fresh line: after a torn last line (a killed append, a full disk) a newline
    comes first, so the new record is never glued onto the broken one.
    """
    path = results_path(output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)  # read: its last byte
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        written = os.write(fd, line)
        while written < len(line):  # a short write (a full disk raises instead): the rest right after it
            written += os.write(fd, line[written:])
    finally:
        os.close(fd)
    return path


def _torn(raw: bytes) -> bool:
    """Whether a line that does not parse is the start of a JSON record cut short (what a killed append leaves),
    rather than a line written wrong: its bytes end inside a UTF-8 character, a string or an object."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.reason == "unexpected end of data"
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg.startswith("Unterminated string"):
            return True
        return e.pos >= len(text.rstrip())
    return False


def read_results(output_dir: str | os.PathLike) -> list[dict]:
    """Every record of `<output_dir>/results.jsonl`, oldest first ([] when there is none yet).

    A torn line (a record cut short by a killed append or a full disk) is skipped with one warning naming
    `file:line`; any other line that is not a JSON object is an InputError naming `file:line`.
    """
    path = results_path(output_dir)
    if not path.is_file():
        return []
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror})") from None
    records = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        if _torn(raw):
            warn(log, f"{path}:{lineno}: skipping a torn record (cut short by an interrupted evaluation)")
            continue
        text = decode_utf8(raw, path, first_line=lineno)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(
                f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno}); expected one evaluation "
                "record a line"
            ) from None
        if not isinstance(obj, dict):
            raise InputError(f"{path}:{lineno}: expected a JSON object per line (one evaluation record a line)")
        records.append(obj)
    return records
