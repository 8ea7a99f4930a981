"""Preparing a model for a training run: which parameters train, and the encoder's training-time attention.

:class:`~flagm3.trainer.M3Trainer` calls :func:`prepare_for_training` when it is built, so a model handed to it
trains with the recipe of its arguments; calling it earlier yourself with the same arguments is harmless.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from .attention import set_attention_dropout, use_recompute_attention
from .losses import M3LossConfig
from .modeling_m3 import unwrap_m3

logger = logging.getLogger(__name__)


def freeze_untrained(model: nn.Module, loss: M3LossConfig, fix_encoder: bool = False,
                     fix_position_embedding: bool = False) -> list[str]:
    """Freeze what must not train: heads in no loss term, the encoder's pooler (unused), and, when asked, the
    encoder or its position embeddings. Returns the names newly frozen."""
    m3 = unwrap_m3(model)
    trained = {h for h in ("sparse", "colbert") if loss.trains(h)}
    frozen = []
    for name, param in m3.named_parameters():
        unused_head = (name.startswith("sparse_linear") and "sparse" not in trained) or (
            name.startswith("colbert_linear") and "colbert" not in trained
        )
        fixed = (fix_encoder and name.startswith("encoder.")) or (
            fix_position_embedding and "position_embeddings" in name
        )
        if unused_head or name.startswith("encoder.pooler.") or fixed:
            if param.requires_grad:
                frozen.append(name)
            param.requires_grad_(False)
    if frozen:
        logger.info("frozen parameters: %d tensors (%s ...)", len(frozen), ", ".join(frozen[:3]))
    return frozen


def set_training_attention(model: nn.Module, dropout: float | None, recompute: bool = False,
                           gradient_checkpointing: bool = False) -> None:
    """The training-time attention settings of :mod:`flagm3.attention`: the dropout on attention probabilities
    (``None``: the encoder's own) and, when asked, probabilities recomputed in the backward pass (not with
    gradient checkpointing, which recomputes whole layers)."""
    encoder = unwrap_m3(model).encoder
    if dropout is not None and not set_attention_dropout(encoder, dropout):
        logger.warning("attention_dropout=%s: no attention module of %s has a dropout to set",
                       dropout, type(encoder).__name__)
    if recompute and not gradient_checkpointing and not use_recompute_attention(encoder):
        logger.warning("recompute_attention: %s does not dispatch attention through transformers' "
                       "AttentionInterface; attention is left as it is", type(encoder).__name__)


def detach_sparse_input(model: nn.Module) -> None:
    """The sparse head reads detached hidden states (``sparse_stop_gradient``): its loss terms train the head,
    not the encoder."""
    head = unwrap_m3(model).sparse_linear
    if getattr(head, "_flagm3_detach_hook", None) is None:  # once, however often the recipe is applied
        head._flagm3_detach_hook = head.register_forward_pre_hook(lambda module, inputs: tuple(x.detach() for x in inputs))


def prepare_for_training(model: nn.Module, args: Any, loss: M3LossConfig | None = None) -> nn.Module:
    """Apply the recipe of ``M3TrainingArguments`` to ``model`` (in place): freezing, the sparse head's input,
    and attention. ``loss`` defaults to ``args.loss_config()``. :class:`M3Trainer` calls it; calling it again with
    the same arguments (e.g. from a script that prepared the model itself) changes nothing."""
    loss = loss if loss is not None else args.loss_config()
    freeze_untrained(model, loss, fix_encoder=getattr(args, "fix_encoder", False),
                     fix_position_embedding=getattr(args, "fix_position_embedding", False))
    if loss.sparse_stop_gradient and "sparse" in loss.heads:
        detach_sparse_input(model)
    set_training_attention(model, args.training_attention_dropout(),
                           recompute=getattr(args, "recompute_attention", False),
                           gradient_checkpointing=getattr(args, "gradient_checkpointing", False))
    return model
