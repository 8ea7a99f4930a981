"""A sentence-transformers module for M3's sparse head, so ``SparseEncoder`` loads a flagm3 export.

:class:`M3SparsePooling` takes the encoder's token states (``token_embeddings`` from sentence-transformers'
``Transformer`` module) and gives each text a vocabulary-sized vector: the max over its tokens of M3's lexical
weight ``ReLU(Linear(hidden, 1))`` (zero at padding and ignored special tokens) per token id, the weights
:class:`flagm3.inference.M3Embedder` returns as ``lexical_weights``. The weight formula is
:meth:`flagm3.modeling_m3.M3Model.sparse_embedding` itself; pooling is :func:`flagm3.scoring.pool_lexical`.
``flagm3 export --format sentence-transformers`` writes it to ``<output>/sparse`` (``SparseEncoder(dir)``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from sentence_transformers.base.modules import Module
from torch import Tensor, nn

from .modeling_m3 import M3Model
from .scoring import pool_lexical


class M3SparsePooling(Module):
    """M3's sparse head as a sentence-transformers module: token states [B, L, H] -> ``sentence_embedding``
    [B, vocab_size] (max-pooled lexical weight per token id, zero elsewhere)."""

    config_keys: list[str] = ["hidden_size", "vocab_size", "ignore_token_ids"]

    def __init__(self, hidden_size: int, vocab_size: int, ignore_token_ids: Sequence[int] = ()) -> None:
        super().__init__()
        self.hidden_size, self.vocab_size = int(hidden_size), int(vocab_size)
        self.ignore_token_ids = [int(i) for i in ignore_token_ids]
        self.sparse_linear = nn.Linear(self.hidden_size, 1)
        self.register_buffer("sparse_ignore_ids", torch.tensor(self.ignore_token_ids, dtype=torch.long),
                             persistent=False)

    @classmethod
    def from_m3(cls, model: M3Model) -> M3SparsePooling:
        """The sparse head of ``model`` (weights copied, float32)."""
        module = cls(model.config.encoder_hidden_size, model.get_input_embeddings().num_embeddings,
                     model.config.sparse_ignore_token_ids)
        module.sparse_linear.load_state_dict({k: v.detach().float().cpu() for k, v in
                                              model.sparse_linear.state_dict().items()})
        return module

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        ids, mask = features["input_ids"], features["attention_mask"]
        weights = M3Model.sparse_embedding(self, features["token_embeddings"], ids, mask)  # [B, L]
        pooled = pool_lexical(ids, weights)
        out = weights.new_zeros(ids.shape[0], self.vocab_size)
        features["sentence_embedding"] = out.index_put((pooled.rows, pooled.token_ids), pooled.weights)
        return features

    def get_embedding_dimension(self) -> int:
        return self.vocab_size

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        self.save_config(output_path)
        self.save_torch_weights(output_path, safe_serialization=safe_serialization)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token: Any = None, cache_folder: Any = None,
             revision: Any = None, local_files_only: bool = False, **kwargs: Any) -> M3SparsePooling:
        hub = dict(subfolder=subfolder, token=token, cache_folder=cache_folder, revision=revision,
                   local_files_only=local_files_only)
        config = cls.load_config(model_name_or_path=model_name_or_path, **hub)
        module = cls(**{k: v for k, v in config.items() if k in cls.config_keys})
        cls.load_torch_weights(model_name_or_path=model_name_or_path, model=module, **hub)
        return module
