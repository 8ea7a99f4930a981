"""Cached-gradient contrastive training (GradCache, Gao et al. 2021), the way sentence-transformers'
``CachedMultipleNegativesRankingLoss`` runs it: inside the loss, with no custom training step.

1. :func:`encode_without_graph`: encode each side in chunks of ``sub_batch_size`` texts without a graph,
   remembering each chunk's random state; the chunk outputs are joined into batch-sized leaves.
2. The caller computes the full-batch loss on those leaves and back-propagates it to them (their ``.grad``).
3. :func:`attach_replay`: the returned loss is a detached copy whose backward hook encodes each chunk again
   with a graph, under its saved random state, and back-propagates ``sum(output * cached_gradient)`` scaled
   by the incoming gradient (gradient accumulation, loss scaling).

The parameter gradients equal those of the uncached loss; memory holds one chunk's activations at a time.
Under DDP all but the last chunk's backward run in ``no_sync``; under DeepSpeed ZeRO-1/2 the parameters are
marked not ready (``ds_grad_is_ready``) until the last chunk, so each gradient is reduced once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from ..modeling_m3 import M3Output, merge_outputs
from .chunking import trim_padding

Encode = Callable[[nn.Module, dict, Optional[list]], M3Output]  # (model, features, row lengths or None)
FIELDS = ("dense", "sparse", "colbert")


class RandomState:
    """Captures the CPU and CUDA random states so that dropout repeats exactly on the second forward."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    @contextlib.contextmanager
    def restored(self):
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if self.cuda else []):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


class AutocastState:
    """The autocast setting of the forward pass, re-entered for the replay (which runs inside ``backward``)."""

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self.enabled = torch.is_autocast_enabled(device_type)
        self.dtype = torch.get_autocast_dtype(device_type) if self.enabled else None

    def __call__(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def _chunks(features: dict[str, Tensor], size: int, lengths: Optional[list[int]] = None) -> list[dict[str, Tensor]]:
    """Split a tokenised batch into chunks of ``size`` texts, each trimmed of its all-padding trailing columns.

    ``lengths``: the rows' token counts of a right-padded batch, when known on the host (no device read)."""
    total = features["input_ids"].shape[0]
    chunks = []
    for start in range(0, total, size):
        part = {k: v[start : start + size] for k, v in features.items()}
        if lengths is None:
            chunks.append(trim_padding(part))
        else:
            width = max(1, max(lengths[start : start + size]))
            chunks.append({k: v[:, :width] for k, v in part.items()})
    return chunks


@dataclass
class CachedSide:
    """One side of the batch encoded without a graph: its chunks, their random states, and the joined outputs
    as leaves that require gradients (``[B, ...]``, token fields padded to the batch's length)."""

    chunks: list[dict[str, Tensor]]
    states: list[RandomState]
    leaves: M3Output
    size: int
    lengths: Optional[list[int]] = None

    def chunk_lengths(self, i: int) -> Optional[list[int]]:
        return None if self.lengths is None else self.lengths[i * self.size : (i + 1) * self.size]


def encode_without_graph(encode: Encode, model: nn.Module, features: dict[str, Tensor], size: int,
                         lengths: Optional[list[int]] = None) -> CachedSide:
    """Step 1 for one side: ``encode(model, chunk, chunk_lengths)`` for each chunk of ``size`` texts, under
    ``no_grad``. ``lengths``: the rows' token counts of a right-padded batch, if known on the host."""
    side = CachedSide(chunks=_chunks(features, size, lengths), states=[], leaves=M3Output(), size=size,
                      lengths=lengths)
    outputs = []
    with torch.no_grad():
        for i, chunk in enumerate(side.chunks):
            side.states.append(RandomState())
            outputs.append(encode(model, chunk, side.chunk_lengths(i)))
    total, length = features["attention_mask"].shape
    merged = merge_outputs(outputs, [range(s, min(s + size, total)) for s in range(0, total, size)], length)
    leaf = lambda t: None if t is None else t.detach().requires_grad_(True)  # noqa: E731
    side.leaves = M3Output(dense=leaf(merged.dense), sparse=leaf(merged.sparse), colbert=leaf(merged.colbert),
                           colbert_mask=merged.colbert_mask)
    return side


def _surrogate(out: M3Output, leaves: M3Output, start: int, size: int) -> Optional[Tensor]:
    """``sum(rep * cached_grad)`` over the heads of one chunk, whose gradient w.r.t. the parameters is the cached
    chain rule; ``None`` when no head received a gradient."""
    terms = []
    for name in FIELDS:
        rep, leaf = getattr(out, name), getattr(leaves, name)
        if rep is None or leaf is None or leaf.grad is None:
            continue
        grad = leaf.grad[start : start + size]
        if name != "dense":
            grad = grad[:, : rep.shape[1]]  # the chunk was trimmed: its padding columns have no output
        terms.append((rep * grad.to(rep.dtype)).sum())
    return torch.stack(terms).sum() if terms else None


@contextlib.contextmanager
def _local_accumulation(model: nn.Module, last: bool) -> Iterator[None]:
    """Accumulate this chunk's gradients locally unless it is the last one (then reduce them once)."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and hasattr(optimizer, "params_already_reduced"):  # DeepSpeed ZeRO-1/2 engine
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.ds_grad_is_ready = last
        try:
            yield
        finally:
            for p in params:
                p.ds_grad_is_ready = True
    elif hasattr(model, "no_sync") and hasattr(model, "require_backward_grad_sync") and not last:  # DDP
        with model.no_sync():
            yield
    else:
        yield


def attach_replay(loss: Tensor, encode: Encode, model: nn.Module, sides: list[CachedSide]) -> Tensor:
    """Step 3: a detached copy of ``loss`` whose backward replays every chunk with a graph and back-propagates
    its cached gradients, scaled by the gradient arriving at the loss."""
    autocast = AutocastState(loss.device.type)
    jobs = [(side, i) for side in sides for i in range(len(side.chunks))]

    def replay(grad_output: Tensor) -> None:
        with torch.enable_grad(), autocast():
            for n, (side, i) in enumerate(jobs):
                with _local_accumulation(model, last=n == len(jobs) - 1), side.states[i].restored():
                    out = encode(model, side.chunks[i], side.chunk_lengths(i))
                    surrogate = _surrogate(out, side.leaves, i * side.size, side.size)
                    if surrogate is not None:
                        (surrogate * grad_output.to(surrogate.dtype)).backward()

    cached = loss.detach().requires_grad_(True)
    cached.register_hook(replay)
    return cached
