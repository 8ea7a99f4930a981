"""Gathering passage representations from every process, keeping gradients (cross-device negatives)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .modeling_m3 import M3Output


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(t: Tensor) -> Tensor:
    """Concatenate ``t`` [n, ...] from all ranks along dim 0; gradients flow back to the owning rank.

    Uses ``torch.distributed.nn.functional.all_gather`` (its backward sums every rank's gradient for each
    slice), so a loss over local queries against all passages trains every passage exactly once. Shapes must
    agree on every rank beyond dim 0 (see :func:`pad_to_common_length`).
    """
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t.contiguous()), dim=0)


def gather_without_grad(t: Tensor) -> Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


def pad_to_common_length(t: Tensor, dim: int, value: float = 0) -> Tensor:
    """Right-pad ``t`` along ``dim`` to the longest length on any rank (gloo cannot gather uneven shapes)."""
    length = torch.tensor([t.shape[dim]], device=t.device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    missing = int(length.item()) - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - dim - 1) + [0, missing]
    return F.pad(t, pad, value=value)


def gather_passages(p: M3Output, p_ids: Tensor, pad_token_id: int = 0) -> tuple[M3Output, Tensor]:
    """All ranks' passages for every head that was computed: dense [W*P, H], sparse [W*P, L*], ColBERT
    [W*P, L*-1, D] with token-level tensors padded to a common length L* (padding has zero weight/mask)."""
    sparse: Optional[Tensor] = None
    colbert: Optional[Tensor] = None
    colbert_mask: Optional[Tensor] = None
    dense = gather_with_grad(p.dense) if p.dense is not None else None
    ids = gather_without_grad(pad_to_common_length(p_ids, 1, pad_token_id))
    if p.sparse is not None:
        sparse = gather_with_grad(pad_to_common_length(p.sparse, 1))
    if p.colbert is not None:
        colbert = gather_with_grad(pad_to_common_length(p.colbert, 1))
        colbert_mask = gather_without_grad(pad_to_common_length(p.colbert_mask, 1))
    return M3Output(dense=dense, sparse=sparse, colbert=colbert, colbert_mask=colbert_mask), ids
