"""Length chunking for the loss: encode one side of a batch in length-sorted chunks, each cut to its own longest
text (``max_length_chunks``), so the encoder processes less padding for the same outputs.

:func:`length_chunks` plans the chunks (optimal, O(n) memory), :func:`split_by_length` cuts a tokenised batch
along the plan, :func:`chunked_padding_fraction` says how much padding is left, :func:`trim_padding` drops the
all-padding trailing columns of a batch. (These lived in ``flagm3.data.sampler``, which still re-exports them.)
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

# What one more encoder call costs, in tokens, when choosing length chunks (docs/performance.md).
CHUNK_OVERHEAD_TOKENS = 256


def _next_layer(prev: List[float], longest: List[int], overhead: int) -> Tuple[List[float], List[int]]:
    """One more chunk: ``cur[j] = min_{i<j} prev[i] + (j - i) * longest[i] + overhead`` for every ``j``, and the
    smallest minimising ``i`` (``cut[j]``), in O(n) by a monotone convex-hull trick.

    For a fixed start ``i`` the cost is a line in ``j`` of slope ``longest[i]`` (non-increasing in ``i``: rows are
    sorted longest first) and intercept ``prev[i] - i * longest[i]``; queries ``j`` increase, so the lower
    envelope is a queue. Costs are sums of token counts (exact in floating point), so ties are found exactly and
    resolved towards the smaller ``i``.
    """
    n, inf = len(longest), float("inf")
    cur, cut = [inf] * (n + 1), [0] * (n + 1)
    slopes: List[int] = []  # the lower envelope, slopes decreasing; entries before ``head`` are spent
    icepts: List[float] = []
    starts: List[int] = []
    head = 0
    for j in range(1, n + 1):
        i = j - 1
        if prev[i] != inf:
            m, c = longest[i], prev[i] - i * longest[i]
            if len(slopes) > head and slopes[-1] == m and c >= icepts[-1]:
                pass  # never below the earlier line of the same slope
            else:
                if len(slopes) > head and slopes[-1] == m:
                    slopes.pop(), icepts.pop(), starts.pop()
                # drop the last line while it is never strictly below both its neighbours: x(a, new) <= x(a, b)
                while len(slopes) - head >= 2 and (
                    (c - icepts[-2]) * (slopes[-2] - slopes[-1]) <= (icepts[-1] - icepts[-2]) * (slopes[-2] - m)
                ):
                    slopes.pop(), icepts.pop(), starts.pop()
                slopes.append(m), icepts.append(c), starts.append(i)
        if len(slopes) == head:
            continue
        while len(slopes) - head >= 2 and slopes[head + 1] * j + icepts[head + 1] < slopes[head] * j + icepts[head]:
            head += 1
        cur[j], cut[j] = slopes[head] * j + icepts[head] + overhead, starts[head]
    return cur, cut


def length_chunks(lengths: Sequence[int], max_chunks: int, overhead: int = CHUNK_OVERHEAD_TOKENS) -> List[List[int]]:
    """Split rows into at most ``max_chunks`` groups of similar length, each to be padded only to its own longest.

    Rows are sorted by length and cut into contiguous runs minimising ``sum(rows * longest + overhead)``
    (tokens processed, padding included, plus ``overhead`` token-equivalents per extra encoder call), by
    dynamic programming over the number of chunks, each layer in O(n) time and memory. Returns lists of row
    indices, longest chunk first; the fewest chunks among the cheapest plans (a single chunk when splitting
    does not pay).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    if n == 0:
        return []
    longest = [int(lengths[i]) for i in order]  # a chunk's longest is its first row
    cost = [0.0] + [float("inf")] * n  # cost[j]: best cost of the first j rows in k chunks
    cuts, best = [], []
    for _ in range(min(max(1, max_chunks), n)):
        cost, cut = _next_layer(cost, longest, overhead)
        cuts.append(cut)
        best.append(cost[n])
    k = min(range(len(best)), key=lambda c: (best[c], c))  # the fewest chunks among the cheapest plans
    bounds, j = [], n
    for step in range(k, -1, -1):
        i = cuts[step][j]
        bounds.append((i, j))
        j = i
    return [order[i:j] for i, j in reversed(bounds)]


def trim_padding(features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A tokenised batch (``[n, L]`` tensors) without the trailing columns that are padding in every row. Only
    trailing columns go (right padding), so positions never shift; a left-padded batch keeps every column."""
    attended = features["attention_mask"].bool().any(0).nonzero()
    length = int(attended.max()) + 1 if attended.numel() else 1
    return {k: v[:, :length] for k, v in features.items()}


def split_by_length(
    features: Dict[str, torch.Tensor], max_chunks: int, overhead: int = CHUNK_OVERHEAD_TOKENS,
    lengths: Optional[Sequence[int]] = None,
) -> List[Tuple[List[int], Dict[str, torch.Tensor]]]:
    """``(rows, features of those rows, trimmed)`` for each chunk of :func:`length_chunks` of a tokenised batch.

    ``lengths``: the rows' token counts when the caller already has them on the host (then a right-padded
    batch is cut without reading the device tensors again)."""
    mask = features["attention_mask"]
    known = lengths is not None
    if not known:
        lengths = mask.ne(0).sum(1).tolist()

    def cut(rows: List[int], part: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        if not known:
            return trim_padding(part)
        width = max(1, max(lengths[i] for i in rows))
        return {k: v[:, :width] for k, v in part.items()}

    chunks = length_chunks(lengths, max_chunks, overhead)
    if len(chunks) < 2:  # the batch as it is, rows in order (no copy)
        rows = list(range(mask.shape[0]))
        return [(rows, cut(rows, features))] if chunks else []
    return [(rows, cut(rows, {k: v.index_select(0, torch.tensor(rows, device=v.device)) for k, v in features.items()}))
            for rows in chunks]


def chunked_padding_fraction(
    attention_mask: torch.Tensor, max_chunks: int, overhead: int = CHUNK_OVERHEAD_TOKENS,
    lengths: Optional[Sequence[int]] = None,
) -> float:
    """Fraction of padded positions the encoder processes when the rows of ``attention_mask`` [B, L] are
    encoded in :func:`length_chunks` (``max_chunks=1``: ``flagm3.data.padding_fraction``); ``lengths``: the
    rows' token counts if already on the host."""
    lengths = attention_mask.ne(0).sum(1).tolist() if lengths is None else lengths
    processed = sum(len(c) * max(lengths[i] for i in c) for c in length_chunks(lengths, max_chunks, overhead))
    return 1.0 - sum(lengths) / processed if processed else 0.0
