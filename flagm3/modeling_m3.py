"""The M3 model: one Hugging Face encoder and three retrieval heads (dense, sparse, ColBERT). No loss here."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel
from transformers.utils import ModelOutput

from .compat import init_copy_, mismatched_shapes
from .configuration_m3 import HEADS, M3Config, sparse_ignore_ids_from_tokenizer
from .convert_bge_m3 import (
    COLBERT_HEAD_FILE,
    SPARSE_HEAD_FILE,
    CheckpointError,
    check_bge_m3_heads,
    checkpoint_layout,
    load_bge_m3_heads,
    read_config,
    resolve_checkpoint,
    save_bge_m3,
    weights_file,
)

logger = logging.getLogger(__name__)

_ENCODER_ON_META: contextvars.ContextVar[bool] = contextvars.ContextVar("flagm3_encoder_on_meta", default=False)


@dataclass
class M3Output(ModelOutput):
    """What the three heads give for a batch of ``B`` texts of ``L`` tokens.

    dense: [B, H] pooled vector (normalised when the config says so).
    token_weights: [B, L] the sparse head's lexical weight per token (not yet pooled per token id), zero at padding
        and at ignored special tokens. ``sparse`` is its former name, still accepted (deprecated).
    colbert: [B, L-1, D] vector per token after CLS, zero at padding (normalised when the config says so).
    colbert_mask: [B, L-1] attention mask of those tokens.
    """

    dense: Optional[Tensor] = None
    token_weights: Optional[Tensor] = None
    colbert: Optional[Tensor] = None
    colbert_mask: Optional[Tensor] = None

    def __init__(self, dense: Optional[Tensor] = None, token_weights: Optional[Tensor] = None,
                 colbert: Optional[Tensor] = None, colbert_mask: Optional[Tensor] = None, *,
                 sparse: Optional[Tensor] = None) -> None:
        if sparse is not None:
            if token_weights is not None:
                raise TypeError("M3Output: give token_weights or its former name sparse, not both")
            token_weights = sparse
        super().__init__()
        self.dense, self.token_weights, self.colbert, self.colbert_mask = dense, token_weights, colbert, colbert_mask
        self.__post_init__()

    @property
    def sparse(self) -> Optional[Tensor]:
        """Deprecated name of :attr:`token_weights` ([B, L] per-token weights, not a sparse vector)."""
        warnings.warn("M3Output.sparse is deprecated: use M3Output.token_weights", DeprecationWarning, stacklevel=2)
        return self.token_weights

    def __getitem__(self, key: Any) -> Any:
        if key == "sparse":  # the former key, as the attribute
            warnings.warn("M3Output['sparse'] is deprecated: use 'token_weights'", DeprecationWarning, stacklevel=2)
            key = "token_weights"
        return super().__getitem__(key)


def pad_tokens(t: Tensor, length: int) -> Tensor:
    """Right-pad dim 1 of a ``[n, l, ...]`` tensor with zeros to ``length`` (what the heads give for padding)."""
    missing = length - t.shape[1]
    return t if missing == 0 else F.pad(t, [0, 0] * (t.dim() - 2) + [0, missing])


def merge_outputs(parts: Sequence[M3Output], rows: Sequence[Sequence[int]], length: int) -> M3Output:
    """Reassemble outputs of row subsets (each of its own, shorter length) into one batch of ``length`` tokens.

    ``parts[c]`` holds rows ``rows[c]`` of the batch; token-level fields are zero-padded to ``length`` (as the
    heads give for padding). Returns the batch's output in the original row order.
    """
    order = torch.tensor([r for chunk in rows for r in chunk], device=_first_tensor(parts[0]).device)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)

    def merged(name: str, tokens: int = 0) -> Optional[Tensor]:
        """``tokens``: the field's full token count (0 for the per-text dense vector)."""
        values = [getattr(part, name) for part in parts]
        if values[0] is None:
            return None
        if tokens:
            values = [pad_tokens(v, tokens) for v in values]
        return torch.cat(values).index_select(0, inverse)

    return M3Output(dense=merged("dense"), token_weights=merged("token_weights", length),
                    colbert=merged("colbert", length - 1),
                    colbert_mask=merged("colbert_mask", length - 1))


def _first_tensor(out: M3Output) -> Tensor:
    return next(v for v in (out.dense, out.token_weights, out.colbert, out.colbert_mask) if v is not None)


def first_token_index(attention_mask: Tensor) -> Tensor:
    """Position of each text's first attended token (0 with right padding). [B, L] -> [B]."""
    return attention_mask.argmax(1)


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Position of each text's last attended token (L-1 with left padding). [B, L] -> [B]."""
    return attention_mask.shape[1] - 1 - attention_mask.flip(1).argmax(1)


def tokens_after_first(attention_mask: Tensor) -> Tensor:
    """Mask of the tokens after each text's first one (CLS), on positions 1..L-1. [B, L] -> [B, L-1].

    With right padding this is ``attention_mask[:, 1:]``; with left padding position 0 is a pad and the CLS
    token further right is masked out instead."""
    positions = torch.arange(1, attention_mask.shape[1], device=attention_mask.device)
    not_first = positions.unsqueeze(0) != first_token_index(attention_mask).unsqueeze(1)
    return attention_mask[:, 1:] * not_first.to(attention_mask.dtype)


def pool(hidden: Tensor, attention_mask: Tensor, method: str) -> Tensor:
    """Sentence vector from token states, for right or left padding. ``hidden`` [B, L, H], ``attention_mask``
    [B, L] -> [B, H]."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if method == "cls":
        return hidden[rows, first_token_index(attention_mask)]
    if method == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    if method == "last_token":
        return hidden[rows, last_token_index(attention_mask)]
    raise ValueError(f"unknown pooling method {method!r}")


class M3PreTrainedModel(PreTrainedModel):
    config_class = M3Config
    base_model_prefix = "encoder"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True  # transformers 4.x name

    def _init_weights(self, module: nn.Module) -> None:
        if module is getattr(self, "sparse_linear", None) or module is getattr(self, "colbert_linear", None):
            module.reset_parameters()  # torch's default Linear init, as BGE-M3's fresh heads
        elif module is self and hasattr(self, "sparse_ignore_ids"):
            # A non-persistent buffer is not in the checkpoint: from_pretrained (meta-device init) leaves it
            # uninitialised unless it is rebuilt here from the config.
            ids = torch.tensor(self.config.sparse_ignore_token_ids, dtype=torch.long)
            init_copy_(self.sparse_ignore_ids, ids)


class M3Model(M3PreTrainedModel):
    """Encoder + dense, sparse and ColBERT heads.

    Weights are stored as ``encoder.*``, ``sparse_linear.*`` and ``colbert_linear.*`` in one safetensors file.
    Start from a plain encoder with :meth:`from_encoder`; load flagm3 checkpoints, BGE-M3-layout directories
    (``colbert_linear.pt`` + ``sparse_linear.pt`` beside the encoder) and hub ids with :meth:`from_pretrained`;
    write the BGE-M3 layout with :meth:`save_bge_m3`.
    """

    def __init__(self, config: M3Config) -> None:
        super().__init__(config)
        attn = getattr(config, "_attn_implementation", None)
        backbone = config.backbone_config
        if attn is not None:
            backbone._attn_implementation = attn
        # from_encoder replaces the encoder at once: then it is built on the meta device (no memory, no init).
        with torch.device("meta") if _ENCODER_ON_META.get() else contextlib.nullcontext():
            self.encoder = AutoModel.from_config(backbone)
        hidden = config.encoder_hidden_size
        self.sparse_linear = nn.Linear(hidden, 1)
        self.colbert_linear = nn.Linear(hidden, config.colbert_output_dim)
        self.register_buffer(
            "sparse_ignore_ids", torch.tensor(config.sparse_ignore_token_ids, dtype=torch.long), persistent=False
        )
        self.post_init()

    # ------------------------------------------------------------------------------------------ heads
    def dense_embedding(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """[B, L, H] -> [B, H]."""
        vecs = pool(hidden, attention_mask, self.config.pooling)
        return F.normalize(vecs, dim=-1) if self.config.normalize_embeddings else vecs

    def sparse_embedding(self, hidden: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """ReLU(Linear(hidden, 1)) per token, zero at padding and ignored ids. [B, L, H] -> [B, L]."""
        weights = torch.relu(self.sparse_linear(hidden)).squeeze(-1)
        # == and any rather than torch.isin: the same mask, and it exports to ONNX
        ignored = (input_ids.unsqueeze(-1) == self.sparse_ignore_ids.to(input_ids.device)).any(-1)
        keep = attention_mask.bool() & ~ignored
        return weights * keep.to(weights.dtype)

    def colbert_embedding(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """Linear(hidden, D) on every token after CLS, zero at padding. [B, L, H] -> [B, L-1, D]."""
        vecs = self.colbert_linear(hidden[:, 1:]) * tokens_after_first(attention_mask)[..., None].to(hidden.dtype)
        return F.normalize(vecs, dim=-1) if self.config.normalize_embeddings else vecs

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        token_type_ids: Optional[Tensor] = None,
        heads: Iterable[str] = HEADS,
        **encoder_kwargs: Any,
    ) -> M3Output:
        """Encode a batch. ``input_ids``/``attention_mask`` [B, L]; ``heads`` selects the outputs computed."""
        if token_type_ids is not None:
            encoder_kwargs["token_type_ids"] = token_type_ids
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **encoder_kwargs
        ).last_hidden_state
        heads = set(heads)
        unknown = heads - set(HEADS)
        if unknown:
            raise ValueError(f"unknown heads {sorted(unknown)}; choose from {', '.join(HEADS)}")
        return M3Output(
            dense=self.dense_embedding(hidden, attention_mask) if "dense" in heads else None,
            token_weights=self.sparse_embedding(hidden, input_ids, attention_mask) if "sparse" in heads else None,
            colbert=self.colbert_embedding(hidden, attention_mask) if "colbert" in heads else None,
            colbert_mask=tokens_after_first(attention_mask) if "colbert" in heads else None,
        )

    # ---------------------------------------------------------------------- encoder delegation
    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.encoder.set_input_embeddings(value)

    # ------------------------------------------------------------------------------- construction
    @classmethod
    def from_encoder(
        cls,
        encoder_name_or_path: str,
        tokenizer: Any = None,
        colbert_dim: int = -1,
        pooling: str = "cls",
        normalize_embeddings: bool = True,
        **encoder_kwargs: Any,
    ) -> M3Model:
        """An M3 model around a pretrained encoder checkpoint, with fresh heads.

        The tokenizer (loaded from the same path when not given) decides which ids the sparse head ignores.
        """
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(encoder_name_or_path)
        encoder = AutoModel.from_pretrained(encoder_name_or_path, **encoder_kwargs)
        # Read it first: PretrainedConfig.__init__ resets the attention implementation of its sub-configs.
        attn = getattr(encoder.config, "_attn_implementation", None)
        config = M3Config(
            backbone_config=encoder.config,
            colbert_dim=colbert_dim,
            pooling=pooling,
            normalize_embeddings=normalize_embeddings,
            sparse_ignore_token_ids=sparse_ignore_ids_from_tokenizer(tokenizer),
        )
        if attn:
            config._attn_implementation = attn
        placeholder = _ENCODER_ON_META.set(True)  # no random encoder is materialised only to be replaced
        try:
            model = cls(config)
        finally:
            _ENCODER_ON_META.reset(placeholder)
        model.encoder = encoder
        check_tokenizer_fits(model, tokenizer, encoder_name_or_path)
        return model.to(encoder.dtype)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):
        """Load a flagm3 checkpoint or a BGE-M3-layout directory (local path or hub id).

        Missing or unexpected weights are an error (never a silently fresh head). A plain encoder
        checkpoint is refused with a pointer to :meth:`from_encoder`.
        """
        path = resolve_checkpoint(str(pretrained_model_name_or_path), kwargs)
        layout = checkpoint_layout(path)
        if layout == "bge-m3":
            return cls.from_bge_m3(path, **kwargs)
        if layout == "encoder":
            model_type = read_config(path).get("model_type")
            raise CheckpointError(
                f"{os.path.join(path, 'config.json')}: a plain '{model_type}' encoder checkpoint, not an M3 model "
                f"(no M3 config and no {COLBERT_HEAD_FILE}/{SPARSE_HEAD_FILE}). Start from it with "
                "M3Model.from_encoder(path), or `flagm3 train --model_name_or_path` which does so."
            )
        kwargs["output_loading_info"] = True
        allow_mismatch = kwargs.pop("ignore_mismatched_sizes", False)
        # Load with mismatches allowed only to list them: transformers' own error names neither file nor field.
        model, info = super().from_pretrained(path, *args, ignore_mismatched_sizes=True, **kwargs)
        if info.get("mismatched_keys") and not allow_mismatch:
            mismatched = mismatched_shapes(info, model, weights_file(path))
            raise CheckpointError(_mismatch_message(path, model.config, mismatched))
        problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys") and v}
        if problems:
            raise CheckpointError(f"{path}: weights do not match an M3 model of this config: {problems}")
        return model

    @classmethod
    def from_bge_m3(cls, path: str, tokenizer: Any = None, **encoder_kwargs: Any) -> M3Model:
        """Import the original BGE-M3 layout: encoder files + ``colbert_linear.pt`` + ``sparse_linear.pt``
        (read and checked by :mod:`flagm3.convert_bge_m3`)."""
        check_bge_m3_heads(path)  # before the encoder loads
        encoder_kwargs.pop("output_loading_info", None)
        model = cls.from_encoder(path, tokenizer=tokenizer, **encoder_kwargs)
        heads = load_bge_m3_heads(path, model.config.encoder_hidden_size)
        model.config.colbert_dim = int(heads["colbert_linear"]["weight"].shape[0])
        if model.colbert_linear.out_features != model.config.colbert_dim:
            model.colbert_linear = nn.Linear(model.config.encoder_hidden_size, model.config.colbert_dim).to(
                model.sparse_linear.weight.dtype
            )
        model.colbert_linear.load_state_dict(heads["colbert_linear"])
        model.sparse_linear.load_state_dict(heads["sparse_linear"])
        return model

    def save_bge_m3(self, save_directory: str, tokenizer: Any = None) -> None:
        """Write the original BGE-M3 layout, loadable by FlagEmbedding's ``BGEM3FlagModel``
        (:func:`flagm3.convert_bge_m3.save_bge_m3`)."""
        save_bge_m3(self, save_directory, tokenizer)


# ------------------------------------------------------------------------------------------ checks
def unwrap_m3(model: nn.Module) -> M3Model:
    """The M3Model inside DDP/DeepSpeed/PEFT wrappers."""
    while not isinstance(model, M3Model):
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            raise TypeError(f"expected an M3Model (possibly wrapped), got {type(model).__name__}")
    return model


def check_tokenizer_fits(model: nn.Module, tokenizer: Any, model_source: Any = None) -> None:
    """Refuse a tokenizer whose ids go beyond the encoder's embedding matrix (a crash when such a token
    first appears, possibly hours into training); the message names the tokenizer and the model."""
    if tokenizer is None or not hasattr(tokenizer, "__len__"):
        return
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) <= rows:
        return
    tok_source = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    model_source = model_source or getattr(model.config, "_name_or_path", "") or "the model"
    raise CheckpointError(
        f"{tok_source}: the tokenizer has {len(tokenizer)} tokens but the encoder's embedding matrix in "
        f"{model_source} has {rows} rows (vocab_size in its config.json): ids >= {rows} fail with 'index out of "
        "range' when such a token appears. Use the model's own tokenizer, or grow the embeddings first "
        "(model.resize_token_embeddings(len(tokenizer)))."
    )


def _mismatch_message(path: str, config: M3Config, mismatched: Iterable) -> str:
    """Which tensors of the weights file disagree with config.json, and the config field to blame."""
    mismatched = sorted(mismatched)
    shapes = "; ".join(f"{key} is {tuple(ckpt)} in the file, config.json implies {tuple(want)}"
                       for key, ckpt, want in mismatched)
    hints = []
    for key, ckpt, _ in mismatched:
        if key == "colbert_linear.weight":
            hints.append(f"config.json has colbert_dim={config.colbert_dim} (ColBERT size "
                         f"{config.colbert_output_dim}) but the weights hold a ColBERT head of size {ckpt[0]}")
        elif key.endswith("word_embeddings.weight"):
            hints.append(f"backbone_config.vocab_size={config.backbone_config.vocab_size} in config.json but the "
                         f"embedding matrix has {ckpt[0]} rows")
    hint = (": " + "; ".join(hints)) if hints else ""
    return (f"{weights_file(path)}: weights do not match {os.path.join(path, 'config.json')}{hint} ({shapes}). "
            "Fix the config (or re-save the model) so that both describe the same model.")


AutoConfig.register(M3Config.model_type, M3Config, exist_ok=True)
AutoModel.register(M3Config, M3Model, exist_ok=True)
