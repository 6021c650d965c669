"""LESS's influence scores (LESS.md section 5), streamed from the gradient stores in blocks.

score[i, j] = sum_c w_c <x_i^c, y_j^c> over checkpoints c (rows are unit vectors, so cosines), then
the mean over the target examples of each subtask, then the max over subtasks. Training rows are
read in blocks of CHUNK_ROWS by a read-ahead thread, so memory stays bounded whatever the pool's size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from lessctl.errors import ConfigError, InputError
from lessctl.grads.store.schema import UNIT_NORM_TOL
from lessctl.models import resolve_device

log = logging.getLogger(__name__)


CHUNK_ROWS = 16384  # rows per block streamed from a training store (256 MiB of float16 at D = 8192)
READ_AHEAD = 3  # host buffers of CHUNK_ROWS rows: one being read while two wait or are copied to the device


# ----------------------------------------------------------------------------- the math


def subtask_matrix(subtasks: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(names in first-seen order, A [M, S]) with A[j, s] = 1/|s| when target row j belongs to subtask s."""
    names: list[str] = []
    for s in subtasks:
        if s not in names:
            names.append(s)
    A = np.zeros((len(subtasks), len(names)), dtype=np.float32)
    for j, s in enumerate(subtasks):
        A[j, names.index(s)] = 1.0
    A /= A.sum(axis=0, keepdims=True)
    return names, A


def aggregate(scores, A):
    """[n, M] example-by-target scores -> [n] scores: mean within each subtask, max over subtasks."""
    return (scores @ A).max(axis=1)


def normalize_weights(weights: Sequence[float], source: str = "--weights", hint: str = "") -> np.ndarray:
    """The checkpoint weights scaled to sum to 1; `source` (the option, or the file they were read from) and
    `hint` go into the error when they are not finite, non-negative and not all zero."""
    w = np.asarray(weights, dtype=np.float64)
    if not np.isfinite(w).all():
        raise ConfigError(f"{source}: checkpoint weights must be finite numbers, got {list(weights)}{hint}")
    if (w < 0).any() or w.sum() <= 0:
        raise ConfigError(
            f"{source}: checkpoint weights must be non-negative and not all zero, got {list(weights)}{hint}"
        )
    return w / w.sum()


@dataclass
class Scored:
    """Scores of every pool row: parallel arrays over the pooled training sets."""

    names: list[str]  # training-set name of each row
    index: np.ndarray  # [N] line in its file
    scores: np.ndarray  # [N] float64; NaN: the row has no score (an example without label tokens)


def less_scores(
    train_readers: dict[str, list[Any]],
    target_readers: list[Any],
    weights: np.ndarray,
    subtasks: Sequence[str],
    dim: int,
    progress: Callable[[int, int], None] | None = None,
    device: str | None = None,
) -> Scored:
    """LESS scores of every training row; readers are per checkpoint, in the order of `weights`.

    The training stores are streamed in blocks of CHUNK_ROWS rows. A background thread reads the blocks
    ahead (`_BlockReader`) while the current one is scored, so reading the disk and computing overlap. On
    a GPU the float16 rows are read into page-locked buffers, copied to the device as stored (half the
    bytes of float32) without blocking, and widened to float32 there; the scores stay on the device until
    every block is done. The arithmetic (float32 products, summed over checkpoints in order) is the same
    on every device and for any read-ahead.
    """
    import torch

    dev = torch.device(resolve_device(device))
    cuda = dev.type == "cuda"
    _, A = subtask_matrix(subtasks)
    At = torch.from_numpy(A).to(dev)
    # target features are small: [C, M, D] float32
    Y = [torch.from_numpy(r.read(dim).astype(np.float32)).to(dev) for r in target_readers]
    w = [float(x) for x in weights]
    names, index, scores = [], [], []
    flags = []  # (readers, c, start, b, device bool): blocks holding a row neither unit-norm nor zero
    total = sum(rs[0].n_rows for rs in train_readers.values())
    done = 0
    for name, readers in train_readers.items():
        n = readers[0].n_rows
        out = torch.empty(n, dtype=torch.float32, device=dev)
        acc = None
        with _BlockReader(readers, dim, CHUNK_ROWS, pin=cuda) as blocks:
            for start, c, buf, x in blocks:  # x: [b, D] float16 on the host, rows start..start+b of checkpoint c
                ready = None
                if cuda:
                    x = x.to(dev, non_blocking=True)
                    ready = torch.cuda.Event()
                    ready.record()  # buf may be read into again once the copy out of it is done
                xf = x.float()
                part = w[c] * (xf @ Y[c].T)  # [b, M]
                length = xf.norm(dim=1)  # [b]; checked on the device, read back once at the end
                unit = length.isfinite() & ((length == 0) | ((length - 1).abs() < UNIT_NORM_TOL))
                flags.append((readers, c, start, len(xf), ~unit.all()))
                blocks.release(buf, ready)
                acc = part if c == 0 else acc + part
                if c == len(readers) - 1:
                    out[start : start + len(acc)] = (acc @ At).max(dim=1).values
                    done += len(acc)
                    if progress:
                        progress(done, total)
        names += [name] * n
        index.append(readers[0].index)
        s = out.double().cpu().numpy()
        s[unscored_rows(readers, dim)] = np.nan
        scores.append(s)
    if flags and (bad := torch.stack([f[4] for f in flags]).cpu().numpy()).any():
        readers, c, start, b, _ = flags[int(np.argmax(bad))]
        _raise_bad_block(readers[c], dim, start, b)
    return Scored(names, np.concatenate(index), np.concatenate(scores))


def unscored_rows(readers: list[Any], dim: int) -> np.ndarray:
    """[N] bool: rows whose feature is zero at some checkpoint (examples without label tokens, `grads.engine`).
    They have no gradient and so no influence: LESS's division by their zero norm made them NaN, which its
    descending sort put first; here they score NaN too, and selections never take them."""
    empty = np.zeros(readers[0].n_rows, dtype=bool)
    for r in readers:
        empty |= r.norms(dim) == 0
    return empty


class _BlockReader:
    """Reads rows of several stores of equal length in a background thread, ahead of their use.

    Iterating yields (start, c, buf, x) for every block of `rows` rows and, within a block, every store c in
    turn: x ([b, D] float16 tensor, a view of the host buffer buf) holds rows start..start+b of store c. Up
    to `depth` pieces are read ahead, into a ring of `depth` buffers (page-locked when `pin`, so that copies
    to a GPU are asynchronous). The caller hands each buffer back with release(buf, ready): it is read into
    again once `ready` (a CUDA event, or None) has completed. h5py releases the GIL while it reads.
    """

    def __init__(self, readers: list[Any], dim: int, rows: int, *, pin: bool = False, depth: int = READ_AHEAD):
        import queue
        import threading

        import torch

        self._readers, self._dim, self._n = readers, dim, readers[0].n_rows
        self._jobs = [(s, c) for s in range(0, self._n, rows) for c in range(len(readers))]
        self._free: queue.Queue = queue.Queue()
        self._full: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        for _ in range(min(depth, len(self._jobs))):
            buf = torch.empty((min(rows, self._n), dim), dtype=torch.float16, pin_memory=pin)
            self._free.put((buf, None))
        self._thread = threading.Thread(target=self._work, name="lessctl-store-reader", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            for start, c in self._jobs:
                item = self._free.get()
                if item is None or self._stop.is_set():
                    return
                buf, ready = item
                if ready is not None:
                    ready.synchronize()
                x = buf[: min(len(buf), self._n - start)]
                self._readers[c].read_into(self._dim, start, x.numpy())
                self._full.put((start, c, buf, x))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            self._full.put(e)

    def __iter__(self):
        for _ in self._jobs:
            item = self._full.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    def release(self, buf: Any, ready: Any = None) -> None:
        self._free.put((buf, ready))

    def close(self) -> None:
        self._stop.set()
        self._free.put(None)
        self._thread.join()

    def __enter__(self) -> _BlockReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _raise_bad_block(reader: Any, dim: int, start: int, b: int) -> None:
    from lessctl.grads.store.schema import bad_rows

    x = np.empty((b, dim), dtype=np.float16)
    reader.read_into(dim, start, x)
    rows = bad_rows(x) + start
    _raise_bad_rows(reader, rows if len(rows) else np.array([start, start + b - 1]))


def _raise_bad_rows(reader: Any, rows: np.ndarray) -> None:
    (path, first), (_, last) = reader.locate(int(rows[0])), reader.locate(int(rows[-1]))
    raise InputError(
        f"gradient store {path}: {len(rows)} rows are not unit vectors (NaN, inf or damaged values), rows "
        f"{first}-{last}; `lessctl store verify` checks every store, `lessctl grads --force` recomputes it"
    )


def check_rows(readers: list[Any], dim: int) -> None:
    """An InputError naming the file and rows when a (small, target) store holds rows neither unit nor zero."""
    from lessctl.grads.store.schema import bad_rows

    for r in readers:
        rows = bad_rows(r.read(dim))
        if len(rows):
            _raise_bad_rows(r, rows)


def check_compatible(readers: list[Any], dim: int) -> None:
    """Refuses stores of different projections, dimensions or base models."""
    from lessctl.grads.projection.base import same_projection

    first = readers[0]
    for r in readers:
        if dim not in r.dims:
            dims = " ".join(map(str, sorted({*r.dims, dim})))
            raise InputError(
                f"{r.paths[0]} has no dimension {dim} (it has {', '.join(map(str, r.dims))}); match with --dim "
                f"{r.dims[-1]}, or add it with `lessctl grads --dims {dims} --force` (recomputes the stores)"
            )
        diff = same_projection(first.projector, r.projector)
        if diff:
            raise InputError(
                f"{first.paths[0].name} and {r.paths[0].name} were projected differently ({diff[0]}); "
                "recompute one of them with the same --projector (and --force)"
            )
        if r.attrs.get("base_model") != first.attrs.get("base_model"):
            raise InputError(f"{first.paths[0].name} and {r.paths[0].name} come from different base models")
