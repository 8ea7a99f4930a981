"""Scores of the three M3 heads and their hybrid: plain, differentiable tensor functions.

Training, inference and evaluation all score through this module. Shapes: ``Q`` queries, ``P`` passages,
``N`` query-passage pairs, ``L`` tokens, ``H`` hidden size, ``D`` ColBERT size.

*All-pairs* functions return a ``[Q, P]`` matrix; ``*_paired`` functions score ``q[i]`` with ``p[i]`` and
return ``[N]``. For retrieval over many texts, lexical weights also go into a ``scipy.sparse`` CSR matrix
``[N, vocab]`` (:func:`lexical_matrix`), scored queries x corpus by one sparse product
(:func:`compute_lexical_matching_scores`).
"""

from __future__ import annotations

from itertools import chain
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import scipy.sparse
import torch
from torch import Tensor

from .configuration_m3 import HEADS as HEADS  # re-exported: the heads scored here
from .defaults import BGE_M3_ENSEMBLE_WEIGHTS as BGE_M3_ENSEMBLE_WEIGHTS  # re-exported: BGE-M3's 1 : 0.3 : 1

# Elements of one intermediate ColBERT token-score block ([Q, chunk, Lq, Lp], or [pairs, Lq, Lp]).
DEFAULT_BLOCK_ELEMENTS = 1 << 25


# ----------------------------------------------------------------------------------------------- dense
def dense_scores(q: Tensor, p: Tensor) -> Tensor:
    """Inner products of dense vectors. ``q`` [Q, H], ``p`` [P, H] -> [Q, P]."""
    return q @ p.transpose(0, 1)


def dense_scores_paired(q: Tensor, p: Tensor) -> Tensor:
    """``q`` [N, H], ``p`` [N, H] -> [N]."""
    return (q * p).sum(-1)


# ---------------------------------------------------------------------------------------------- sparse
class PooledLexical(NamedTuple):
    """Max-pooled lexical weights in coordinate form: one entry per (text, token id) with weight > 0."""

    rows: Tensor  # [K] index of the text
    token_ids: Tensor  # [K] vocabulary id
    weights: Tensor  # [K] max weight of that token in that text
    num_rows: int


def pool_lexical(token_ids: Tensor, weights: Tensor) -> PooledLexical:
    """Max-pool token weights per vocabulary id, without any tensor of vocabulary size.

    ``token_ids`` [B, L] (long), ``weights`` [B, L] (>= 0; zero at padding and ignored tokens).
    Differentiable in ``weights`` (ties share the gradient). Entries of zero weight are dropped.
    """
    batch, length = token_ids.shape
    keep = weights > 0
    rows = torch.arange(batch, device=token_ids.device).unsqueeze(1).expand(batch, length)[keep]
    ids = token_ids[keep]
    w = weights[keep]
    if ids.numel() == 0:
        return PooledLexical(rows, ids, w, batch)
    id_base = int(ids.max()) + 1
    keys, inverse = torch.unique(rows * id_base + ids, return_inverse=True)
    pooled = w.new_zeros(keys.shape[0]).scatter_reduce(0, inverse, w, reduce="amax", include_self=False)
    return PooledLexical(keys // id_base, keys % id_base, pooled, batch)


def _query_columns(token_ids: Tensor, weights: Tensor) -> Tensor:
    """Sorted distinct ids of the tokens with a positive weight: ``[Q, Lq]`` -> ``[U]``."""
    return torch.unique(token_ids[weights > 0])


def _column_weights(token_ids: Tensor, weights: Tensor, columns: Tensor) -> Tensor:
    """Max-pooled weights of each text over ``columns`` (sorted distinct ids): ``[B, L]`` -> ``[B, U]``.

    Tokens whose id is not a column, and tokens of zero weight, are dropped (written to a spare column that is
    cut off): they neither score nor receive gradient. Differentiable in ``weights``; repeated ids in one text
    share the gradient of their maximum, as :func:`pool_lexical`. No host read, no tensor of vocabulary size.
    """
    batch, length = token_ids.shape
    num = columns.shape[0]
    if num == 0:
        return weights.new_zeros(batch, 0) + 0.0 * weights.sum()  # keeps the graph: zero gradients
    col = torch.searchsorted(columns, token_ids).clamp_(max=num - 1)
    hit = (columns[col] == token_ids) & (weights > 0)
    col = torch.where(hit, col, num)  # the spare column
    flat = (torch.arange(batch, device=token_ids.device).unsqueeze(1) * (num + 1) + col).reshape(-1)
    values = weights.reshape(-1)
    with torch.no_grad():  # which occurrences hold their cell's maximum, and how many tie for it
        best = values.new_zeros(batch * (num + 1)).scatter_reduce_(0, flat, values, reduce="amax")
        wins = (values == best[flat]) & hit.reshape(-1)
        share = wins.to(values.dtype) / values.new_zeros(best.shape).index_add_(0, flat, wins.to(values.dtype))[flat]
        del best
    # Each winner adds weight / ties: the maximum, and the gradient of scatter_reduce("amax") (ties share it), with
    # a backward of one gather instead of amax's several cell-sized buffers.
    out = values.new_zeros(batch * (num + 1)).index_add(0, flat, values * share.nan_to_num_(0.0))
    return out.view(batch, num + 1)[:, :num]


class LexicalColumns(NamedTuple):
    """Texts' max-pooled lexical weights over ``columns`` [U], the sorted distinct token ids (of positive weight)
    of those texts: ``matrix`` [N, U]. Only these ids can score against another text, so a tensor of this form
    scores all pairs on any device (:func:`sparse_scores_columns`) without a tensor of vocabulary size."""

    columns: Tensor
    matrix: Tensor


def lexical_columns(batches: Sequence[Tuple[Tensor, Tensor, Tensor]], num_rows: int) -> LexicalColumns:
    """:class:`LexicalColumns` of ``num_rows`` texts encoded in batches ``(rows [b], token_ids [b, L], weights
    [b, L])`` (``rows``: the texts' positions; ``L`` may differ between batches). On the batches' device."""
    columns = torch.unique(torch.cat([_query_columns(ids, w) for _, ids, w in batches]))
    matrix = batches[0][2].new_zeros(num_rows, columns.shape[0])
    for rows, ids, w in batches:
        matrix[rows] = _column_weights(ids, w, columns)
    return LexicalColumns(columns, matrix)


def sparse_scores_columns(queries: LexicalColumns, p_ids: Tensor, p_weights: Tensor, chunk_size: int = 4096) -> Tensor:
    """Lexical matching scores ``sum_t w_q(t) * w_p(t)`` of ``queries`` [Q, U] with passages ``p_ids``/``p_weights``
    [P, Lp] -> [Q, P]: passages max-pooled over the queries' columns, ``chunk_size`` at a time (memory
    ``[Q + chunk_size, U]``). Differentiable in both sides' weights."""
    blocks = [
        queries.matrix @ _column_weights(p_ids[s : s + chunk_size], p_weights[s : s + chunk_size], queries.columns).T
        for s in range(0, p_ids.shape[0], chunk_size)
    ]
    return torch.cat(blocks, dim=1) if blocks else queries.matrix.new_zeros(queries.matrix.shape[0], 0)


def sparse_scores(
    q_ids: Tensor, q_weights: Tensor, p_ids: Tensor, p_weights: Tensor, chunk_size: int = 4096
) -> Tensor:
    """Lexical matching scores ``sum_t w_q(t) * w_p(t)`` for all pairs.

    ``q_ids``/``q_weights`` [Q, Lq], ``p_ids``/``p_weights`` [P, Lp] -> [Q, P]. Exact and differentiable. Only a
    token that occurs in some query can score, so both sides are max-pooled over the ``U`` distinct query token
    ids (``U <= Q * Lq``): memory is ``[Q + chunk_size, U]``, whatever the vocabulary and the passages' own
    tokens; passages are scored ``chunk_size`` at a time (:func:`sparse_scores_columns`).
    """
    columns = _query_columns(q_ids, q_weights)
    queries = LexicalColumns(columns, _column_weights(q_ids, q_weights, columns))
    return sparse_scores_columns(queries, p_ids, p_weights, chunk_size)


def sparse_scores_paired(q_ids: Tensor, q_weights: Tensor, p_ids: Tensor, p_weights: Tensor) -> Tensor:
    """Lexical matching score of ``q[i]`` with ``p[i]``: [N, Lq] x [N, Lp] -> [N]."""
    q_pooled, p_pooled = pool_lexical(q_ids, q_weights), pool_lexical(p_ids, p_weights)
    n = q_ids.shape[0]
    if q_pooled.token_ids.numel() == 0 or p_pooled.token_ids.numel() == 0:
        return q_weights.new_zeros(n) + 0.0 * (q_weights.sum() + p_weights.sum())
    id_base = int(torch.cat([q_pooled.token_ids, p_pooled.token_ids]).max()) + 1
    keys = torch.cat([q_pooled.rows * id_base + q_pooled.token_ids, p_pooled.rows * id_base + p_pooled.token_ids])
    unique_keys, inverse = torch.unique(keys, return_inverse=True)
    nq = q_pooled.token_ids.shape[0]
    vq = q_pooled.weights.new_zeros(unique_keys.shape[0]).index_put((inverse[:nq],), q_pooled.weights)
    vp = p_pooled.weights.new_zeros(unique_keys.shape[0]).index_put((inverse[nq:],), p_pooled.weights)
    return (vq * vp).new_zeros(n).index_add(0, unique_keys // id_base, vq * vp)


def concat_lexical(parts: Sequence[Tuple[Tensor, PooledLexical]], num_rows: int) -> PooledLexical:
    """Pooled weights of several batches as one :class:`PooledLexical` over ``num_rows`` texts.

    ``parts``: per batch, ``(rows, pooled)`` with ``rows`` [b] (long) the text index of each batch row and
    ``pooled`` the batch's :func:`pool_lexical` output.
    """
    if not parts:
        empty = torch.empty(0, dtype=torch.long)
        return PooledLexical(empty, empty, torch.empty(0), num_rows)
    return PooledLexical(
        torch.cat([rows[pooled.rows] for rows, pooled in parts]),
        torch.cat([pooled.token_ids for _, pooled in parts]),
        torch.cat([pooled.weights for _, pooled in parts]),
        num_rows,
    )


LexicalInput = Union[PooledLexical, Sequence[Mapping[str, float]], scipy.sparse.spmatrix]


def lexical_matrix(
    lexical: LexicalInput, num_columns: Optional[int] = None, dtype: Any = np.float32
) -> scipy.sparse.csr_matrix:
    """Lexical weights as a sparse ``[N, num_columns]`` matrix (row ``i``: weight of each token id in text ``i``).

    ``lexical``: a :class:`PooledLexical` (from :func:`pool_lexical`), a
    list of ``{str(token_id): weight}`` dicts (``encode(...)["lexical_weights"]``) or a sparse matrix.
    ``num_columns`` defaults to the largest token id + 1 (pass the vocabulary size to fix it).
    """
    if scipy.sparse.issparse(lexical):
        matrix = scipy.sparse.csr_matrix(lexical, dtype=dtype)
        if num_columns is not None and num_columns != matrix.shape[1]:
            if num_columns < matrix.shape[1] and matrix.nnz and matrix.indices.max() >= num_columns:
                raise ValueError(f"token id {matrix.indices.max()} does not fit num_columns={num_columns}")
            matrix.resize(matrix.shape[0], num_columns)
        return matrix
    if isinstance(lexical, PooledLexical):
        rows = lexical.rows.detach().cpu().numpy()
        cols = lexical.token_ids.detach().cpu().numpy()
        data = lexical.weights.detach().float().cpu().numpy()
        num_rows = lexical.num_rows
    else:
        rows, cols, data = _dicts_to_coordinates(lexical)
        num_rows = len(lexical)
    needed = int(cols.max()) + 1 if cols.size else 0
    if num_columns is None:
        num_columns = needed
    elif needed > num_columns:
        raise ValueError(f"token id {needed - 1} does not fit num_columns={num_columns}")
    return scipy.sparse.csr_matrix((data.astype(dtype), (rows, cols)), shape=(num_rows, num_columns))


def _dicts_to_coordinates(dicts: Sequence[Mapping[str, float]]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices, token ids and weights of a list of ``{str(token_id): weight}`` dicts (a dict that carries
    ``arrays = (token_ids, weights)``, as ``M3Embedder.encode``'s do, is not parsed)."""
    counts = np.fromiter((len(d) for d in dicts), dtype=np.int64, count=len(dicts))
    if all(getattr(d, "arrays", None) is not None for d in dicts):  # encode()'s own dicts: no key parsing
        rows = np.repeat(np.arange(len(dicts), dtype=np.int64), counts)
        if not dicts:
            return rows, np.empty(0, np.int64), np.empty(0, np.float64)
        return rows, np.concatenate([d.arrays[0] for d in dicts]), np.concatenate([d.arrays[1] for d in dicts])
    total = int(counts.sum())
    try:
        cols = np.fromiter(map(int, chain.from_iterable(dicts)), dtype=np.int64, count=total)
    except (TypeError, ValueError) as err:
        raise ValueError(
            "lexical weights must be dicts keyed by token id (str(int), as encode() returns them), "
            f"not by token text: {err}"
        ) from err
    data = np.fromiter(chain.from_iterable(d.values() for d in dicts), dtype=np.float64, count=total)
    rows = np.repeat(np.arange(len(dicts), dtype=np.int64), counts)
    return rows, cols, data


def compute_lexical_matching_scores(queries_lexical: LexicalInput, corpus_lexical: LexicalInput) -> np.ndarray:
    """``sum_t w_q(t) * w_p(t)`` for every query and passage, by one sparse matrix product: ``[Q, P]``.

    Each side is anything :func:`lexical_matrix` takes; their column counts are aligned.
    """
    q = lexical_matrix(queries_lexical)
    p = lexical_matrix(corpus_lexical)
    columns = max(q.shape[1], p.shape[1])
    q, p = lexical_matrix(q, columns), lexical_matrix(p, columns)
    return np.asarray((q @ p.T).toarray())


# --------------------------------------------------------------------------------------------- colbert
def _maxsim(q_vecs: Tensor, q_mask: Tensor, p_vecs: Tensor, p_mask: Tensor, pattern: str) -> Tensor:
    token_scores = torch.einsum(pattern, q_vecs, p_vecs)  # [..., Lq, Lp]
    p_pad = ~p_mask.bool()
    p_pad = p_pad[None, :, None, :] if pattern.endswith("qpij") else p_pad[:, None, :]
    token_scores = token_scores.masked_fill(p_pad, torch.finfo(token_scores.dtype).min)
    best = token_scores.max(-1).values  # [..., Lq]
    # A passage without any real token scores 0 (not finfo.min per query token, which sums to -inf).
    p_empty = ~p_mask.bool().any(-1)
    best = best.masked_fill(p_empty[None, :, None] if pattern.endswith("qpij") else p_empty[:, None], 0.0)
    q_mask_f = q_mask.to(best.dtype)
    if pattern.endswith("qpij"):
        return (best * q_mask_f[:, None, :]).sum(-1) / q_mask_f.sum(-1, keepdim=True).clamp(min=1)
    return (best * q_mask_f).sum(-1) / q_mask_f.sum(-1).clamp(min=1)


def colbert_scores(
    q_vecs: Tensor,
    q_mask: Tensor,
    p_vecs: Tensor,
    p_mask: Tensor,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> Tensor:
    """MaxSim of every query token over a passage's tokens, averaged over the query's tokens.

    ``q_vecs`` [Q, Lq, D], ``q_mask`` [Q, Lq], ``p_vecs`` [P, Lp, D], ``p_mask`` [P, Lp] -> [Q, P].
    Masks are 1 for real tokens (for M3 vectors: every token after CLS, SEP/EOS included); masked passage
    tokens never match, and a passage with no real token scores 0. Passages are
    processed in chunks so that one ``[Q, chunk, Lq, Lp]`` block has at most ``block_elements`` entries.
    """
    per_passage = max(1, q_vecs.shape[0] * q_vecs.shape[1] * p_vecs.shape[1])
    chunk = max(1, block_elements // per_passage)
    blocks = [
        _maxsim(q_vecs, q_mask, p_vecs[s : s + chunk], p_mask[s : s + chunk], "qid,pjd->qpij")
        for s in range(0, p_vecs.shape[0], chunk)
    ]
    return torch.cat(blocks, dim=1) if blocks else q_vecs.new_zeros(q_vecs.shape[0], 0)


def colbert_scores_paired(q_vecs: Tensor, q_mask: Tensor, p_vecs: Tensor, p_mask: Tensor) -> Tensor:
    """``q_vecs`` [N, Lq, D], ``p_vecs`` [N, Lp, D] (with masks) -> [N]."""
    return _maxsim(q_vecs, q_mask, p_vecs, p_mask, "nid,njd->nij")


# ---------------------------------------------------------------------------------------------- hybrid


def hybrid_scores(
    scores: Mapping[str, Optional[Tensor]], weights: Mapping[str, float], normalize: bool = False
) -> Tensor:
    """Weighted sum of per-head scores of one shape; heads with weight 0 or no scores are skipped.

    ``normalize=True`` divides by the sum of the weights used (``BGEM3FlagModel.compute_score``);
    ``False`` is the training ensemble ``dense + 0.3 * sparse + colbert`` of BGE-M3.
    """
    used = [(name, w) for name, w in weights.items() if w != 0 and scores.get(name) is not None]
    if not used:
        raise ValueError(f"no scores for any head with a non-zero weight: weights={dict(weights)}")
    total = sum(w * scores[name] for name, w in used)
    return total / sum(w for _, w in used) if normalize else total
