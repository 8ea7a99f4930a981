"""The training recipe: what trains, at which rate, with which terms, in one object.

A :class:`Recipe` holds everything a named recipe (``--loss_preset``) decides beyond the data and the schedule:

- ``loss``: the objective (:class:`~flagm3.losses.M3LossConfig`: terms, weights, temperatures), including the
  sparse head's stop-gradient (``sparse_stop_gradient``) and its anchor (``sparse_anchor_weight``);
- the learning rates per parameter group (encoder, heads, sparse head): :meth:`Recipe.parameter_groups`;
- the training-time attention (dropout on attention probabilities, recomputed attention);
- the fresh sparse head's initialisation (``sparse_init``: fitted to the corpus IDF or random);
- which parameters are frozen (``fix_encoder``, ``fix_position_embedding``, heads in no term).

:meth:`M3TrainingArguments.recipe` builds it from the arguments; :class:`~flagm3.trainer.M3Trainer` builds its
loss and its optimizer's parameter groups from it and prepares the model with it (:meth:`Recipe.prepare`, once
per model); ``flagm3 train`` asks it whether to fit the sparse head to the IDF (:meth:`Recipe.fits_sparse_idf`);
the model card records :meth:`Recipe.card`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional

from torch import nn

from .attention import set_attention_dropout, use_recompute_attention
from .losses import M3LossConfig
from .modeling_m3 import unwrap_m3

logger = logging.getLogger(__name__)

# Per preset (--loss_preset): the attention dropout it trains with (None keeps the encoder's own, 0.1 for BERT
# and XLM-RoBERTa; 0 lets PyTorch's fused attention kernels run, docs/performance.md) and the sparse head's
# learning rate (None: the heads' or the encoder's). With detached hidden states only the flagm3 sparse head's
# own weights learn from its term, and at the encoder's rate they would hardly move.
RECIPE_ATTENTION_DROPOUT: dict[str, Optional[float]] = {"flagm3": 0.0, "bge-m3": None}
RECIPE_SPARSE_LEARNING_RATE = 3e-4
PRESET_SPARSE_LEARNING_RATE: dict[str, Optional[float]] = {"flagm3": RECIPE_SPARSE_LEARNING_RATE, "bge-m3": None}

HEAD_MODULES = ("sparse_linear", "colbert_linear")
SPARSE_INITS = ("auto", "idf", "none")
_PREPARED = "_flagm3_recipe"  # attribute of a prepared model: the recipe applied to it


@dataclass
class Recipe:
    """One training recipe (see the module docstring). ``None`` learning rates mean the encoder's."""

    preset: str = "flagm3"
    loss: M3LossConfig = field(default_factory=lambda: M3LossConfig.preset("flagm3"))
    head_learning_rate: Optional[float] = None
    sparse_learning_rate: Optional[float] = RECIPE_SPARSE_LEARNING_RATE
    attention_dropout: Optional[float] = RECIPE_ATTENTION_DROPOUT["flagm3"]
    recompute_attention: bool = False
    sparse_init: str = "auto"
    fix_encoder: bool = False
    fix_position_embedding: bool = False

    def __post_init__(self) -> None:
        if self.sparse_init not in SPARSE_INITS:
            raise ValueError(f"sparse_init must be one of {SPARSE_INITS}, got {self.sparse_init!r}")

    @classmethod
    def from_args(cls, args: Any, sparse_init: str = "auto", loss: Optional[M3LossConfig] = None) -> Recipe:
        """The recipe of ``M3TrainingArguments`` (``--loss_preset`` and every explicitly given knob);
        ``sparse_init`` comes from the model arguments. ``loss`` overrides ``args.loss_config()``."""
        preset = getattr(args, "loss_preset", "flagm3")
        head_lr = getattr(args, "head_learning_rate", None)
        sparse_lr = getattr(args, "sparse_learning_rate", None)
        if sparse_lr is None:
            sparse_lr = head_lr if head_lr is not None else PRESET_SPARSE_LEARNING_RATE.get(preset)
        dropout = getattr(args, "attention_dropout", None)
        return cls(
            preset=preset,
            loss=loss if loss is not None else args.loss_config(),
            head_learning_rate=head_lr,
            sparse_learning_rate=sparse_lr,
            attention_dropout=dropout if dropout is not None else RECIPE_ATTENTION_DROPOUT.get(preset),
            recompute_attention=bool(getattr(args, "recompute_attention", False)),
            sparse_init=sparse_init,
            fix_encoder=bool(getattr(args, "fix_encoder", False)),
            fix_position_embedding=bool(getattr(args, "fix_position_embedding", False)),
        )

    # ------------------------------------------------------------------------------ what it holds
    @property
    def sparse_stop_gradient(self) -> bool:
        """The sparse head reads detached hidden states (its loss terms train the head, not the encoder)."""
        return bool(self.loss.sparse_stop_gradient) and "sparse" in self.loss.heads

    @property
    def sparse_anchor_weight(self) -> float:
        """Weight of the sparse head's pull towards its initial (IDF-fitted) parameters."""
        return self.loss.sparse_anchor_weight

    def learning_rate_of(self, name: str) -> Optional[float]:
        """The learning rate of parameter ``name`` (``None``: the encoder's, ``--learning_rate``)."""
        if "sparse_linear." in name:
            return self.sparse_learning_rate
        if any(f"{h}." in name for h in HEAD_MODULES):
            return self.head_learning_rate
        return None

    def parameter_groups(self, model: nn.Module, weight_decay: float,
                         decay_names: Iterable[str]) -> Optional[list[dict[str, Any]]]:
        """The optimizer's parameter groups: trainable parameters by (learning rate, with weight decay); ``None``
        when every parameter trains at the encoder's rate (the Trainer's own groups then)."""
        if self.head_learning_rate is None and self.sparse_learning_rate is None:
            return None
        decay = set(decay_names)
        groups: dict[tuple[Optional[float], bool], list] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                groups.setdefault((self.learning_rate_of(name), name in decay), []).append(param)
        return [{"params": params, "weight_decay": weight_decay if with_decay else 0.0,
                 **({"lr": lr} if lr is not None else {})} for (lr, with_decay), params in groups.items()]

    def fits_sparse_idf(self, layout: str) -> bool:
        """Whether a model loaded from a checkpoint of ``layout`` gets its sparse head fitted to the corpus IDF:
        ``idf`` always, ``auto`` for a fresh head (a plain encoder) that the loss uses, ``none`` never."""
        if self.sparse_init == "idf":
            return True
        return self.sparse_init == "auto" and layout == "encoder" and "sparse" in self.loss.heads

    def card(self) -> dict[str, Any]:
        """What the model card records of the recipe (the loss configuration is recorded on its own)."""
        out = {k: v for k, v in asdict(self).items() if k != "loss"}
        out.update(sparse_stop_gradient=self.sparse_stop_gradient, sparse_anchor_weight=self.sparse_anchor_weight)
        return out

    # ---------------------------------------------------------------------------------- preparing
    def prepare(self, model: nn.Module, gradient_checkpointing: bool = False) -> nn.Module:
        """Apply the recipe to ``model`` in place: freezing, the sparse head's detached input, attention. Runs once
        per model: a model already prepared with an equal recipe is returned unchanged."""
        m3 = unwrap_m3(model)
        if getattr(m3, _PREPARED, None) == self:
            return model
        freeze_untrained(model, self.loss, self.fix_encoder, self.fix_position_embedding)
        if self.sparse_stop_gradient:
            detach_sparse_input(model)
        set_training_attention(model, self.attention_dropout, self.recompute_attention, gradient_checkpointing)
        object.__setattr__(m3, _PREPARED, self)  # a plain attribute, not a submodule
        return model


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
    """Apply the recipe of ``M3TrainingArguments`` to ``model`` (in place): :meth:`Recipe.prepare` with
    ``Recipe.from_args(args)``. :class:`M3Trainer` does it when it is built; doing it first yourself with the same
    arguments changes nothing."""
    recipe = Recipe.from_args(args, loss=loss)
    return recipe.prepare(model, gradient_checkpointing=bool(getattr(args, "gradient_checkpointing", False)))
