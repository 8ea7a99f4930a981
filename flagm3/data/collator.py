"""Batch collation: tokenise queries and passage groups with dynamic padding."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch


def right_padded_lengths(attention_mask: torch.Tensor) -> Optional[List[int]]:
    """Each row's token count of a right-padded host mask ``[B, L]``; ``None`` when some row is not
    right-padded (then the loss encodes that side whole)."""
    mask = attention_mask.ne(0).long()
    if not bool((mask.cumprod(1) == mask).all()):
        return None
    return mask.sum(1).tolist()


class M3Collator:
    """Collate :class:`~flagm3.data.dataset.M3TrainDataset` items into model inputs.

    Returns ``{"query": {input_ids, attention_mask[, token_type_ids]}`` LongTensors ``[B, Lq]``,
    ``"passage"``: the same ``[B*G, Lp]`` in group-major order (rows ``i*G:(i+1)*G`` belong to query ``i``,
    positive first), ``"teacher_scores"``: FloatTensor ``[B, G]`` (only when every item has scores),
    ``"no_in_batch_neg"``: bool, ``"lengths"``: ``{"query": [B], "passage": [B*G]}`` host lists of each row's
    token count (``None`` for a side that is not right-padded), so that the loss never reads the masks back
    from the device}``. Each side is one batched tokenizer call, truncated to its max length and padded to the
    longest sequence in the batch, then up to a multiple of ``pad_to_multiple_of``.
    """

    def __init__(
        self,
        tokenizer: Any,
        query_max_len: int = 32,
        passage_max_len: int = 128,
        pad_to_multiple_of: Optional[int] = None,
    ):
        self.tokenizer = tokenizer
        self.query_max_len = query_max_len
        self.passage_max_len = passage_max_len
        self.pad_to_multiple_of = pad_to_multiple_of

    def _tokenize(self, texts: List[str], max_len: int) -> Dict[str, torch.Tensor]:
        encoded = self.tokenizer(
            texts,
            truncation=True,
            max_length=max_len,
            padding="longest",
            pad_to_multiple_of=self.pad_to_multiple_of,
            return_tensors="pt",
        )
        return {k: v.long() for k, v in encoded.items()}

    def __call__(self, features: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        group_sizes = {len(f["passages"]) for f in features}
        if len(group_sizes) != 1:
            sizes = sorted(group_sizes)
            raise ValueError(f"all items of a batch need the same number of passages, got {sizes}")
        flags = {bool(f.get("no_in_batch_neg", False)) for f in features}
        if len(flags) != 1:
            raise ValueError(
                "batch mixes no_in_batch_neg datasets with others; use M3BatchSampler, which keeps them apart"
            )
        batch: Dict[str, Any] = {
            "query": self._tokenize([f["query"] for f in features], self.query_max_len),
            "passage": self._tokenize([p for f in features for p in f["passages"]], self.passage_max_len),
            "no_in_batch_neg": flags.pop(),
        }
        batch["lengths"] = {side: right_padded_lengths(batch[side]["attention_mask"]) for side in ("query", "passage")}
        scores = [f.get("teacher_scores") for f in features]
        if all(s is not None for s in scores):
            batch["teacher_scores"] = torch.tensor(scores, dtype=torch.float32)
        return batch
