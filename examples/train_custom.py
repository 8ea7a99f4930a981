"""Customising flagm3 by subclassing: a learned pooling for the dense head and an extra loss term.

    python examples/train_custom.py --model_name_or_path sentence-transformers/all-MiniLM-L6-v2 \
        --train_data train.jsonl --output_dir runs/custom --max_steps 100 \
        --per_device_train_batch_size 8 --train_group_size 4 --flops_weight 1e-3

Two customisations, written the way a project would write its own:

1. :class:`AttentionPoolingM3Model` subclasses :class:`flagm3.M3Model` and overrides ``dense_embedding``: the dense
   vector is an attention-weighted mean of the token states, ``softmax_i(a . h_i) h_i`` over the real tokens,
   with a learned vector ``a`` (``pool_scorer``). ``a`` starts at zero, so training starts from mean pooling.
   The new parameters train and save with the model; reload with ``AttentionPoolingM3Model.from_pretrained``
   (``M3Model.from_pretrained`` refuses the checkpoint: it has weights a plain M3 model lacks).
2. :class:`FlopsM3Loss` subclasses :class:`flagm3.M3Loss` and adds SPLADE's FLOPS regulariser on the sparse head,
   ``sum_t (mean_x w_x(t))^2`` over the vocabulary for queries and for passages, which pushes the lexical
   weights towards sparsity (smaller inverted-index posting lists). It is logged as ``flops``.

The command line is ``flagm3 train``'s (FlagEmbedding's names and every ``TrainingArguments`` option) plus the
fields of :class:`CustomArguments`. The trainer is :class:`flagm3.M3Trainer`, given the custom loss as ``loss=``.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoTokenizer, HfArgumentParser, set_seed

from flagm3 import M3Config, M3Loss, M3LossConfig, M3Model, M3Output, M3Trainer
from flagm3.losses import M3LossOutput
from flagm3.recipe import prepare_for_training
from flagm3.scoring import pool_lexical
from flagm3.sparse_init import init_sparse_head_from_idf
from flagm3.train import build_dataset
from flagm3.training_args import M3DataArguments, M3ModelArguments, M3TrainingArguments

logger = logging.getLogger("train_custom")


@dataclass
class CustomArguments:
    flops_weight: float = field(default=1e-3, metadata={"help": "Weight of the FLOPS regulariser (0: off)."})
    attention_pooling: bool = field(default=True, metadata={"help": "Learned attention pooling for the dense head."})


# ----------------------------------------------------------------------------------------------- model
class AttentionPoolingM3Model(M3Model):
    """An M3 model whose dense vector is a learned attention pooling of the token states."""

    def __init__(self, config: M3Config) -> None:
        super().__init__(config)
        self.pool_scorer = nn.Linear(config.encoder_hidden_size, 1, bias=False)
        nn.init.zeros_(self.pool_scorer.weight)  # uniform attention = mean pooling at the start

    def dense_embedding(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """``softmax_i(a . h_i)`` over the real tokens, times ``h_i``, summed: [B, L, H] -> [B, H]."""
        logits = self.pool_scorer(hidden).squeeze(-1).float()  # [B, L]
        logits = logits.masked_fill(~attention_mask.bool(), torch.finfo(logits.dtype).min)
        weights = torch.softmax(logits, dim=-1).to(hidden.dtype)
        vecs = (weights.unsqueeze(-1) * hidden).sum(1)
        return F.normalize(vecs, dim=-1) if self.config.normalize_embeddings else vecs


# ------------------------------------------------------------------------------------------------ loss
def flops_regularizer(token_ids: Tensor, weights: Tensor) -> Tensor:
    """SPLADE's FLOPS term ``sum_t (mean_x w_x(t))^2``, with ``w_x(t)`` the max-pooled weight of id ``t`` in text
    ``x``. ``token_ids``/``weights`` [N, L] -> scalar. No vocabulary-sized tensor: only the ids that occur."""
    pooled = pool_lexical(token_ids, weights)
    if pooled.token_ids.numel() == 0:
        return weights.sum() * 0.0
    ids, inverse = torch.unique(pooled.token_ids, return_inverse=True)
    totals = pooled.weights.new_zeros(ids.shape[0]).index_add(0, inverse, pooled.weights)
    return ((totals / pooled.num_rows) ** 2).sum()


class FlopsM3Loss(M3Loss):
    """The M3 loss plus ``flops_weight * (FLOPS(queries) + FLOPS(passages))`` on the sparse head."""

    def __init__(self, config: Optional[M3LossConfig] = None, flops_weight: float = 1e-3) -> None:
        super().__init__(config)
        self.flops_weight = flops_weight

    @property
    def heads(self) -> tuple[str, ...]:
        """The objective's heads, plus the sparse head when the regulariser needs its weights."""
        heads = set(super().heads) | ({"sparse"} if self.flops_weight and "sparse" in self.config.heads else set())
        return tuple(h for h in ("dense", "sparse", "colbert") if h in heads)

    def get_config_dict(self) -> dict:  # what the model card records
        return {**super().get_config_dict(), "flops_weight": self.flops_weight}

    def forward(self, q: M3Output, q_ids: Tensor, p: M3Output, p_ids: Tensor, group_size: int,
                **kwargs) -> M3LossOutput:
        out = super().forward(q, q_ids, p, p_ids, group_size, **kwargs)
        if "sparse" not in self.heads or self.flops_weight == 0:
            return out
        flops = flops_regularizer(q_ids, q.sparse) + flops_regularizer(p_ids, p.sparse)
        loss = out.loss + self.flops_weight * flops
        logs = {**out.logs, "flops": flops.detach(), "loss": loss.detach()}
        return M3LossOutput(loss=loss, logs=logs, logits=out.logits)


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: Optional[Sequence[str]] = None):
    parser = HfArgumentParser((M3ModelArguments, M3DataArguments, M3TrainingArguments, CustomArguments))
    return parser.parse_args_into_dataclasses(args=list(sys.argv[1:] if argv is None else argv))


def main(argv: Optional[Sequence[str]] = None) -> M3Trainer:
    model_args, data_args, training_args, custom = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    set_seed(training_args.seed)
    model_class = AttentionPoolingM3Model if custom.attention_pooling else M3Model
    model = model_class.from_encoder(
        model_args.model_name_or_path,
        tokenizer=tokenizer,
        colbert_dim=-1 if model_args.colbert_dim is None else model_args.colbert_dim,
        pooling=training_args.sentence_pooling_method or "cls",
        normalize_embeddings=training_args.normalize_embeddings is not False,
    )
    dataset = build_dataset(data_args, training_args, tokenizer)
    if model_args.sparse_init != "none":  # as flagm3 train does for a fresh sparse head
        init_sparse_head_from_idf(model, tokenizer, dataset.passage_texts(), max_length=data_args.passage_max_len)
    loss = FlopsM3Loss(training_args.loss_config(), flops_weight=custom.flops_weight)
    prepare_for_training(model, training_args)  # freeze what no term trains; attention settings
    trainer = M3Trainer(
        model=model,
        args=training_args,
        data_args=data_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        loss=loss,
    )
    trainer.train()
    trainer.save_model()
    logger.info("saved to %s; reload with %s.from_pretrained", training_args.output_dir, model_class.__name__)
    return trainer


if __name__ == "__main__":
    main()
