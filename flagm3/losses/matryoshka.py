"""Matryoshka (nested-dimension) terms of the M3 objective, for the dense and ColBERT heads.

With ``mrl_dims`` (``--mrl_dims 96 192 384``) each of these heads' InfoNCE term is also computed on the first ``d``
dimensions of its vectors, for every ``d`` of ``mrl_dims`` below the head's size, and added to the head's own
term with the dimension's weight (``mrl_weights``, default 1): head ``h``'s term becomes
``L_h + sum_d m_d * L_h@d``. Truncated vectors are renormalised when the model normalises (``mrl_normalize``),
as :meth:`flagm3.inference.M3Embedder.encode` truncates them at inference. The ensemble and self-distillation
terms stay at full size. Scores come from :meth:`M3Loss.head_logits` (:mod:`flagm3.scoring`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, Optional, Sequence, Tuple

from torch import Tensor

from ..compression import truncate
from ..modeling_m3 import M3Output

if TYPE_CHECKING:  # the objective passes itself in
    from .objective import M3Loss

MRL_HEADS = ("dense", "colbert")  # heads with vector dimensions to nest


def nested_dims(dims: Sequence[int], size: int) -> Tuple[int, ...]:
    """The prefixes of a head of ``size`` dimensions to train: each of ``dims`` capped at ``size``, without the
    full size itself (the head's own term) and without repeats, ascending."""
    return tuple(sorted({min(int(d), size) for d in dims} - {size}))


def truncate_output(out: M3Output, head: str, dim: int, normalize: bool) -> M3Output:
    """``out`` with ``head``'s vectors (``dense`` [B, H] or ``colbert`` [B, L, D]) cut to ``dim`` dimensions."""
    fields = {"dense": out.dense, "sparse": out.sparse, "colbert": out.colbert, "colbert_mask": out.colbert_mask}
    fields[head] = truncate(fields[head], dim, normalize)
    return M3Output(**fields)


def matryoshka_terms(
    objective: M3Loss,
    heads: Sequence[str],
    q: M3Output,
    q_ids: Tensor,
    p: M3Output,
    p_ids: Tensor,
    group_size: Optional[int],
    contrastive: Callable[[str, Tensor], Tensor],
) -> Dict[Tuple[str, int], Tensor]:
    """``{(head, d): L_head@d}`` for each head of ``heads`` in :data:`MRL_HEADS` and each nested ``d``.

    ``group_size``: as :meth:`M3Loss.head_logits` (``None``: all pairs). ``contrastive(head, logits)`` turns a
    head's logits into its term exactly as the full-size term is made (InfoNCE, teacher scores, masks).
    """
    cfg = objective.config
    terms: Dict[Tuple[str, int], Tensor] = {}
    for head in heads:
        if head not in MRL_HEADS:
            continue
        full = getattr(q, head)
        for dim in nested_dims(cfg.mrl_dims, full.shape[-1]):
            qd = truncate_output(q, head, dim, cfg.mrl_normalize)
            pd = truncate_output(p, head, dim, cfg.mrl_normalize)
            terms[(head, dim)] = contrastive(head, objective.head_logits(head, qd, q_ids, pd, p_ids, group_size))
    return terms
