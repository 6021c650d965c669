"""RDS's representations (`lessctl grads --type reps`, written by grads.stage.collect_representations): the last
layer's hidden state at each example's last token.

As the authors' `collect_reps` computes them: the warmup checkpoint's model (base model + that checkpoint's
LoRA) in eval mode, each example's full sequence (the same token ids as its gradient), and the last
hidden state (`output_hidden_states=True`, `hidden_states[-1]`) at the last non-padding position. Batches are
right-padded and length-sorted under the token budget; the rows go into ordinary stores
(`<name>-ckpt<step>-reps.h5`, one `dim<hidden>` group, unit rows with their norms), written, resumed and
sharded exactly like gradient stores.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Sequence

log = logging.getLogger(__name__)


REPS_PROJECTOR = {"kind": "none", "type": "hidden_state"}  # the projector_* attributes of a reps store


def last_token_states(model: Any, seqs: Sequence[Sequence[int]], pad_id: int, device: Any):
    """[B, H] float32: the last layer's hidden state at each sequence's last token, one right-padded batch."""
    import torch

    from lessctl.grads.engine import pad_batch

    ids, _, att = pad_batch(seqs, seqs, pad_id, device)
    kwargs = {}
    if "logits_to_keep" in inspect.signature(_forward_of(model)).parameters:
        kwargs["logits_to_keep"] = 1  # the head's logits are not needed: one position instead of all
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=att, output_hidden_states=True, **kwargs)
    pos = att.sum(dim=1) - 1  # [B] last non-padding position
    return out.hidden_states[-1][torch.arange(len(seqs), device=ids.device), pos].float()


def _forward_of(model: Any):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.forward


def hidden_size(model: Any) -> int:
    cfg = model.config
    return int(getattr(cfg, "hidden_size", None) or cfg.get_text_config().hidden_size)
