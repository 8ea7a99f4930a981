"""In-batch false negatives: passages that are near-duplicates of a query's positive, masked out of InfoNCE.

A passage ``j`` is a near-duplicate of query ``b``'s positive when the cosine similarity of their dense vectors
(:func:`flagm3.scoring.dense_scores` on L2-normalised vectors) is at least ``threshold``; its logit for query
``b`` is set to the dtype's minimum in every contrastive term, so it is neither a negative nor a target. The
positive itself is never masked. Off by default (``M3LossConfig.false_negative_threshold``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..scoring import dense_scores


def near_duplicate_mask(passages: Tensor, positive_index: Tensor, threshold: float) -> Tensor:
    """``[B, P]`` bool: passage ``j`` (of ``passages`` [P, H] dense vectors) is a near-duplicate of query ``b``'s
    positive (row ``positive_index[b]``), other than that positive itself."""
    unit = F.normalize(passages.detach().float(), dim=-1)
    similarity = dense_scores(unit[positive_index], unit)  # [B, P]
    mask = similarity >= threshold
    mask[torch.arange(positive_index.shape[0], device=mask.device), positive_index] = False
    return mask


def mask_logits(logits: Tensor, mask: Tensor) -> Tensor:
    """``logits`` [B, P] with the masked entries at the dtype's minimum (a softmax gives them 0)."""
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)
