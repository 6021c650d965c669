"""Running under torchrun (or accelerate launch): every rank runs the whole command, so whatever writes shared
files (a manifest, a run file, a staging folder moved into place, stdout's JSON) happens on rank 0 alone, with
barriers where the other ranks must see it done."""

from __future__ import annotations

import os
from datetime import timedelta


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def world_size() -> int:
    """Processes working together: WORLD_SIZE as torchrun and accelerate set it, else 1."""
    return max(1, _env_int("WORLD_SIZE", 1))


def rank() -> int:
    """This process's rank (RANK), 0 when not launched by torchrun."""
    return _env_int("RANK", 0) if world_size() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def local_device(device: str) -> str:
    """`cuda` on one of several ranks is this rank's own GPU (LOCAL_RANK): loading every rank's model onto
    cuda:0 first would need the memory of all of them there."""
    if device == "cuda" and world_size() > 1:
        return f"cuda:{_env_int('LOCAL_RANK', 0)}"
    return device


def barrier() -> None:
    """Waits for every rank, when a process group is up (the Trainer starts one); else nothing."""
    if world_size() <= 1:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def init_process_group(hours: float = 2.0) -> None:
    """Starts the process group where no Trainer did (rank 0 may then work alone for `hours` while the others
    wait: longer than torch's default 10 minutes)."""
    if world_size() <= 1:
        return
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=hours))
