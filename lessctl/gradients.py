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
    import torch
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


def transform(g, grad_type: str, adam: AdamState | None = None):
    """LESS's features from raw gradients g [B, P]: adam (no bias correction, eps inside the sqrt), sgd, sign."""
    import torch

    if grad_type == "sgd":
        return g
    if grad_type == "sign":
        return torch.sign(g)
    if grad_type == "adam":
        assert adam is not None
        m = adam.beta1 * adam.exp_avg + (1 - adam.beta1) * g
        v = adam.beta2 * adam.exp_avg_sq + (1 - adam.beta2) * g * g
        return m / torch.sqrt(v + adam.eps)
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
