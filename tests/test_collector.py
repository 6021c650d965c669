"""lessctl.grads.collector: the feature collector."""

from __future__ import annotations

import numpy as np
from grads_helpers import _checkpoint, _encoded, _model

from lessctl._reference import naive_gradients
from lessctl.grads.adam import load_adam_state, transform
from lessctl.grads.engine import PerExampleGradients


def test_feature_collector_equals_per_batch_projection(tiny_template):
    """Gathering rows across batches for larger projector calls changes nothing in the features."""
    from lessctl.grads.collector import FeatureCollector
    from lessctl.grads.projection.trak import TrakBasicProjector

    model, tok = _model(tiny_template)
    ckpt, _ = _checkpoint(tiny_template)
    enc = _encoded(tiny_template, tok, 14)
    seqs, labels = [e.input_ids for e in enc], [e.labels for e in enc]
    peg = PerExampleGradients(model)
    adam = load_adam_state(ckpt, peg.params, "cpu")
    proj = {64: TrakBasicProjector(peg.grad_dim, 64, "cpu")}
    try:
        small = FeatureCollector(peg, proj, "adam", adam, pad_id=tok.pad_token_id, batch_tokens=120, project_rows=1)(
            seqs, labels
        )
        big = FeatureCollector(
            peg, proj, "adam", adam, pad_id=tok.pad_token_id, batch_tokens=120, project_rows=1000, max_batch_examples=3
        )(seqs, labels)
        naive = naive_gradients(model, seqs, labels, tok.pad_token_id)
    finally:
        peg.remove()
    assert len(small.batches) > 1 and all(b <= 3 for b, _ in big.batches)
    # Features are sums over thousands of float32 products with entries in the hundreds: an entry near zero
    # carries the row's rounding, so each row is compared by its relative error, not entry by entry.
    expected = proj[64].project(transform(naive, "adam", adam)).numpy()
    assert _row_rel_err(small.features[64], big.features[64]) < 1e-5
    assert _row_rel_err(big.features[64], expected) < 1e-4


def _row_rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """The largest ||a_i - b_i|| / ||b_i|| over rows."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float((np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)).max())
