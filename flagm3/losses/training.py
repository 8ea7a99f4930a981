"""The loss of one training batch, from the model and the raw batch: the step's forward work in one module.

:class:`M3BatchLoss` (formerly ``M3TrainingLoss``) encodes both sides of a batch (in length-sorted chunks, ``max_length_chunks``), gathers
the passages of every process (``negatives_cross_device``, :mod:`flagm3.distributed`), and applies the M3
objective (:class:`~flagm3.losses.objective.M3Loss`). With ``sub_batch_size`` it caches gradients
(:mod:`flagm3.losses.gradcache`): the loss it returns replays the sub-batches from a backward hook, so any
training loop that calls ``backward`` on it (the Hugging Face Trainer's own, DeepSpeed's) trains with it.

Nothing here reads a value back to the host except lengths: each side's attention mask once (the length chunks
need the rows' lengths) and, with negatives gathered across processes, the longest token length on any rank.
The logs stay tensors.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..data import chunked_padding_fraction, split_by_length
from ..data.sampler import CHUNK_OVERHEAD_TOKENS
from ..distributed import gather_passages, world
from ..modeling_m3 import M3Output, merge_outputs, unwrap_m3
from .gradcache import attach_replay, encode_without_graph
from .objective import M3Loss, M3LossOutput


def _float_output(out: M3Output) -> M3Output:
    """Scores and losses in fp32 even when the encoder ran in bf16/fp16."""
    cast = lambda t: t.float() if t is not None and t.is_floating_point() else t  # noqa: E731
    return M3Output(dense=cast(out.dense), sparse=cast(out.sparse), colbert=cast(out.colbert),
                    colbert_mask=out.colbert_mask)


def trained_sparse_head(model: nn.Module) -> nn.Module:
    """The sparse head whose parameters train: under PEFT (LoRA with ``modules_to_save``) the active adapter's
    copy inside the ``ModulesToSaveWrapper``, not the frozen original beside it."""
    head = unwrap_m3(model).sparse_linear
    copies = getattr(head, "modules_to_save", None)
    if copies is None:
        return head
    active = head.active_adapter
    return copies[active if isinstance(active, str) else active[0]]


SPARSE_ANCHOR_FILE = "sparse_anchor.safetensors"  # the sparse anchor's reference, in checkpoints (when on)


class M3BatchLoss(nn.Module):
    """``loss(model, inputs, step)`` -> :class:`M3LossOutput`: the loss of one batch of
    :class:`flagm3.data.M3Collator`, computed from the model and the raw batch (``M3TrainingLoss`` is its old name).
    Its state (the sparse anchor's reference) goes into checkpoints: :meth:`save_state` / :meth:`load_state`.

    Args:
        objective: the M3 objective on head outputs (its ``heads`` are the outputs computed).
        sub_batch_size: cached-gradient training in chunks of this many texts (``None``: one graph).
        max_length_chunks: encode each side in at most this many length-sorted chunks (1: whole).
        negatives_cross_device: score local queries against the passages of every process.
    """

    def __init__(
        self,
        objective: M3Loss,
        sub_batch_size: Optional[int] = None,
        max_length_chunks: int = 1,
        negatives_cross_device: bool = False,
    ) -> None:
        super().__init__()
        self.objective = objective
        self.sub_batch_size = int(sub_batch_size) if sub_batch_size else None
        self.max_length_chunks = int(max_length_chunks)
        self.negatives_cross_device = bool(negatives_cross_device)
        self._sparse_initial: Optional[list[Tensor]] = None  # the sparse head's parameters, for the anchor

    @classmethod
    def from_args(cls, objective: M3Loss, args: Any) -> M3BatchLoss:
        """The loss ``M3TrainingArguments`` describe around ``objective``."""
        return cls(
            objective,
            sub_batch_size=getattr(args, "sub_batch_size", None),
            max_length_chunks=getattr(args, "max_length_chunks", 1),
            negatives_cross_device=getattr(args, "negatives_cross_device", False),
        )

    @property
    def heads(self) -> tuple[str, ...]:
        return self.objective.heads

    # ------------------------------------------------------------------------------------ encoding
    def encode(self, model: nn.Module, features: dict[str, Tensor], lengths: Optional[list[int]] = None) -> M3Output:
        """Run the (wrapped) model on one side of the batch, computing only the heads the objective needs.

        With ``max_length_chunks > 1`` the rows are encoded in length-sorted chunks, each cut to its own longest
        text (:func:`flagm3.data.split_by_length`), and reassembled: the same outputs for fewer padded tokens.
        ``lengths``: the rows' token counts when known on the host (``None``: read from the mask).
        """
        mask = features["attention_mask"]
        if self.max_length_chunks > 1 and lengths is None:
            lengths = self._lengths(mask)
        elif lengths is not None and len(lengths) != mask.shape[0]:
            raise ValueError(f"lengths has {len(lengths)} rows, the batch {mask.shape[0]}")
        if self.max_length_chunks < 2 or lengths is None:
            return _float_output(model(**features, heads=self.heads))
        chunks = split_by_length(features, self.max_length_chunks, CHUNK_OVERHEAD_TOKENS, lengths=lengths)
        if len(chunks) < 2:
            return _float_output(model(**features, heads=self.heads))
        parts = [_float_output(model(**part, heads=self.heads)) for _, part in chunks]
        return merge_outputs(parts, [rows for rows, _ in chunks], mask.shape[1])

    @staticmethod
    def _lengths(mask: Tensor) -> Optional[list[int]]:
        """The rows' token counts of a right-padded mask (``None`` when left-padded: then encoded whole)."""
        host = mask.detach().cpu()
        if not bool((host.cumprod(1) == host).all()):
            return None
        return host.ne(0).sum(1).tolist()

    # ------------------------------------------------------------------------------------ the loss
    def loss_from_outputs(
        self, q: M3Output, q_ids: Tensor, p: M3Output, p_ids: Tensor, inputs: dict[str, Any], step: int = 0
    ) -> M3LossOutput:
        """The objective of one batch from both sides' head outputs (passages gathered across processes if
        asked; every process makes the same collective calls, see :mod:`flagm3.distributed`)."""
        no_in_batch_neg = bool(inputs.get("no_in_batch_neg", False))
        group_size = p_ids.shape[0] // q_ids.shape[0]
        offset = 0
        if self.negatives_cross_device and not no_in_batch_neg:
            rank, size = world()
            if size > 1:
                p, p_ids = gather_passages(p, p_ids)
                offset = rank * q_ids.shape[0]
        return self.objective(
            q, q_ids, p, p_ids,
            group_size=group_size,
            teacher_scores=inputs.get("teacher_scores"),
            no_in_batch_neg=no_in_batch_neg,
            step=step,
            query_offset=offset,
        )

    def forward(self, model: nn.Module, inputs: dict[str, Any], step: int = 0) -> M3LossOutput:
        """The loss of ``inputs`` (``query``/``passage`` features, optional ``teacher_scores``,
        ``no_in_batch_neg``) at optimizer step ``step``; ``logs`` also hold ``padding_query`` and
        ``padding_passage`` (host floats: the fraction of padded positions the encoder processes)."""
        q_feat, p_feat = inputs["query"], inputs["passage"]
        q_len, p_len = self._lengths(q_feat["attention_mask"]), self._lengths(p_feat["attention_mask"])
        if self.sub_batch_size and torch.is_grad_enabled():
            out = self._cached(model, inputs, step, q_len, p_len)
        else:
            q = self.encode(model, q_feat, q_len)
            p = self.encode(model, p_feat, p_len)
            out = self.loss_from_outputs(q, q_feat["input_ids"], p, p_feat["input_ids"], inputs, step)
        anchor = self.sparse_anchor(model)
        if anchor is not None:
            out.loss = out.loss + anchor
            out.stats["sparse_anchor"] = anchor.detach()
        for side, features, lengths in (("passage", p_feat, p_len), ("query", q_feat, q_len)):
            out.logs[f"padding_{side}"] = chunked_padding_fraction(
                features["attention_mask"], self.max_length_chunks, CHUNK_OVERHEAD_TOKENS, lengths=lengths)
        return out

    def sparse_anchor(self, model: nn.Module) -> Optional[Tensor]:
        """The objective's pull of the sparse head towards its reference parameters (``sparse_anchor_weight``;
        ``None`` when off or the sparse head is not in the loss). The reference is the head at the first training
        batch, or the one :meth:`load_sparse_anchor_reference` restored from a checkpoint."""
        if self.objective.config.sparse_anchor_weight <= 0 or "sparse" not in self.objective.config.computed_heads():
            return None
        head = trained_sparse_head(model)
        if any(p.numel() == 0 for p in head.parameters()):
            raise ValueError("sparse_anchor_weight needs the sparse head's whole parameters on every process; under "
                             "DeepSpeed ZeRO-3 they are partitioned: use ZeRO stage 0-2 or sparse_anchor_weight 0.")
        if self._sparse_initial is None:
            self._sparse_initial = [p.detach().clone() for p in head.parameters()]
        return self.objective.sparse_anchor(head, self._sparse_initial)

    def sparse_anchor_reference(self) -> Optional[dict[str, Tensor]]:
        """The anchor's reference (``{"weight": [1, H], "bias": [1]}``), ``None`` before the first batch or
        when the anchor is off; saved with each checkpoint so that a resumed run anchors to the same point."""
        if self._sparse_initial is None:
            return None
        return dict(zip(("weight", "bias"), (t.detach().cpu().contiguous() for t in self._sparse_initial)))

    def load_sparse_anchor_reference(self, reference: dict[str, Tensor]) -> None:
        """Restore the reference :meth:`sparse_anchor_reference` returned."""
        self._sparse_initial = [reference["weight"], reference["bias"]]

    def save_state(self, directory: str) -> None:
        """Write the loss's state into a checkpoint ``directory`` (the sparse anchor's reference, when on)."""
        reference = self.sparse_anchor_reference()
        if reference is not None:
            save_file(reference, os.path.join(directory, SPARSE_ANCHOR_FILE))

    def load_state(self, directory: str) -> None:
        """Restore what :meth:`save_state` wrote into ``directory`` (nothing there: nothing changes)."""
        path = os.path.join(directory, SPARSE_ANCHOR_FILE)
        if os.path.isfile(path) and self.objective.config.sparse_anchor_weight > 0:
            self.load_sparse_anchor_reference(load_file(path))

    def _cached(self, model: nn.Module, inputs: dict[str, Any], step: int, q_len: Optional[list[int]],
                p_len: Optional[list[int]]) -> M3LossOutput:
        """GradCache: outputs without a graph, the objective's gradient w.r.t. them, and a loss whose backward
        replays the sub-batches (:mod:`flagm3.losses.gradcache`)."""
        size = self.sub_batch_size
        q = encode_without_graph(self.encode, model, inputs["query"], size, q_len)
        p = encode_without_graph(self.encode, model, inputs["passage"], size, p_len)
        with torch.enable_grad():
            out = self.loss_from_outputs(q.leaves, inputs["query"]["input_ids"], p.leaves,
                                         inputs["passage"]["input_ids"], inputs, step)
            out.loss.backward()
        loss = attach_replay(out.loss, self.encode, model, [q, p])
        return M3LossOutput(loss=loss, logs=out.logs, logits={k: v.detach() for k, v in out.logits.items()},
                            stats=out.stats)


M3TrainingLoss = M3BatchLoss  # the old name, kept for existing code
