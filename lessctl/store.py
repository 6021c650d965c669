"""The HDF5 gradient datastore: file names, crash-safe writing with resume, shards, reading, verifying.

Per file: `index` [n] int64 (row -> 0-based source line); `dim<D>/features` [n, D] float16, rows
L2-normalized (zero rows stay zero); `dim<D>/norms` [n] float32 (norms before normalization); root
attributes (ROOT_ATTRS and projector_*). Datasets are contiguous (any row range is one read) and
allocated in full at creation, so appending rows changes no HDF5 metadata but the `rows_completed`
attribute, rewritten in place after the rows are flushed: a `.part` killed at any point reopens with
all of its `rows_completed` rows intact.
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
# Attributes the caller must pass to StoreWriter (`projector` is a dict, stored as projector_<key>).
CALLER_ATTRS = ("base_model", "checkpoint", "step", "grad_type", "source", "source_sha256", "projector")
ROOT_ATTRS = ("format_version", "lessctl_version", "base_model", "checkpoint", "step", "grad_type", "source",
              "source_sha256", "n_rows", "rows_completed", "complete", "shard", "num_shards", "row_start", "total_rows")
# Attributes (besides projector_*, dims and index) that must agree for a `.part` to be resumed.
_RESUME_KEYS = ("grad_type", "step", "base_model", "n_rows", "row_start", "total_rows", "shard", "num_shards")
# Attributes (besides projector_* and dims) that must agree between the shards of one store.
_SHARD_KEYS = ("format_version", "grad_type", "step", "base_model", "source_sha256", "total_rows", "num_shards")
_NAME_RE = re.compile(r"^(?P<name>.+)-ckpt(?P<step>\d+)-(?P<type>adam|sgd|sign)"
                      r"(?:-shard(?P<k>\d+)of(?P<n>\d+))?\.h5(?:\.part)?$")
_DIM_RE = re.compile(r"^dim(\d+)$")


def format_store_name(name: str, step: int, grad_type: str, shard: tuple[int, int] | None = None) -> str:
    """The file name of a store: `<name>-ckpt<step>-<type>[-shard<K>of<N>].h5`."""
    if grad_type not in GRAD_TYPES or not name or "/" in name or (shard and not 1 <= shard[0] <= shard[1]):
        raise ValueError(f"no store name for name={name!r}, grad_type={grad_type!r}, shard={shard!r}")
    return f"{name}-ckpt{int(step)}-{grad_type}" + (f"-shard{shard[0]}of{shard[1]}" if shard else "") + ".h5"


def store_path(grads_dir: Path, name: str, step: int, grad_type: str, shard: tuple[int, int] | None = None) -> Path:
    """The path of a store (or of one shard of it) in `grads_dir`."""
    return Path(grads_dir) / format_store_name(name, step, grad_type, shard)


def part_path(path: Path) -> Path:
    """The `.part` file a store is written into until it is complete."""
    return Path(path).with_name(Path(path).name + ".part")


def parse_store_name(filename: str) -> tuple[str, int, str, tuple[int, int] | None] | None:
    """(name, step, grad_type, (K, N) or None) from a store file name (`.part` allowed); None if not a store."""
    m = _NAME_RE.match(Path(filename).name)
    shard = (int(m["k"]), int(m["n"])) if m and m["k"] else None
    if m is None or (shard and not 1 <= shard[0] <= shard[1]):
        return None
    return m["name"], int(m["step"]), m["type"], shard


def sha256_file(path: Path, block_size: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(block_size):
            h.update(block)
    return h.hexdigest()


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
    """True when `path` is a readable store marked complete with all its rows written."""
    try:
        with _open_read(Path(path)) as f:
            a = _read_attrs(f)
    except OSError:
        return False
    return bool(a.get("complete")) and "n_rows" in a and a.get("rows_completed") == a["n_rows"]


class StoreWriter:
    """Appends rows to `<path>.part`, resuming one left by an interrupted run, and renames it when complete."""

    def __init__(self, path: Path, *, dims: list[int], index: np.ndarray, attrs: dict, force: bool = False):
        self.path, self.part = Path(path), part_path(path)
        self.dims = sorted({int(d) for d in dims})
        self.index = np.asarray(index, dtype=np.int64)  # [n]
        if not self.dims or self.dims[0] <= 0 or self.index.ndim != 1:
            raise ValueError(f"StoreWriter needs positive dims and a 1-D index, got {dims!r}, {self.index.shape}")
        self.n_rows = len(self.index)
        self.attrs = self._root_attrs(attrs)
        self.rows_completed = 0
        self._finalized = False
        self._file: h5py.File | None = None
        if self.path.exists():
            if not force:
                raise AlreadyExistsError(f"gradient store {self.path} already exists; pass --force to recompute it")
            log.warning("removing %s to recompute it (--force)", self.path)
            self.path.unlink()
        if self.part.exists() and force:
            log.warning("discarding the partial store %s (--force)", self.part)
            self.part.unlink()
        if self.part.exists():
            self._file = self._resume()
        if self._file is None:
            self._file = self._create()

    def _root_attrs(self, attrs: dict) -> dict[str, Any]:
        if missing := [k for k in CALLER_ATTRS if k not in attrs]:
            raise ValueError(f"StoreWriter attrs lack {missing}")
        out = {k: _py(v) for k, v in attrs.items() if k != "projector"}
        out.update({PROJECTOR_PREFIX + str(k): _py(v) for k, v in attrs["projector"].items()})
        out.setdefault("lessctl_version", __version__)
        for key, default in (("shard", 1), ("num_shards", 1), ("row_start", 0), ("total_rows", self.n_rows)):
            out.setdefault(key, default)
        out.update(format_version=FORMAT_VERSION, n_rows=self.n_rows, rows_completed=0, complete=False)
        if out["grad_type"] not in GRAD_TYPES:
            raise ValueError(f"grad_type must be one of {GRAD_TYPES}, not {out['grad_type']!r}")
        if not 1 <= out["shard"] <= out["num_shards"] or out["row_start"] + self.n_rows > out["total_rows"]:
            raise ValueError(f"inconsistent shard attributes: {out}")
        return out

    def _create(self) -> h5py.File:
        self.part.parent.mkdir(parents=True, exist_ok=True)
        f = h5py.File(self.part, "w", locking="best-effort")
        for key, value in self.attrs.items():
            f.attrs[key] = h5py.Empty("f8") if value is None else value
        f.create_dataset("index", data=self.index)
        for d in self.dims:
            f.create_dataset(f"dim{d}/features", shape=(self.n_rows, d), dtype=np.float16, dcpl=_early_alloc())
            f.create_dataset(f"dim{d}/norms", shape=(self.n_rows,), dtype=np.float32, dcpl=_early_alloc())
        f.flush()
        log.info("writing %s (%d rows, dims %s)", self.part, self.n_rows, self.dims)
        return f

    def _resume(self) -> h5py.File | None:
        try:
            f = h5py.File(self.part, "r+", locking="best-effort")
        except BlockingIOError as e:
            raise LessctlError(f"{self.part} is open in another process (another `lessctl grads` writing it?); "
                               "wait for it to finish or stop it") from e
        except OSError as e:
            log.warning("cannot read the partial store %s (%s); starting over", self.part, e)
            self.part.unlink()
            return None
        try:
            if broken := _file_problems(f, self.part, require_complete=False, check_values=False):
                log.warning("the partial store %s is damaged (%s); starting over", self.part, broken[0])
                f.close()
                self.part.unlink()
                return None
            old = _read_attrs(f)
            if old["source_sha256"] != self.attrs["source_sha256"]:
                raise InputError(f"the source file {self.attrs['source']} changed since the partial store "
                                 f"{self.part} was started (its sha256 differs); pass --force to start over")
            proj = sorted(k for k in old.keys() | self.attrs.keys() if k.startswith(PROJECTOR_PREFIX))
            checks = [(k, old.get(k), self.attrs.get(k)) for k in (*_RESUME_KEYS, *proj)]
            checks.append(("dims", _dims_of(f), self.dims))
            if not np.array_equal(f["index"][:], self.index):
                checks.append(("index", "other rows", "these rows"))
            for key, was, now in checks:
                if was != now:
                    raise InputError(f"the partial store {self.part} was started with {key}={was!r}, not {now!r}; "
                                     "re-run with the original settings or pass --force to start over")
        except BaseException:
            f.close()
            raise
        self.rows_completed = int(old["rows_completed"])
        log.info("resuming %s at row %d of %d", self.part, self.rows_completed, self.n_rows)
        return f

    def write(self, features: dict[int, Any]) -> None:
        """Append the next b rows: {dim: [b, D] float32 array or tensor}, unnormalized."""
        if self._file is None or set(features) != set(self.dims):
            raise ValueError(f"write() needs an open writer and features for dims {self.dims}, got {sorted(features)}")
        blocks = {d: _as_float32(features[d]) for d in self.dims}  # {D: [b, D]}
        b = len(blocks[self.dims[0]])
        start, stop = self.rows_completed, self.rows_completed + b
        if any(x.shape != (b, d) for d, x in blocks.items()) or stop > self.n_rows:
            shapes = {d: x.shape for d, x in blocks.items()}
            raise ValueError(f"{self.path}: bad write of {shapes} at row {start} of {self.n_rows}")
        if b == 0:
            return
        for d, x in blocks.items():
            norms = np.linalg.norm(x, axis=1).astype(np.float32)  # [b]
            if not np.isfinite(norms).all():
                row = self.attrs["row_start"] + start + int(np.argmin(np.isfinite(norms)))
                raise LessctlError(f"non-finite gradient features (NaN or inf) at row {row} for {self.path.name}")
            self._file[f"dim{d}/features"][start:stop] = (x / np.where(norms > 0, norms, 1)[:, None]).astype(np.float16)
            self._file[f"dim{d}/norms"][start:stop] = norms
        self._file.flush()  # the rows reach the file before the counter that vouches for them
        self._file.attrs.modify("rows_completed", np.int64(stop))
        self._file.flush()
        self.rows_completed = stop

    def finalize(self) -> Path:
        """Mark the store complete and move `<path>.part` to `path`; returns `path`."""
        if self._finalized:
            return self.path
        if self._file is None or self.rows_completed != self.n_rows:
            raise ValueError(f"{self.path}: cannot finalize a closed writer or with {self.rows_completed} "
                             f"of {self.n_rows} rows written")
        self._file.attrs.modify("complete", True)
        self.close()
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
        """Finalize when all rows are written and no exception is propagating; otherwise just close."""
        if exc_type is None and self._file is not None and self.rows_completed == self.n_rows:
            self.finalize()
        self.close()


def _early_alloc() -> h5py.h5p.PropDCID:
    # Allocate the whole (contiguous) dataset at creation: later writes touch no HDF5 metadata.
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return dcpl


def _as_float32(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor (bfloat16 has no numpy view); no torch import needed
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StoreReader:
    """One logical store over one file or a full set of shards (given in any order), read in row order."""

    def __init__(self, paths: list[Path]):
        self._files: list[h5py.File] = []
        try:
            for p in paths:
                try:
                    self._files.append(_open_read(Path(p)))
                except OSError as e:
                    raise InputError(f"cannot read gradient store {p}: {e}") from e
            self._files.sort(key=lambda f: int(f.attrs.get("shard", 1)))
            self.paths = [Path(f.filename) for f in self._files]
            self.shard_attrs = [_read_attrs(f) for f in self._files]
            self._check()
        except BaseException:
            self.close()
            raise
        first = self.shard_attrs[0]
        self._starts = [a["row_start"] for a in self.shard_attrs]
        self.n_rows = int(first["total_rows"])
        self.attrs = {k: v for k, v in first.items() if k not in ("shard", "row_start")}
        self.attrs.update(n_rows=self.n_rows, rows_completed=self.n_rows)
        self.projector = {k[len(PROJECTOR_PREFIX) :]: v for k, v in first.items() if k.startswith(PROJECTOR_PREFIX)}
        self.index = np.concatenate([f["index"][:] for f in self._files]).astype(np.int64)  # [N]

    def _check(self) -> None:
        first, p0 = self.shard_attrs[0], self.paths[0]
        self.dims = _dims_of(self._files[0])
        row = 0
        for k, (p, a, f) in enumerate(zip(self.paths, self.shard_attrs, self._files), start=1):
            if not a.get("complete") or a.get("rows_completed") != a.get("n_rows"):
                raise MissingArtifactError(f"gradient store {p} is incomplete; re-running `lessctl grads` resumes it")
            if broken := _file_problems(f, p, require_complete=True, check_values=False):
                raise InputError(f"gradient store {p} is malformed: {broken[0]}")
            keys = [*_SHARD_KEYS, *sorted(x for x in a.keys() | first.keys() if x.startswith(PROJECTOR_PREFIX))]
            for key, old, new in [*((x, first.get(x), a.get(x)) for x in keys), ("dims", self.dims, _dims_of(f))]:
                if old != new:
                    raise InputError(f"shards disagree on {key}: {p0.name} has {old!r}, {p.name} has {new!r}; "
                                     "recompute the odd one with --force")
            if (a.get("shard"), a.get("num_shards"), a.get("row_start")) != (k, len(self.paths), row):
                raise InputError(f"{p.name} is shard {a.get('shard')}/{a.get('num_shards')} from row {a.get('row_start')}, "
                                 f"expected shard {k}/{len(self.paths)} from row {row}")
            row += a["n_rows"]
        if row != first.get("total_rows"):
            raise InputError(f"the shards of {p0.name} hold {row} rows, not total_rows={first.get('total_rows')}")

    def _datasets(self, dim: int, name: str) -> list[h5py.Dataset]:
        if dim not in self.dims:
            raise InputError(f"gradient store {self.paths[0]} has no dimension {dim} (it has {self.dims})")
        return [f[f"dim{dim}/{name}"] for f in self._files]

    def read(self, dim: int) -> np.ndarray:
        """All normalized rows of one dimension: [N, D] float16."""
        return np.concatenate([ds[:] for ds in self._datasets(dim, "features")])

    def norms(self, dim: int) -> np.ndarray:
        """The norms before normalization: [N] float32."""
        return np.concatenate([ds[:] for ds in self._datasets(dim, "norms")])

    def iter_chunks(self, dim: int, rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (global start row, [b, D] float16) with b <= rows, in row order across shards."""
        for ds, offset in zip(self._datasets(dim, "features"), self._starts):
            for a in range(0, ds.shape[0], rows):
                yield offset + a, ds[a : a + rows]

    def read_into(self, dim: int, start: int, out: np.ndarray) -> None:
        """Fill `out` ([b, D] float16, C-contiguous, e.g. a pinned buffer) with rows start..start+b, across shards.

        No allocation and no copy besides the file read itself: each shard's part is one HDF5 read into `out`.
        """
        stop = start + len(out)
        shape_ok = out.dtype == np.float16 and out.shape[1:] == (dim,) and out.flags.c_contiguous
        if not shape_ok or not 0 <= start <= stop <= self.n_rows:
            raise ValueError(f"read_into needs a C-contiguous float16 [b, {dim}] array for rows in [0, {self.n_rows}], "
                             f"got {out.dtype} {out.shape} from row {start}")
        for ds, offset in zip(self._datasets(dim, "features"), self._starts):
            a, b = max(start, offset), min(stop, offset + ds.shape[0])
            if a < b:
                ds.read_direct(out, np.s_[a - offset : b - offset], np.s_[a - start : b - start])

    def close(self) -> None:
        """Close the underlying files."""
        for f in self._files:
            f.close()
        self._files = []

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _scan(grads_dir: Path) -> dict[tuple[str, int, str, int | None], dict[int, Path]]:
    """Store files in `grads_dir`: {(name, step, type, N or None): {K: the final file, else its .part}}."""
    groups: dict = {}
    if Path(grads_dir).is_dir():
        for p in sorted(Path(grads_dir).iterdir(), key=lambda q: (q.name.endswith(".part"), q.name)):
            parsed = parse_store_name(p.name)
            if parsed is not None and p.is_file():
                name, step, grad_type, shard = parsed
                k, n = shard or (1, None)
                groups.setdefault((name, step, grad_type, n), {}).setdefault(k, p)
    return groups


def _is_part(p: Path | None) -> bool:
    return p is None or p.name.endswith(".part")


def open_store(grads_dir: Path, name: str, step: int, grad_type: str) -> StoreReader:
    """Open the store of one data set, checkpoint and gradient type (unsharded, or a full set of shards)."""
    path = store_path(grads_dir, name, step, grad_type)
    if path.exists():
        return StoreReader([path])
    what = f"the gradient store for '{name}' at checkpoint {step} ({grad_type})"
    sets = {key[3]: by_k for key, by_k in _scan(grads_dir).items() if key[:3] == (name, step, grad_type)}
    if None in sets and len(sets) == 1:
        raise MissingArtifactError(f"{what} is incomplete ({part_path(path)}); "
                                   f"re-running `lessctl grads --ckpt {step}` resumes it")
    sets.pop(None, None)
    if not sets:
        raise MissingArtifactError(f"no gradient store for '{name}' at checkpoint {step} ({grad_type}): "
                                   f"expected {path}; run `lessctl grads --ckpt {step}` first")
    full = [n for n, by_k in sets.items() if not any(_is_part(by_k.get(k)) for k in range(1, n + 1))]
    if len(sets) > 1 and len(full) != 1:
        counts = ", ".join(f"of{n}" for n in sorted(sets))
        raise InputError(f"shards of {what} in {grads_dir} come in several counts ({counts}); remove the stale ones")
    n = full[0] if full else next(iter(sets))
    by_k = sets[n]
    for k in range(1, n + 1):
        run = f"`lessctl grads --ckpt {step} --shard {k}/{n}`"
        if k not in by_k:
            shard_file = store_path(grads_dir, name, step, grad_type, (k, n))
            raise MissingArtifactError(f"shard {k}/{n} of {what} is missing: {shard_file}; run {run} to make it")
        if _is_part(by_k[k]):
            raise MissingArtifactError(f"shard {k}/{n} of {what} is incomplete ({by_k[k]}); re-running {run} resumes it")
    return StoreReader([by_k[k] for k in range(1, n + 1)])


def list_stores(grads_dir: Path) -> list[dict]:
    """One dict per logical store in `grads_dir` (shards grouped; `.part` files count as incomplete).

    Keys: name, step, grad_type, dims, rows ("done/total"), rows_completed, total_rows, projector (kind),
    complete, num_shards, missing_shards (K of absent shards), paths.
    """
    out = []
    for (name, step, grad_type, n), by_k in sorted(_scan(grads_dir).items(), key=lambda kv: (*kv[0][:3], kv[0][3] or 0)):
        done, total, dims, kind, complete = 0, None, [], None, True
        for p in by_k.values():
            try:
                with _open_read(p) as f:
                    a, dims = _read_attrs(f), _dims_of(f)
            except OSError as e:
                log.warning("cannot read %s: %s", p, e)
                complete = False
                continue
            done += int(a.get("rows_completed") or 0)
            total, kind = a.get("total_rows", total), a.get(PROJECTOR_PREFIX + "kind", kind)
            complete &= not _is_part(p) and bool(a.get("complete")) and a.get("rows_completed") == a.get("n_rows")
        missing = [k for k in range(1, (n or 1) + 1) if k not in by_k]
        out.append(dict(name=name, step=step, grad_type=grad_type, dims=dims, rows=f"{done}/{total}",
                        rows_completed=done, total_rows=total, projector=kind, complete=complete and not missing,
                        num_shards=n or 1, missing_shards=missing, paths=[str(p) for _, p in sorted(by_k.items())]))
    return out


def verify_store(path_or_reader: Path | str | StoreReader) -> list[str]:
    """Problems found in one store file or in every file of a reader; an empty list means it is sound."""
    if isinstance(path_or_reader, StoreReader):
        problems = [q for p in path_or_reader.paths for q in verify_store(p)]
        if (np.diff(path_or_reader.index) <= 0).any():
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
    """Schema problems of one open file, then (check_values) the values of its first rows_completed rows."""
    a = _read_attrs(f)
    if missing := [k for k in ROOT_ATTRS if k not in a]:
        return [f"{path.name}: missing attributes {missing}"]
    n, done = a["n_rows"], a["rows_completed"]
    counts_ok = isinstance(n, int) and isinstance(done, int) and 0 <= done <= n
    problems = [msg for bad, msg in (
        (a["format_version"] != FORMAT_VERSION, f"format_version {a['format_version']!r}, expected {FORMAT_VERSION}"),
        (a["grad_type"] not in GRAD_TYPES, f"grad_type {a['grad_type']!r} is not one of {GRAD_TYPES}"),
        (not any(k.startswith(PROJECTOR_PREFIX) for k in a), "no projector_* attributes"),
        (require_complete and not a["complete"], "not marked complete"),
        (require_complete and done != n, f"rows_completed={done} but n_rows={n}"),
        (not counts_ok, "n_rows or rows_completed out of range"),
    ) if bad]
    idx, dims = f.get("index"), _dims_of(f)
    if not isinstance(idx, h5py.Dataset) or idx.dtype != np.int64 or idx.shape != (n,):
        problems.append(f"index must be int64 [{n}]")
    elif check_values:
        values = idx[:]
        problems += [msg for bad, msg in (
            ((values < 0).any(), "index has negative line numbers"),
            (len(np.unique(values)) != len(values), "index has duplicate line numbers"),
            ((np.diff(values) < 0).any(), "index is not increasing"),
        ) if bad]
    if not dims:
        problems.append("no dim<D> groups")
    for d in dims:
        feats, norms = f[f"dim{d}"].get("features"), f[f"dim{d}"].get("norms")
        if not isinstance(feats, h5py.Dataset) or feats.dtype != np.float16 or feats.shape != (n, d):
            problems.append(f"dim{d}/features must be float16 [{n}, {d}]")
        elif not isinstance(norms, h5py.Dataset) or norms.dtype != np.float32 or norms.shape != (n,):
            problems.append(f"dim{d}/norms must be float32 [{n}]")
        elif check_values and counts_ok:
            problems += [f"dim{d}: {p}" for p in _value_problems(feats, norms, done)]
    return [f"{path.name}: {p}" for p in problems]


def _value_problems(feats: h5py.Dataset, norms: h5py.Dataset, rows: int) -> list[str]:
    """Non-finite values, non-unit rows and bad zero rows among the first `rows` rows."""
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
    out = []
    for kind, parts in masks.items():
        mask = np.concatenate(parts)
        if mask.any():
            out.append(f"{int(mask.sum())} {kind} (first at row {int(np.argmax(mask))})")
    return out
