"""lessctl.grads.engine: per-example gradients of a batch in one backward, merged, compiled, label-only head."""

from __future__ import annotations

import pytest
import torch
from grads_helpers import _checkpoint, _encoded, _model

from lessctl._reference import naive_gradients
from lessctl.grads.adam import load_adam_state, transform
from lessctl.grads.engine import PerExampleGradients


def test_batched_gradients_equal_batch_of_one(tiny_template):
    model, tok = _model(tiny_template)
    enc = _encoded(tiny_template, tok, 12)
    seqs, labels = [e.input_ids for e in enc], [e.labels for e in enc]
    assert len({len(s) for s in seqs}) > 1, "the batch must mix lengths so padding is exercised"
    peg = PerExampleGradients(model)
    try:
        batched, loss, count = peg(seqs, labels, tok.pad_token_id)
    finally:
        peg.remove()
    naive = naive_gradients(model, seqs, labels, tok.pad_token_id)
    assert batched.shape == naive.shape == (12, peg.grad_dim)
    rel = (batched - naive).norm(dim=1) / naive.norm(dim=1)
    assert rel.max().item() < 1e-4, rel
    assert (count > 0).all()
    # the per-example loss is the mean token loss HF computes for a batch of one
    one = model(input_ids=torch.tensor([seqs[0]]), labels=torch.tensor([labels[0]])).loss
    assert abs(one.item() - loss[0].item()) < 1e-5


def test_fully_masked_example_gives_zero_gradient(tiny_template):
    model, tok = _model(tiny_template)
    enc = _encoded(tiny_template, tok, 3)
    labels = [e.labels for e in enc]
    labels[1] = [-100] * len(labels[1])
    peg = PerExampleGradients(model)
    try:
        g, _, count = peg([e.input_ids for e in enc], labels, tok.pad_token_id)
    finally:
        peg.remove()
    assert count[1].item() == 0 and torch.count_nonzero(g[1]) == 0
    assert torch.count_nonzero(g[0]) > 0


def test_lora_engine_generic_engine_and_merged_pass_agree_with_batch_of_one(tiny_template):
    """The three ways of hooking a model give the naive per-example gradients; merging restores the weights exactly."""
    model, tok = _model(tiny_template)
    enc = _encoded(tiny_template, tok, 9)
    seqs, labels = [e.input_ids for e in enc], [e.labels for e in enc]
    naive = naive_gradients(model, seqs, labels, tok.pad_token_id)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    peg = PerExampleGradients(model)
    assert peg.lora is not None and len(peg.lora) == 4 * model.config.num_hidden_layers
    try:
        lora_rows, _, _ = peg(seqs, labels, tok.pad_token_id)
    finally:
        peg.remove()
    merged = PerExampleGradients(model, merge=True)
    try:
        changed = [n for n, p in model.named_parameters() if "base_layer" in n and not torch.equal(p, before[n])]
        assert len(changed) == 4 * model.config.num_hidden_layers  # the delta went into every LoRA'd base weight
        merged_rows, _, _ = merged(seqs, labels, tok.pad_token_id)
    finally:
        merged.remove()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    for rows in (lora_rows, merged_rows):
        rel = (rows - naive).norm(dim=1) / naive.norm(dim=1)
        assert rel.max().item() < 1e-4, rel
    # after remove() the model computes what it computed before (the LoRA branch is back)
    assert torch.allclose(naive_gradients(model, seqs[:2], labels[:2], tok.pad_token_id), naive[:2], atol=1e-7)

    # a model that is not a peft LoRA model: hooks on its trainable Linear weights
    base = model.get_base_model()
    for n, p in base.named_parameters():
        p.requires_grad_(n.endswith("mlp.down_proj.weight"))
    generic = PerExampleGradients(base)
    try:
        assert generic.lora is None
        rows, _, _ = generic(seqs, labels, tok.pad_token_id)
    finally:
        generic.remove()
    ref = naive_gradients(base, seqs, labels, tok.pad_token_id)
    assert rows.shape == ref.shape and ((rows - ref).norm(dim=1) / ref.norm(dim=1)).max().item() < 1e-4


def test_loss_on_label_positions_only_equals_the_full_logits_loss(tiny_template):
    """A Llama's head runs on the label positions only; the losses, counts and gradients are those of the full
    logits (the path every model outside PLAIN_HEADS takes), a fully masked example included."""
    model, tok = _model(tiny_template)
    enc = _encoded(tiny_template, tok, 6)
    seqs, labels = [e.input_ids for e in enc], [list(e.labels) for e in enc]
    labels[2] = [-100] * len(labels[2])
    peg = PerExampleGradients(model)
    try:
        assert peg._head is not None and peg._head[1] is model.get_output_embeddings()
        rows, loss, count = peg(seqs, labels, tok.pad_token_id)
        peg._head = None
        ref_rows, ref_loss, ref_count = peg(seqs, labels, tok.pad_token_id)
    finally:
        peg.remove()
    assert torch.equal(count, ref_count) and count[2] == 0 and loss[2] == 0
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    assert torch.allclose(rows, ref_rows, rtol=1e-4, atol=1e-6 * ref_rows.abs().max().item())
    assert not rows[2].any()


def test_features_are_the_transform_of_the_gradients_in_float16(tiny_template):
    model, tok = _model(tiny_template)
    ckpt, _ = _checkpoint(tiny_template)
    enc = _encoded(tiny_template, tok, 6)
    seqs, labels = [e.input_ids for e in enc], [e.labels for e in enc]
    peg = PerExampleGradients(model)
    adam = load_adam_state(ckpt, peg.params, "cpu")
    try:
        raw, _, _ = peg(seqs, labels, tok.pad_token_id)
        for kind in ("adam", "sgd", "sign"):
            f16, r16, _, _ = peg.features(
                seqs, labels, tok.pad_token_id, kind, adam if kind == "adam" else None, keep_raw=True
            )
            assert f16.dtype == r16.dtype == torch.float16
            expected = transform(raw.clone(), kind, adam).to(torch.float16)
            assert torch.allclose(f16.float(), expected.float(), rtol=2e-3, atol=1e-5), kind
            assert torch.allclose(r16.float(), raw.to(torch.float16).float(), rtol=2e-3, atol=1e-7)
    finally:
        peg.remove()
    with pytest.raises(Exception, match="not \\(only\\) peft LoRA"):
        base = model.get_base_model()
        for n, p in base.named_parameters():
            p.requires_grad_(n.endswith("down_proj.weight"))
        PerExampleGradients(base, merge=True)


def test_compiled_pass_gives_the_same_gradients(tiny_template):
    """`grads --compile`: the compiled pass (zero probes on the LoRA outputs, no attention mask) gives the eager
    pass's per-example gradients, for batches of several shapes, merged and not; the eager hooks are gone."""
    model, tok = _model(tiny_template)
    enc = _encoded(tiny_template, tok, 5)
    seqs, labels = [e.input_ids for e in enc], [e.labels for e in enc]
    from torch._dynamo.utils import counters

    counters.clear()
    for merge in (True, False):
        peg = PerExampleGradients(model, merge=merge)
        try:
            ref, ref_loss, _ = peg(seqs, labels, tok.pad_token_id)
            peg.remove()
            peg = PerExampleGradients(model, merge=merge, compile=True)
            assert len(peg._handles) == len(peg.layers)  # probe hooks only
            got, loss, _ = peg(seqs, labels, tok.pad_token_id)
            graphs = counters["stats"]["unique_graphs"]
            got2, _, _ = peg(seqs[:2], labels[:2], tok.pad_token_id)  # another shape: dynamic, no failure
            got1, loss1, _ = peg(seqs[4:], labels[4:], tok.pad_token_id)  # one example: a row without labels is added
            assert counters["stats"]["unique_graphs"] == graphs, "every batch shape must reuse the compiled graphs"
            assert not counters["graph_break"], counters["graph_break"]
        finally:
            peg.remove()
        tol = dict(rtol=1e-4, atol=1e-6 * ref.abs().max().item())
        assert torch.allclose(got, ref, **tol)
        assert torch.allclose(got2, ref[:2], **tol)
        assert got1.shape == (1, peg.grad_dim) and loss1.shape == (1,)
        assert torch.allclose(got1, ref[4:], **tol)
        assert torch.allclose(loss, ref_loss, rtol=1e-5)
    assert not any(m._forward_hooks or m._compiled_call_impl for m in model.modules())
    assert not any(hasattr(m, "_lessctl_probe") for m in model.modules())


@pytest.mark.parametrize("grad_type", ["adam", "sgd", "sign"])
def test_example_without_label_tokens_gets_a_zero_feature_row(tiny_template, grad_type):
    """No label tokens: a zero row (adam would otherwise give every such example the constant m'/sqrt(v')),
    and the other rows of the batch are exactly what they are without it."""
    model, tok = _model(tiny_template)
    ckpt, _ = _checkpoint(tiny_template)
    enc = _encoded(tiny_template, tok, 3)
    seqs, labels = [e.input_ids for e in enc], [e.labels for e in enc]
    masked = list(labels)
    masked[1] = [-100] * len(labels[1])
    peg = PerExampleGradients(model)
    try:
        adam = load_adam_state(ckpt, peg.params, "cpu") if grad_type == "adam" else None
        feats, _, _, count = peg.features(seqs, masked, tok.pad_token_id, grad_type, adam)
        alone, _, _, _ = peg.features([seqs[0], seqs[2]], [labels[0], labels[2]], tok.pad_token_id, grad_type, adam)
    finally:
        peg.remove()
    assert count[1].item() == 0 and torch.count_nonzero(feats[1]) == 0
    if grad_type == "adam":  # the transform of a zero gradient, which the row would hold otherwise, is not zero
        assert torch.count_nonzero(transform(torch.zeros(1, peg.grad_dim), "adam", adam)) > 0
    torch.testing.assert_close(feats[[0, 2]], alone, rtol=0, atol=0)
