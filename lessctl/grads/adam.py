"""LESS's optimizer-state transforms of gradient rows (LESS.md section 3): adam, sgd and sign.

adam: m' = b1 m + (1 - b1) g, v' = b2 v + (1 - b2) g^2, feature = m' / sqrt(v' + eps) (no bias correction,
eps inside the square root, as LESS computes it), using the Adam moments saved with each warmup checkpoint.
An example without label tokens has no gradient; the engine gives it a zero row rather than this transform
of g = 0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lessctl.errors import InputError, MissingArtifactError
from lessctl.files import torch_load_safe
from lessctl.vocab import GRAD_TYPES

log = logging.getLogger(__name__)


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
    sd = torch_load_safe(path, "a torch optimizer state", "`lessctl warmup --force` trains the warmup again")
    try:
        state, groups, entries = _entries(path, sd, params)
        m, v = [], []
        for (key, st), (name, p) in zip(entries, params):
            if "exp_avg" not in st or tuple(st["exp_avg"].shape) != tuple(p.shape):
                got = tuple(st["exp_avg"].shape) if "exp_avg" in st else "no exp_avg"
                raise InputError(
                    f"{path}: optimizer state {key!r} ({got}) does not match parameter {name} {tuple(p.shape)}"
                )
            m.append(st["exp_avg"].reshape(-1).float())
            v.append(st["exp_avg_sq"].reshape(-1).float())
    except (TypeError, AttributeError, KeyError, ValueError, IndexError) as e:
        raise InputError(
            f"{path}: not an optimizer state ({type(e).__name__}: {e}); expected torch's dict of 'state' and "
            "'param_groups': `lessctl warmup --force` trains the warmup again"
        ) from None
    g0 = groups[0] if groups and isinstance(groups[0], dict) else {}
    try:
        b1, b2 = (float(b) for b in g0.get("betas", (0.9, 0.999)))
        eps = float(g0.get("eps", 1e-8))
    except (TypeError, ValueError):
        raise InputError(f"{path}: param_groups[0] has no valid betas/eps: {g0.get('betas')!r}") from None
    return AdamState(torch.cat(m).to(device), torch.cat(v).to(device), b1, b2, eps)


def _entries(path: Path, sd, params: list[tuple[str, Any]]):
    """(state, param_groups, [(key, per-parameter state)] in parameter order) of a loaded optimizer state."""
    if not isinstance(sd, dict) or not isinstance(sd.get("state", {}), dict):
        raise InputError(f"{path}: not an optimizer state (expected a dict with 'state' and 'param_groups')")
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
    return state, groups, entries


def transform(g, grad_type: str, adam: AdamState | None = None):
    """LESS's features from raw gradients g [B, P]: adam (no bias correction, eps inside the sqrt), sgd, sign.

    The reference formula; the grads stage runs `transform_into`, the same arithmetic per parameter slice.
    """
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


def transform_into(g, grad_type: str, adam: AdamState | None, offset: int, out) -> None:
    """`transform` of the rows g [B, n] (parameters offset .. offset+n), written into out [B, n] (float16).

    The same arithmetic as `transform` in four passes over g instead of nine: the [n] moment slices are
    scaled first (b2*v + eps, once per slice, not per row), then v' = addcmul, sqrt, m' = lerp(m, g, 1-b1)
    and the division straight into the float16 output. g is overwritten.
    """
    import torch

    if grad_type == "adam":
        from lessctl.grads.fast_paths import adam_into

        assert adam is not None
        n = g.shape[1]
        m, v = adam.exp_avg[offset : offset + n], adam.exp_avg_sq[offset : offset + n]
        if adam_into(g, m, v, adam.beta1, adam.beta2, adam.eps, out):
            return
        denom = torch.addcmul(v * adam.beta2 + adam.eps, g, g, value=1 - adam.beta2).sqrt_()
        torch.lerp(m.expand_as(g), g, 1 - adam.beta1, out=g)
        torch.div(g, denom, out=out)
    elif grad_type in ("sgd", "sign"):
        out.copy_(g if grad_type == "sgd" else g.sign_())
    else:
        raise InputError(f"--type: expected one of {', '.join(GRAD_TYPES)}, got {grad_type!r}")
