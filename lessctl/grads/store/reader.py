"""Reading stores: one file or a complete set of shards as one, listing a folder, verifying."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from lessctl.errors import InputError, MissingArtifactError
from lessctl.grads.store.schema import (
    _SHARD_KEYS,
    PROJECTOR_PREFIX,
    _dims_of,
    _file_problems,
    _open_read,
    _read_attrs,
    incomplete_message,
    parse_store_name,
    part_path,
    store_path,
)

log = logging.getLogger(__name__)


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
                raise MissingArtifactError(incomplete_message(p))
            if broken := _file_problems(f, p, require_complete=True, check_values=False):
                raise InputError(f"gradient store {p} is malformed: {broken[0]}")
            keys = [*_SHARD_KEYS, *sorted(x for x in a.keys() | first.keys() if x.startswith(PROJECTOR_PREFIX))]
            for key, old, new in [*((x, first.get(x), a.get(x)) for x in keys), ("dims", self.dims, _dims_of(f))]:
                if old != new:
                    raise InputError(
                        f"shards disagree on {key}: {p0.name} has {old!r}, {p.name} has {new!r}; "
                        "recompute the odd one with --force"
                    )
            if (a.get("shard"), a.get("num_shards"), a.get("row_start")) != (k, len(self.paths), row):
                raise InputError(
                    f"{p.name} is shard {a.get('shard')}/{a.get('num_shards')} from row {a.get('row_start')}, "
                    f"expected shard {k}/{len(self.paths)} from row {row}"
                )
            row += a["n_rows"]
        if row != first.get("total_rows"):
            raise InputError(f"the shards of {p0.name} hold {row} rows, not total_rows={first.get('total_rows')}")

    def _datasets(self, dim: int, name: str) -> list[h5py.Dataset]:
        if dim not in self.dims:
            raise InputError(f"gradient store {self.paths[0]} has no dimension {dim} (it has {self.dims})")
        return [f[f"dim{dim}/{name}"] for f in self._files]

    def read(self, dim: int) -> np.ndarray:
        """All normalized rows of one dimension: [N, D] float16."""
        return np.concatenate([_read(ds, np.s_[:]) for ds in self._datasets(dim, "features")])

    def norms(self, dim: int) -> np.ndarray:
        """The norms before normalization: [N] float32."""
        return np.concatenate([_read(ds, np.s_[:]) for ds in self._datasets(dim, "norms")])

    def iter_chunks(self, dim: int, rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (global start row, [b, D] float16) with b <= rows, in row order across shards."""
        for ds, offset in zip(self._datasets(dim, "features"), self._starts):
            for a in range(0, ds.shape[0], rows):
                yield offset + a, _read(ds, np.s_[a : a + rows])

    def locate(self, row: int) -> tuple[Path, int]:
        """(file, row in that file) of a global row."""
        k = max(i for i, s in enumerate(self._starts) if s <= row)
        return self.paths[k], row - self._starts[k]

    def read_into(self, dim: int, start: int, out: np.ndarray) -> None:
        """Fill `out` ([b, D] float16, C-contiguous, e.g. a pinned buffer) with rows start..start+b, across shards.

        No allocation and no copy besides the file read itself: each shard's part is one HDF5 read into `out`.
        """
        stop = start + len(out)
        shape_ok = out.dtype == np.float16 and out.shape[1:] == (dim,) and out.flags.c_contiguous
        if not shape_ok or not 0 <= start <= stop <= self.n_rows:
            raise ValueError(
                f"read_into needs a C-contiguous float16 [b, {dim}] array for rows in [0, {self.n_rows}], "
                f"got {out.dtype} {out.shape} from row {start}"
            )
        for ds, offset in zip(self._datasets(dim, "features"), self._starts):
            a, b = max(start, offset), min(stop, offset + ds.shape[0])
            if a < b:
                try:
                    ds.read_direct(out, np.s_[a - offset : b - offset], np.s_[a - start : b - start])
                except OSError as e:
                    raise _damaged(ds, a - offset, b - offset, e) from e

    def close(self) -> None:
        """Close the underlying files."""
        for f in self._files:
            f.close()
        self._files = []

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _damaged(ds: h5py.Dataset, a: int, b: int, e: OSError) -> InputError:
    return InputError(
        f"gradient store {ds.file.filename} is damaged: {ds.name} rows {a}-{b - 1} cannot be read "
        f"({str(e).splitlines()[0]}); `lessctl store verify` lists the damage, `lessctl grads --force` recomputes it"
    )


def _read(ds: h5py.Dataset, sel) -> np.ndarray:
    try:
        return ds[sel]
    except OSError as e:
        a, b, _ = sel[0].indices(ds.shape[0]) if isinstance(sel, tuple) else sel.indices(ds.shape[0])
        raise _damaged(ds, a, b, e) from e


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
        raise MissingArtifactError(incomplete_message(part_path(path)))
    sets.pop(None, None)
    if not sets:
        raise MissingArtifactError(
            f"no gradient store for '{name}' at checkpoint {step} ({grad_type}): "
            f"expected {path}; run `lessctl grads --ckpt {step}` first"
        )
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
            raise MissingArtifactError(f"shard {k}/{n}: {incomplete_message(by_k[k])}")
    return StoreReader([by_k[k] for k in range(1, n + 1)])


def list_stores(grads_dir: Path) -> list[dict]:
    """One dict per logical store in `grads_dir` (shards grouped; `.part` files count as incomplete).

    Keys: name, step, grad_type, dims, rows ("done/total"), rows_completed, total_rows, projector (kind),
    complete, num_shards, missing_shards (K of absent shards), paths.
    """
    out = []
    for (name, step, grad_type, n), by_k in sorted(
        _scan(grads_dir).items(), key=lambda kv: (*kv[0][:3], kv[0][3] or 0)
    ):
        done, total, dims, kind, complete = 0, None, [], None, True
        a: dict = {}
        for p in by_k.values():
            try:
                with _open_read(p) as f:
                    a, dims = _read_attrs(f), _dims_of(f)
                    sound = not _file_problems(f, p, require_complete=False, check_values=False)
            except OSError as e:
                log.warning("cannot read %s: %s", p, e)
                complete = False
                continue
            done += int(a.get("rows_completed") or 0)
            total, kind = a.get("total_rows", total), a.get(PROJECTOR_PREFIX + "kind", kind)
            complete &= sound and not _is_part(p) and bool(a.get("complete"))
            complete &= a.get("rows_completed") == a.get("n_rows")
        missing = [k for k in range(1, (n or 1) + 1) if k not in by_k]
        out.append(
            dict(
                name=name,
                step=step,
                grad_type=grad_type,
                dims=dims,
                rows=f"{done}/{total}",
                rows_completed=done,
                total_rows=total,
                projector=kind,
                complete=complete and not missing,
                num_shards=n or 1,
                missing_shards=missing,
                paths=[str(p) for _, p in sorted(by_k.items())],
                attrs=a,
            )
        )
    return out


def verify_store(path_or_reader: Path | str | StoreReader, progress=None) -> list[str]:
    """Problems found in one store file or in every file of a reader; an empty list means it is sound.

    progress: called with a number of rows each time that many more rows of one dim have been checked."""
    if isinstance(path_or_reader, StoreReader):
        problems = [q for p in path_or_reader.paths for q in verify_store(p, progress)]
        if (np.diff(path_or_reader.index) <= 0).any():
            problems.append(f"{path_or_reader.paths[0].name}: index is not strictly increasing across shards")
        return problems
    path = Path(path_or_reader)
    try:
        f = _open_read(path)
    except OSError as e:
        return [f"{path.name}: cannot be read as HDF5 ({e})"]
    with f:
        return _file_problems(f, path, require_complete=True, check_values=True, progress=progress)
