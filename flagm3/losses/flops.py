"""The FLOPS regulariser of a sparse head (Paria et al. 2020, as SPLADE uses it), with a target activity.

``FLOPS = sum_t (mean_i w_i(t))^2`` over the vocabulary ``t``, with ``w_i(t)`` text ``i``'s max-pooled weight of
token ``t`` (:func:`flagm3.scoring.pool_lexical`: no vocabulary-sized tensor). It pushes down the weights of
tokens active in many texts, so fewer tokens stay active per text (a smaller inverted index, cheaper search).
With a target number of active tokens per text the term is applied only while the batch's mean is above it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..scoring import pool_lexical


def flops(token_ids: Tensor, weights: Tensor) -> Tensor:
    """``sum_t (mean_i w_i(t))^2`` for ``token_ids``/``weights`` [N, L] (weights 0 at padding) -> scalar."""
    pooled = pool_lexical(token_ids, weights)
    if pooled.token_ids.numel() == 0:
        return weights.sum() * 0.0
    _, column = torch.unique(pooled.token_ids, return_inverse=True)
    mean = pooled.weights.new_zeros(int(column.max()) + 1).index_add(0, column, pooled.weights) / pooled.num_rows
    return (mean ** 2).sum()


def flops_penalty(token_ids: Tensor, weights: Tensor, weight: float, target: Optional[float]) -> Tensor:
    """``weight * flops`` while the texts' mean number of active tokens is above ``target`` (always when
    ``target`` is ``None``), else 0 (with the graph kept, so every process runs the same backward)."""
    value = weight * flops(token_ids, weights)
    if target is None:
        return value
    active = (weights.detach() > 0).sum(1).float().mean()
    return value * (active > target).to(value.dtype)
