#!/usr/bin/env python
"""Does `lessctl match` stream the gradient stores at close to the disk's read speed?

One run writes synthetic gradient stores with lessctl's StoreWriter (C checkpoints of a training set of
--rows x --dim float16 unit rows, and a small target store per checkpoint) into --dir, then times, with the
training stores evicted from the page cache before each cold pass:

  plain-cold / plain-warm   every byte of the training-store files read sequentially in --read-mib buffers
  plain-parallel-cold       the same, the C files read at once by C threads
  h5py-cold                 StoreReader.iter_chunks over the C stores in step (the order less_scores reads in)
  read-only-cold            lessctl's block reader (selection._BlockReader), with the copy to the GPU, no math
  lessctl-cold / -warm      selection.less_scores over the C checkpoints on --device (default: the GPU if any)
  legacy-cold               the less_scores loop lessctl had before the block reader, for comparison

and checks the scores against a direct float64 numpy computation and the legacy loop's. See bench/README.md.

    python bench/match_throughput.py --rows 20000 --dim 1024 --ckpts 4
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import hashlib
import json
import mmap
import os
import platform
import shlex
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lessctl.grads.store.reader import StoreReader
from lessctl.grads.store.schema import store_complete, store_path
from lessctl.grads.store.writer import StoreWriter
from lessctl.select import scores as selection

TRAIN, TARGET = "pool", "target"
GB = 1e9


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where the stores are written (kept, and reused by a later run with the same settings); "
        "default: a temporary folder, removed at the end",
    )
    p.add_argument("--rows", type=int, default=100_000, help="training rows per store")
    p.add_argument("--dim", type=int, default=8192, help="feature dimension D")
    p.add_argument("--ckpts", type=int, default=4, help="checkpoints C (one training and one target store each)")
    p.add_argument("--subtasks", type=int, default=3)
    p.add_argument("--per-subtask", type=int, default=5, help="target rows per subtask")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-rows", type=int, default=8192, help="rows per StoreWriter.write call")
    p.add_argument("--read-mib", type=int, default=64, help="buffer of the plain read, MiB")
    p.add_argument(
        "--chunk-rows",
        type=int,
        default=None,
        help=f"selection.CHUNK_ROWS for this run (lessctl's: {selection.CHUNK_ROWS})",
    )
    p.add_argument("--device", default=None, help="device for the scores (default: selection._device())")
    p.add_argument("--repeats", type=int, default=1, help="passes of each kind; the fastest is reported")
    p.add_argument("--check-rows", type=int, default=16, help="rows whose scores are checked against float64 numpy")
    p.add_argument("--no-legacy", action="store_true", help="skip the pre-change loop")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (with no --dir)")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the stores


def _steps(ckpts: int) -> list[int]:
    return [100 * (c + 1) for c in range(ckpts)]


def _subtasks(args) -> list[str]:
    return [f"s{s}" for s in range(args.subtasks) for _ in range(args.per_subtask)]


def _attrs(args, step: int, grad_type: str, name: str) -> dict:
    tag = (
        f"match_throughput seed={args.seed} rows={args.rows} dim={args.dim} targets={args.subtasks}x{args.per_subtask}"
    )
    return {
        "base_model": "synthetic",
        "checkpoint": f"synthetic/checkpoint-{step}",
        "step": step,
        "grad_type": grad_type,
        "source": f"synthetic:{name}",
        "source_sha256": hashlib.sha256(f"{tag} {name}".encode()).hexdigest(),
        "role": "train" if name == TRAIN else "target",
        "dataset": name,
        "projector": {"kind": "synthetic", "seed": args.seed, "dim": args.dim},
    }


def write_stores(args, d: Path) -> dict:
    """The C training (adam) and target (sgd) stores, as `lessctl grads` writes them; reused when complete and alike."""
    t0 = time.perf_counter()
    written = reused = 0
    n_target = args.subtasks * args.per_subtask
    for c, step in enumerate(_steps(args.ckpts)):
        for name, grad_type, n in ((TRAIN, "adam", args.rows), (TARGET, "sgd", n_target)):
            path = store_path(d, name, step, grad_type)
            attrs = _attrs(args, step, grad_type, name)
            if store_complete(path):
                with StoreReader([path]) as r:
                    if (
                        r.n_rows == n
                        and r.dims == [args.dim]
                        and r.attrs.get("source_sha256") == attrs["source_sha256"]
                    ):
                        reused += 1
                        continue
            rng = np.random.default_rng([args.seed, c, grad_type == "sgd"])
            with StoreWriter(path, dims=[args.dim], index=np.arange(n, dtype=np.int64), attrs=attrs, force=True) as w:
                for a in range(0, n, args.write_rows):
                    b = min(n, a + args.write_rows)
                    w.write({args.dim: rng.standard_normal((b - a, args.dim), dtype=np.float32)})
            written += 1
    return {"written": written, "reused": reused, "seconds": round(time.perf_counter() - t0, 2)}


# ----------------------------------------------------------------------------- the page cache


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache (fsync first: dirty pages are not dropped)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(paths: list[Path]) -> float | None:
    """Share of the files' pages in the page cache (mincore), or None where it cannot be asked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        page = mmap.PAGESIZE
        have = total = 0
        for p in paths:
            size = os.path.getsize(p)
            if size == 0:
                continue
            pages = (size + page - 1) // page
            fd = os.open(p, os.O_RDONLY)
            try:
                addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
                if addr in (None, ctypes.c_void_p(-1).value):
                    return None
                try:
                    vec = (ctypes.c_ubyte * pages)()
                    if libc.mincore(addr, size, vec) != 0:
                        return None
                    have += sum(v & 1 for v in bytes(vec))
                finally:
                    libc.munmap(addr, size)
            finally:
                os.close(fd)
            total += pages
        return have / total if total else None
    except (OSError, AttributeError):
        return None


# ----------------------------------------------------------------------------- the passes


def plain_read(paths: list[Path], buf: bytearray) -> int:
    """Read every byte of each file in turn, into one reused buffer; returns the bytes read."""
    view = memoryview(buf)
    n = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while k := f.readinto(view):
                n += k
    return n


def plain_read_parallel(paths: list[Path], bufs: list[bytearray]) -> int:
    """The files read at once, one thread (and buffer) each."""
    counts = [0] * len(paths)

    def one(i: int) -> None:
        counts[i] = plain_read([paths[i]], bufs[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts)


def h5py_read(readers: list[StoreReader], dim: int, rows: int) -> int:
    """StoreReader.iter_chunks over the stores in step, as less_scores read them; returns the bytes read."""
    n = 0
    for chunks in zip(*(r.iter_chunks(dim, rows) for r in readers)):
        n += sum(x.nbytes for _, x in chunks)
    return n


def read_only(readers: list[StoreReader], dim: int, device: str) -> int:
    """lessctl's block reader with the copy to the device and no arithmetic; returns the bytes read."""
    import torch

    cuda = torch.device(device).type == "cuda"
    n = 0
    with selection._BlockReader(readers, dim, selection.CHUNK_ROWS, pin=cuda) as blocks:
        for _, _, buf, x in blocks:
            ready = None
            if cuda:
                x = x.to(device, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record()
            blocks.release(buf, ready)
            n += x.numel() * x.element_size()
    if cuda:
        torch.cuda.synchronize()
    return n


def legacy_less_scores(train_readers, target_readers, weights, subtasks, dim, device) -> np.ndarray:
    """lessctl's less_scores before the block reader (the same arithmetic): iter_chunks re-cut by
    _fixed_chunks (a copy), float32 made on the CPU, a blocking copy to the device, one result copy per block."""
    import torch

    _, A = selection.subtask_matrix(subtasks)
    At = torch.from_numpy(A).to(device)
    Y = [torch.from_numpy(r.read(dim).astype(np.float32)).to(device) for r in target_readers]
    scores = []
    for readers in train_readers.values():
        out = np.empty(readers[0].n_rows, dtype=np.float64)
        for chunks in zip(*(_fixed_chunks(r, dim, selection.CHUNK_ROWS) for r in readers)):
            start = chunks[0][0]
            acc = None
            for w, (_, x), y in zip(weights, chunks, Y):
                part = float(w) * (torch.from_numpy(x.astype(np.float32)).to(device) @ y.T)
                acc = part if acc is None else acc + part
            agg = (acc @ At).max(dim=1).values
            out[start : start + len(agg)] = agg.double().cpu().numpy()
        scores.append(out)
    return np.concatenate(scores)


def _fixed_chunks(reader, dim: int, size: int):
    buf: list[np.ndarray] = []
    have = start = 0
    for _, x in reader.iter_chunks(dim, size):
        buf.append(x)
        have += len(x)
        while have >= size:
            cat = np.concatenate(buf)
            yield start, cat[:size]
            start += size
            rest = cat[size:]
            buf, have = ([rest] if len(rest) else []), len(rest)
    if have:
        yield start, np.concatenate(buf)


def numpy_scores(train_paths: list[Path], target_paths: list[Path], weights, subtasks, dim: int, rows) -> np.ndarray:
    """The LESS scores of some rows in float64, straight from the files."""
    import h5py

    s = 0.0
    for w, tp, yp in zip(weights, train_paths, target_paths):
        with h5py.File(tp, "r") as ft, h5py.File(yp, "r") as fy:
            x = ft[f"dim{dim}/features"][rows].astype(np.float64)  # rows increasing, as h5py needs  [k, D]
            s = s + w * (x @ fy[f"dim{dim}/features"][:].astype(np.float64).T)  # [k, M]
    _, A = selection.subtask_matrix(subtasks)
    return selection.aggregate(s, A.astype(np.float64))


# ----------------------------------------------------------------------------- the run


def _filesystem(d: Path) -> str | None:
    """'type (device)' of the mount that holds `d`."""
    try:
        best, target = None, str(Path(d).resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and (
                best is None or len(mnt) > len(best[0])
            ):
                best = (mnt, f"{fstype} ({dev} on {mnt})")
        return best[1] if best else None
    except (OSError, ValueError):
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _timed(fn: Callable[[], Any], paths: list[Path], cold: bool, sync: Callable[[], None]) -> dict:
    if cold:
        evict(paths)
    resident = resident_fraction(paths)
    sync()
    t0 = time.perf_counter()
    value = fn()
    sync()
    return {"seconds": time.perf_counter() - t0, "resident_before": resident, "value": value}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    device = args.device or selection._device()
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    chunk_rows_before = selection.CHUNK_ROWS
    if args.chunk_rows:
        selection.CHUNK_ROWS = args.chunk_rows
    tmp = args.dir is None
    d = Path(tempfile.mkdtemp(prefix="lessctl-match-bench-")) if tmp else args.dir
    d.mkdir(parents=True, exist_ok=True)
    steps = _steps(args.ckpts)
    subtasks = _subtasks(args)
    weights = selection.normalize_weights(np.linspace(1.0, 0.5, args.ckpts))
    report: dict[str, Any] = {
        "command": " ".join(
            shlex.quote(a) for a in ["bench/match_throughput.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "chunk_rows": selection.CHUNK_ROWS,
        "read_ahead": selection.READ_AHEAD,
        "weights": [float(x) for x in weights],
        "device": {
            "type": torch.device(device).type,
            "name": torch.cuda.get_device_name(0) if cuda else _cpu_name(),
            "cpus": os.cpu_count(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "h5py": __import__("h5py").__version__,
        },
    }
    try:
        log(f"stores: {args.ckpts} x {args.rows} x {args.dim} float16 in {d}")
        report["stores"] = write_stores(args, d)
        train_paths = [store_path(d, TRAIN, s, "adam") for s in steps]
        target_paths = [store_path(d, TARGET, s, "sgd") for s in steps]
        feature_bytes = args.ckpts * args.rows * args.dim * 2
        file_bytes = sum(p.stat().st_size for p in train_paths)
        report["data"] = {
            "dir": str(d),
            "filesystem": _filesystem(d),
            "feature_bytes": feature_bytes,
            "file_bytes": file_bytes,
            "feature_gb": feature_bytes / GB,
            "target_rows": len(subtasks),
        }
        log(f"stores {report['stores']}; {feature_bytes / GB:.2f} GB of training features")
        if cuda:  # CUDA context and cuBLAS set up before any timing
            torch.ones(8, 8, device=device) @ torch.ones(8, 8, device=device)
            sync()

        train = [StoreReader([p]) for p in train_paths]
        targets = [StoreReader([p]) for p in target_paths]
        selection.check_compatible(train + targets, args.dim)  # what run_match checks of the stores
        bufs = [bytearray(args.read_mib << 20) for _ in train_paths]  # allocated (and zeroed) before any timing
        results: dict[str, dict] = {}
        last: dict[str, Any] = {}
        passes: list[tuple[str, bool, Callable[[], Any]]] = [
            ("plain-cold", True, lambda: plain_read(train_paths, bufs[0])),
            ("plain-warm", False, lambda: plain_read(train_paths, bufs[0])),
            ("plain-parallel-cold", True, lambda: plain_read_parallel(train_paths, bufs)),
            ("h5py-cold", True, lambda: h5py_read(train, args.dim, selection.CHUNK_ROWS)),
            (
                "lessctl-cold",
                True,
                lambda: selection.less_scores({TRAIN: train}, targets, weights, subtasks, args.dim, device=device),
            ),
            (
                "lessctl-warm",
                False,
                lambda: selection.less_scores({TRAIN: train}, targets, weights, subtasks, args.dim, device=device),
            ),
            # after lessctl-cold, which (as a `lessctl match` run) pays for allocating the page-locked buffers
            ("read-only-cold", True, lambda: read_only(train, args.dim, device)),
        ]
        if not args.no_legacy:
            passes.append(
                (
                    "legacy-cold",
                    True,
                    lambda: legacy_less_scores({TRAIN: train}, targets, weights, subtasks, args.dim, device),
                )
            )
        for rep in range(args.repeats):
            for name, cold, fn in passes:
                log(f"{name} (pass {rep + 1} of {args.repeats})")
                r = _timed(fn, train_paths, cold, sync)
                last[name] = r.pop("value")
                res = results.setdefault(
                    name, {"pass": name, "cold": cold, "seconds_all": [], "resident_before_all": []}
                )
                res["seconds_all"].append(round(r["seconds"], 4))
                res["resident_before_all"].append(r["resident_before"])
        for r in [*train, *targets]:
            r.close()

        for name, res in results.items():
            k = int(np.argmin(res["seconds_all"]))
            res["seconds"] = res["seconds_all"][k]
            res["resident_before"] = res["resident_before_all"][k]
            res["gb_per_s"] = feature_bytes / GB / res["seconds"]
            if name.startswith("plain"):
                res["file_gb_per_s"] = file_bytes / GB / res["seconds"]
        base = results["plain-cold"]["gb_per_s"]
        for res in results.values():
            res["x_plain_cold"] = res["gb_per_s"] / base
        report["passes"] = list(results.values())

        t = {k: v["seconds"] for k, v in results.items()}
        rc, rw = results["plain-cold"]["resident_before"], results["plain-warm"]["resident_before"]
        report["summary"] = {
            "lessctl_vs_plain_cold": t["plain-cold"] / t["lessctl-cold"],
            "lessctl_vs_h5py_cold": t["h5py-cold"] / t["lessctl-cold"],
            "h5py_vs_plain_cold": t["plain-cold"] / t["h5py-cold"],
            "read_share": min(1.0, t["read-only-cold"] / t["lessctl-cold"]),
            "compute_bound_gb_per_s": results["lessctl-warm"]["gb_per_s"],
            "legacy_vs_plain_cold": t["plain-cold"] / t["legacy-cold"] if "legacy-cold" in t else None,
            "speedup_over_legacy": t["legacy-cold"] / t["lessctl-cold"] if "legacy-cold" in t else None,
            "eviction": {
                "warm_over_cold_plain": t["plain-cold"] / t["plain-warm"],
                "resident_after_evict": rc,
                "resident_warm": rw,
                "worked": (rc is not None and rc < 0.05) or (rc is None and t["plain-cold"] > 1.5 * t["plain-warm"]),
            },
        }

        scored = last["lessctl-cold"]
        rng = np.random.default_rng(args.seed)
        rows = np.unique(
            np.concatenate([[0, args.rows - 1], rng.choice(args.rows, min(args.rows, args.check_rows), replace=False)])
        )
        ref = numpy_scores(train_paths, target_paths, weights, subtasks, args.dim, rows)
        check: dict[str, Any] = {
            "rows": len(rows),
            "max_abs_diff_numpy": float(np.abs(scored.scores[rows] - ref).max()),
            "warm_equals_cold": bool(np.array_equal(last["lessctl-warm"].scores, scored.scores)),
        }
        if "legacy-cold" in last:
            check["max_abs_diff_legacy"] = float(np.abs(last["legacy-cold"] - scored.scores).max())
            check["identical_to_legacy"] = bool(np.array_equal(last["legacy-cold"], scored.scores))
        check["ok"] = (
            check["max_abs_diff_numpy"] < 1e-5
            and check["warm_equals_cold"]
            and check.get("max_abs_diff_legacy", 0) < 1e-5
        )
        report["check"] = check
        report["sample"] = {"rows": rows.tolist(), "scores": scored.scores[rows].tolist()}
    finally:
        selection.CHUNK_ROWS = chunk_rows_before
        if tmp and not args.keep:
            shutil.rmtree(d, ignore_errors=True)

    print_table(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {args.json}")
    return report


LABELS = {
    "plain-cold": "plain read, cold",
    "plain-warm": "plain read, warm",
    "plain-parallel-cold": "plain read, C files at once, cold",
    "h5py-cold": "h5py iter_chunks, cold",
    "read-only-cold": "lessctl reading (+ copy), no math, cold",
    "lessctl-cold": "lessctl less_scores, cold",
    "lessctl-warm": "lessctl less_scores, warm",
    "legacy-cold": "previous less_scores loop, cold",
}


def print_table(r: dict) -> None:
    d, dev = r["data"], r["device"]
    print(
        f"\nmatch throughput: {r['settings']['ckpts']} checkpoints x {r['settings']['rows']} rows x "
        f"D={r['settings']['dim']} "
        f"float16 = {d['feature_gb']:.2f} GB of training features; device {dev['type']} ({dev['name']}); "
        f"blocks of {r['chunk_rows']} rows\n"
    )
    print(f"{'pass':<42}{'seconds':>9}{'GB/s':>8}{'x plain cold':>14}{'cached before':>15}")
    for p in r["passes"]:
        res = p["resident_before"]
        print(
            f"{LABELS.get(p['pass'], p['pass']):<42}{p['seconds']:>9.3f}{p['gb_per_s']:>8.2f}{p['x_plain_cold']:>14.2f}"
            f"{'?' if res is None else f'{res:.0%}':>15}"
        )
    s, c = r["summary"], r["check"]
    ev = s["eviction"]
    print(
        f"\nlessctl cold / plain read cold: {s['lessctl_vs_plain_cold']:.2f}   lessctl / h5py: "
        f"{s['lessctl_vs_h5py_cold']:.2f}   "
        f"reading share of lessctl's time: {s['read_share']:.0%}"
        + (f"   speed-up over the previous loop: {s['speedup_over_legacy']:.2f}x" if s["speedup_over_legacy"] else "")
    )
    print(
        f"eviction {'worked' if ev['worked'] else 'DID NOT WORK (cold figures are warm)'}: plain warm is "
        f"{ev['warm_over_cold_plain']:.1f}x plain cold"
    )
    print(
        f"scores: max |lessctl - float64 numpy| = {c['max_abs_diff_numpy']:.2e} on {c['rows']} rows"
        + (f"; identical to the previous loop: {c['identical_to_legacy']}" if "identical_to_legacy" in c else "")
        + f"; {'OK' if c['ok'] else 'MISMATCH'}"
    )


if __name__ == "__main__":
    main()
