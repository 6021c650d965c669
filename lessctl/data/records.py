"""Reading data files: one example a line (jsonl, gzip-compressed jsonl) or a row (parquet), `messages` or
`prompt`/`completion`; every error names `file:line` (parquet: `file row N`).

Every format is read streaming: text line by line (gzip through the stdlib, decompressed as it is read),
parquet a batch of rows at a time. Which format a file is follows its name (`DATA_FILE_SUFFIXES`).
"""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from lessctl.errors import InputError
from lessctl.files import decode_utf8, not_a_file

log = logging.getLogger(__name__)


ROLES = ("system", "user", "assistant")
PARQUET_BATCH_ROWS = 1024  # rows converted to Python at a time
EXAMPLE_COLUMNS = (("messages",), ("prompt", "completion"))  # a parquet of examples has one of these column sets


def is_parquet(path: str | Path) -> bool:
    return str(path).lower().endswith(".parquet")


def is_gzip(path: str | Path) -> bool:
    return str(path).lower().endswith(".gz")


def where(path: str | Path, number: int) -> str:
    """How an error names line `number` of a text file (`file:N`) or row `number` of a parquet (`file row N`)."""
    return f"{path} row {number}" if is_parquet(path) else f"{path}:{number}"


def data_stem(path: str | Path) -> str:
    """A data file's name without its format's suffix: `cot.jsonl.gz`, `cot.parquet`, `cot.jsonl` -> `cot`."""
    name = Path(path).name
    for suffix in (".jsonl.gz", ".gz", ".parquet", ".jsonl"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


@dataclass(frozen=True)
class Record:
    """One example of a data file: its 0-based line (parquet: row) number, the raw JSON line, the parsed object."""

    line: int
    raw: str
    data: dict


def _raw_lines(fh, path: str | Path) -> Iterator[bytes]:
    """The lines of an open binary file; a gzip stream that is damaged or cut short is an InputError naming
    the line where decompression failed."""
    lineno = 0
    while True:
        try:
            raw = fh.readline()
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise InputError(
                f"{path}:{lineno + 1}: the gzip data is damaged or cut short ({exc}); "
                "compress the file again (gzip FILE.jsonl)"
            ) from None
        if not raw:
            return
        lineno += 1
        yield raw


def text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line with its newline) of a UTF-8 text file, read line by line (a name ending in
    `.gz`: gzip-compressed, decompressed as it is read); a line that is not UTF-8 is an InputError naming
    `file:line`. Every text reader of data files goes through here."""
    try:
        fh = gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, expected a file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror})") from None
    with fh:
        for lineno, raw in enumerate(_raw_lines(fh, path), start=1):
            line = decode_utf8(raw, path, first_line=lineno)
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def parquet_rows(
    path: str | Path, expected: str, columns: Sequence[Sequence[str]] = ()
) -> Iterator[tuple[int, str, dict]]:
    """(1-based row number, the row as a JSON line, the row as an object) for every row of a parquet file, read
    a batch of rows at a time. A null value is a key the row does not have (parquet gives every row every column).

    columns: alternative sets of columns one of which the file must have (e.g. `messages`, or `prompt` and
    `completion`); a file without any, or one that is not parquet, is an InputError naming the file.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, expected a file") from None
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a readable parquet file ({_first_line(exc)}); expected {expected}") from None
    names = set(pf.schema_arrow.names)
    if columns and not any(set(c) <= names for c in columns):
        wanted = " or ".join("+".join(f"'{n}'" for n in c) for c in columns)
        have = ", ".join(sorted(names)) or "none"
        raise InputError(f"{path}: the parquet file has no {wanted} column (its columns: {have}); expected {expected}")
    n = 0
    for group in range(pf.num_row_groups):  # a row group at a time, so that damage is named by its first row
        batches = pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[group])
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except (pa.ArrowException, OSError) as exc:
                raise InputError(
                    f"{path} row {n + 1}: cannot be read ({_first_line(exc)}); the file is damaged"
                ) from None
            for row in batch.to_pylist():
                n += 1
                obj = {k: v for k, v in row.items() if v is not None}
                yield n, json.dumps(obj, ensure_ascii=False, default=str), obj


def iter_objects(
    path: str | Path, expected: str, columns: Sequence[Sequence[str]] = ()
) -> Iterator[tuple[int, str, dict]]:
    """(1-based line or row number, raw JSON line, object) of a data file in any of `DATA_FILE_SUFFIXES`' formats:
    `iter_json_lines` for jsonl and jsonl.gz, `parquet_rows` for parquet. Errors name `where(path, number)`."""
    if is_parquet(path):
        return parquet_rows(path, expected, columns)
    return iter_json_lines(path, expected)


EXAMPLES_LAYOUT = 'one example a line, {"messages": [...]} or {"prompt", "completion"}'
PARQUET_EXAMPLES_LAYOUT = "one example a row, a 'messages' column (a list of {role, content}) or 'prompt', 'completion'"


def read_examples(path: str | Path) -> list[Record]:
    """Reads a training data file (.jsonl, .jsonl.gz or .parquet), validating each example; a bad one is an
    InputError naming `file:line` (parquet: `file row N`)."""
    path = Path(path)
    if problem := not_a_file(path, "data file"):
        raise InputError(problem)
    records: list[Record] = []
    layout = PARQUET_EXAMPLES_LAYOUT if is_parquet(path) else EXAMPLES_LAYOUT
    for number, raw, obj in iter_objects(path, layout, EXAMPLE_COLUMNS):
        validate_example(obj, where(path, number))
        records.append(Record(number - 1, raw.rstrip("\n"), obj))
    if not records:
        raise InputError(f"{path}: the file holds no examples")
    return records


read_jsonl = read_examples


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
