"""What :class:`~flagm3.trainer.M3Trainer` adds to a training run besides the loss, as ``TrainerCallback``s.

- :class:`LossTermLogs` (not a callback: the trainer feeds it): each micro-batch's loss terms and statistics
  (``loss_<term>``, ``self_distill_<head>``, ``padding_*``, ``sparse_*``) summed as device tensors, averaged
  over the micro-batches and processes when the Trainer logs (one host read per logging step).
- :class:`SparseHealthCallback`: one WARNING when the sparse head collapses (from the logged statistics).
- :class:`NonFiniteStepGuard`: optimizer steps with a non-finite gradient change nothing and are reported; too
  many in a row stop training (:class:`NonFiniteLossError`).
- :class:`ModelCardCallback`: what the model card records of the run (recipe, loss, sparse health, metrics).
- :class:`~flagm3.checkpointing.CheckpointCallback`: complete checkpoints (in :mod:`flagm3.checkpointing`).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn
from transformers import TrainerCallback

from .distributed import world
from .modeling_m3 import unwrap_m3
from .recipe import HEAD_MODULES

logger = logging.getLogger("flagm3.trainer")  # the trainer's messages, wherever they are decided


class NonFiniteLossError(RuntimeError):
    """Too many consecutive training steps had a non-finite loss or gradient."""


def largest_magnitude(tensors: list[Tensor]) -> Tensor:
    """``max |t|`` over all ``tensors`` in fused kernels per device and dtype (NaN if any entry is NaN)."""
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is not None:
        return get_total_norm(tensors, norm_type=math.inf)
    return torch.stack([t.detach().abs().max().float() for t in tensors]).max()


# ------------------------------------------------------------------------------------------- logging
class LossTermLogs:
    """Sums of the loss's per-micro-batch logs and statistics until the next logging step."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = defaultdict(float)  # tensors (losses, statistics) and host floats (padding)
        self.count: Any = 0  # micro-batches with a finite loss (a tensor once counting starts)
        self.host_count = 0  # micro-batches recorded
        self.step: list[dict[str, Any]] = []  # this optimizer step's micro-batch logs, read when it is skipped
        self.last: dict[str, Any] = {}

    def add(self, logs: dict[str, Any], stats: Optional[dict[str, Tensor]] = None) -> None:
        """Add one micro-batch (no host read); a micro-batch with a non-finite loss adds only its padding."""
        self.last = logs
        self.step.append(logs)
        stats = dict(stats or {})
        for side in ("query", "passage"):  # a ratio (weight per active token): summed times its denominator
            if f"sparse_weight_{side}" in stats and f"sparse_active_{side}" in stats:
                stats[f"sparse_weight_{side}"] = stats[f"sparse_weight_{side}"] * stats[f"sparse_active_{side}"]
        finite = torch.isfinite(logs["loss"])
        for key, value in {**logs, **stats}.items():
            if key == "loss":
                continue
            if torch.is_tensor(value):
                self.sums[key] = self.sums[key] + torch.where(finite, value, torch.zeros_like(value))
            else:
                self.sums[key] += value
        self.count = self.count + finite.to(torch.float32)
        self.host_count += 1

    def reduce(self, device: Any) -> dict[str, float]:
        """The means since the last call, over micro-batches and processes (one all-reduce, one host read)."""
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        values = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float32, device=device) for k in keys]
                             + [torch.as_tensor(self.count, dtype=torch.float32, device=device)])
        if world()[1] > 1:
            torch.distributed.all_reduce(values)
        values = values.tolist()
        count, host_count = values[-1], self.host_count * world()[1]
        out = {}
        for key, value in zip(keys, values):
            n = host_count if not torch.is_tensor(self.sums[key]) else count
            if n:
                out[key] = round(value / n, 6)
        raw = dict(zip(keys, values))
        for side in ("query", "passage"):  # over every active token of every micro-batch and process
            if raw.get(f"sparse_active_{side}") and f"sparse_weight_{side}" in raw:
                out[f"sparse_weight_{side}"] = round(raw[f"sparse_weight_{side}"] / raw[f"sparse_active_{side}"], 6)
        self.sums.clear()
        self.count, self.host_count = 0, 0
        return out

    def nonfinite_loss(self) -> tuple[str, list[str]]:
        """(``loss nan``, its non-finite terms) for this step's first micro-batch with a non-finite loss;
        ``("", [])`` when every loss was finite."""
        for logs in self.step:
            values = {k: float(v) for k, v in logs.items()}
            if not math.isfinite(values.get("loss", 0.0)):
                return f"loss {values['loss']}", [k for k, v in values.items() if not math.isfinite(v) and k != "loss"]
        return "", []


class SparseHealthCallback(TrainerCallback):
    """One WARNING when more than 5% of the passages have all-zero lexical vectors, or when the active tokens per
    passage or query fall below half of their first logged value."""

    def __init__(self) -> None:
        self.start: Optional[dict[str, float]] = None
        self.warned = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "sparse_active_passage" not in logs:
            return
        if self.start is None:
            self.start = {k: v for k, v in logs.items() if k.startswith("sparse_")}
        if self.warned:
            return
        start = self.start
        halved = [side for side in ("passage", "query")
                  if logs[f"sparse_active_{side}"] < 0.5 * start[f"sparse_active_{side}"]]
        if logs["sparse_zero_passage"] > 0.05 or halved:
            self.warned = True
            logger.warning(
                "sparse head collapsing at step %d: %.1f%% of passages have all-zero lexical weights, active tokens "
                "per passage %.1f (%.1f at the start), per query %.1f (%.1f at the start); see "
                "docs/heads-and-loss.md, 'Training the sparse head'",
                state.global_step, 100 * logs["sparse_zero_passage"], logs["sparse_active_passage"],
                start["sparse_active_passage"], logs["sparse_active_query"], start["sparse_active_query"],
            )


# ---------------------------------------------------------------------------------------- non-finite
class NonFiniteStepGuard(TrainerCallback):
    """Skips and reports optimizer steps with a non-finite gradient.

    - Without DeepSpeed (:meth:`check_gradients`, after the last micro-batch's backward, before clipping): one
      fused check of every gradient; a non-finite one drops all gradients, so the optimizer and the schedule
      leave this step alone.
    - Under DeepSpeed the gradients are reduced into partitions during backward and the engine steps inside it.
      ZeRO-1/2/3 skip a step whose gradients (or their norm) are non-finite themselves; for an optimizer the
      engine steps directly (ZeRO-0), :meth:`watch_optimizer`'s step pre-hook drops the gradients instead.
    - fp16 with loss scaling: the scaler skips such steps itself (part of finding its scale; not reported).

    ``on_step_end`` reports a skipped step (WARNING naming the loss term or the parameters) and raises
    :class:`NonFiniteLossError` after ``max_consecutive_nonfinite_steps`` in a row. Every process decides
    alike: gradients and DeepSpeed's overflow flag are the same on every process.
    """

    def __init__(self, terms: LossTermLogs, max_consecutive: int = 3, fp16: bool = False) -> None:
        self.terms = terms
        self.max_consecutive = max_consecutive
        self.fp16 = fp16
        self.skipped: Optional[str] = None  # what made this step non-finite, once found
        self.bad_steps = 0

    def _describe(self, model: nn.Module, grads_of: Optional[set[int]] = None) -> str:
        what, terms = self.terms.nonfinite_loss()
        if what:
            return what + (f" (terms: {', '.join(terms)})" if terms else "")
        bad = [n for n, p in unwrap_m3(model).named_parameters() if p.grad is not None
               and (grads_of is None or id(p) in grads_of) and not torch.isfinite(p.grad).all()]
        bad.sort(key=lambda n: not n.startswith(HEAD_MODULES))  # the heads first: nearest to the loss
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        return f"gradient of {', '.join(bad[:3]) or 'a parameter'}{more}"

    def check_gradients(self, model: nn.Module, optimizer: Any) -> None:
        """Drop every gradient if one is non-finite (one fused max-norm, one host read)."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        finite = not grads or bool(torch.isfinite(largest_magnitude(grads)))
        if not finite:
            self.skipped = self._describe(model)
            model.zero_grad(set_to_none=True)  # the optimizer leaves parameters without gradients alone
        if hasattr(optimizer, "_is_overflow"):  # accelerate's step_was_skipped: no scheduler step either
            optimizer._is_overflow = not finite

    def watch_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        """Under DeepSpeed: a step pre-hook on the optimizer the engine steps, dropping non-finite gradients
        (a no-op under ZeRO-1/2/3, which skip such steps before reaching it). ``optimizer.overflow`` tells
        DeepSpeed and accelerate that the step was skipped. An optimizer DeepSpeed builds from its config (a
        placeholder here) is not watched: ZeRO-1/2/3 check it themselves."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            return
        optimizer.overflow = False

        def drop_nonfinite(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
            opt.overflow = bool(params) and not bool(torch.isfinite(largest_magnitude([p.grad for p in params])))
            if opt.overflow:
                self.skipped = self._describe(model, {id(p) for p in params})
                for p in params:
                    p.grad = None

        optimizer.register_step_pre_hook(drop_nonfinite)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self.skipped is None and getattr(optimizer, "step_was_skipped", False) and not self.fp16:
            self.skipped = self.terms.nonfinite_loss()[0] or "gradient"  # DeepSpeed skipped it
        self.terms.step.clear()
        if self.skipped is None:
            self.bad_steps = 0
            return
        what, self.skipped = self.skipped, None
        self.bad_steps += 1
        logger.warning("step %d: non-finite %s; step skipped (%d in a row)", state.global_step, what, self.bad_steps)
        if self.bad_steps >= self.max_consecutive:
            last = {k: float(v) for k, v in self.terms.last.items() if k.startswith(("loss", "self_distill"))}
            raise NonFiniteLossError(
                f"{self.bad_steps} consecutive steps with a non-finite {what.split(' (')[0]} at step "
                f"{state.global_step}; last per-term losses: {last}. Lower the learning rate, check the data, "
                "or use bf16."
            )


# ---------------------------------------------------------------------------------------- model card
@dataclass
class ModelCardData:
    """What the model card records of a run, gathered by :class:`ModelCardCallback`."""

    recipe: dict[str, Any] = field(default_factory=dict)
    loss: dict[str, Any] = field(default_factory=dict)
    sparse_health: list[dict[str, float]] = field(default_factory=list)  # the first and the last logged
    eval_metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation


class ModelCardCallback(TrainerCallback):
    """Fills :class:`ModelCardData` from the run: the recipe and loss at the start, the sparse health as logged,
    the metrics of each evaluation."""

    def __init__(self, data: ModelCardData, recipe: Any, loss: Any) -> None:
        self.data = data
        self.recipe, self.loss = recipe, loss

    def on_train_begin(self, args, state, control, **kwargs):
        self.data.recipe = self.recipe.card()
        self.data.loss = self.loss.get_config_dict()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "sparse_active_passage" in logs:
            entry = {"step": state.global_step, **{k: v for k, v in logs.items() if k.startswith("sparse_")}}
            self.data.sparse_health[1 if self.data.sparse_health else 0:] = [entry]

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics:
            self.data.eval_metrics = dict(metrics)
