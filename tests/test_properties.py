"""Properties of the scoring functions (hypothesis): padding and order invariance, repeated tokens, extremes."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("hypothesis")  # a dev extra

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from flagm3.scoring import (  # noqa: E402
    colbert_scores,
    colbert_scores_paired,
    dense_scores,
    sparse_scores,
    sparse_scores_paired,
)

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None)

sizes = st.integers(min_value=1, max_value=5)
lengths = st.integers(min_value=1, max_value=8)
seeds = st.integers(min_value=0, max_value=2**31 - 1)


def lexical(gen: torch.Generator, batch: int, length: int, vocab: int = 12):
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    weights = torch.rand(batch, length, generator=gen) * 2
    weights[torch.rand(batch, length, generator=gen) < 0.25] = 0.0
    return ids, weights


def token_vectors(gen: torch.Generator, batch: int, length: int, dim: int = 4):
    vecs = torch.randn(batch, length, dim, generator=gen)
    mask = (torch.rand(batch, length, generator=gen) < 0.8).long()
    mask[:, 0] = 1  # at least one real token per text
    return vecs, mask


def pad_lexical(ids, weights, extra: int, gen: torch.Generator):
    """Append ``extra`` pad positions with arbitrary ids and zero weight."""
    pad_ids = torch.randint(0, 50, (ids.shape[0], extra), generator=gen)
    return torch.cat([ids, pad_ids], 1), torch.cat([weights, weights.new_zeros(ids.shape[0], extra)], 1)


def pad_vectors(vecs, mask, extra: int, gen: torch.Generator):
    """Append ``extra`` masked positions holding large arbitrary vectors (they must be ignored)."""
    pad = 100 * torch.randn(vecs.shape[0], extra, vecs.shape[2], generator=gen)
    return torch.cat([vecs, pad], 1), torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], 1)


# --------------------------------------------------------------------------------------------- padding
@SETTINGS
@given(sizes, sizes, lengths, lengths, st.integers(1, 6), st.integers(0, 6), seeds)
def test_sparse_invariant_to_padding(nq, np_, lq, lp, extra_q, extra_p, seed):
    gen = torch.Generator().manual_seed(seed)
    q_ids, q_w = lexical(gen, nq, lq)
    p_ids, p_w = lexical(gen, np_, lp)
    base = sparse_scores(q_ids, q_w, p_ids, p_w)
    qp_ids, qp_w = pad_lexical(q_ids, q_w, extra_q, gen)
    pp_ids, pp_w = pad_lexical(p_ids, p_w, extra_p, gen)
    torch.testing.assert_close(sparse_scores(qp_ids, qp_w, pp_ids, pp_w, chunk_size=2), base)
    n = min(nq, np_)
    torch.testing.assert_close(
        sparse_scores_paired(qp_ids[:n], qp_w[:n], pp_ids[:n], pp_w[:n]),
        sparse_scores_paired(q_ids[:n], q_w[:n], p_ids[:n], p_w[:n]),
    )


@SETTINGS
@given(sizes, sizes, lengths, lengths, st.integers(1, 6), st.integers(0, 6), seeds)
def test_colbert_invariant_to_padding(nq, np_, lq, lp, extra_q, extra_p, seed):
    """Masked tokens are excluded: neither a query pad (not averaged) nor a passage pad (never the max) counts."""
    gen = torch.Generator().manual_seed(seed)
    q_vecs, q_mask = token_vectors(gen, nq, lq)
    p_vecs, p_mask = token_vectors(gen, np_, lp)
    base = colbert_scores(q_vecs, q_mask, p_vecs, p_mask)
    qp_vecs, qp_mask = pad_vectors(q_vecs, q_mask, extra_q, gen)
    pp_vecs, pp_mask = pad_vectors(p_vecs, p_mask, extra_p, gen)
    torch.testing.assert_close(colbert_scores(qp_vecs, qp_mask, pp_vecs, pp_mask, block_elements=7), base)
    n = min(nq, np_)
    torch.testing.assert_close(
        colbert_scores_paired(qp_vecs[:n], qp_mask[:n], pp_vecs[:n], pp_mask[:n]),
        colbert_scores_paired(q_vecs[:n], q_mask[:n], p_vecs[:n], p_mask[:n]),
    )


# ---------------------------------------------------------------------------------------- passage order
@SETTINGS
@given(sizes, st.integers(1, 7), lengths, lengths, seeds)
def test_permuting_passages_permutes_columns(nq, np_, lq, lp, seed):
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(np_, generator=gen)
    q_ids, q_w = lexical(gen, nq, lq)
    p_ids, p_w = lexical(gen, np_, lp)
    torch.testing.assert_close(
        sparse_scores(q_ids, q_w, p_ids[perm], p_w[perm], chunk_size=3), sparse_scores(q_ids, q_w, p_ids, p_w)[:, perm]
    )
    q_vecs, q_mask = token_vectors(gen, nq, lq)
    p_vecs, p_mask = token_vectors(gen, np_, lp)
    torch.testing.assert_close(
        colbert_scores(q_vecs, q_mask, p_vecs[perm], p_mask[perm], block_elements=5),
        colbert_scores(q_vecs, q_mask, p_vecs, p_mask)[:, perm],
    )
    q_dense, p_dense = torch.randn(nq, 6, generator=gen), torch.randn(np_, 6, generator=gen)
    torch.testing.assert_close(dense_scores(q_dense, p_dense[perm]), dense_scores(q_dense, p_dense)[:, perm])


# ------------------------------------------------------------------------------------- repeated tokens
@SETTINGS
@given(sizes, sizes, lengths, lengths, st.integers(1, 5), st.floats(0.0, 0.999), seeds)
def test_sparse_unchanged_by_repeats_below_the_max(nq, np_, lq, lp, repeats, fraction, seed):
    """Appending, to a passage, copies of its own tokens with weights below their max changes nothing."""
    gen = torch.Generator().manual_seed(seed)
    q_ids, q_w = lexical(gen, nq, lq)
    p_ids, p_w = lexical(gen, np_, lp)
    p_w[:, 0] = p_w[:, 0] + 0.5  # at least one token with a positive weight per passage
    pos = torch.randint(0, lp, (np_, repeats), generator=gen)
    rep_ids = p_ids.gather(1, pos)
    vocab_max = torch.zeros(np_, 64).scatter_reduce(1, p_ids, p_w, reduce="amax")
    rep_w = vocab_max.gather(1, rep_ids) * fraction
    p2_ids, p2_w = torch.cat([p_ids, rep_ids], 1), torch.cat([p_w, rep_w], 1)
    torch.testing.assert_close(sparse_scores(q_ids, q_w, p2_ids, p2_w), sparse_scores(q_ids, q_w, p_ids, p_w))
    n = min(nq, np_)
    torch.testing.assert_close(
        sparse_scores_paired(q_ids[:n], q_w[:n], p2_ids[:n], p2_w[:n]),
        sparse_scores_paired(q_ids[:n], q_w[:n], p_ids[:n], p_w[:n]),
    )


# ----------------------------------------------------------------------------------------- extremes
@SETTINGS
@given(sizes, sizes, lengths, lengths, st.sampled_from([1e15, 1e-30, 0.0, 1.0]), seeds)
def test_sparse_finite_for_extreme_weights(nq, np_, lq, lp, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    q_ids, q_w = lexical(gen, nq, lq)
    p_ids, p_w = lexical(gen, np_, lp)
    q_w, p_w = q_w * scale, p_w * scale
    q_w.requires_grad_()
    scores = sparse_scores(q_ids, q_w, p_ids, p_w, chunk_size=2)
    assert scores.shape == (nq, np_) and torch.isfinite(scores).all()
    scores.sum().backward()
    assert torch.isfinite(q_w.grad).all()
    if scale == 0.0:
        assert (scores == 0).all()
    n = min(nq, np_)
    paired = sparse_scores_paired(q_ids[:n], q_w[:n], p_ids[:n], p_w[:n])
    assert paired.shape == (n,) and torch.isfinite(paired).all()


def test_sparse_all_zero_weights_keep_the_graph():
    q_w = torch.zeros(2, 3, requires_grad=True)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    scores = sparse_scores(ids, q_w, ids, torch.zeros(2, 3))
    paired = sparse_scores_paired(ids, q_w, ids, torch.zeros(2, 3))
    assert (scores == 0).all() and (paired == 0).all()
    (scores.sum() + paired.sum()).backward()  # differentiable even with nothing to match
    assert (q_w.grad == 0).all()


def test_single_token_texts():
    ids, w = torch.tensor([[4], [4], [5]]), torch.tensor([[2.0], [0.5], [3.0]])
    expected = torch.tensor([[4.0, 1.0, 0.0], [1.0, 0.25, 0.0], [0.0, 0.0, 9.0]])
    torch.testing.assert_close(sparse_scores(ids, w, ids, w, chunk_size=1), expected)
    torch.testing.assert_close(sparse_scores_paired(ids, w, ids, w), expected.diagonal())
    vecs, mask = torch.tensor([[[1.0, 0.0]], [[0.0, -1.0]]]), torch.ones(2, 1)
    torch.testing.assert_close(colbert_scores(vecs, mask, vecs, mask), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_empty_batches():
    ids, w = torch.tensor([[1, 2]]), torch.tensor([[1.0, 2.0]])
    none_ids, none_w = ids[:0], w[:0]
    assert sparse_scores(none_ids, none_w, ids, w).shape == (0, 1)
    assert sparse_scores(ids, w, none_ids, none_w).shape == (1, 0)
    assert sparse_scores_paired(none_ids, none_w, none_ids, none_w).shape == (0,)
    vecs, mask = torch.randn(2, 3, 4), torch.ones(2, 3)
    assert colbert_scores(vecs[:0], mask[:0], vecs, mask).shape == (0, 2)
    assert colbert_scores(vecs, mask, vecs[:0], mask[:0]).shape == (2, 0)
    assert colbert_scores_paired(vecs[:0], mask[:0], vecs[:0], mask[:0]).shape == (0,)
    assert dense_scores(torch.randn(0, 4), torch.randn(3, 4)).shape == (0, 3)


@SETTINGS
@given(sizes, sizes, lengths, lengths, st.sampled_from([1e15, 1e-30, 0.0]), seeds)
def test_colbert_finite_for_extreme_inputs(nq, np_, lq, lp, scale, seed):
    """Tiny, huge (products still in range) and zero vectors, fully masked texts: scores stay finite."""
    gen = torch.Generator().manual_seed(seed)
    q_vecs, q_mask = token_vectors(gen, nq, lq)
    p_vecs, p_mask = token_vectors(gen, np_, lp)
    q_mask[0] = 0  # a query without real tokens scores 0
    p_mask[-1] = 0  # so does a passage without real tokens
    q_vecs, p_vecs = q_vecs * scale, p_vecs * scale
    q_vecs.requires_grad_()
    for dtype in (torch.float32, torch.bfloat16):
        scores = colbert_scores(q_vecs.to(dtype), q_mask, p_vecs.to(dtype), p_mask, block_elements=3)
        assert scores.shape == (nq, np_) and torch.isfinite(scores).all()
        assert (scores[0] == 0).all() and (scores[:, -1] == 0).all()
    scores.float().sum().backward()
    assert torch.isfinite(q_vecs.grad).all()
    n = min(nq, np_)
    paired = colbert_scores_paired(q_vecs[:n], q_mask[:n], p_vecs[-n:], p_mask[-n:])
    assert torch.isfinite(paired).all() and paired[0] == 0 and paired[-1] == 0
