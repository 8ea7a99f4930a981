"""Matryoshka (nested-dimension) terms of the M3 objective, for the dense and ColBERT heads.

With ``mrl_dims`` (``--mrl_dims 96 192 384``) each of these heads' InfoNCE term is also computed on the first ``d``
dimensions of its vectors, for every ``d`` of ``mrl_dims`` below the head's size, and added to the head's own
term with the dimension's weight (``mrl_weights``, default 1): head ``h``'s term becomes
``L_h + sum_d m_d * L_h@d``. Truncated vectors are renormalised when the model normalises (``normalize_compressed``),
as :meth:`flagm3.inference.M3Embedder.encode` truncates them at inference. The ensemble and self-distillation
terms stay at full size. Scores come from :meth:`M3Loss.head_logits` (:mod:`flagm3.scoring`).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

from torch import Tensor

from ..compression import truncate
from ..modeling_m3 import M3Output

MRL_HEADS = ("dense", "colbert")  # heads with vector dimensions to nest


def nested_dims(dims: Sequence[int], size: int) -> Tuple[int, ...]:
    """The prefixes of a head of ``size`` dimensions to train: each of ``dims`` capped at ``size``, without the
    full size itself (the head's own term) and without repeats, ascending."""
    return tuple(sorted({min(int(d), size) for d in dims} - {size}))


def truncate_output(out: M3Output, head: str, dim: int, normalize: bool) -> M3Output:
    """``out`` with ``head``'s vectors (``dense`` [B, H] or ``colbert`` [B, L, D]) cut to ``dim`` dimensions."""
    fields = {"dense": out.dense, "token_weights": out.token_weights, "colbert": out.colbert,
              "colbert_mask": out.colbert_mask}
    fields[head] = truncate(fields[head], dim, normalize)
    return M3Output(**fields)


def matryoshka_terms(
    dims: Sequence[int],
    normalize: bool,
    heads: Sequence[str],
    q: M3Output,
    p: M3Output,
    term: Callable[[str, M3Output, M3Output], Tensor],
    pool_passages: Optional[Callable[[M3Output], M3Output]] = None,
) -> Dict[Tuple[str, int], Tensor]:
    """``{(head, d): L_head@d}`` for each head of ``heads`` in :data:`MRL_HEADS` and each nested ``d`` of ``dims``
    (:func:`nested_dims`). ``term(head, q_d, p_d)`` makes the head's term from outputs whose ``head`` vectors are
    cut to ``d`` dimensions (renormalised when ``normalize``), exactly as the full-size term is made.
    ``pool_passages`` (pooling-aware training): applied to the passages' ColBERT vectors after the cut, as
    :meth:`flagm3.inference.M3Embedder.encode` cuts (``colbert_dim``) and then pools (``pool_factor``); ``p`` is
    then the unpooled output."""
    terms: Dict[Tuple[str, int], Tensor] = {}
    for head in heads:
        if head not in MRL_HEADS:
            continue
        for dim in nested_dims(dims, getattr(q, head).shape[-1]):
            p_d = truncate_output(p, head, dim, normalize)
            if head == "colbert" and pool_passages is not None:
                p_d = pool_passages(p_d)
            terms[(head, dim)] = term(head, truncate_output(q, head, dim, normalize), p_d)
    return terms
