"""lessctl.grads.batching: token-budget batches."""

from __future__ import annotations

from lessctl.grads.batching import token_batches


def test_token_batches_respect_budget():
    lengths = [5, 40, 12, 33, 7, 40, 1]
    batches = list(token_batches(lengths, 80))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert max(lengths[i] for i in b) * len(b) <= 80 or len(b) == 1


def test_batches_avoid_padding_a_short_example_to_a_long_one():
    from lessctl.grads.batching import BATCH_OVERHEAD_TOKENS

    lengths = [1000, 60, 58, 57, 55, 50]
    batches = list(token_batches(lengths, 4096))
    assert batches[0] == [0]  # the long example alone: the others are not padded to 1000 tokens
    assert sorted(i for b in batches for i in b) == list(range(len(lengths))) and len(batches) == 2
    # with a cap, the batches respect it and still cover everything once
    capped = list(token_batches(lengths, 4096, 2))
    assert all(len(b) <= 2 for b in capped) and sorted(i for b in capped for i in b) == list(range(6))
    assert BATCH_OVERHEAD_TOKENS > 0
