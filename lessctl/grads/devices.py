"""`lessctl grads --devices`: one spawned worker per device, worker k computing shard k/N of every store.

What the workers write is exactly what N runs of `lessctl grads --shard k/N --device D_k` write (the
same shard files, resumed the same way), so `open_store` reads them as one store. The parent merges
the workers' progress into one callback, re-raises a worker's lessctl error as the same error class
and stops the other workers on any failure or Ctrl-C.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing as mp
import os
import queue as queue_mod
import re
import signal
import sys
import time
from typing import Any, Callable

from lessctl.errors import ConfigError, LessctlError, WorkerError, log_handler

_DEVICE_RE = re.compile(r"^(cpu|cuda|cuda:\d+)$")
POLL_S = 0.25
# How long a worker may be dead before its last messages are given up on (its queue is flushed at exit).
DEAD_GRACE_S = 2.0
# How long finished workers get to exit before they are terminated.
EXIT_GRACE_S = 30.0


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count()


def parse_devices(spec: str) -> list[str]:
    """`--devices`: an integer N (cuda:0 .. cuda:N-1) or a comma-separated list of cpu, cuda, cuda:N."""
    text = (spec or "").strip()
    if text.isdigit():
        n = int(text)
        if n < 1:
            raise ConfigError(f"--devices: expected at least one device, got {spec!r}")
        visible = cuda_device_count()
        if n > visible:
            raise ConfigError(
                f"--devices {n}: needs {n} CUDA GPUs, but {visible} {'is' if visible == 1 else 'are'} visible"
            )
        return [f"cuda:{i}" for i in range(n)]
    names = [x.strip() for x in text.split(",")]
    bad = [x for x in names if not _DEVICE_RE.match(x)]
    if bad or not names:
        raise ConfigError(f"--devices: expected N or a comma-separated list of cpu, cuda, cuda:N, got {spec!r}")
    if any(x.startswith("cuda") for x in names):
        visible = cuda_device_count()
        for x in names:
            index = int(x.split(":")[1]) if ":" in x else 0
            if index >= visible:
                raise ConfigError(
                    f"--devices: {x} is not visible ({visible} CUDA GPU{'' if visible == 1 else 's'} visible)"
                )
    return names


def cpu_threads(n_workers: int) -> int:
    """Torch threads per CPU worker: the usable cores shared out (at least one)."""
    try:
        cores = len(os.sched_getaffinity(0))  # what Slurm/cgroups/taskset allow, not the machine's count
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores // n_workers)


def collect_on_devices(
    cfg,
    devices: list[str],
    *,
    progress: Callable[..., None] | None = None,
    announce: Callable[[str], None] | None = None,
    log_level: int | None = None,
    **kwargs: Any,
) -> list:
    """`collect_gradients(cfg, **kwargs)` split over `devices`: worker k runs shard (k, N) on devices[k-1].

    One device runs in this process, unsharded (as `--device`). The StoreResults come back grouped by
    store, shards in order, each with extra={"device", "shard"}.
    """
    from lessctl.grads.stage import check_steps, collect_gradients, data_sets

    if "shard" in kwargs or "device" in kwargs:
        raise TypeError("collect_on_devices sets shard and device itself")
    if len(devices) == 1:
        return collect_gradients(cfg, device=devices[0], progress=progress, announce=announce, **kwargs)
    n = len(devices)
    # the user errors every worker would raise, found before the (slow) workers start
    check_steps(cfg, kwargs["steps"])
    data_sets(cfg, kwargs.get("train"), kwargs.get("targets"), kwargs.get("grad_type"))
    if announce:
        announce(f"{n} workers: " + ", ".join(f"shard {k}/{n} on {d}" for k, d in enumerate(devices, 1)))
    ctx = mp.get_context("spawn")  # never fork a process that has imported torch
    q = ctx.Queue()
    level = logging.getLogger().getEffectiveLevel() if log_level is None else log_level
    procs = {
        k: ctx.Process(
            target=_worker,
            name=f"lessctl-grads-{k}of{n}",
            args=(k, n, dev, cfg, kwargs, q, cpu_threads(n) if dev == "cpu" else 0, level),
        )
        for k, dev in enumerate(devices, 1)
    }
    summed = _ProgressSum(progress)
    announced: set[str] = set()
    results: dict[int, list] = {}
    dead_since: dict[int, float] = {}
    ok = False
    try:
        for p in procs.values():
            p.start()
        while len(results) < n:
            try:
                msg = q.get(timeout=POLL_S)
            except queue_mod.Empty:
                msg = ("none", 0)
            now = time.monotonic()
            for j, p in procs.items():
                if j not in results and p.exitcode is not None:  # its last messages may still be in the pipe
                    if now - dead_since.setdefault(j, now) > DEAD_GRACE_S:
                        _raise_dead(j, n, devices[j - 1], p.exitcode)
            kind, k = msg[0], msg[1]
            if kind == "progress":
                summed.update(k, *msg[2:])
            elif kind == "announce":
                if announce and msg[2] not in announced:
                    announced.add(msg[2])
                    announce(msg[2])
            elif kind == "done":
                results[k] = msg[2]
            elif kind == "error":
                _raise_error(*msg[2:])
            elif kind == "crash":
                raise WorkerError(
                    f"grads worker {k}/{n} on {devices[k - 1]} failed: {msg[2]} (traceback above); "
                    f"`lessctl grads --shard {k}/{n} --device {devices[k - 1]}` with the same "
                    "options runs that shard alone"
                )
        ok = True
    finally:
        _stop(procs, EXIT_GRACE_S if ok else 0.0)
        q.close()
        q.cancel_join_thread()
    out = []
    for k, rows in results.items():
        for i, r in enumerate(rows):
            r.extra.update(device=devices[k - 1], shard=f"{k}/{n}")
            out.append((i, k, r))
    return [r for _, _, r in sorted(out, key=lambda t: t[:2])]


class _ProgressSum:
    """Rows done summed over the workers, per store; reports the oldest store some worker has not finished."""

    def __init__(self, progress: Callable[..., None] | None):
        self.progress = progress
        self.stores: dict[tuple[str, int], dict[int, tuple[int, int]]] = {}  # in order of first report

    def update(self, k: int, name: str, step: int, done: int, total: int) -> None:
        self.stores.setdefault((name, step), {})[k] = (done, total)
        if self.progress is None:
            return
        current = next((key for key, by_k in self.stores.items() if any(d < t for d, t in by_k.values())), (name, step))
        by_k = self.stores[current].values()
        self.progress(current[0], current[1], sum(d for d, _ in by_k), sum(t for _, t in by_k))


def _raise_error(module: str, qualname: str, message: str, exit_code: int) -> None:
    """Re-raise a worker's lessctl error in this process: the same class, message and exit code."""
    cls: Any = None
    if module.split(".")[0] == "lessctl":
        try:
            cls = getattr(importlib.import_module(module), qualname, None)
        except ImportError:
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, LessctlError)):
        cls = LessctlError
    try:
        exc = cls(message)
    except Exception:  # noqa: BLE001 - a subclass with another constructor
        exc = LessctlError(message)
    if exc.exit_code != exit_code:
        exc.exit_code = exit_code
    raise exc


def _raise_dead(k: int, n: int, device: str, code: int) -> None:
    if code in (130, -signal.SIGINT):
        raise KeyboardInterrupt
    if code < 0:
        try:
            how = f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
        if -code == signal.SIGKILL:
            how += " (out of memory?)"
    else:
        how = f"exited with code {code}"
    raise WorkerError(
        f"grads worker {k}/{n} on {device} {how} without an error message; re-running the command "
        f"resumes every shard, `lessctl grads --shard {k}/{n} --device {device}` runs that shard alone"
    )


def _stop(procs: dict, grace: float) -> None:
    """Join the workers for up to `grace` seconds, then terminate (and at last kill) what is left."""
    deadline = time.monotonic() + grace
    for p in procs.values():
        if p.pid is not None:
            p.join(max(0.0, deadline - time.monotonic()))
    alive = [p for p in procs.values() if p.pid is not None and p.is_alive()]
    for p in alive:
        p.terminate()
    for p in alive:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join()


def _exit_with_parent() -> None:
    """A daemon thread that ends this worker when the parent dies (kill -9 included)."""
    import threading
    from multiprocessing.connection import wait

    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _worker(k: int, n: int, device: str, cfg, kwargs: dict, q, threads: int, log_level: int) -> None:
    """Runs in a spawned process: shard k/n of every store on `device`; reports through `q`."""
    _exit_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which terminates the workers
    logging.basicConfig(level=log_level, handlers=[log_handler(f"%(name)s [{k}/{n} {device}]: %(message)s")])
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(threads)  # before torch is imported in this process
    try:
        import torch

        if threads:
            torch.set_num_threads(threads)
        if device.startswith("cuda:"):
            torch.cuda.set_device(
                int(device.split(":")[1])
            )  # kernels that use the current device, and no context on cuda:0

        from lessctl.grads.stage import collect_gradients

        results = collect_gradients(
            cfg,
            shard=(k, n),
            device=device,
            progress=lambda name, step, done, total: q.put(("progress", k, name, step, done, total)),
            announce=lambda text: q.put(("announce", k, text)),
            **kwargs,
        )
        q.put(("done", k, results))
    except LessctlError as e:
        if log_level <= logging.DEBUG:
            import traceback

            traceback.print_exc()
        q.put(("error", k, type(e).__module__, type(e).__qualname__, str(e), e.exit_code))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which names the device
        import traceback

        traceback.print_exc()
        q.put(("crash", k, f"{type(e).__name__}: {e}"))
        q.close()
        q.join_thread()
        sys.exit(1)
