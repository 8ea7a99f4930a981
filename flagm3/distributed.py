"""Several processes: cross-device negatives, process-group setup, loading under DeepSpeed ZeRO-3.

Cross-device negatives (``--negatives_cross_device``): every rank scores its own queries against the passages of
all ranks, gathered with gradients (:func:`gather_passages`); loss and gradients equal those of one process
holding the whole global batch. Every rank must make the same collective calls in the same order, which the
training data guarantees: the batch sampler gives each rank the same number of batches (an incomplete last
global batch is completed with earlier items, or dropped with ``--dataloader_drop_last``), and keeps
``no_in_batch_neg`` datasets in global batches of their own, so all ranks agree on whether to gather.
Token-level outputs are padded to the longest length on any rank before gathering (gloo aborts on uneven
shapes).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .modeling_m3 import M3Output


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_process_group(args: Any) -> None:
    """Start the process group of ``TrainingArguments`` now, DeepSpeed's communication layer included.

    Call it before loading the model: under ZeRO-3 ``from_pretrained`` partitions the weights while loading,
    which needs the world size. (On CPU the Trainer starts only torch's gloo group; DeepSpeed then reads a
    world size of 1 and rejects the batch sizes.)
    """
    _ = args.device  # TrainingArguments starts torch.distributed (and accelerate's state) on first use
    if getattr(args, "deepspeed", None) and dist.is_available() and dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=dist.get_backend())


def shutdown_process_group() -> None:
    """Wait for every rank, then tear the process group down (a no-op in a single process).

    Ending a gloo run without it lets the first rank to finish close its sockets while another rank's
    communication threads still run: that rank aborts with ``terminate called without an active exception``.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def check_deepspeed_config(args: Any) -> None:
    """Refuse settings that a DeepSpeed config would silently override.

    With an ``"optimizer"`` section DeepSpeed builds the optimizer from a flat parameter list, so the heads'
    own learning rate (``--head_learning_rate``) would be ignored.
    """
    hf_config = getattr(args, "hf_deepspeed_config", None)
    if hf_config is None:
        return
    stage = (hf_config.config.get("zero_optimization") or {}).get("stage", 0)
    if getattr(args, "sub_batch_size", None) and stage == 3:
        source = args.deepspeed if isinstance(args.deepspeed, str) else "<config>"
        raise ValueError(f"--sub_batch_size {args.sub_batch_size} and --deepspeed {source} (ZeRO-3) conflict: "
                         "cached gradients run under ZeRO stages 0-2; use a stage 0-2 config or drop --sub_batch_size")
    if getattr(args, "head_learning_rate", None) is None:
        return
    if "optimizer" in hf_config.config:
        raise ValueError(
            f"{args.deepspeed}: --head_learning_rate needs the Trainer's optimizer, but this DeepSpeed config has an "
            '"optimizer" section; remove it (the Trainer then builds AdamW from --learning_rate, --weight_decay, '
            "--adam_beta1/2, --adam_epsilon) or drop --head_learning_rate."
        )


def zero3_enabled() -> bool:
    """True while a Trainer's DeepSpeed ZeRO-3 config is active (``from_pretrained`` then partitions weights)."""
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return bool(is_deepspeed_zero3_enabled())


@contextmanager
def full_weights_on_load(args: Any) -> Iterator[None]:
    """Load models whole on every rank even under ZeRO-3; DeepSpeed partitions them when the Trainer starts.

    For models assembled from parts (``M3Model.from_encoder`` builds and initialises an encoder, then swaps in
    the pretrained one), which ``deepspeed.zero.Init`` would partition mid-construction.
    """
    hf_config = getattr(args, "hf_deepspeed_config", None)
    if hf_config is None or not zero3_enabled():
        yield
        return
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(hf_config)


def keep_used_weight_conversions(model: nn.Module) -> None:
    """Save with the model's own parameter names after a ZeRO-3 ``from_pretrained``.

    transformers' ZeRO-3 loader remembers every key-renaming rule, used or not (the legacy ``LayerNorm.gamma``
    -> ``weight`` ones included), and ``save_pretrained`` reverses them all: the checkpoint would name
    LayerNorm weights ``gamma``/``beta``. Keep only the rules that matched a checkpoint key, as the
    non-DeepSpeed loader does.
    """
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [c for c in conversions if getattr(c, "was_used", lambda: False)()]


def gather_with_grad(t: Tensor) -> Tensor:
    """Concatenate ``t`` [n, ...] from all ranks along dim 0; gradients flow back to the owning rank.

    The backward of the gather sums every rank's gradient for each slice (a reduce-scatter), so a loss over
    local queries against all passages trains every passage by every rank's loss. With DDP averaging the
    gradients, the update is the gradient of the mean of the ranks' losses: the loss of one process holding
    the whole global batch. Shapes must agree on every rank beyond dim 0 (see :func:`pad_to_common_length`).
    """
    t = t.contiguous()
    try:  # functional collectives with autograd; torch.distributed.nn's all_gather is deprecated in newer torch
        from torch.distributed._functional_collectives import all_gather_single_autograd, wait_tensor
    except ImportError:
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(t), dim=0)
    return wait_tensor(all_gather_single_autograd(t, 0, dist.group.WORLD))


def gather_without_grad(t: Tensor) -> Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


def pad_to_common_length(t: Tensor, dim: int, value: float = 0) -> Tensor:
    """Right-pad ``t`` along ``dim`` to the longest length on any rank (gloo cannot gather uneven shapes)."""
    length = torch.tensor([t.shape[dim]], device=t.device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    missing = int(length.item()) - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - dim - 1) + [0, missing]
    return F.pad(t, pad, value=value)


def gather_passages(p: M3Output, p_ids: Tensor, pad_token_id: int = 0) -> tuple[M3Output, Tensor]:
    """All ranks' passages for every head that was computed: dense [W*P, H], sparse [W*P, L*], ColBERT
    [W*P, L*-1, D] with token-level tensors padded to a common length L* (padding has zero weight/mask)."""
    sparse: Optional[Tensor] = None
    colbert: Optional[Tensor] = None
    colbert_mask: Optional[Tensor] = None
    dense = gather_with_grad(p.dense) if p.dense is not None else None
    ids = gather_without_grad(pad_to_common_length(p_ids, 1, pad_token_id))
    if p.sparse is not None:
        sparse = gather_with_grad(pad_to_common_length(p.sparse, 1))
    if p.colbert is not None:
        colbert = gather_with_grad(pad_to_common_length(p.colbert, 1))
        colbert_mask = gather_without_grad(pad_to_common_length(p.colbert_mask, 1))
    return M3Output(dense=dense, sparse=sparse, colbert=colbert, colbert_mask=colbert_mask), ids
