"""Writing a store crash-safely into `<file>.part`, resuming it, and renaming it when complete."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from lessctl import __version__
from lessctl.errors import AlreadyExistsError, InputError, LessctlError
from lessctl.grads.store.schema import (
    _RESUME_KEYS,
    CALLER_ATTRS,
    FEATURE_TYPES,
    FORMAT_VERSION,
    NUMERIC_KEYS,
    PROJECTOR_PREFIX,
    _dims_of,
    _file_problems,
    _py,
    _read_attrs,
    in_use_message,
    part_in_use,
    part_path,
    resume_command,
)

log = logging.getLogger(__name__)


class StoreWriter:
    """Appends rows to `<path>.part`, resuming one left by an interrupted run, and renames it when complete.

    An existing complete store is replaced (force, or replace: its source changed) only when the new one is
    complete: until then readers keep seeing the old file. A `.part` that another process holds open (HDF5's
    file lock) is never resumed nor discarded, with or without force.
    """

    def __init__(
        self,
        path: Path,
        *,
        dims: list[int],
        index: np.ndarray,
        attrs: dict,
        force: bool = False,
        replace: bool = False,
    ):
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
        if self.path.exists() and not (force or replace):
            raise AlreadyExistsError(f"gradient store {self.path} already exists; pass --force to recompute it")
        if self.part.exists() and force:
            if part_in_use(self.part):
                raise LessctlError(in_use_message(self.part))
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
        if out["grad_type"] not in FEATURE_TYPES:
            raise ValueError(f"grad_type must be one of {FEATURE_TYPES}, not {out['grad_type']!r}")
        if not 1 <= out["shard"] <= out["num_shards"] or out["row_start"] + self.n_rows > out["total_rows"]:
            raise ValueError(f"inconsistent shard attributes: {out}")
        return out

    def _create(self) -> h5py.File:
        self.part.parent.mkdir(parents=True, exist_ok=True)
        need = sum(self.n_rows * (2 * d + 4) for d in self.dims) + 8 * self.n_rows + (1 << 20)
        free = shutil.disk_usage(self.part.parent).free
        if free < need:
            raise LessctlError(
                f"{self.part.parent}: {free / 2**20:.1f} MiB free, the store {self.path.name} needs "
                f"{need / 2**20:.1f} MiB; free some space and re-run"
            )
        try:  # "x": never truncate a .part another process has just created
            f = h5py.File(self.part, "x", locking="best-effort")
        except (FileExistsError, BlockingIOError) as e:
            raise LessctlError(in_use_message(self.part)) from e
        for key, value in self.attrs.items():
            f.attrs[key] = h5py.Empty("f8") if value is None else value
        f.attrs["dims"] = np.asarray(self.dims, dtype=np.int64)
        f.create_dataset("index", data=self.index, **_checksummed(self.n_rows, ()))
        for d in self.dims:
            rows = (1 << 20) // (2 * d)  # chunks of about 1 MiB
            f.create_dataset(
                f"dim{d}/features", shape=(self.n_rows, d), dtype=np.float16, **_checksummed(self.n_rows, (d,), rows)
            )
            f.create_dataset(f"dim{d}/norms", shape=(self.n_rows,), dtype=np.float32, **_checksummed(self.n_rows, ()))
        f.flush()
        log.info("writing %s (%d rows, dims %s)", self.part, self.n_rows, self.dims)
        return f

    def _resume(self) -> h5py.File | None:
        try:
            f = h5py.File(self.part, "r+", locking="best-effort")
        except BlockingIOError as e:
            raise LessctlError(in_use_message(self.part)) from e
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
                raise InputError(
                    f"the source file {self.attrs['source']} changed since the partial store "
                    f"{self.part} was started (its sha256 differs); pass --force to start over"
                )
            proj = sorted(k for k in old.keys() | self.attrs.keys() if k.startswith(PROJECTOR_PREFIX))
            checks = [(k, old.get(k), self.attrs.get(k)) for k in (*_RESUME_KEYS, *proj)]
            # settings that change the numbers; a .part from before they were recorded lacks them
            checks += [(k, old[k], self.attrs.get(k)) for k in NUMERIC_KEYS if k in old]
            checks.append(("dims", _dims_of(f), self.dims))
            if not np.array_equal(f["index"][:], self.index):
                checks.append(("index", "other rows", "these rows"))
            for key, was, now in checks:
                if was != now:
                    raise InputError(
                        f"the partial store {self.part} was started with {key}={was!r}, not {now!r}; "
                        f"`{resume_command(self.part)}` resumes it, --force starts over"
                    )
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
        rows = {}
        for d, x in blocks.items():
            norms = np.linalg.norm(x, axis=1).astype(np.float32)  # [b]
            if not np.isfinite(norms).all():
                row = self.attrs["row_start"] + start + int(np.argmin(np.isfinite(norms)))
                raise LessctlError(f"non-finite gradient features (NaN or inf) at row {row} for {self.path.name}")
            rows[d] = ((x / np.where(norms > 0, norms, 1)[:, None]).astype(np.float16), norms)
        try:
            for d, (unit, norms) in rows.items():
                self._file[f"dim{d}/features"][start:stop] = unit
                self._file[f"dim{d}/norms"][start:stop] = norms
            self._file.flush()  # the rows reach the file before the counter that vouches for them
            self._file.attrs.modify("rows_completed", np.int64(stop))
            self._file.flush()
        except OSError as e:  # a full disk, a quota: the counter still vouches only for rows written before
            raise LessctlError(
                f"cannot write {self.part} ({str(e).splitlines()[0]}); its first {start} rows are kept: free "
                "some space and re-run the same command to resume"
            ) from e
        self.rows_completed = stop

    def finalize(self) -> Path:
        """Mark the store complete and move `<path>.part` to `path`; returns `path`."""
        if self._finalized:
            return self.path
        if self._file is None or self.rows_completed != self.n_rows:
            raise ValueError(
                f"{self.path}: cannot finalize a closed writer or with {self.rows_completed} "
                f"of {self.n_rows} rows written"
            )
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


def _checksummed(n: int, row_shape: tuple, rows: int = 1 << 16) -> dict:
    """create_dataset options: chunks of `rows` rows, each with HDF5's Fletcher-32 checksum, all allocated
    at creation (later writes rewrite chunks in place and touch no HDF5 metadata). Empty datasets stay
    contiguous (HDF5 cannot chunk them)."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    if n == 0:
        return {"dcpl": dcpl}
    per_chunk = -(-n // -(-n // max(1, rows)))  # equal chunks: the last one wastes less than one row per chunk
    return {"dcpl": dcpl, "chunks": (per_chunk, *row_shape), "fletcher32": True}


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
