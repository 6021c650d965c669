"""Per-example gradient features (LESS.md section 3), batched, and the optimizer-state transforms.

One forward/backward pass serves a whole batch: hooks on the LoRA Linear layers keep each layer's
input X [B, T, in] and output gradient G [B, T, out]; example b's weight gradient is G_b^T X_b. The
loss of a batch is the sum of each example's mean token loss, so each example's gradient is exactly
the one a batch of one gives (tested against `naive_gradients`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from lessctl.errors import InputError, MissingArtifactError

log = logging.getLogger(__name__)

GRAD_TYPES = ("adam", "sgd", "sign")


def trainable_parameters(model) -> list[tuple[str, Any]]:
    """The parameters whose gradients make the feature, in `named_parameters()` order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def pad_batch(seqs: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_id: int, device):
    """Right-padded input ids, labels (-100 on padding) and attention mask, [B, T] each."""
    import torch

    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    lab = torch.full((len(seqs), T), -100, dtype=torch.long)
    att = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(l)] = torch.tensor(l)
        att[i, : len(s)] = 1
    return ids.to(device), lab.to(device), att.to(device)


def per_example_loss(logits, labels):
    """Mean next-token cross-entropy over each example's label tokens: [B] (0 where none)."""
    import torch.nn.functional as F

    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    tok = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(shift_labels.shape)
    count = (shift_labels != -100).sum(dim=1)
    return tok.sum(dim=1) / count.clamp(min=1), count


def naive_gradients(model, seqs, labels, pad_id: int = 0):
    """The reference: one example at a time, autograd on the trainable parameters. [B, P] float32."""
    import torch

    params = [p for _, p in trainable_parameters(model)]
    dev = params[0].device
    rows = []
    for s, l in zip(seqs, labels):
        ids, lab, att = pad_batch([s], [l], pad_id, dev)
        loss, _ = per_example_loss(model(input_ids=ids, attention_mask=att).logits, lab)
        grads = torch.autograd.grad(loss.sum(), params, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                               for g, p in zip(grads, params)]))
    return torch.stack(rows)


class PerExampleGradients:
    """Per-example gradients of every trainable Linear weight from one batched forward/backward."""

    def __init__(self, model):
        import torch

        self.model = model
        self.params = trainable_parameters(model)
        if not self.params:
            raise InputError("the model has no trainable parameters (is a LoRA adapter loaded?)")
        self.slices: list[tuple[Any, int, int]] = []  # (module, offset, numel) in parameter order
        self._saved: dict[int, dict] = {}
        self._handles = []
        offset = 0
        for name, p in self.params:
            mod_name, _, leaf = name.rpartition(".")
            mod = model.get_submodule(mod_name)
            if leaf != "weight" or not isinstance(mod, torch.nn.Linear) or (mod.bias is not None and mod.bias.requires_grad):
                raise InputError(f"batched gradients support trainable Linear weights only; {name} is not one")
            self.slices.append((mod, offset, p.numel()))
            self._handles.append(mod.register_forward_hook(self._forward_hook))
            offset += p.numel()
        self.grad_dim = offset

    def _forward_hook(self, mod, inputs, output):
        store = self._saved.setdefault(id(mod), {})
        store["x"] = inputs[0].detach()

        def keep_grad(g, store=store):
            store["g"] = g.detach()

        if output.requires_grad:
            output.register_hook(keep_grad)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def __call__(self, seqs, labels, pad_id: int):
        """Returns (features [B, P] float32, loss [B], label token counts [B])."""
        import torch

        dev = self.params[0][1].device
        ids, lab, att = pad_batch(seqs, labels, pad_id, dev)
        self._saved.clear()
        loss, count = per_example_loss(self.model(input_ids=ids, attention_mask=att).logits, lab)
        torch.autograd.grad(loss.sum(), [p for _, p in self.params], allow_unused=True)
        out = torch.zeros(len(seqs), self.grad_dim, dtype=torch.float32, device=dev)
        for mod, off, n in self.slices:
            s = self._saved.get(id(mod), {})
            if "g" not in s:
                continue  # this layer got no gradient (all labels masked): stays zero
            x, g = s["x"].float(), s["g"].float()  # [B, T, in], [B, T, out]
            out[:, off : off + n] = torch.einsum("bto,bti->boi", g, x).reshape(len(seqs), n)
        self._saved.clear()
        return out, loss.detach(), count


# ----------------------------------------------------------------------------- optimizer state


@dataclass
class AdamState:
    exp_avg: Any  # [P] float32
    exp_avg_sq: Any  # [P] float32
    beta1: float
    beta2: float
    eps: float


def load_adam_state(ckpt_dir: Path, params: list[tuple[str, Any]], device) -> AdamState:
    """The checkpoint's Adam moments flattened in parameter order.

    Reads `optimizer.pt` whether its state is keyed by position (a plain Trainer run) or by
    parameter name (an FSDP run): entries are taken in order and each must match its parameter's shape.
    """
    import torch

    path = Path(ckpt_dir) / "optimizer.pt"
    if not path.is_file():
        raise MissingArtifactError(
            f"{path}: the checkpoint has no optimizer state, which adam features need; "
            "use a checkpoint saved by `lessctl warmup`, or --type sgd"
        )
    sd = torch.load(path, map_location="cpu", weights_only=False)
    state, groups = sd.get("state", {}), sd.get("param_groups", [{}])
    if groups and all(isinstance(k, int) for k in state):
        order = [i for g in groups for i in g.get("params", [])] or sorted(state)
        entries = [(i, state[i]) for i in order if i in state]
    else:
        by_name = {str(k): v for k, v in state.items()}
        names = [n for n, _ in params]
        matched = [next((k for k in by_name if n.endswith(k) or k.endswith(n)), None) for n in names]
        keys = matched if all(matched) else list(by_name)
        entries = [(k, by_name[k]) for k in keys]
    if len(entries) != len(params):
        raise InputError(f"{path}: optimizer state has {len(entries)} entries for {len(params)} trainable parameters")
    m, v = [], []
    for (key, st), (name, p) in zip(entries, params):
        if "exp_avg" not in st or tuple(st["exp_avg"].shape) != tuple(p.shape):
            got = tuple(st["exp_avg"].shape) if "exp_avg" in st else "no exp_avg"
            raise InputError(f"{path}: optimizer state {key!r} ({got}) does not match parameter {name} {tuple(p.shape)}")
        m.append(st["exp_avg"].reshape(-1).float())
        v.append(st["exp_avg_sq"].reshape(-1).float())
    g0 = groups[0] if groups else {}
    b1, b2 = g0.get("betas", (0.9, 0.999))
    return AdamState(torch.cat(m).to(device), torch.cat(v).to(device), float(b1), float(b2), float(g0.get("eps", 1e-8)))


def transform(g, grad_type: str, adam: AdamState | None = None, inplace: bool = False):
    """LESS's features from raw gradients g [B, P]: adam (no bias correction, eps inside the sqrt), sgd, sign.

    With inplace=True the result overwrites g and the adam transform needs one extra [B, P] buffer
    instead of five (at 7B shape a row is 0.5 GB).
    """
    import torch

    if grad_type == "sgd":
        return g
    if grad_type == "sign":
        return g.sign_() if inplace else torch.sign(g)
    if grad_type == "adam":
        assert adam is not None
        if not inplace:
            m = adam.beta1 * adam.exp_avg + (1 - adam.beta1) * g
            v = adam.beta2 * adam.exp_avg_sq + (1 - adam.beta2) * g * g
            return m / torch.sqrt(v + adam.eps)
        denom = g * g  # [B, P]: the one temporary
        denom.mul_(1 - adam.beta2).add_(adam.exp_avg_sq, alpha=adam.beta2).add_(adam.eps).sqrt_()
        g.mul_(1 - adam.beta1).add_(adam.exp_avg, alpha=adam.beta1).div_(denom)
        return g
    raise InputError(f"--type: expected one of {', '.join(GRAD_TYPES)}, got {grad_type!r}")


# ----------------------------------------------------------------------------- batching


def token_batches(lengths: Sequence[int], batch_tokens: int) -> Iterator[list[int]]:
    """Positions grouped longest-first so that (longest length x batch size) stays within the budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: list[int] = []
    for i in order:
        longest = lengths[batch[0]] if batch else lengths[i]
        if batch and longest * (len(batch) + 1) > batch_tokens:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def split_batches(lengths: Sequence[int], batch_tokens: int, max_examples: int | None = None) -> Iterator[list[int]]:
    """token_batches, each cut further into at most `max_examples` examples."""
    for b in token_batches(lengths, batch_tokens):
        step = max_examples or len(b)
        for i in range(0, len(b), step):
            yield b[i : i + step]


def auto_max_batch_examples(grad_dim: int, device) -> int | None:
    """On a GPU: how many [P] float32 gradient rows (with the transform's temporary and the hooks' own
    buffers, about 4 copies) fit in a quarter of the GPU's memory; on a CPU no cap."""
    import torch

    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    return max(1, int(0.25 * total // (4 * 4 * grad_dim)))


def auto_project_rows(projectors: dict, grad_dim: int, device) -> int:
    """Rows to gather before one projection call: fast_jl costs the same for 2 rows as for its maximum,
    and BasicProjector may regenerate its matrix on every call, so calls should be as full as memory allows."""
    budget = (8 << 30) if str(device).startswith("cuda") else (1 << 30)
    rows = max(1, budget // (2 * grad_dim))  # float16 rows
    for p in projectors.values():
        if getattr(p, "kind", "") == "cuda":
            rows = min(rows, p.max_rows)
    return int(rows)


class _NullTimer:
    def part(self, name: str):
        import contextlib

        return contextlib.nullcontext()


@dataclass
class Collected:
    features: dict  # dim -> [n, D] float32 numpy (unnormalized projections)
    zero_label_rows: int
    batches: list  # (examples, padded length) per forward/backward
    raw: dict | None = None  # dim -> [n, D]: projections of the raw gradients (keep_raw, for checks)


class FeatureCollector:
    """Features of many examples: batched gradients, the in-place transform, and projection in full calls.

    Gradient rows are gathered (as float16, the projector's input) until `project_rows` are waiting, so
    each projector call is as large as memory allows whatever the batch sizes.
    """

    def __init__(self, peg: PerExampleGradients, projectors: dict, grad_type: str, adam: AdamState | None = None, *,
                 pad_id: int, batch_tokens: int, max_batch_examples: int | None = None,
                 project_rows: int | None = None, timer=None, keep_raw: bool = False):
        dev = peg.params[0][1].device
        self.peg, self.projectors, self.grad_type, self.adam = peg, projectors, grad_type, adam
        self.pad_id, self.batch_tokens = pad_id, batch_tokens
        self.max_batch_examples = max_batch_examples if max_batch_examples is not None else auto_max_batch_examples(peg.grad_dim, dev)
        self.project_rows = project_rows or auto_project_rows(projectors, peg.grad_dim, dev)
        self.timer = timer or _NullTimer()
        self.keep_raw = keep_raw

    def __call__(self, seqs: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]) -> Collected:
        import numpy as np
        import torch

        n = len(seqs)
        out = {d: np.zeros((n, d), dtype=np.float32) for d in self.projectors}
        raw = {d: np.zeros((n, d), dtype=np.float32) for d in self.projectors} if self.keep_raw else None
        pending: list[tuple[list[int], Any, Any]] = []
        waiting = 0
        zero = 0
        log_batches = []

        def flush() -> None:
            nonlocal pending, waiting
            if not pending:
                return
            rows = [i for pos, _, _ in pending for i in pos]
            with self.timer.part("projection"):
                x = torch.cat([f for _, f, _ in pending])
                for d, proj in self.projectors.items():
                    out[d][rows] = proj.project(x).float().cpu().numpy()
                if raw is not None:
                    xr = torch.cat([r for _, _, r in pending])
                    for d, proj in self.projectors.items():
                        raw[d][rows] = proj.project(xr).float().cpu().numpy()
            pending, waiting = [], 0

        for batch in split_batches([len(s) for s in seqs], self.batch_tokens, self.max_batch_examples):
            with self.timer.part("fwd_bwd"):
                g, _, count = self.peg([seqs[i] for i in batch], [labels[i] for i in batch], self.pad_id)
            zero += int((count == 0).sum())
            log_batches.append((len(batch), max(len(seqs[i]) for i in batch)))
            r16 = g.to(torch.float16) if raw is not None else None
            with self.timer.part("transform"):
                f16 = transform(g, self.grad_type, self.adam, inplace=True).to(torch.float16)
            del g
            pending.append((batch, f16, r16))
            waiting += len(batch)
            if waiting >= self.project_rows:
                flush()
        flush()
        return Collected(out, zero, log_batches, raw)
