"""Configuration of an M3 model: a backbone encoder's config plus the settings of the three heads."""

from __future__ import annotations

from typing import Any, Iterable

from transformers import AutoConfig, PretrainedConfig

from .defaults import HEADS as HEADS  # re-exported: the three retrieval heads, in this order everywhere

POOLING_METHODS = ("cls", "mean", "last_token")


def sparse_ignore_ids_from_tokenizer(tokenizer: Any) -> list[int]:
    """Token ids whose lexical weight is always zero: CLS, EOS (SEP when there is no EOS), PAD and UNK.

    BGE-M3 drops ``cls, eos, pad, unk``; BERT tokenizers have no EOS token, so their SEP takes its place.
    """
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    ids = [tokenizer.cls_token_id, eos, tokenizer.pad_token_id, tokenizer.unk_token_id]
    return sorted({int(i) for i in ids if i is not None})


class M3Config(PretrainedConfig):
    """Config of :class:`flagm3.M3Model`.

    Args:
        backbone_config: config of the encoder (a ``PretrainedConfig`` or its dict with ``model_type``).
        colbert_dim: output size of the ColBERT head; ``-1`` means the encoder's hidden size (BGE-M3).
        pooling: dense pooling, one of ``cls`` (BGE-M3), ``mean``, ``last_token``.
        normalize_embeddings: L2-normalise dense and ColBERT vectors.
        sparse_ignore_token_ids: ids given zero lexical weight (see :func:`sparse_ignore_ids_from_tokenizer`).
    """

    model_type = "flagm3"
    sub_configs = {"backbone_config": AutoConfig}

    def __init__(
        self,
        backbone_config: PretrainedConfig | dict | None = None,
        colbert_dim: int = -1,
        pooling: str = "cls",
        normalize_embeddings: bool = True,
        sparse_ignore_token_ids: Iterable[int] | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(backbone_config, dict):
            backbone_config = dict(backbone_config)
            model_type = backbone_config.pop("model_type", None)
            if model_type is None:
                raise ValueError("backbone_config needs a 'model_type' entry (for example 'bert').")
            backbone_config = AutoConfig.for_model(model_type, **backbone_config)
        if pooling not in POOLING_METHODS:
            raise ValueError(f"pooling must be one of {POOLING_METHODS}, got {pooling!r}")
        self.backbone_config = backbone_config
        self.colbert_dim = int(colbert_dim)
        self.pooling = pooling
        self.normalize_embeddings = bool(normalize_embeddings)
        self.sparse_ignore_token_ids = sorted({int(i) for i in (sparse_ignore_token_ids or [])})
        super().__init__(**kwargs)

    @property
    def encoder_hidden_size(self) -> int:
        return int(self.backbone_config.hidden_size)

    @property
    def colbert_output_dim(self) -> int:
        """Size of a ColBERT vector (the hidden size when ``colbert_dim <= 0``)."""
        return self.colbert_dim if self.colbert_dim > 0 else self.encoder_hidden_size
