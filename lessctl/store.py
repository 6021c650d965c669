"""The HDF5 gradient datastore: file names, crash-safe writing with resume, shards, reading, verifying.

Layout of one file (see ARCHITECTURE.md, "The gradient store"):

    /index                 [n] int64      row -> 0-based line of the source file
    /dim<D>/features       [n, D] float16 L2-normalized rows (zero rows stay zero)
    /dim<D>/norms          [n] float32    L2 norm before normalization
    root attributes        format_version, provenance, projector_*, rows_completed, complete, shard info

Datasets are contiguous (row-major, so any row range is one read) and allocated in full
when the file is created, so appending rows changes no HDF5 metadata except the
`rows_completed` attribute, which is rewritten in place after the rows are flushed: a
`.part` killed at any point reopens with every one of its `rows_completed` rows intact.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from lessctl import __version__
from lessctl.errors import AlreadyExistsError, InputError, LessctlError, MissingArtifactError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
GRAD_TYPES = ("adam", "sgd", "sign")
PROJECTOR_PREFIX = "projector_"
UNIT_NORM_TOL = 1e-2  # float16 rounding of a unit row stays well inside this
# Attributes the caller must pass to StoreWriter (`projector` is a dict, stored as projector_*).
CALLER_ATTRS = ("base_model", "checkpoint", "step", "grad_type", "source", "source_sha256", "projector")
# Root attributes every file has.
ROOT_ATTRS = (
    "format_version", "lessctl_version", "base_model", "checkpoint", "step", "grad_type", "source",
    "source_sha256", "n_rows", "rows_completed", "complete", "shard", "num_shards", "row_start", "total_rows",
)
# Attributes (besides projector_*, dims and index) that must agree for a `.part` to be resumed.
_RESUME_KEYS = ("grad_type", "step", "base_model", "n_rows", "row_start", "total_rows", "shard", "num_shards")
# Attributes that must agree between the shards of one store.
_SHARD_KEYS = ("format_version", "grad_type", "step", "base_model", "source_sha256", "total_rows", "num_shards")
_NAME_RE = re.compile(
    r"^(?P<name>.+)-ckpt(?P<step>\d+)-(?P<type>adam|sgd|sign)(?:-shard(?P<k>\d+)of(?P<n>\d+))?\.h5(?:\.part)?$"
)
_DIM_RE = re.compile(r"^dim(\d+)$")


# --- names -------------------------------------------------------------------------------------


def format_store_name(name: str, step: int, grad_type: str, shard: tuple[int, int] | None = None) -> str:
    """The file name of a store: `<name>-ckpt<step>-<type>[-shard<K>of<N>].h5`."""
    if grad_type not in GRAD_TYPES:
        raise ValueError(f"grad_type must be one of {GRAD_TYPES}, not {grad_type!r}")
    if not name or "/" in name or os.sep in name:
        raise ValueError(f"invalid data set name {name!r}")
    base = f"{name}-ckpt{int(step)}-{grad_type}"
    if shard is None:
        return base + ".h5"
    k, n = shard
    if not 1 <= k <= n:
        raise ValueError(f"shard must be K/N with 1 <= K <= N, not {k}/{n}")
    return f"{base}-shard{k}of{n}.h5"


def store_path(grads_dir: Path, name: str, step: int, grad_type: str, shard: tuple[int, int] | None = None) -> Path:
    """The path of a store (or of one shard of it) in `grads_dir`."""
    return Path(grads_dir) / format_store_name(name, step, grad_type, shard)


def part_path(path: Path) -> Path:
    """The `.part` file a store is written into before it is complete."""
    path = Path(path)
    return path.with_name(path.name + ".part")


def parse_store_name(filename: str) -> tuple[str, int, str, tuple[int, int] | None] | None:
    """(name, step, grad_type, (K, N) or None) from a store file name (`.part` allowed); None if not a store."""
    m = _NAME_RE.match(Path(filename).name)
    if m is None:
        return None
    shard = None
    if m["k"] is not None:
        shard = (int(m["k"]), int(m["n"]))
        if not 1 <= shard[0] <= shard[1]:
            return None
    return m["name"], int(m["step"]), m["type"], shard


def sha256_file(path: Path, block_size: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(block_size):
            h.update(block)
    return h.hexdigest()


# --- attribute helpers -------------------------------------------------------------------------


def _py(v: Any) -> Any:
    """An attribute value as plain Python (h5py.Empty -> None, numpy scalars -> int/float/bool)."""
    if isinstance(v, h5py.Empty):
        return None
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    return list(v) if isinstance(v, tuple) else v


def _read_attrs(f: h5py.File) -> dict[str, Any]:
    return {k: _py(v) for k, v in f.attrs.items()}


def _dims_of(f: h5py.File) -> list[int]:
    return sorted(int(m[1]) for key in f.keys() if (m := _DIM_RE.match(key)))


def _open_read(path: Path) -> h5py.File:
    # No file locking: finished stores are immutable, and `store ls` must not block on a .part in use.
    return h5py.File(path, "r", locking=False)


def store_complete(path: Path) -> bool:
    """True when `path` is a readable store marked complete with all its rows written."""
    try:
        with _open_read(Path(path)) as f:
            a = f.attrs
            return bool(a.get("complete", False)) and int(a.get("rows_completed", -1)) == int(a.get("n_rows", -2))
    except (OSError, ValueError, TypeError):
        return False


def _mismatch(part: Path, key: str, old: Any, new: Any) -> InputError:
    return InputError(
        f"the partial store {part} was started with {key}={old!r}, not {new!r}; "
        "re-run with the original settings or pass --force to start over"
    )


# --- writing -----------------------------------------------------------------------------------


class StoreWriter:
    """Appends rows to `<path>.part`, resuming one left by an interrupted run, and renames it when complete."""

    def __init__(self, path: Path, *, dims: list[int], index: np.ndarray, attrs: dict, force: bool = False):
        self.path = Path(path)
        self.part = part_path(self.path)
        self.dims = sorted({int(d) for d in dims})
        if not self.dims or self.dims[0] <= 0:
            raise ValueError(f"dims must be positive integers, not {dims!r}")
        self.index = np.asarray(index, dtype=np.int64)  # [n]
        if self.index.ndim != 1:
            raise ValueError("index must be one-dimensional")
        self.n_rows = len(self.index)
        self.attrs = self._root_attrs(attrs)
        self.rows_completed = 0
        self._finalized = False
        if self.path.exists():
            if not force:
                raise AlreadyExistsError(f"gradient store {self.path} already exists; pass --force to recompute it")
            log.warning("removing %s to recompute it (--force)", self.path)
            self.path.unlink()
        self._file: h5py.File | None = None
        if self.part.exists():
            if force:
                log.warning("discarding the partial store %s (--force)", self.part)
                self.part.unlink()
            else:
                self._file = self._resume()
        if self._file is None:
            self._file = self._create()

    def _root_attrs(self, attrs: dict) -> dict[str, Any]:
        missing = [k for k in CALLER_ATTRS if k not in attrs]
        if missing:
            raise ValueError(f"StoreWriter attrs lack {missing}")
        out: dict[str, Any] = {}
        for key, value in attrs.items():
            if key == "projector":
                out.update({PROJECTOR_PREFIX + str(k): _py(v) for k, v in value.items()})
            else:
                out[key] = _py(value)
        out["format_version"] = FORMAT_VERSION
        out.setdefault("lessctl_version", __version__)
        for key, default in (("shard", 1), ("num_shards", 1), ("row_start", 0), ("total_rows", self.n_rows)):
            out.setdefault(key, default)
        out.update(n_rows=self.n_rows, rows_completed=0, complete=False)
        if out["grad_type"] not in GRAD_TYPES:
            raise ValueError(f"grad_type must be one of {GRAD_TYPES}, not {out['grad_type']!r}")
        if not 1 <= out["shard"] <= out["num_shards"] or out["row_start"] + self.n_rows > out["total_rows"]:
            raise ValueError(f"inconsistent shard attributes: {out}")
        return out

    def _create(self) -> h5py.File:
        f = h5py.File(self.part, "w", locking="best-effort")
        for key, value in self.attrs.items():
            f.attrs[key] = h5py.Empty("f8") if value is None else value
        f.create_dataset("index", data=self.index)
        for d in self.dims:
            g = f.create_group(f"dim{d}")
            g.create_dataset("features", shape=(self.n_rows, d), dtype=np.float16, dcpl=_early_alloc())
            g.create_dataset("norms", shape=(self.n_rows,), dtype=np.float32, dcpl=_early_alloc())
        f.flush()
        log.info("writing %s (%d rows, dims %s)", self.part, self.n_rows, self.dims)
        return f

    def _resume(self) -> h5py.File | None:
        try:
            f = h5py.File(self.part, "r+", locking="best-effort")
        except BlockingIOError as e:
            raise LessctlError(
                f"{self.part} is open in another process (is another `lessctl grads` writing it?); "
                "wait for it to finish or stop it"
            ) from e
        except OSError as e:
            log.warning("cannot read the partial store %s (%s); starting over", self.part, e)
            self.part.unlink()
            return None
        try:
            old = _read_attrs(f)
            broken = _file_problems(f, self.part, require_complete=False, check_values=False)
            if broken:
                log.warning("the partial store %s is damaged (%s); starting over", self.part, broken[0])
                f.close()
                self.part.unlink()
                return None
            if old.get("source_sha256") != self.attrs["source_sha256"]:
                raise InputError(
                    f"the source file {self.attrs['source']} changed since the partial store {self.part} "
                    "was started (its sha256 differs); pass --force to start over"
                )
            proj = sorted(k for k in old.keys() | self.attrs.keys() if k.startswith(PROJECTOR_PREFIX))
            for key in (*_RESUME_KEYS, *proj):
                if old.get(key) != self.attrs.get(key):
                    raise _mismatch(self.part, key, old.get(key), self.attrs.get(key))
            if _dims_of(f) != self.dims:
                raise _mismatch(self.part, "dims", _dims_of(f), self.dims)
            if not np.array_equal(f["index"][:], self.index):
                raise _mismatch(self.part, "index", "(other rows)", "(these rows)")
        except BaseException:
            f.close()
            raise
        self.rows_completed = int(old["rows_completed"])
        log.info("resuming %s at row %d of %d", self.part, self.rows_completed, self.n_rows)
        return f

    def write(self, features: dict[int, Any]) -> None:
        """Append the next b rows: {dim: [b, D] float32 array or tensor}, unnormalized."""
        if self._file is None:
            raise ValueError(f"StoreWriter for {self.path} is closed")
        if set(features) != set(self.dims):
            raise ValueError(f"write() needs features for dims {self.dims}, got {sorted(features)}")
        blocks = {d: _as_float32(features[d]) for d in self.dims}
        b = blocks[self.dims[0]].shape[0]
        for d, x in blocks.items():
            if x.shape != (b, d):
                raise ValueError(f"features for dim {d} have shape {x.shape}, expected ({b}, {d})")
        start, stop = self.rows_completed, self.rows_completed + b
        if stop > self.n_rows:
            raise ValueError(f"{self.path}: writing rows {start}..{stop} past n_rows={self.n_rows}")
        if b == 0:
            return
        for d, x in blocks.items():
            norms = np.linalg.norm(x, axis=1).astype(np.float32)  # [b]
            if not np.isfinite(norms).all():
                first = self.attrs["row_start"] + start + int(np.argmin(np.isfinite(norms)))
                raise LessctlError(f"non-finite gradient features (NaN or inf) at row {first} for {self.path.name}")
            unit = x / np.where(norms > 0, norms, 1.0)[:, None]  # zero rows stay zero
            g = self._file[f"dim{d}"]
            g["features"][start:stop] = unit.astype(np.float16)
            g["norms"][start:stop] = norms
        self._file.flush()  # rows reach the file before the counter that vouches for them
        self._file.attrs.modify("rows_completed", np.int64(stop))
        self._file.flush()
        self.rows_completed = stop

    def finalize(self) -> Path:
        """Mark the store complete and move `<path>.part` to `path`; returns `path`."""
        if self._finalized:
            return self.path
        if self._file is None:
            raise ValueError(f"StoreWriter for {self.path} is closed")
        if self.rows_completed != self.n_rows:
            raise ValueError(f"{self.path}: only {self.rows_completed} of {self.n_rows} rows written")
        self._file.attrs.modify("complete", True)
        self._file.close()
        self._file = None
        _fsync(self.part)
        os.replace(self.part, self.path)
        _fsync(self.path.parent)
        self._finalized = True
        log.info("wrote %s", self.path)
        return self.path

    def close(self) -> None:
        """Close the `.part` without finalizing (it stays resumable)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self._file is not None and self.rows_completed == self.n_rows:
            self.finalize()
        else:
            self.close()


def _early_alloc() -> h5py.h5p.PropDCID:
    # Allocate the whole (contiguous) dataset at creation: later writes touch no chunk index.
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return dcpl


def _as_float32(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; no torch import needed
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- reading -----------------------------------------------------------------------------------


class StoreReader:
    """One logical store over one file or a full set of shards, in row order."""

    def __init__(self, paths: list[Path]):
        self.paths = [Path(p) for p in paths]
        self._files: list[h5py.File] = []
        try:
            for p in self.paths:
                try:
                    self._files.append(_open_read(p))
                except OSError as e:
                    raise InputError(f"cannot read gradient store {p}: {e}") from e
            self._init()
        except BaseException:
            self.close()
            raise

    def _init(self) -> None:
        shard_attrs = [_read_attrs(f) for f in self._files]
        order = sorted(range(len(self.paths)), key=lambda i: shard_attrs[i].get("shard", 1))
        self.paths = [self.paths[i] for i in order]
        self._files = [self._files[i] for i in order]
        self.shard_attrs = [shard_attrs[i] for i in order]
        first, p0 = self.shard_attrs[0], self.paths[0]
        self.dims = _dims_of(self._files[0])
        row = 0
        for k, (p, a, f) in enumerate(zip(self.paths, self.shard_attrs, self._files), start=1):
            if not a.get("complete") or a.get("rows_completed") != a.get("n_rows"):
                raise MissingArtifactError(f"gradient store {p} is incomplete; re-running `lessctl grads` resumes it")
            for key in _SHARD_KEYS:
                if a.get(key) != first.get(key):
                    raise InputError(f"shards disagree on {key}: {p0.name} has {first.get(key)!r}, {p.name} has {a.get(key)!r}")
            proj = {x for x in a.keys() | first.keys() if x.startswith(PROJECTOR_PREFIX)}
            bad = [x for x in sorted(proj) if a.get(x) != first.get(x)]
            if bad or _dims_of(f) != self.dims:
                what = bad[0] if bad else "dims"
                raise InputError(f"shards disagree on {what}: {p0.name} and {p.name}; recompute one with --force")
            if a.get("shard") != k or a.get("num_shards") != len(self.paths) or a.get("row_start") != row:
                raise InputError(f"{p.name} is shard {a.get('shard')}/{a.get('num_shards')} starting at row "
                                 f"{a.get('row_start')}, expected shard {k}/{len(self.paths)} starting at row {row}")
            row += a["n_rows"]
        if row != first.get("total_rows"):
            raise InputError(f"shards of {p0.name} hold {row} rows, expected total_rows={first.get('total_rows')}")
        self._starts = np.cumsum([0] + [a["n_rows"] for a in self.shard_attrs])  # [num_files + 1]
        self.n_rows = int(row)
        per_shard = {"shard", "row_start", "n_rows", "rows_completed"}
        self.attrs = {k: v for k, v in first.items() if k not in per_shard}
        self.attrs.update(n_rows=self.n_rows, rows_completed=self.n_rows)
        n = len(PROJECTOR_PREFIX)
        self.projector = {k[n:]: v for k, v in first.items() if k.startswith(PROJECTOR_PREFIX)}
        self.index = np.concatenate([f["index"][:] for f in self._files]).astype(np.int64)  # [N]

    def _group(self, f: h5py.File, dim: int) -> h5py.Group:
        if dim not in self.dims:
            raise InputError(f"gradient store {self.paths[0]} has no dimension {dim} (it has {self.dims})")
        return f[f"dim{dim}"]

    def read(self, dim: int) -> np.ndarray:
        """All normalized rows of one dimension: [N, D] float16."""
        return np.concatenate([self._group(f, dim)["features"][:] for f in self._files])

    def norms(self, dim: int) -> np.ndarray:
        """The norms before normalization: [N] float32."""
        return np.concatenate([self._group(f, dim)["norms"][:] for f in self._files])

    def iter_chunks(self, dim: int, rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (global start row, [b, D] float16) with b <= rows, in row order across shards."""
        for f, offset in zip(self._files, self._starts):
            ds = self._group(f, dim)["features"]
            for a in range(0, ds.shape[0], rows):
                yield int(offset) + a, ds[a : a + rows]

    def close(self) -> None:
        """Close the underlying files."""
        for f in self._files:
            f.close()
        self._files = []

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _scan(grads_dir: Path) -> dict[tuple[str, int, str, int | None], dict[int, list[Path]]]:
    """Store files in `grads_dir`: {(name, step, type, N or None): {K: [paths, final before .part]}}."""
    groups: dict = {}
    if not Path(grads_dir).is_dir():
        return groups
    for p in sorted(Path(grads_dir).iterdir(), key=lambda q: (q.name.endswith(".part"), q.name)):
        parsed = parse_store_name(p.name)
        if parsed is None or not p.is_file():
            continue
        name, step, grad_type, shard = parsed
        k, n = shard if shard else (1, None)
        groups.setdefault((name, step, grad_type, n), {}).setdefault(k, []).append(p)
    return groups


def open_store(grads_dir: Path, name: str, step: int, grad_type: str) -> StoreReader:
    """Open the store of one data set, checkpoint and gradient type (unsharded, or a full set of shards)."""
    grads_dir = Path(grads_dir)
    path = store_path(grads_dir, name, step, grad_type)
    if path.exists():
        return StoreReader([path])
    what = f"'{name}' at checkpoint {step} ({grad_type})"
    sets = {n: by_k for (nm, st, gt, n), by_k in _scan(grads_dir).items() if (nm, st, gt) == (name, step, grad_type)}
    shard_sets = {n: by_k for n, by_k in sets.items() if n is not None}
    if not shard_sets:
        if None in sets:
            raise MissingArtifactError(f"the gradient store for {what} is incomplete ({part_path(path)}); "
                                       f"re-running `lessctl grads --ckpt {step}` resumes it")
        raise MissingArtifactError(f"no gradient store for {what}: expected {path}; "
                                   f"run `lessctl grads --ckpt {step}` first")
    full = [n for n, by_k in shard_sets.items() if all(not by_k.get(k, [Path(".part")])[0].name.endswith(".part")
                                                      for k in range(1, n + 1))]
    if len(full) == 1:
        n = full[0]
    elif len(shard_sets) == 1:
        n = next(iter(shard_sets))
    else:
        counts = ", ".join(f"of{n}" for n in sorted(shard_sets))
        raise InputError(f"shards of {what} in {grads_dir} come in several counts ({counts}); remove the stale ones")
    by_k = shard_sets[n]
    for k in range(1, n + 1):
        shard_file = store_path(grads_dir, name, step, grad_type, (k, n))
        if k not in by_k:
            raise MissingArtifactError(f"shard {k}/{n} of the gradient store for {what} is missing: {shard_file}; "
                                       f"run `lessctl grads --ckpt {step} --shard {k}/{n}` to make it")
        if by_k[k][0].name.endswith(".part"):
            raise MissingArtifactError(f"shard {k}/{n} of the gradient store for {what} is incomplete "
                                       f"({by_k[k][0]}); re-running `lessctl grads --ckpt {step} --shard {k}/{n}` resumes it")
    return StoreReader([by_k[k][0] for k in range(1, n + 1)])


def list_stores(grads_dir: Path) -> list[dict]:
    """One dict per logical store in `grads_dir` (shards grouped; `.part` files count as incomplete)."""
    out = []
    for (name, step, grad_type, n), by_k in sorted(_scan(grads_dir).items(), key=lambda kv: (*kv[0][:3], kv[0][3] or 0)):
        paths, rows, total, dims, kind, complete = [], 0, None, [], None, True
        for k in sorted(by_k):
            p = by_k[k][0]
            paths.append(str(p))
            try:
                with _open_read(p) as f:
                    a, dims = _read_attrs(f), _dims_of(f)
            except OSError as e:
                log.warning("cannot read %s: %s", p, e)
                complete = False
                continue
            rows += int(a.get("rows_completed") or 0)
            total = a.get("total_rows", total)
            kind = a.get(PROJECTOR_PREFIX + "kind", kind)
            complete &= not p.name.endswith(".part") and bool(a.get("complete")) and a.get("rows_completed") == a.get("n_rows")
        missing = [k for k in range(1, (n or 1) + 1) if k not in by_k]
        out.append(dict(name=name, step=step, grad_type=grad_type, dims=dims, rows_completed=rows, total_rows=total,
                        projector_kind=kind, complete=complete and not missing, num_shards=n or 1,
                        missing_shards=missing, paths=paths))
    return out


# --- verifying ---------------------------------------------------------------------------------


def verify_store(path_or_reader: Path | str | StoreReader) -> list[str]:
    """Problems found in one store file or in every file of a reader; an empty list means it is sound."""
    if isinstance(path_or_reader, StoreReader):
        problems = [q for p in path_or_reader.paths for q in verify_store(p)]
        idx = path_or_reader.index
        if len(idx) > 1 and not (np.diff(idx) > 0).all():
            problems.append(f"{path_or_reader.paths[0].name}: index is not strictly increasing across shards")
        return problems
    path = Path(path_or_reader)
    try:
        f = _open_read(path)
    except OSError as e:
        return [f"{path.name}: cannot be read as HDF5 ({e})"]
    with f:
        return _file_problems(f, path, require_complete=True, check_values=True)


def _file_problems(f: h5py.File, path: Path, *, require_complete: bool, check_values: bool) -> list[str]:
    """Schema problems of one open file, then (check_values) problems in its first rows_completed rows."""
    at = f"{path.name}:"
    a = _read_attrs(f)
    missing = [k for k in ROOT_ATTRS if k not in a]
    if missing:
        return [f"{at} missing attributes {missing}"]
    problems = []
    if a["format_version"] != FORMAT_VERSION:
        problems.append(f"{at} format_version {a['format_version']!r}, expected {FORMAT_VERSION}")
    if a["grad_type"] not in GRAD_TYPES:
        problems.append(f"{at} grad_type {a['grad_type']!r} is not one of {GRAD_TYPES}")
    if not any(k.startswith(PROJECTOR_PREFIX) for k in a):
        problems.append(f"{at} no projector_* attributes")
    n, done = a["n_rows"], a["rows_completed"]
    if require_complete and not a["complete"]:
        problems.append(f"{at} not marked complete")
    if require_complete and done != n:
        problems.append(f"{at} rows_completed={done} but n_rows={n}")
    if not isinstance(done, int) or not 0 <= done <= n:
        return problems + [f"{at} rows_completed={done!r} out of range"]
    idx = f.get("index")
    if not isinstance(idx, h5py.Dataset) or idx.dtype != np.int64 or idx.shape != (n,):
        problems.append(f"{at} index must be int64 [{n}]")
    elif check_values:
        values = idx[:]
        steps = np.diff(values)
        if (values < 0).any():
            problems.append(f"{at} index has negative line numbers")
        if (steps == 0).any():
            problems.append(f"{at} index has duplicate line numbers")
        if (steps < 0).any():
            problems.append(f"{at} index is not increasing")
    dims = _dims_of(f)
    if not dims:
        problems.append(f"{at} no dim<D> groups")
    for d in dims:
        g = f[f"dim{d}"]
        feats, norms = g.get("features"), g.get("norms")
        if not isinstance(feats, h5py.Dataset) or feats.dtype != np.float16 or feats.shape != (n, d):
            problems.append(f"{at} dim{d}/features must be float16 [{n}, {d}]")
        elif not isinstance(norms, h5py.Dataset) or norms.dtype != np.float32 or norms.shape != (n,):
            problems.append(f"{at} dim{d}/norms must be float32 [{n}]")
        elif check_values:
            problems += [f"{at} dim{d}: {p}" for p in _value_problems(feats, norms, done)]
    return problems


def _value_problems(feats: h5py.Dataset, norms: h5py.Dataset, rows: int) -> list[str]:
    """Non-finite values, non-unit rows and bad zero rows among the first `rows` rows."""
    step = max(1, (64 << 20) // (4 * feats.shape[1]))  # about 64 MiB of float32 at a time
    counts = {"non-finite values": [0, None], "rows not unit-norm": [0, None],
              "zero-norm rows with non-zero features": [0, None], "negative or non-finite norms": [0, None]}

    def note(kind: str, mask: np.ndarray, start: int) -> None:
        if mask.any():
            counts[kind][0] += int(mask.sum())
            if counts[kind][1] is None:
                counts[kind][1] = start + int(np.argmax(mask))

    for start in range(0, rows, step):
        x = feats[start : min(rows, start + step)].astype(np.float32)  # [b, D]
        nrm = norms[start : start + len(x)]  # [b]
        finite = np.isfinite(x).all(axis=1)
        length = np.linalg.norm(x, axis=1)
        note("non-finite values", ~finite, start)
        note("negative or non-finite norms", ~(np.isfinite(nrm) & (nrm >= 0)), start)
        note("rows not unit-norm", finite & (nrm != 0) & (np.abs(length - 1) >= UNIT_NORM_TOL), start)
        note("zero-norm rows with non-zero features", (nrm == 0) & (length != 0), start)
    return [f"{c} {kind} (first at row {first})" for kind, (c, first) in counts.items() if c]
