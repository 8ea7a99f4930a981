"""Attention that recomputes its probabilities in the backward pass instead of keeping them.

With dropout on the attention probabilities, PyTorch's CPU attention (``sdpa`` falls back to the math kernel,
like ``eager``) keeps three ``[B, heads, L, L]`` tensors per layer for the backward pass: the probabilities,
the dropout mask and the dropped probabilities. The implementation registered here, :data:`RECOMPUTE_SDPA`,
runs transformers' ``sdpa`` attention under activation checkpointing: it keeps only the query, key and value
tensors and recomputes the attention core (the same dropout mask: the RNG state is restored) when the gradient
is needed. Outputs and gradients are those of ``sdpa``; the extra work is one more attention core (softmax and
dropout over ``L x L``) per layer, so it is opt-in (``M3TrainingArguments.recompute_attention``). Encoders that
do not dispatch attention through transformers' ``AttentionInterface`` keep their own implementation.

:func:`set_attention_dropout` is the other way out: without dropout on the probabilities, SDPA runs its fused
kernel, which neither stores them nor spends time on them. The ``flagm3`` recipe trains that way
(``M3TrainingArguments.attention_dropout``). The memory and time of both, measured: docs/performance.md.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)

RECOMPUTE_SDPA = "flagm3_recompute_sdpa"


def recompute_sdpa_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' ``sdpa`` attention, checkpointed when it would store probabilities for the backward pass.

    ``query`` [B, heads, Lq, d], ``key``/``value`` [B, heads, Lk, d] -> ([B, Lq, heads, d], None).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attend(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
        return sdpa_attention_forward(module, q, k, v, mask, dropout=dropout, **kwargs)[0]

    if torch.is_grad_enabled() and query.requires_grad:
        return checkpoint(attend, query, key, value, attention_mask, use_reentrant=False), None
    return attend(query, key, value, attention_mask), None


def set_attention_dropout(encoder: nn.Module, p: float) -> int:
    """Set the dropout on attention probabilities of every attention module of ``encoder`` to ``p``.

    Covers the two conventions of transformers' encoders: a float ``attention_dropout`` attribute, and the
    ``nn.Dropout`` called ``dropout`` of BERT-family ``*SelfAttention`` modules (BERT, RoBERTa, XLM-RoBERTa), with
    the float ``dropout_prob`` that their SDPA variants read in transformers 4.x.
    Only the modules change, not the saved config. Returns how many modules were changed.
    """
    changed = 0
    for module in encoder.modules():
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = p
            changed += 1
        elif type(module).__name__.endswith("SelfAttention"):
            found = False
            if isinstance(getattr(module, "dropout", None), nn.Dropout):
                module.dropout.p = p
                found = True
            if isinstance(getattr(module, "dropout_prob", None), float):  # transformers 4.x's *SdpaSelfAttention
                module.dropout_prob = p
                found = True
            changed += found
    return changed


def register() -> None:
    """Make :data:`RECOMPUTE_SDPA` a valid ``attn_implementation``, with ``sdpa``'s mask format (idempotent).

    Both registrations are needed: for an implementation without a mask function transformers passes no
    attention mask at all, and padding would be attended to.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(RECOMPUTE_SDPA, recompute_sdpa_attention)
    AttentionMaskInterface.register(RECOMPUTE_SDPA, sdpa_mask)


def use_recompute_attention(encoder: nn.Module) -> bool:
    """Switch an encoder from ``sdpa``/``eager`` attention to :data:`RECOMPUTE_SDPA`; False when it cannot.

    Only the in-memory setting changes: ``save_pretrained`` does not write the attention implementation.
    """
    current = getattr(encoder.config, "_attn_implementation", None)
    if current == RECOMPUTE_SDPA:
        return True
    can_set = getattr(encoder, "_can_set_attn_implementation", None)
    if current not in ("sdpa", "eager") or can_set is None or not can_set():
        return False
    try:
        register()
    except ImportError:  # a transformers without the attention/mask interfaces
        return False
    encoder.set_attn_implementation(RECOMPUTE_SDPA)
    logger.info("%s: attention probabilities recomputed in the backward pass (flagm3.attention)",
                type(encoder).__name__)
    return encoder.config._attn_implementation == RECOMPUTE_SDPA
