"""What HDF5's Fletcher-32 checksums cost a gradient store: write (StoreWriter) and read (StoreReader.read_into)
of one N x D float16 store, checksummed chunks (stores now) against a contiguous copy (stores before), from the
page cache; plus the raw h5py read of chunked data with and without the checksum, to separate the two.

    python bench/store_checksum.py [--rows 4096] [--dim 8192] [--dir /tmp/store-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lessctl.grads.store.reader import StoreReader  # noqa: E402
from lessctl.grads.store.writer import StoreWriter  # noqa: E402

ATTRS = dict(
    base_model="m", checkpoint="c", step=1, grad_type="adam", source="s", source_sha256="ab", projector={"kind": "x"}
)


def best_of(n: int, f) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/store-bench"))
    args = ap.parse_args()
    n, d, folder = args.rows, args.dim, args.dir
    folder.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(0).standard_normal((256, d)).astype(np.float32)
    path = folder / "bench-ckpt1-adam.h5"

    def write() -> None:
        for q in (path, path.with_name(path.name + ".part")):
            q.unlink(missing_ok=True)
        with StoreWriter(path, dims=[d], index=np.arange(n), attrs=ATTRS) as w:
            for a in range(0, n, 256):
                w.write({d: x[: min(256, n - a)]})

    t_write = best_of(2, write)
    old = folder / "old-ckpt1-adam.h5"
    with h5py.File(path) as src, h5py.File(old, "w") as dst:
        for k, v in src.attrs.items():
            dst.attrs[k] = v
        dst["index"] = src["index"][:]
        dst.create_dataset(f"dim{d}/features", data=src[f"dim{d}/features"][:])
        dst[f"dim{d}/norms"] = src[f"dim{d}/norms"][:]
    buf = np.empty((n, d), dtype=np.float16)
    reads = {}
    for kind, p in (("checksummed", path), ("contiguous", old)):
        with StoreReader([p]) as r:
            reads[kind] = best_of(3, lambda r=r: r.read_into(d, 0, buf))
    plain = folder / "plain.h5"
    with h5py.File(path) as src, h5py.File(plain, "w") as dst:
        ds = src[f"dim{d}/features"]
        dst.create_dataset("a", data=ds[:], chunks=ds.chunks)
    with h5py.File(plain) as f:
        reads["chunked, no checksum"] = best_of(3, lambda: f["a"].read_direct(buf))
    mib = n * d * 2 / 2**20
    report = {
        "rows": n,
        "dim": d,
        "MiB": round(mib, 1),
        "write_MiB_s": round(mib / t_write, 1),
        "read_MiB_s": {k: round(mib / v, 1) for k, v in reads.items()},
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
