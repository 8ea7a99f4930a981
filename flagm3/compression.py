"""Smaller M3 vectors at encode time: Matryoshka truncation, ColBERT token pooling, sparse pruning, index sizes.

* :func:`truncate`: the first ``d`` dimensions of dense or ColBERT vectors, renormalised when the model
  normalises (what Matryoshka training, ``--mrl_dims``, trains for; :mod:`flagm3.losses.matryoshka`).
* :func:`pool_tokens`: hierarchical clustering of one passage's ColBERT token vectors into
  ``max(1, n // pool_factor)`` clusters (Ward linkage, scipy), each replaced by its mean (Clavié et al. 2024,
  arXiv 2409.14683). Queries are never pooled.
* :func:`prune_lexical`: a text's lexical weights cut to its ``top_k`` tokens and/or those >= ``threshold``.
* :func:`index_bytes_per_passage`: what a served index stores per passage for each head.

:class:`Compression` carries the settings; :class:`flagm3.inference.M3Embedder` applies them to the passage
side (``encode_corpus``, ``iter_outputs(passage=True)``) and the dimensions to both sides, so the M3Embedder,
an ONNX export and a Qdrant collection all see the same vectors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# Bytes one stored value takes: float32 vectors, Qdrant's int8 scalar and 1-bit binary quantisation.
VALUE_BYTES = {"float32": 4.0, "int8": 1.0, "binary": 1 / 8}
SPARSE_ENTRY_BYTES = 8  # a sparse vector entry: uint32 token id + float32 weight


@dataclass(frozen=True)
class Compression:
    """Encode-time compression. ``None``/1 fields leave a head as the model gives it.

    dense_dim, colbert_dim: keep the first dimensions (renormalised when the model normalises); both sides.
    pool_factor: ColBERT token pooling of passages (``n`` tokens -> ``max(1, n // pool_factor)`` vectors).
    sparse_top_k, sparse_threshold: passages' lexical weights pruned to the top-k tokens / weights >= threshold.
    """

    dense_dim: Optional[int] = None
    colbert_dim: Optional[int] = None
    pool_factor: int = 1
    sparse_top_k: Optional[int] = None
    sparse_threshold: Optional[float] = None

    def __post_init__(self) -> None:
        for name in ("dense_dim", "colbert_dim", "sparse_top_k"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if int(self.pool_factor) < 1:
            raise ValueError(f"pool_factor must be >= 1, got {self.pool_factor}")
        if self.sparse_threshold is not None and self.sparse_threshold < 0:
            raise ValueError(f"sparse_threshold must be >= 0, got {self.sparse_threshold}")

    def dims_only(self) -> Compression:
        """The settings that apply to queries too: dimensions only (no pooling, no pruning)."""
        return Compression(dense_dim=self.dense_dim, colbert_dim=self.colbert_dim)

    def replace(self, **changes: Any) -> Compression:
        """A copy with the given (non-``None``) fields changed."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and not (k == "pool_factor" and v == 1)}

    @classmethod
    def from_dict(cls, values: Optional[Mapping[str, Any]]) -> Compression:
        return cls(**dict(values or {}))

    @property
    def is_identity(self) -> bool:
        return not self.to_dict()


# ------------------------------------------------------------------------------------------- dimensions
def truncate(vecs: Tensor, dim: Optional[int], normalize: bool) -> Tensor:
    """The first ``dim`` dimensions of ``vecs`` [..., D] -> [..., dim] (``None`` or ``dim >= D``: unchanged),
    L2-normalised when ``normalize`` (zero vectors, ColBERT's padding, stay zero)."""
    if dim is None or dim >= vecs.shape[-1]:
        return vecs
    vecs = vecs[..., :dim]
    return F.normalize(vecs, dim=-1) if normalize else vecs


# ---------------------------------------------------------------------------------------- token pooling
def pool_tokens(vecs: Tensor, pool_factor: int, normalize: bool = True) -> Tensor:
    """One passage's token vectors ``[n, D]`` -> ``[max(1, n // pool_factor), D]``: Ward hierarchical clustering
    (in float64, deterministic) cut into that many clusters, each the mean of its vectors, renormalised when
    ``normalize``; clusters in the order of their first token. ``pool_factor`` 1 or ``n <= 1``: unchanged."""
    n = vecs.shape[0]
    clusters = max(1, n // pool_factor)
    if pool_factor <= 1 or n <= 1 or clusters >= n:
        return vecs
    from scipy.cluster.hierarchy import fcluster, linkage

    points = vecs.detach().double().cpu().numpy()
    labels = fcluster(linkage(points, method="ward"), t=clusters, criterion="maxclust")
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # cluster k of the output: the k-th by first token
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    index = torch.as_tensor(rank[inverse], device=vecs.device)
    sums = vecs.new_zeros(order.size, vecs.shape[1]).index_add(0, index, vecs)
    means = sums / torch.bincount(index, minlength=order.size).to(vecs.dtype).unsqueeze(1)
    return F.normalize(means, dim=-1) if normalize else means


def pool_colbert_batch(vecs: Tensor, mask: Tensor, pool_factor: int, normalize: bool = True) -> Tuple[Tensor, Tensor]:
    """:func:`pool_tokens` for each text of a batch: ``vecs`` [b, L, D], ``mask`` [b, L] (1 for real tokens,
    right- or left-padded) -> pooled vectors [b, L', D] (right-padded with zeros) and their mask [b, L']."""
    if pool_factor <= 1:
        return vecs, mask
    pooled = [pool_tokens(v[m.bool()], pool_factor, normalize) for v, m in zip(vecs, mask)]
    length = max((p.shape[0] for p in pooled), default=0)
    out = vecs.new_zeros(vecs.shape[0], length, vecs.shape[2])
    out_mask = mask.new_zeros(mask.shape[0], length)
    for row, p in enumerate(pooled):
        out[row, : p.shape[0]] = p
        out_mask[row, : p.shape[0]] = 1
    return out, out_mask


# ------------------------------------------------------------------------------------------- sparse pruning
def prune_lexical(token_ids: Tensor, weights: Tensor, top_k: Optional[int] = None,
                  threshold: Optional[float] = None) -> Tensor:
    """``weights`` [b, L] with every position zeroed whose token is not kept: tokens (distinct ids, scored by
    their max weight in the text) below ``threshold``, and beyond each text's ``top_k`` best (ties: lower id
    first). The max-pooled weights of the kept tokens are unchanged."""
    if threshold is not None:
        weights = weights * (weights >= threshold).to(weights.dtype)
    if top_k is None:
        return weights
    from .scoring import pool_lexical

    pooled = pool_lexical(token_ids, weights)
    if pooled.token_ids.numel() == 0:
        return weights
    # rank each text's tokens: sort by (row, -weight, id), then position within the row
    order = torch.argsort(pooled.token_ids, stable=True)
    order = order[torch.argsort(-pooled.weights[order], stable=True)]
    order = order[torch.argsort(pooled.rows[order], stable=True)]
    rows = pooled.rows[order]
    starts = torch.searchsorted(rows, rows, right=False)
    keep = order[(torch.arange(rows.numel(), device=rows.device) - starts) < top_k]
    base = int(token_ids.max()) + 1
    kept_keys = pooled.rows[keep] * base + pooled.token_ids[keep]
    row_index = torch.arange(token_ids.shape[0], device=token_ids.device).unsqueeze(1)
    keys = row_index * base + token_ids
    return weights * torch.isin(keys, kept_keys).to(weights.dtype)


# --------------------------------------------------------------------------------------------- index sizes
def index_bytes_per_passage(dense_dim: int, sparse_entries: float, colbert_vectors: float, colbert_dim: int,
                            quantization: Optional[str] = None) -> Dict[str, float]:
    """Bytes a served index stores per passage (vectors only, no index structures or payload): ``dense``
    ``dense_dim`` values, ``sparse`` ``sparse_entries`` (id, weight) pairs, ``colbert`` ``colbert_vectors``
    vectors of ``colbert_dim`` values; ``quantization`` (``int8``/``binary``) applies to dense and ColBERT
    (Qdrant keeps the float32 originals too, on disk, for rescoring: not counted)."""
    value = VALUE_BYTES[quantization or "float32"]
    return {"dense": dense_dim * value, "sparse": sparse_entries * SPARSE_ENTRY_BYTES,
            "colbert": colbert_vectors * colbert_dim * value}


class PassageStats:
    """Running counts over encoded passages (what an index of them stores): texts, sparse entries (distinct
    token ids with a positive weight) and ColBERT vectors (after pooling)."""

    def __init__(self) -> None:
        self.texts = 0
        self.sparse_texts = self.sparse_entries = 0
        self.colbert_texts = self.colbert_vectors = 0

    def update(self, out: Mapping[str, Tensor]) -> None:
        """Count one batch of :meth:`M3Embedder.iter_outputs` outputs."""
        first = next(iter(out.values()))
        self.texts += first.shape[0]
        if "sparse_weights" in out:
            from .scoring import pool_lexical

            self.sparse_texts += out["sparse_ids"].shape[0]
            self.sparse_entries += int(pool_lexical(out["sparse_ids"], out["sparse_weights"]).token_ids.numel())
        if "colbert_mask" in out:
            self.colbert_texts += out["colbert_mask"].shape[0]
            self.colbert_vectors += int(out["colbert_mask"].sum())

    def mean_sparse_entries(self) -> float:
        return self.sparse_entries / max(1, self.sparse_texts)

    def mean_colbert_vectors(self) -> float:
        return self.colbert_vectors / max(1, self.colbert_texts)

    def bytes_per_passage(self, dense_dim: int, colbert_dim: int, quantization: Optional[str] = None) -> Dict[str, float]:
        """:func:`index_bytes_per_passage` at the counted means (a head never encoded: 0)."""
        sizes = index_bytes_per_passage(dense_dim, self.mean_sparse_entries(), self.mean_colbert_vectors(),
                                        colbert_dim, quantization)
        if not self.sparse_texts:
            sizes["sparse"] = 0.0
        if not self.colbert_texts:
            sizes["colbert"] = 0.0
        return sizes


def index_bytes(embedder: Any, quantization: Optional[str] = None) -> dict[str, float]:
    """Bytes per passage of each head for the passages ``embedder`` encoded (its ``passage_stats``) at its
    compression's dimensions, float32 or ``quantization`` (``int8``/``binary``) for dense and ColBERT."""
    dense_dim, colbert_dim = embedder.vector_sizes()
    return embedder.passage_stats.bytes_per_passage(dense_dim, colbert_dim, quantization)
