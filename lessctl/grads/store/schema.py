"""What a store is: file names, root attributes, and the checks of a file's structure and values."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from lessctl.outputs.layout import format_store_name, parse_store_name
from lessctl.vocab import FEATURE_TYPES

log = logging.getLogger(__name__)


FORMAT_VERSION = 1
PROJECTOR_PREFIX = "projector_"
UNIT_NORM_TOL = 1e-2  # float16 rounding of a unit row stays well inside this
# Attributes the caller must pass to StoreWriter (`projector` is a dict, stored as projector_<key>).
CALLER_ATTRS = ("base_model", "checkpoint", "step", "grad_type", "source", "source_sha256", "projector")
ROOT_ATTRS = (
    "format_version",
    "lessctl_version",
    "base_model",
    "checkpoint",
    "step",
    "grad_type",
    "source",
    "source_sha256",
    "n_rows",
    "rows_completed",
    "complete",
    "shard",
    "num_shards",
    "row_start",
    "total_rows",
)
# Attributes (besides projector_*, dims and index) that must agree for a `.part` to be resumed.
_RESUME_KEYS = ("grad_type", "step", "base_model", "n_rows", "row_start", "total_rows", "shard", "num_shards")
# Settings that change the numbers a store holds: a `.part` is resumed only with the same ones (when recorded).
NUMERIC_KEYS = ("batch_tokens", "merge", "compile", "max_seq_length", "chat_format", "warmup_run")
# Attributes (besides projector_* and dims) that must agree between the shards of one store.
_SHARD_KEYS = ("format_version", "grad_type", "step", "base_model", "source_sha256", "total_rows", "num_shards")
_DIM_RE = re.compile(r"^dim(\d+)$")


def store_path(grads_dir: Path, name: str, step: int, grad_type: str, shard: tuple[int, int] | None = None) -> Path:
    """The path of a store (or of one shard of it) in `grads_dir`."""
    return Path(grads_dir) / format_store_name(name, step, grad_type, shard)


def part_path(path: Path) -> Path:
    """The `.part` file a store is written into until it is complete."""
    return Path(path).with_name(Path(path).name + ".part")


def _py(v: Any) -> Any:
    """An attribute value as plain Python (h5py.Empty -> None, numpy scalars -> int/float/bool)."""
    if isinstance(v, h5py.Empty):
        return None
    if isinstance(v, (np.ndarray, np.generic)):
        return v.tolist()
    if isinstance(v, bytes):
        return v.decode()
    return os.fspath(v) if isinstance(v, os.PathLike) else list(v) if isinstance(v, tuple) else v


def _read_attrs(f: h5py.File) -> dict[str, Any]:
    return {k: _py(v) for k, v in f.attrs.items()}


def _dims_of(f: h5py.File) -> list[int]:
    return sorted(int(m[1]) for key in f.keys() if (m := _DIM_RE.match(key)))


def _open_read(path: Path) -> h5py.File:
    # No file locking: finished stores are immutable, and `store ls` must not block on a .part in use.
    return h5py.File(path, "r", locking=False)


def store_complete(path: Path) -> bool:
    """True when `path` is a readable store marked complete with all its rows written and all its datasets."""
    return store_sha256(path) is not None


def store_sha256(path: Path) -> str | None:
    """The source_sha256 of a complete, structurally sound store; None when it is not one."""
    a = complete_attrs(path)
    return None if a is None else a.get("source_sha256")


def complete_attrs(path: Path) -> dict | None:
    """The root attributes of a complete, structurally sound store; None when it is not one."""
    try:
        with _open_read(Path(path)) as f:
            a = _read_attrs(f)
            if not (bool(a.get("complete")) and "n_rows" in a and a.get("rows_completed") == a["n_rows"]):
                return None
            if _file_problems(f, Path(path), require_complete=True, check_values=False):
                return None
    except OSError:
        return None
    return a


def _name_mismatch(path: Path, a: dict) -> str | None:
    """A store whose attributes name another data set, checkpoint or type than its file name (renamed or copied)."""
    parsed = parse_store_name(Path(path).name)
    for key, named in zip(("dataset", "step", "grad_type"), parsed or ()):
        if key in a and a[key] != named:
            whose = "another data set's" if key == "dataset" else "another checkpoint's" if key == "step" else "another"
            return f"records {key} {a[key]!r} but its name says {named!r} ({whose} store, renamed or copied?)"
    return None


def name_problem(path: Path) -> str | None:
    """`_name_mismatch` of a store file on disk (None when it is not there or cannot be read)."""
    try:
        with _open_read(Path(path)) as f:
            return _name_mismatch(path, _read_attrs(f))
    except OSError:
        return None


def _claimed_bytes(f: h5py.File) -> int:
    """The bytes the file's index, features and norms datasets say they hold (shape x item size)."""
    total = 0
    for name in ("index", *(f"{g}/{ds}" for g in f if g.startswith("dim") for ds in ("features", "norms"))):
        ds = f.get(name)
        if isinstance(ds, h5py.Dataset) and ds.shape is not None:
            total += int(np.prod(ds.shape, dtype=np.float64)) * ds.dtype.itemsize
    return total


def _file_problems(f: h5py.File, path: Path, *, require_complete: bool, check_values: bool, progress=None) -> list[str]:
    """Schema problems of one open file, then (check_values) the values of its first rows_completed rows
    (`progress(rows)` is called as rows are checked).

    lessctl writes stores uncompressed with every chunk allocated, so the file is at least as large as the
    data its datasets claim: a file smaller than that (a tiny file claiming 10^9 rows) is refused before
    anything is read, rather than read as unwritten zeros for hours.
    """
    a = _read_attrs(f)
    if missing := [k for k in ROOT_ATTRS if k not in a]:
        return [f"{path.name}: missing attributes {missing}"]
    claimed, size = _claimed_bytes(f), os.path.getsize(path)
    if claimed > size:
        return [
            f"{path.name}: its datasets claim {a.get('n_rows')!r} rows ({claimed:,} bytes) but the file is "
            f"{size:,} bytes: it is damaged or not a store lessctl wrote; compute it again with "
            "`lessctl grads ... --force`"
        ]
    n, done = a["n_rows"], a["rows_completed"]
    counts_ok = isinstance(n, int) and isinstance(done, int) and 0 <= done <= n
    problems = [
        msg
        for bad, msg in (
            (
                a["format_version"] != FORMAT_VERSION,
                f"format_version {a['format_version']!r}, expected {FORMAT_VERSION}",
            ),
            (a["grad_type"] not in FEATURE_TYPES, f"grad_type {a['grad_type']!r} is not one of {FEATURE_TYPES}"),
            (not any(k.startswith(PROJECTOR_PREFIX) for k in a), "no projector_* attributes"),
            (require_complete and not a["complete"], "not marked complete"),
            (require_complete and done != n, f"rows_completed={done} but n_rows={n}"),
            (not counts_ok, "n_rows or rows_completed out of range"),
        )
        if bad
    ]
    if mismatch := _name_mismatch(path, a):
        problems.append(mismatch)
    idx, dims = f.get("index"), _dims_of(f)
    if not isinstance(idx, h5py.Dataset) or idx.dtype != np.int64 or idx.shape != (n,):
        problems.append(f"index must be int64 [{n}]")
    elif check_values:
        values = idx[:]
        problems += [
            msg
            for bad, msg in (
                ((values < 0).any(), "index has negative line numbers"),
                (len(np.unique(values)) != len(values), "index has duplicate line numbers"),
                ((np.diff(values) < 0).any(), "index is not increasing"),
            )
            if bad
        ]
    if not dims:
        problems.append("no dim<D> groups")
    recorded = a.get("dims")  # stores written since the attribute exists record their dims
    if recorded is not None and sorted(int(x) for x in np.atleast_1d(recorded)) != dims:
        problems.append(f"dims {dims} but the store was written with dims {sorted(np.atleast_1d(recorded).tolist())}")
    for d in dims:
        group = f[f"dim{d}"]
        if not isinstance(group, h5py.Group):
            problems.append(f"dim{d} is not a group")
            continue
        feats, norms = group.get("features"), group.get("norms")
        if not isinstance(feats, h5py.Dataset) or feats.dtype != np.float16 or feats.shape != (n, d):
            problems.append(f"dim{d}/features must be float16 [{n}, {d}]")
        elif not isinstance(norms, h5py.Dataset) or norms.dtype != np.float32 or norms.shape != (n,):
            problems.append(f"dim{d}/norms must be float32 [{n}]")
        elif check_values and counts_ok:
            try:
                problems += [f"dim{d}: {p}" for p in _value_problems(feats, norms, done, progress)]
            except OSError as e:  # a Fletcher-32 checksum mismatch, or a truncated file
                problems.append(f"dim{d}: cannot be read ({str(e).splitlines()[0]})")
    return [f"{path.name}: {p}" for p in problems]


def _value_problems(feats: h5py.Dataset, norms: h5py.Dataset, rows: int, progress=None) -> list[str]:
    """Non-finite values, non-unit rows and bad zero rows among the first `rows` rows (`progress(k)` after each
    k rows read)."""
    step = max(1, (64 << 20) // (4 * feats.shape[1]))  # about 64 MiB of float32 per read
    masks: dict[str, list[np.ndarray]] = {}
    for start in range(0, rows, step):
        x = feats[start : min(rows, start + step)].astype(np.float32)  # [b, D]
        nrm = norms[start : start + len(x)]  # [b]
        finite, length = np.isfinite(x).all(axis=1), np.linalg.norm(x, axis=1)  # [b], [b]
        for kind, mask in (
            ("rows with non-finite values", ~finite),
            ("negative or non-finite norms", ~(np.isfinite(nrm) & (nrm >= 0))),
            ("rows not unit-norm", finite & (nrm != 0) & (np.abs(length - 1) >= UNIT_NORM_TOL)),
            ("zero-norm rows with non-zero features", (nrm == 0) & (length != 0)),
        ):
            masks.setdefault(kind, []).append(mask)
        if progress is not None:
            progress(len(x))
    out = []
    for kind, parts in masks.items():
        mask = np.concatenate(parts)
        if mask.any():
            out.append(f"{int(mask.sum())} {kind} (first at row {int(np.argmax(mask))})")
    return out


def bad_rows(x: np.ndarray) -> np.ndarray:
    """Positions of rows that are neither unit-norm nor all zero (NaN, inf, a flipped bit): [k] int."""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(all="ignore"):
        length = np.linalg.norm(x, axis=1)
    ok = np.isfinite(length) & ((length == 0) | (np.abs(length - 1) < UNIT_NORM_TOL))
    return np.flatnonzero(~ok)


def in_use_message(part: Path) -> str:
    """The one line for a `.part` that another process is writing (grads and match say the same)."""
    return (
        f"{part} is open in another process (another `lessctl grads` writing it); wait for it to finish, "
        "or stop it and re-run the same command to resume it"
    )


def part_in_use(part: Path) -> bool:
    """True when another process holds `part` open for writing (HDF5's file lock refuses a second writer)."""
    try:
        h5py.File(part, "r", locking=True).close()
    except BlockingIOError:
        return True
    except OSError as e:
        return "lock" in str(e).lower()
    return False


def resume_command(part: Path) -> str:
    """The `lessctl grads` command that resumes `part` with the settings it was started with."""
    try:
        with _open_read(Path(part)) as f:
            a, dims = _read_attrs(f), _dims_of(f)
    except OSError:
        a, dims = {}, []
    parsed = parse_store_name(Path(part).name)
    name, step, grad_type, shard = parsed if parsed else (a.get("dataset", "?"), a.get("step", "?"), None, None)
    role = "target" if a.get("role") == "target" or grad_type in ("sgd", "sign") else "train"
    cmd = [f"lessctl grads --ckpt {step} --{role} {name}"]
    if grad_type and grad_type != ("adam" if role == "train" else "sgd"):
        cmd.append(f"--type {grad_type}")
    if dims:
        cmd.append("--dims " + " ".join(map(str, dims)))
    if shard:
        cmd.append(f"--shard {shard[0]}/{shard[1]}")
    if a.get("batch_tokens"):
        cmd.append(f"--batch-tokens {a['batch_tokens']}")
    if a.get(PROJECTOR_PREFIX + "kind"):
        cmd.append(f"--projector {a[PROJECTOR_PREFIX + 'kind']}")
    return " ".join(cmd)


def incomplete_message(part: Path) -> str:
    """The one line for an incomplete store: in use by another process, or the command that resumes it."""
    if part_in_use(part):
        return in_use_message(part)
    try:
        with _open_read(Path(part)) as f:
            a = _read_attrs(f)
        rows = f" ({a.get('rows_completed')} of {a.get('n_rows')} rows)"
    except OSError:
        rows = ""
    return f"gradient store {part} is incomplete{rows}; `{resume_command(part)}` resumes it"
