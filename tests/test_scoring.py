"""Scores of the three heads: hand-checked 2x2 examples, and comparisons with plain reference implementations."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from flagm3.scoring import (
    BGE_M3_ENSEMBLE_WEIGHTS,
    colbert_scores,
    colbert_scores_paired,
    compute_lexical_matching_scores,
    concat_lexical,
    dense_scores,
    dense_scores_paired,
    hybrid_scores,
    lexical_matrix,
    pool_lexical,
    sparse_scores,
    sparse_scores_paired,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from sparse_scoring import union_columns_scores  # noqa: E402  (the earlier scorer, kept once, as the benchmark's baseline)


# ------------------------------------------------------------------------------------------ references
def vocab_vectors(ids: torch.Tensor, weights: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, L] ids and weights -> [B, V] max-pooled lexical vectors (the vocabulary-sized reference)."""
    out = weights.new_zeros(ids.shape[0], vocab_size)
    return out.scatter_reduce(1, ids, weights, reduce="amax", include_self=True)


def sparse_reference(q_ids, q_w, p_ids, p_w, vocab_size: int) -> torch.Tensor:
    return vocab_vectors(q_ids, q_w, vocab_size) @ vocab_vectors(p_ids, p_w, vocab_size).T


def colbert_reference(q_vecs, q_mask, p_vecs, p_mask) -> torch.Tensor:
    """Loop over query/passage pairs: for each real query token the best real passage token, averaged."""
    out = torch.zeros(q_vecs.shape[0], p_vecs.shape[0], dtype=torch.float64)
    for i in range(q_vecs.shape[0]):
        for j in range(p_vecs.shape[0]):
            q_tok = q_vecs[i][q_mask[i].bool()].double()
            p_tok = p_vecs[j][p_mask[j].bool()].double()
            if len(q_tok) == 0 or len(p_tok) == 0:
                continue
            out[i, j] = (q_tok @ p_tok.T).max(dim=1).values.mean()
    return out


def random_lexical(gen: torch.Generator, batch: int, length: int, vocab: int, pad_from: int | None = None):
    """Ids with repeats (small vocabulary), weights with exact zeros, right padding of random length."""
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    weights = torch.rand(batch, length, generator=gen) * 3
    weights[torch.rand(batch, length, generator=gen) < 0.2] = 0.0
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return ids, weights * mask


def random_colbert(gen: torch.Generator, batch: int, length: int, dim: int):
    vecs = torch.randn(batch, length, dim, generator=gen)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    vecs = vecs + 10.0 * (1 - mask)[..., None]  # large pad vectors: they must never win a MaxSim
    return vecs, mask


# -------------------------------------------------------------------------------- hand-checked examples
def test_dense_scores_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    p = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    expected = torch.tensor([[0.6, 0.0], [1.0, 0.8]])
    torch.testing.assert_close(dense_scores(q, p), expected)
    torch.testing.assert_close(dense_scores_paired(q, p), torch.tensor([0.6, 0.8]))


SPARSE_Q_IDS = torch.tensor([[5, 7], [7, 7]])
SPARSE_Q_W = torch.tensor([[0.5, 2.0], [1.0, 3.0]])  # q1: token 7 twice, max 3.0
SPARSE_P_IDS = torch.tensor([[7, 9], [5, 7]])
SPARSE_P_W = torch.tensor([[4.0, 1.0], [2.0, 0.5]])
# q0={5:.5, 7:2}, q1={7:3}, p0={7:4, 9:1}, p1={5:2, 7:.5}
SPARSE_EXPECTED = torch.tensor([[2.0 * 4.0, 0.5 * 2.0 + 2.0 * 0.5], [3.0 * 4.0, 3.0 * 0.5]])


def test_sparse_scores_by_hand():
    torch.testing.assert_close(sparse_scores(SPARSE_Q_IDS, SPARSE_Q_W, SPARSE_P_IDS, SPARSE_P_W), SPARSE_EXPECTED)
    torch.testing.assert_close(
        sparse_scores_paired(SPARSE_Q_IDS, SPARSE_Q_W, SPARSE_P_IDS, SPARSE_P_W), torch.tensor([8.0, 1.5])
    )


def test_pool_lexical_by_hand():
    ids = torch.tensor([[5, 7, 7, 0], [7, 7, 3, 3]])
    weights = torch.tensor([[0.5, 2.0, 1.0, 0.0], [1.0, 3.0, 0.0, 0.0]])
    pooled = pool_lexical(ids, weights)
    got = sorted(zip(pooled.rows.tolist(), pooled.token_ids.tolist(), pooled.weights.tolist()))
    assert got == [(0, 5, 0.5), (0, 7, 2.0), (1, 7, 3.0)]  # zero weights (pads, token 3) dropped
    assert pooled.num_rows == 2


def test_batches_into_one_csr_matrix_by_hand():
    """Batches of texts 2, 0 and 1 (out of order, as length-sorted encoding gives them) become CSR rows 0..2."""
    first = pool_lexical(torch.tensor([[4, 4, 9], [9, 2, 0]]), torch.tensor([[1.0, 3.0, 0.5], [2.0, 0.0, 0.0]]))
    second = pool_lexical(torch.tensor([[2, 2]]), torch.tensor([[0.25, 0.75]]))
    pooled = concat_lexical([(torch.tensor([2, 0]), first), (torch.tensor([1]), second)], num_rows=4)
    matrix = lexical_matrix(pooled, num_columns=10).toarray()
    expected = torch.zeros(4, 10)
    expected[2, 4], expected[2, 9], expected[0, 9], expected[1, 2] = 3.0, 0.5, 2.0, 0.75  # max per (text, id)
    assert matrix.shape == (4, 10) and (matrix == expected.numpy()).all()  # row 3: no batch, stays empty
    scores = compute_lexical_matching_scores(pooled, [{"9": 2.0, "2": 1.0}])
    assert scores.tolist() == [[4.0], [0.75], [1.0], [0.0]]
    assert concat_lexical([], num_rows=2).num_rows == 2


COLBERT_Q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 0.0]]])
COLBERT_Q_MASK = torch.tensor([[1, 1], [1, 0]])
COLBERT_P = torch.tensor([[[1.0, 0.0], [0.0, 5.0]], [[0.6, 0.8], [-1.0, 0.0]]])  # p0's second token is a pad
COLBERT_P_MASK = torch.tensor([[1, 0], [1, 1]])
# (q0,p0): (1 + 0)/2; (q0,p1): (0.6 + 0.8)/2; (q1,p0): 1/1; (q1,p1): 0.6/1
COLBERT_EXPECTED = torch.tensor([[0.5, 0.7], [1.0, 0.6]])


def test_colbert_scores_by_hand():
    got = colbert_scores(COLBERT_Q, COLBERT_Q_MASK, COLBERT_P, COLBERT_P_MASK)
    torch.testing.assert_close(got, COLBERT_EXPECTED)
    paired = colbert_scores_paired(COLBERT_Q, COLBERT_Q_MASK, COLBERT_P, COLBERT_P_MASK)
    torch.testing.assert_close(paired, torch.tensor([0.5, 0.6]))


def test_hybrid_scores_by_hand():
    dense = torch.tensor([[0.6, 0.0], [1.0, 0.8]])
    scores = {"dense": dense, "sparse": SPARSE_EXPECTED, "colbert": COLBERT_EXPECTED}
    expected = torch.tensor([[0.6 + 0.3 * 8 + 0.5, 0.0 + 0.3 * 2 + 0.7], [1.0 + 0.3 * 12 + 1.0, 0.8 + 0.3 * 1.5 + 0.6]])
    torch.testing.assert_close(hybrid_scores(scores, BGE_M3_ENSEMBLE_WEIGHTS), expected)
    torch.testing.assert_close(hybrid_scores(scores, BGE_M3_ENSEMBLE_WEIGHTS, normalize=True), expected / 2.3)


def test_hybrid_skips_zero_weights_and_missing_heads():
    dense = torch.tensor([[0.6, 0.0], [1.0, 0.8]])
    scores = {"dense": dense, "sparse": None, "colbert": COLBERT_EXPECTED}
    weights = {"dense": 0.4, "sparse": 0.3, "colbert": 0.2}  # sparse has no scores: skipped
    torch.testing.assert_close(hybrid_scores(scores, weights), 0.4 * dense + 0.2 * COLBERT_EXPECTED)
    torch.testing.assert_close(
        hybrid_scores(scores, weights, normalize=True), (0.4 * dense + 0.2 * COLBERT_EXPECTED) / 0.6
    )
    only_dense = {"dense": 2.0, "colbert": 0.0}
    torch.testing.assert_close(hybrid_scores(scores, only_dense, normalize=True), dense)
    with pytest.raises(ValueError, match="no scores"):
        hybrid_scores({"dense": dense}, {"dense": 0.0, "sparse": 1.0})


# ------------------------------------------------------------------- sparse against the vocabulary reference
@pytest.mark.parametrize("chunk_size", [1, 3, 4096])
def test_sparse_scores_match_vocabulary_reference(chunk_size):
    gen = torch.Generator().manual_seed(0)
    vocab = 23
    q_ids, q_w = random_lexical(gen, 5, 9, vocab)
    p_ids, p_w = random_lexical(gen, 7, 13, vocab)
    expected = sparse_reference(q_ids, q_w, p_ids, p_w, vocab)
    got = sparse_scores(q_ids, q_w, p_ids, p_w, chunk_size=chunk_size)
    assert got.shape == (5, 7)
    torch.testing.assert_close(got, expected)


def test_sparse_scores_paired_match_vocabulary_reference():
    gen = torch.Generator().manual_seed(1)
    vocab = 17
    q_ids, q_w = random_lexical(gen, 6, 8, vocab)
    p_ids, p_w = random_lexical(gen, 6, 11, vocab)
    expected = (vocab_vectors(q_ids, q_w, vocab) * vocab_vectors(p_ids, p_w, vocab)).sum(-1)
    torch.testing.assert_close(sparse_scores_paired(q_ids, q_w, p_ids, p_w), expected)


def test_sparse_scores_large_token_ids():
    """Ids near a 250k vocabulary (XLM-RoBERTa) pool and match like small ones."""
    gen = torch.Generator().manual_seed(2)
    q_ids, q_w = random_lexical(gen, 3, 6, 10)
    p_ids, p_w = random_lexical(gen, 4, 6, 10)
    offset = 250_000
    expected = sparse_reference(q_ids, q_w, p_ids, p_w, 10)
    torch.testing.assert_close(sparse_scores(q_ids + offset, q_w, p_ids + offset, p_w, chunk_size=3), expected)
    torch.testing.assert_close(
        sparse_scores_paired(q_ids[:3] + offset, q_w[:3], p_ids[:3] + offset, p_w[:3]), expected.diagonal()[:3]
    )


def test_sparse_gradients_match_vocabulary_reference():
    gen = torch.Generator().manual_seed(3)
    vocab = 19
    q_ids, _ = random_lexical(gen, 4, 7, vocab)
    p_ids, _ = random_lexical(gen, 5, 9, vocab)
    # Strictly positive, distinct weights (no ties); padding through a mask as in the model's sparse head.
    q_raw = (torch.rand(4, 7, generator=gen) + 0.1).double()
    p_raw = (torch.rand(5, 9, generator=gen) + 0.1).double()
    q_mask = torch.ones(4, 7, dtype=torch.float64)
    q_mask[1, 4:] = 0
    p_mask = torch.ones(5, 9, dtype=torch.float64)
    p_mask[2, 3:] = 0
    upstream = torch.randn(4, 5, generator=gen).double()

    def grads(fn):
        qr, pr = q_raw.clone().requires_grad_(), p_raw.clone().requires_grad_()
        scores = fn(qr * q_mask, pr * p_mask)
        (scores * upstream[: scores.shape[0], : scores.shape[-1]]).sum().backward()
        return qr.grad, pr.grad

    got = grads(lambda qw, pw: sparse_scores(q_ids, qw, p_ids, pw, chunk_size=2))
    expected = grads(lambda qw, pw: sparse_reference(q_ids, qw, p_ids, pw, vocab))
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    assert got[0].abs().sum() > 0 and got[1].abs().sum() > 0
    assert (got[0][1, 4:] == 0).all() and (got[1][2, 3:] == 0).all()  # padding
    # Of a token repeated in one text, only the occurrence with the max weight receives gradient.
    for ids, raw, grad in ((q_ids, q_raw, got[0]), (p_ids, p_raw, got[1])):
        for row in range(ids.shape[0]):
            for token in ids[row].unique():
                where = (ids[row] == token).nonzero().flatten()
                if len(where) > 1:
                    losers = where[raw[row, where] < raw[row, where].max()]
                    assert (grad[row, losers] == 0).all()

    paired_q = grads(lambda qw, pw: sparse_scores_paired(q_ids, qw, p_ids[:4], pw[:4]))
    paired_ref = grads(
        lambda qw, pw: (vocab_vectors(q_ids, qw, vocab) * vocab_vectors(p_ids[:4], pw[:4], vocab)).sum(-1)
    )
    torch.testing.assert_close(paired_q[0], paired_ref[0])
    torch.testing.assert_close(paired_q[1], paired_ref[1])


@pytest.mark.parametrize("seed", range(6))
def test_query_columns_equal_union_columns_and_dense_reference(seed):
    """Query-token columns give the scores and gradients of the union-column implementation and of the
    vocabulary-sized reference: repeated ids (with tied weights too), padding, special tokens (weight 0 from the
    model's mask), passage tokens no query has, a query with no positive weight."""
    gen = torch.Generator().manual_seed(100 + seed)
    vocab, special = 31, torch.tensor([0, 1, 2])  # CLS / pad / EOS-like ids: the model gives them weight 0
    q_ids, _ = random_lexical(gen, 4, 7, vocab)
    p_ids, _ = random_lexical(gen, 9, 11, vocab)
    p_ids[:, -2:] = torch.randint(vocab, vocab + 50, (9, 2), generator=gen)  # ids no query has
    q_ids[:, 0] = 0
    p_ids[:, 0] = 0
    q_raw, p_raw = torch.rand(4, 7, generator=gen).double(), torch.rand(9, 11, generator=gen).double()
    q_raw[0, 1:4] = 2.0  # tied weights of one repeated id (the maximum: other weights are < 1)
    q_ids[0, 1:4] = 5
    p_raw[3, 4:7] = 2.0
    p_ids[3, 4:7] = 5

    def model_mask(ids, lengths):  # the sparse head's zeros: padding and special tokens
        pad = torch.arange(ids.shape[1])[None, :] < torch.tensor(lengths)[:, None]
        return (pad & ~torch.isin(ids, special)).double()

    q_mask = model_mask(q_ids, [7, 5, 3, 1])  # the last query: only CLS, no weight at all
    p_lengths = torch.randint(1, 12, (9,), generator=gen)
    p_lengths[3] = 11  # keeps the tied repeats
    p_mask = model_mask(p_ids, p_lengths.tolist())
    upstream = torch.randn(4, 9, generator=gen).double()

    def run(fn):
        qr, pr = q_raw.clone().requires_grad_(), p_raw.clone().requires_grad_()
        scores = fn(q_ids, torch.relu(qr) * q_mask, p_ids, torch.relu(pr) * p_mask)
        (scores * upstream).sum().backward()
        return scores.detach(), qr.grad, pr.grad

    got = run(lambda *a: sparse_scores(*a, chunk_size=4))
    union = run(lambda *a: union_columns_scores(*a, chunk_size=4))
    dense = run(lambda *a: sparse_reference(*a, vocab + 50))
    for expected in (union, dense):
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    assert (got[0][3] == 0).all() and got[1].abs().sum() > 0 and got[2].abs().sum() > 0
    assert (got[2][:, -2:] == 0).all()  # tokens of no query: no gradient
    assert got[1][0, 1] == got[1][0, 2] == got[1][0, 3] != 0  # a tie shares the gradient


def test_sparse_scores_no_query_weight_and_no_passages():
    q_ids, p_ids = torch.tensor([[3, 4]]), torch.tensor([[3, 4], [5, 6]])
    q_w = torch.zeros(1, 2, requires_grad=True)
    p_w = torch.ones(2, 2, requires_grad=True)
    scores = sparse_scores(q_ids, q_w, p_ids, p_w)
    assert scores.shape == (1, 2) and (scores == 0).all()
    scores.sum().backward()
    assert (q_w.grad == 0).all() and (p_w.grad == 0).all()
    assert sparse_scores(q_ids, q_w, p_ids[:0], p_w[:0]).shape == (1, 0)


# ------------------------------------------------------------------------ ColBERT against a reference loop
@pytest.mark.parametrize("block_elements", [1, 50, 1 << 25])
def test_colbert_scores_match_reference_loop(block_elements):
    gen = torch.Generator().manual_seed(4)
    q_vecs, q_mask = random_colbert(gen, 3, 5, 4)
    p_vecs, p_mask = random_colbert(gen, 6, 8, 4)
    got = colbert_scores(q_vecs, q_mask, p_vecs, p_mask, block_elements=block_elements)
    assert got.shape == (3, 6)
    torch.testing.assert_close(got.double(), colbert_reference(q_vecs, q_mask, p_vecs, p_mask))


def test_colbert_scores_paired_match_reference_loop():
    gen = torch.Generator().manual_seed(5)
    q_vecs, q_mask = random_colbert(gen, 4, 6, 3)
    p_vecs, p_mask = random_colbert(gen, 4, 7, 3)
    expected = colbert_reference(q_vecs, q_mask, p_vecs, p_mask).diagonal()
    torch.testing.assert_close(colbert_scores_paired(q_vecs, q_mask, p_vecs, p_mask).double(), expected)


def test_colbert_gradients_match_reference_loop():
    gen = torch.Generator().manual_seed(6)
    q_vecs, q_mask = random_colbert(gen, 2, 4, 3)
    p_vecs, p_mask = random_colbert(gen, 3, 5, 3)

    def grads(fn):
        q, p = q_vecs.double().requires_grad_(), p_vecs.double().requires_grad_()
        fn(q, p).sum().backward()
        return q.grad, p.grad

    got = grads(lambda q, p: colbert_scores(q, q_mask, p, p_mask, block_elements=1))
    expected = grads(lambda q, p: colbert_reference(q, q_mask, p, p_mask))
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    assert (got[1][~p_mask.bool()] == 0).all()  # padding never receives gradient


# ------------------------------------------------------------------------------------------- bf16 inputs
def test_sparse_and_colbert_on_bf16_inputs():
    gen = torch.Generator().manual_seed(7)
    q_ids, q_w = random_lexical(gen, 4, 9, 29)
    p_ids, p_w = random_lexical(gen, 6, 12, 29)
    q_bf, p_bf = q_w.bfloat16(), p_w.bfloat16()
    expected = sparse_reference(q_ids, q_bf.float(), p_ids, p_bf.float(), 29)
    got = sparse_scores(q_ids, q_bf, p_ids, p_bf, chunk_size=4)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)
    paired = sparse_scores_paired(q_ids, q_bf, p_ids[:4], p_bf[:4])
    torch.testing.assert_close(paired.float(), expected.diagonal(), rtol=2e-2, atol=2e-2)

    q_vecs, q_mask = random_colbert(gen, 3, 6, 8)
    p_vecs, p_mask = random_colbert(gen, 5, 7, 8)
    q_vbf, p_vbf = q_vecs.bfloat16(), p_vecs.bfloat16()
    expected = colbert_reference(q_vbf.float(), q_mask, p_vbf.float(), p_mask).float()
    got = colbert_scores(q_vbf, q_mask, p_vbf, p_mask, block_elements=100)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)
    paired = colbert_scores_paired(q_vbf, q_mask, p_vbf[:3], p_mask[:3])
    torch.testing.assert_close(paired.float(), expected.diagonal(), rtol=2e-2, atol=2e-2)
