"""Length-chunked encoding (``max_length_chunks``): the chunk plan is optimal, and encoding a batch in trimmed,
length-sorted chunks gives the outputs, loss and gradients of encoding it whole."""

from __future__ import annotations

import itertools
import random
import tracemalloc

import numpy as np
import pytest
import torch
from test_gradcache import assert_same_grads, collate, load_model, make_items, make_trainer, step

from flagm3.losses import chunking
from flagm3.losses import training as training_loss_module
from flagm3.losses.chunking import length_chunks
from flagm3.modeling_m3 import merge_outputs

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def plan_cost(lengths, chunks, overhead):
    return sum(len(c) * max(lengths[i] for i in c) + overhead for c in chunks)


def best_cost_by_enumeration(lengths, max_chunks, overhead):
    """Every split of the length-sorted rows into at most ``max_chunks`` contiguous runs."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    best = float("inf")
    for k in range(1, max_chunks + 1):
        for cuts in itertools.combinations(range(1, len(order)), k - 1):
            bounds = (0, *cuts, len(order))
            chunks = [order[a:b] for a, b in zip(bounds, bounds[1:])]
            best = min(best, plan_cost(lengths, chunks, overhead))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_plan_covers_every_row_once_and_is_optimal(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 256) for _ in range(rng.randint(1, 9))]
    max_chunks, overhead = rng.randint(1, 4), rng.choice([0, 16, 256])
    chunks = length_chunks(lengths, max_chunks, overhead)
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    assert 1 <= len(chunks) <= max_chunks
    longest = [max(lengths[i] for i in c) for c in chunks]
    assert longest == sorted(longest, reverse=True)
    assert plan_cost(lengths, chunks, overhead) == best_cost_by_enumeration(lengths, max_chunks, overhead)


def quadratic_length_chunks(lengths, max_chunks, overhead):
    """flagm3's earlier plan: the same dynamic programme over (n+1)^2 float64 cost matrices."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    if n == 0:
        return []
    longest = np.array([lengths[i] for i in order], dtype=np.float64)
    starts, ends = np.arange(n + 1)[:, None], np.arange(n + 1)[None, :]
    chunk_cost = np.where(starts < ends, (ends - starts) * np.append(longest, 0)[:, None] + overhead, np.inf)
    cost = np.full(n + 1, np.inf)
    cost[0] = 0.0
    cuts, best = [], []
    for _ in range(max(1, max_chunks)):
        candidates = cost[:, None] + chunk_cost
        cuts.append(candidates.argmin(0))
        cost = candidates.min(0)
        best.append(cost[n])
    k = int(np.argmin(best))
    bounds, j = [], n
    for layer in range(k, -1, -1):
        i = int(cuts[layer][j])
        bounds.append((i, j))
        j = i
    return [order[i:j] for i, j in reversed(bounds)]


@pytest.mark.parametrize("seed", range(5))
def test_plan_equals_the_quadratic_programme(seed):
    """The same chunks as the (n+1)^2 programme, ties included (few distinct lengths, long runs of equals)."""
    rng = random.Random(seed)
    for _ in range(400):
        n = rng.randint(0, 60)
        lengths = [rng.randint(1, rng.choice([2, 4, 32, 256, 8192])) for _ in range(n)]
        max_chunks, overhead = rng.randint(1, 6), rng.choice([0, 1, 7, 64, 256])
        assert chunking.length_chunks(lengths, max_chunks, overhead) == quadratic_length_chunks(
            lengths, max_chunks, overhead), (lengths, max_chunks, overhead)


def test_plan_memory_is_linear():
    """Peak memory grows linearly with the number of rows (the quadratic programme: 16x for 4x the rows)."""
    rng = random.Random(0)

    def peak(n):
        lengths = [rng.randint(1, 512) for _ in range(n)]
        tracemalloc.start()
        chunking.length_chunks(lengths, 4)
        used = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return used

    small, large = peak(1_000), peak(4_000)
    assert large < 6 * small
    assert large < 4_000 * 200  # bytes: a few Python lists of n entries per chunk layer (not (n+1)^2 * 8)


def test_plan_examples():
    assert length_chunks([], 4) == []
    assert length_chunks([10, 200, 12, 190], 4, overhead=0) == [[1], [3], [2], [0]]
    assert length_chunks([10, 200, 12, 190], 2, overhead=0) == [[1, 3], [2, 0]]
    assert length_chunks([10, 200, 12, 190], 1, overhead=0) == [[1, 3, 2, 0]]
    # a split that saves fewer tokens than one call costs is not made
    assert len(length_chunks([100, 99, 98, 97], 4, overhead=256)) == 1


def test_merged_chunk_outputs_equal_whole_batch_outputs(tiny_encoder_dir, tiny_tokenizer):
    model = load_model(tiny_encoder_dir).eval()
    features = collate(tiny_tokenizer, make_items(False))["passage"]
    mask = features["attention_mask"]
    chunks = length_chunks(mask.sum(1).tolist(), 3, overhead=0)
    assert len(chunks) == 3
    with torch.no_grad():
        whole = model(**features)
        parts = []
        for rows in chunks:
            length = int(mask[rows].sum(1).max())
            parts.append(model(**{k: v[rows, :length] for k, v in features.items()}))
    assert min(p.sparse.shape[1] for p in parts) < mask.shape[1]  # chunks really were trimmed
    merged = merge_outputs(parts, chunks, mask.shape[1])
    for name in ("dense", "sparse", "colbert", "colbert_mask"):
        torch.testing.assert_close(getattr(merged, name), getattr(whole, name), msg=name)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("heads", [None, "dense,sparse"])
def test_chunked_step_equals_whole_step(tiny_encoder_dir, tiny_tokenizer, tmp_path, monkeypatch, padding_side,
                                        heads):
    """Loss and every gradient equal (float64); left-padded batches are encoded whole."""
    monkeypatch.setattr(training_loss_module, "CHUNK_OVERHEAD_TOKENS", 0)
    inputs = collate(tiny_tokenizer, make_items(True), padding_side=padding_side)
    model = load_model(tiny_encoder_dir)
    extra = {"heads": heads} if heads else {}
    whole = make_trainer(model, tiny_tokenizer, tmp_path, max_length_chunks=1, **extra)
    chunked = make_trainer(model, tiny_tokenizer, tmp_path, max_length_chunks=4, **extra)

    calls = []
    model.register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs["input_ids"].shape),
                                with_kwargs=True)
    loss_whole, grads_whole = step(whole, inputs)
    calls_whole = len(calls)
    loss_chunked, grads_chunked = step(chunked, inputs)
    assert calls_whole == 2  # queries, passages
    assert len(calls) - calls_whole == (2 if padding_side == "left" else 8)  # up to 4 chunks per side
    assert loss_chunked == pytest.approx(loss_whole, rel=1e-9)
    required = ["sparse_linear.weight"] + ([] if heads else ["colbert_linear.weight"])
    assert_same_grads(grads_chunked, grads_whole, rtol=1e-9, required=required)


def test_chunked_padding_fraction():
    from flagm3.data import padding_fraction
    from flagm3.losses.chunking import chunked_padding_fraction

    lengths = [10, 200, 12, 190]
    mask = (torch.arange(200)[None, :] < torch.tensor(lengths)[:, None]).long()
    assert chunked_padding_fraction(mask, 1) == pytest.approx(padding_fraction(mask)) == pytest.approx(1 - 412 / 800)
    # chunks [200, 190] and [12, 10]: 2 * 200 + 2 * 12 positions processed
    assert chunked_padding_fraction(mask, 2, overhead=0) == pytest.approx(1 - 412 / 424)
    assert chunked_padding_fraction(mask[:0], 4) == 0.0
