"""The feature collector: batches a data set, runs the engine, transforms and projects rows through staging buffers."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

from lessctl.grads.adam import AdamState
from lessctl.grads.batching import auto_max_batch_examples, auto_project_rows, token_batches
from lessctl.grads.engine import PerExampleGradients, _NullTimer

log = logging.getLogger(__name__)


class _Staging:
    """Rows waiting for projection in one float16 buffer that grows to what a projection call takes plus a
    batch: each batch writes its rows straight into the buffer (`reserve`), and no concatenation doubles them."""

    def __init__(self):
        self.buf = None
        self.n = 0

    def reserve(self, k: int, width: int, dtype, device, project_rows: int):
        """The next k rows, [k, width], for a batch to write into; they count as staged from now on."""
        import torch

        need = self.n + k
        if self.buf is None or need > self.buf.shape[0]:
            grown = torch.empty(max(need, project_rows + k), width, dtype=dtype, device=device)
            if self.n:
                grown[: self.n] = self.buf[: self.n]
            self.buf = grown
        self.n = need
        return self.buf[need - k : need]

    def first(self, k: int):
        return self.buf[:k]

    def drop(self, k: int) -> None:
        """Forget the first k rows; the others move to the front."""
        left = self.n - k
        if left > 0:
            src = self.buf[k : self.n]
            self.buf[:left] = src.clone() if left > k else src  # overlapping ranges need a copy
        self.n = max(left, 0)


@dataclass
class Collected:
    features: dict  # dim -> [n, D] float32 numpy (unnormalized projections)
    zero_label_rows: int
    batches: list  # (examples, padded length) per forward/backward
    raw: dict | None = None  # dim -> [n, D]: projections of the raw gradients (keep_raw, for checks)


class FeatureCollector:
    """Features of many examples: batched gradients transformed slice by slice, projection in full calls.

    Gradient rows (float16, the projector's input) are gathered across batches and projected in
    multiples of `project_rows`, so each projector call is as large as it can be whatever the batch sizes.
    """

    def __init__(
        self,
        peg: PerExampleGradients,
        projectors: dict,
        grad_type: str,
        adam: AdamState | None = None,
        *,
        pad_id: int,
        batch_tokens: int,
        max_batch_examples: int | None = None,
        project_rows: int | None = None,
        timer=None,
        keep_raw: bool = False,
    ):
        dev = peg.device
        self.peg, self.projectors, self.grad_type, self.adam = peg, projectors, grad_type, adam
        self.pad_id, self.batch_tokens = pad_id, batch_tokens
        self.max_batch_examples = (
            max_batch_examples if max_batch_examples is not None else auto_max_batch_examples(peg.grad_dim, dev)
        )
        self.project_rows = project_rows or auto_project_rows(projectors, peg.grad_dim, dev)
        self.timer = timer or _NullTimer()
        self.keep_raw = keep_raw

    def __call__(self, seqs: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]) -> Collected:
        import numpy as np
        import torch

        n = len(seqs)
        out = {d: np.zeros((n, d), dtype=np.float32) for d in self.projectors}
        raw = {d: np.zeros((n, d), dtype=np.float32) for d in self.projectors} if self.keep_raw else None
        rows: list[int] = []  # example positions waiting for projection, in the order of the staged rows
        feats, raws = _Staging(), _Staging()
        counts: list = []
        log_batches = []

        def flush(final: bool) -> None:
            nonlocal rows
            k = len(rows) if final else len(rows) // self.project_rows * self.project_rows
            if not k:
                return
            with self.timer.part("projection"):
                for d, proj in self.projectors.items():
                    out[d][rows[:k]] = proj.project(feats.first(k)).float().cpu().numpy()
                    if raw is not None:
                        raw[d][rows[:k]] = proj.project(raws.first(k)).float().cpu().numpy()
            rows = rows[k:]
            feats.drop(k)
            raws.drop(k)

        self.peg.timer = self.timer
        try:
            for batch in token_batches([len(s) for s in seqs], self.batch_tokens, self.max_batch_examples):
                with self.timer.part("fwd_bwd"):
                    dst = feats.reserve(
                        len(batch), self.peg.grad_dim, torch.float16, self.peg.device, self.project_rows
                    )
                    _, r, _, count = self.peg.features(
                        [seqs[i] for i in batch],
                        [labels[i] for i in batch],
                        self.pad_id,
                        self.grad_type,
                        self.adam,
                        keep_raw=raw is not None,
                        out=dst,
                    )
                    if r is not None:
                        raws.reserve(len(batch), self.peg.grad_dim, torch.float16, self.peg.device, self.project_rows)[
                            :
                        ] = r
                    del dst, r
                counts.append(count)
                log_batches.append((len(batch), max(len(seqs[i]) for i in batch)))
                rows.extend(batch)
                flush(final=False)
            flush(final=True)
        finally:
            self.peg.timer = _NullTimer()
        zero = int(sum(int((c == 0).sum()) for c in counts))
        return Collected(out, zero, log_batches, raw)
