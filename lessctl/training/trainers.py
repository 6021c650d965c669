"""The loss of an optimizer step, and the two ways lessctl takes its passes.

Loss weightings: "example" is transformers 4.36's loss as LESS trained with it (each example's mean token
loss, averaged over the examples of the optimizer step, so every example weighs the same); "token" is
transformers 5's (the step's summed token losses over its label tokens).

Passes: the batch-of-one Trainer (LESS's setting: one example a forward pass, accumulated over the step)
or padding-free packs: the Trainer's batch is the whole step's examples (the same examples, in the same
order, the sampler draws for the batch-of-one run), which `PackingCollator` lays end to end into rows of at
most `pack_tokens` tokens with position ids restarting at every example. transformers reads the restarts
as packed sequences and masks attention block-diagonally, so no token attends across examples; logits are
computed only where the next token is a label. Packing changes the speed, not the loss: each pack
backpropagates its share of the step's loss, and the step's gradient is the batch-of-one accumulation's
(tests/test_packing.py).
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any


def pack_groups(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of `lengths` grouped into packs of at most `budget` tokens (first fit, longest first; an
    example longer than the budget gets a pack of its own). Deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, r in enumerate(room):
            if lengths[i] <= r:
                packs[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            packs.append([i])
            room.append(budget - lengths[i])
    return packs


class PackingCollator:
    """The examples of one optimizer step (on this device) as padding-free packs:
    {"packs": [{"input_ids", "position_ids", "labels": [1, T], "example_index": [T], "n_examples"}],
    "n_examples", "n_label_tokens"}. Each example's first label is dropped (-100): no token predicts
    across a boundary, and a causal LM never predicts an example's first token anyway."""

    def __init__(self, pack_tokens: int):
        self.pack_tokens = pack_tokens

    def __call__(self, features: list[dict]) -> dict:
        import torch

        lengths = [len(f["input_ids"]) for f in features]
        packs = []
        for group in pack_groups(lengths, self.pack_tokens):
            ids: list[int] = []
            pos: list[int] = []
            labels: list[int] = []
            index: list[int] = []
            for j, i in enumerate(group):
                f = features[i]
                ids += f["input_ids"]
                pos += range(lengths[i])
                labels += [-100, *f["labels"][1:]]
                index += [j] * lengths[i]
            packs.append(
                {
                    "input_ids": torch.tensor([ids]),
                    "position_ids": torch.tensor([pos]),
                    "labels": torch.tensor([labels]),
                    "example_index": torch.tensor(index),
                    "n_examples": len(group),
                    "cu_seq_lens": torch.tensor(
                        [0, *itertools.accumulate(lengths[i] for i in group)], dtype=torch.int32
                    ),
                    "max_length": max(lengths[i] for i in group),
                }
            )
        n_tokens = sum(sum(1 for x in f["labels"][1:] if x != -100) for f in features)
        return {"packs": packs, "n_examples": len(features), "n_label_tokens": n_tokens}


def pack_loss(model: Any, pack: dict, loss_weighting: str, varlen: bool = False):
    """The summed loss of one pack: its examples' mean token losses ("example") or its token losses ("token").
    varlen: the model runs `training.varlen`'s attention, which reads the boundaries from cu_seq_lens."""
    import torch
    import torch.nn.functional as F

    shift = pack["labels"][0, 1:]
    keep = (shift != -100).nonzero().squeeze(1)  # positions whose next token is a label: the only logits needed
    # no cache: transformers reads restarting position ids as packed sequences only without one
    extra = {}
    if varlen:
        cu, longest = pack["cu_seq_lens"], pack["max_length"]
        extra = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
    out = model(
        input_ids=pack["input_ids"], position_ids=pack["position_ids"], use_cache=False, logits_to_keep=keep, **extra
    )
    token_losses = F.cross_entropy(out.logits[0].float(), shift[keep], reduction="none")
    if loss_weighting == "token":
        return token_losses.sum()
    n = pack["n_examples"]
    example = pack["example_index"][1:][keep]
    sums = torch.zeros(n, dtype=token_losses.dtype, device=token_losses.device).index_add_(0, example, token_losses)
    return (sums / torch.bincount(example, minlength=n).clamp(min=1)).sum()


def trainer_class(loss_weighting: str, packing: bool = False, varlen: bool = False):
    """The Trainer for a loss weighting and a way of taking passes (module docstring); varlen: packs attend
    through `training.varlen` (the model must be switched to it)."""
    from transformers import Trainer

    if packing:
        return _packed_trainer(loss_weighting, varlen)
    if loss_weighting == "token":
        return Trainer

    from lessctl.models import per_example_loss

    class ExampleWeightedTrainer(Trainer):
        loss_is_scaled_for_ga = True  # compute_loss divides by the examples of the whole optimizer step

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
            return batches, sum(int(b["labels"].shape[0]) for b in batches)  # examples in this step, this device

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"]
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
            per_example, _ = per_example_loss(outputs.logits, labels)
            n = num_items_in_batch or labels.shape[0] * self.current_gradient_accumulation_steps
            loss = per_example.sum() / n
            return (loss, outputs) if return_outputs else loss

    return ExampleWeightedTrainer


def _packed_trainer(loss_weighting: str, varlen: bool):
    from transformers import Trainer

    class PackedTrainer(Trainer):
        """One batch = one optimizer step's examples as packs (PackingCollator); each pack backpropagates
        its part of the step's loss, gradients synchronised across devices once, after the last pack."""

        loss_is_scaled_for_ga = True

        def training_step(self, model, inputs, num_items_in_batch=None):
            import torch

            model.train()
            if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
                self.optimizer.train()
            denominator = inputs["n_examples"] if loss_weighting == "example" else inputs["n_label_tokens"]
            scale = 1.0
            across = self.accelerator.num_processes > 1 and self.args.average_tokens_across_devices
            if loss_weighting == "token" and across:
                # transformers 5's token weighting over all devices: every device divides by the step's label
                # tokens on all of them, and the gradient average over devices is undone
                count = torch.tensor(denominator, device=self.args.device)
                denominator = int(self.accelerator.gather(count).sum().item())
                scale = float(self.accelerator.num_processes)
            packs = inputs["packs"]
            total = torch.zeros((), device=self.args.device)
            for i, pack in enumerate(packs):
                pack = self._prepare_inputs(pack)
                last = i == len(packs) - 1
                with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                    with self.compute_loss_context_manager():
                        loss = pack_loss(model, pack, loss_weighting, varlen) * (scale / max(1, denominator))
                    self.accelerator.backward(loss)
                total += loss.detach() / scale
            return total

    return PackedTrainer
