"""File helpers every stage shares: sha256 of a file or of a set of files, atomic writes, UTF-8 decoding."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from lessctl.errors import InputError


def sha256_file(path: Path, block_size: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(block_size):
            h.update(block)
    return h.hexdigest()


def source_sha256(files: list[Path]) -> str:
    """The sha256 of a data set: its file's, or for several files one over their names and hashes in order."""
    if len(files) == 1:
        return sha256_file(files[0])
    h = hashlib.sha256()
    for f in files:
        h.update(f"{Path(f).name}:{sha256_file(f)}\n".encode())
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields `<path>.part` to write; renames it onto `path` when the block ends, deletes it if the block fails.

    Readers see the old file or the new one, never half of one, and a failed write leaves no stray file.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, text: str) -> None:
    """Writes `text` (UTF-8) to `path` through `atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def replace_dir(new: Path, dst: Path) -> None:
    """Moves the complete folder `new` onto `dst`: the old `dst` is renamed aside first, then deleted."""
    new, dst = Path(new), Path(dst)
    old = dst.with_name(dst.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(new, dst)
    shutil.rmtree(old, ignore_errors=True)


def decode_utf8(data: bytes, path: str | Path, first_line: int = 1) -> str:
    """`data` decoded as UTF-8; bytes that are not UTF-8 are an InputError naming `file:line` and the column
    (`data` starts at line `first_line` of the file)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + first_line
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise InputError(
            f"{path}:{line}: byte 0x{data[exc.start]:02x} at column {col} is not UTF-8; save the file as UTF-8"
        ) from None
