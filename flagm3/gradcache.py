"""Cached-gradient contrastive training (GradCache, Gao et al. 2021) for all three M3 heads.

1. Encode queries and passages in chunks of ``sub_batch_size`` texts without building a graph.
2. Compute the full-batch loss on those representations (as leaves) and take its gradient w.r.t. them.
3. Encode each chunk again with a graph, under the same random state, and back-propagate
   ``sum(representation * cached_gradient)``.
The parameter gradients equal those of the uncached loss; memory holds one chunk's activations at a time.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .data import trim_padding
from .modeling_m3 import M3Output, merge_outputs

if TYPE_CHECKING:
    from .trainer import M3Trainer


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


def _chunks(features: dict[str, Tensor], size: int) -> list[dict[str, Tensor]]:
    """Split a tokenised batch into chunks of ``size`` texts, each trimmed of its all-padding trailing columns."""
    total = features["input_ids"].shape[0]
    return [trim_padding({k: v[start : start + size] for k, v in features.items()}) for start in range(0, total, size)]


def _concat(outputs: list[M3Output], full_mask: Tensor, size: int) -> M3Output:
    """Join the outputs of consecutive chunks of ``size`` texts into batch-sized leaves that require gradients."""
    total = full_mask.shape[0]
    rows = [range(start, min(start + size, total)) for start in range(0, total, size)]
    merged = merge_outputs(outputs, rows, full_mask.shape[1])
    leaf = lambda t: None if t is None else t.detach().requires_grad_(True)  # noqa: E731
    return M3Output(dense=leaf(merged.dense), sparse=leaf(merged.sparse), colbert=leaf(merged.colbert),
                    colbert_mask=full_mask[:, 1:])


def _surrogate(out: M3Output, cached: M3Output) -> Tensor | None:
    """``sum(rep * grad)`` over the heads, whose gradient w.r.t. the parameters is the cached chain rule.

    ``None`` when no head received a gradient (nothing to back-propagate)."""
    terms = []
    for name in ("dense", "sparse", "colbert"):
        rep, leaf = getattr(out, name), getattr(cached, name)
        if rep is None or leaf is None or leaf.grad is None:
            continue
        grad = leaf.grad[:, : rep.shape[1]] if name != "dense" else leaf.grad
        terms.append((rep * grad.to(rep.dtype)).sum())
    return torch.stack(terms).sum() if terms else None


def cached_gradient_step(trainer: M3Trainer, model: nn.Module, inputs: dict[str, Any]) -> Tensor:
    """One training micro-step with cached gradients; returns the (detached) loss."""
    size = int(trainer.args.sub_batch_size)
    sides = {name: _chunks(inputs[name], size) for name in ("query", "passage")}
    states: dict[str, list[RandomState]] = {name: [] for name in sides}
    outputs: dict[str, list[M3Output]] = {name: [] for name in sides}
    with torch.no_grad():
        for name, chunks in sides.items():
            for chunk in chunks:
                states[name].append(RandomState())
                with trainer.compute_loss_context_manager():
                    outputs[name].append(trainer.encode(model, chunk))
    q = _concat(outputs["query"], inputs["query"]["attention_mask"], size)
    p = _concat(outputs["passage"], inputs["passage"]["attention_mask"], size)
    out = trainer.m3_loss_from_outputs(q, inputs["query"]["input_ids"], p, inputs["passage"]["input_ids"], inputs)
    trainer._record(out.logs, inputs)
    if not trainer.all_finite(out.loss):
        trainer._skip_step(f"loss {float(out.loss.detach())}")
        return torch.zeros((), device=out.loss.device)
    scale = 1.0 / trainer.current_gradient_accumulation_steps
    (out.loss * scale).backward()

    cached = {"query": q, "passage": p}
    jobs = [(name, i) for name in sides for i in range(len(sides[name]))]
    for n, (name, i) in enumerate(jobs):
        sync = n == len(jobs) - 1
        context = contextlib.nullcontext() if sync else trainer.accelerator.no_sync(model)
        with context, states[name][i].restored(), trainer.compute_loss_context_manager():
            chunk_out = trainer.encode(model, sides[name][i])
            start = i * size
            leaf = cached[name]
            sliced = M3Output(
                dense=_slice_leaf(leaf.dense, start, size),
                sparse=_slice_leaf(leaf.sparse, start, size),
                colbert=_slice_leaf(leaf.colbert, start, size),
            )
            surrogate = _surrogate(chunk_out, sliced)
            if surrogate is not None:
                trainer.accelerator.backward(surrogate)
    return out.loss.detach() * scale


class _GradView:
    """A leaf's rows with their cached gradient (what :func:`_surrogate` reads)."""

    def __init__(self, grad: Tensor) -> None:
        self.grad = grad
        self.shape = grad.shape


def _slice_leaf(leaf: Tensor | None, start: int, size: int) -> _GradView | None:
    if leaf is None or leaf.grad is None:
        return None
    return _GradView(leaf.grad[start : start + size])
