"""RDS's representations (`lessctl grads --type reps`): the last layer's hidden state at each example's last token.

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
import time
from typing import Any, Callable, Sequence

import numpy as np

from lessctl import __version__, paths
from lessctl.config import Config
from lessctl.files import source_sha256
from lessctl.vocab import REPS

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


def collect_representations(
    cfg: Config,
    *,
    steps: list[int],
    train: list[str] | None = None,
    targets: list[str] | None = None,
    shard: tuple[int, int] | None = None,
    batch_tokens: int | None = None,
    force: bool = False,
    device: str | None = None,
    progress: Callable[..., None] | None = None,
    announce: Callable[[str], None] | None = None,
    **_: Any,
) -> list:
    """Writes a reps store for every selected data set at every selected checkpoint (see the module docstring).

    Takes collect_gradients' arguments; dims and projector do not apply (the features are the hidden states).
    """
    import torch

    from lessctl.grads.batching import token_batches
    from lessctl.grads.stage import FLUSH_ROWS, StoreResult, check_steps, data_sets, shard_rows
    from lessctl.grads.store.schema import store_complete, store_path
    from lessctl.grads.store.writer import StoreWriter
    from lessctl.models import default_device, load_adapter_model
    from lessctl.training import checkpoint_dir

    device = device or default_device()
    batch_tokens = batch_tokens or cfg.grads.batch_tokens
    check_steps(cfg, steps)
    sets = data_sets(cfg, train, targets, REPS)
    grads_dir = paths.grads_dir(cfg.output_dir)
    grads_dir.mkdir(parents=True, exist_ok=True)
    base = cfg.model_ref()
    hashes: dict[str, str] = {}
    results: list = []
    for step in steps:
        store_paths = {ds.name: store_path(grads_dir, ds.name, step, REPS, shard) for ds in sets}
        todo = [ds for ds in sets if force or not store_complete(store_paths[ds.name])]
        skipped = [ds for ds in sets if ds not in todo]
        results += [StoreResult(store_paths[ds.name], ds.name, step, REPS, 0, "skipped") for ds in skipped]
        if not todo:
            continue
        ckpt = checkpoint_dir(cfg, step)
        model, tok = load_adapter_model(ckpt, base=base, dtype=cfg.model.dtype, device=device)
        model.eval()
        hidden = hidden_size(model)
        if announce:
            announce(f"representations: the last hidden state ({hidden} dimensions) at checkpoint {step}")
        for ds in todo:
            enc = ds.encode(cfg, tok)
            start, end = shard_rows(len(enc), shard)
            if ds.name not in hashes:
                hashes[ds.name] = source_sha256(ds.files)
            attrs = {
                "base_model": str(base),
                "checkpoint": str(ckpt),
                "step": step,
                "grad_type": REPS,
                "source": ";".join(str(f) for f in ds.files),
                "source_sha256": hashes[ds.name],
                "role": ds.role,
                "dataset": ds.name,
                "total_rows": len(enc),
                "row_start": start,
                "max_seq_length": cfg.model.max_seq_length,
                "chat_format": cfg.model.chat_format,
                "lessctl_version": __version__,
                "shard": shard[0] if shard else 1,
                "num_shards": shard[1] if shard else 1,
                "projector": {**REPS_PROJECTOR, "grad_dim": hidden},
            }
            index = np.array([e.line for e in enc[start:end]], dtype=np.int64)
            t0 = time.time()
            with StoreWriter(store_paths[ds.name], dims=[hidden], index=index, attrs=attrs, force=force) as w:
                done0 = w.rows_completed
                pos = start + done0
                if progress:
                    progress(ds.name, step, done0, end - start)
                while pos < end:
                    window = [e.input_ids for e in enc[pos : min(end, pos + FLUSH_ROWS)]]
                    rows = np.zeros((len(window), hidden), dtype=np.float32)
                    for batch in token_batches([len(s) for s in window], batch_tokens):
                        states = last_token_states(model, [window[i] for i in batch], tok.pad_token_id, device)
                        rows[batch] = states.cpu().numpy()
                    w.write({hidden: rows})
                    pos += len(window)
                    if progress:
                        progress(ds.name, step, pos - start, end - start)
                w.finalize()
            secs = time.time() - t0
            n_new = end - start - done0
            status = "resumed" if done0 else "written"
            rate = n_new / secs if secs > 0 else 0.0
            results.append(StoreResult(store_paths[ds.name], ds.name, step, REPS, end - start, status, secs, rate))
        del model
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
    return results
