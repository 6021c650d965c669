"""Helpers the grads tests share: the tiny workspace's checkpoint, model and encoded examples."""

from __future__ import annotations

import json
import time
from pathlib import Path

import h5py

from lessctl.data.encoding import encode_record
from lessctl.data.records import read_jsonl
from lessctl.models import load_adapter_model


def _checkpoint(ws: Path) -> tuple[Path, int]:
    manifest = json.loads((ws / "out" / "warmup" / "checkpoints.json").read_text())
    step = manifest[-1]["step"]
    return ws / "out" / "warmup" / f"checkpoint-{step}", step


def _model(ws: Path):
    ckpt, _ = _checkpoint(ws)
    model, tok = load_adapter_model(ckpt, base=str(ws / "model"), dtype="fp32", device="cpu", trainable=True)
    model.eval()
    return model, tok


def _encoded(ws: Path, tok, n: int = 10):
    recs = read_jsonl(ws / "data" / "synth_a.jsonl")[:n]
    return [encode_record(r, tok, 128) for r in recs]


def _wait_rows(part: Path, at_least: int, proc, timeout: float = 120.0) -> int:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"grads finished before it could be killed: {proc.stderr.read()}")
        if part.exists():
            try:
                with h5py.File(part, "r", locking=False) as f:
                    n = int(f.attrs.get("rows_completed", 0))
                if n >= at_least:
                    return n
            except OSError:
                pass
        time.sleep(0.05)
    raise AssertionError("no progress in time")
