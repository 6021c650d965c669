"""File helpers every stage shares: sha256 of a file or of a set of files, atomic writes, folder swaps, UTF-8
decoding, and the one safe way torch files are read."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
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


def source_sha256(files: list[Path], sha=sha256_file) -> str:
    """The sha256 of a data set: its file's, or for several files one over their names and hashes in order
    (`sha`: the hash of one file, e.g. a memoized sha256_file)."""
    if len(files) == 1:
        return sha(files[0])
    h = hashlib.sha256()
    for f in files:
        h.update(f"{Path(f).name}:{sha(f)}\n".encode())
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


ASIDE_MARK = ".lessctl-old-"  # in the name of the folder replace_dir moves an old `dst` to: lessctl's own


def replace_dir(new: Path, dst: Path) -> None:
    """Moves the complete folder `new` onto `dst`: the old `dst` is renamed aside first, then deleted.

    The aside name (`.<dst>.lessctl-old-<pid>-<random>`) is new each time and lessctl's alone, so no folder of
    the user's (a `<dst>.old` kept by hand, say) is ever removed.
    """
    new, dst = Path(new), Path(dst)
    old = dst.with_name(f".{dst.name}{ASIDE_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    moved = False
    if dst.exists():
        os.replace(dst, old)
        moved = True
    os.replace(new, dst)
    if moved:
        shutil.rmtree(old, ignore_errors=True)


def torch_load_safe(path: Path, what: str, redo: str):
    """The contents of a torch file (`torch.save`) read with `weights_only=True`: tensors, numbers, strings and
    containers only, so no code in the file ever runs. A file that holds anything else (a pickled object, a
    payload), or is not a torch file at all, is an InputError naming it, `what` it should be and `redo`."""
    import pickle
    import warnings

    import torch

    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4": what follows says what matters
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        why = next((ln.strip() for ln in text.splitlines() if "Unsupported" in ln or "GLOBAL" in ln), "")
        if "Weights only load failed" in text:
            why = why or "it holds objects other than tensors and numbers"
            raise InputError(
                f"{path}: refused by the safe load ({why}): lessctl reads torch files with weights_only=True "
                f"and runs no code from them; the file is damaged or not {what}: {redo}"
            ) from None
        first = text.splitlines()[0] if text else type(e).__name__
        raise InputError(f"{path}: cannot be read as {what} ({first}); the file is damaged: {redo}") from None
    except Exception as e:  # noqa: BLE001 - a truncated zip, random bytes, EOF: a damaged file
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path}: cannot be read as {what} ({first}); the file is damaged: {redo}") from None


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


def not_a_file(path: Path, what: str) -> str | None:
    """Why `path` cannot be read as `what` (a data file, a training file), or None when it is a regular file:
    missing, a folder, or a FIFO, device or socket (`/dev/zero`, a named pipe), which lessctl cannot hash and
    read again (every data file is read more than once)."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"{path}: no such {what}"
    except OSError as e:
        return f"{path}: cannot be read as {what} ({e.strerror})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return f"{path}: is a folder, expected a {what}"
    kind = "a socket"
    if stat.S_ISFIFO(mode):
        kind = "a FIFO (named pipe)"
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        kind = "a device"
    return f"{path}: is {kind}, not a regular file; give the {what} as a regular file (lessctl reads it more than once)"


def read_json_file(path: Path, expected: str, redo: str, kind: type = dict):
    """A JSON file lessctl wrote, read back: an InputError naming `file:line` when it is not UTF-8 or not JSON,
    and naming the file when its top level is not a `kind`; `expected` says what it should hold, `redo` how to
    write it again."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror}); {redo}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start}); {redo}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); expected {expected}; {redo}") from None
    if not isinstance(data, kind):
        raise InputError(f"{path}: expected {expected}, found a JSON {type(data).__name__}; {redo}")
    return data
