"""Alarms that name the fix: ``TrainerCallback``s that each log one WARNING with its cause and remedy.

The usual ways a fine-tuning run does nothing or harm, found while it runs (docs/diagnosing.md):

* :class:`LossNearZeroAlarm`: a loss term stays near 0 for several logging steps: the negatives are too easy.
* :class:`NoUpdateAlarm`: no trainable parameter moved, or the gradient norm is 0: a frozen model or a learning
  rate of 0.
* :class:`EmbeddingsUnchangedAlarm`: the dense embeddings of the eval queries are still step 0's.
* :class:`MetricFallingAlarm`: a head's eval metric fell two evaluations in a row.

Each alarm warns once (per term or ranking) and only on the main process.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from transformers import TrainerCallback

from .modeling_m3 import unwrap_m3

logger = logging.getLogger(__name__)

DOCS = "docs/diagnosing.md"
SNAPSHOT_ELEMENTS = 256  # entries kept per parameter to tell whether it moved


def _warn(state: Any, message: str, *args: Any) -> None:
    if getattr(state, "is_world_process_zero", True):
        logger.warning(message, *args)


class LossNearZeroAlarm(TrainerCallback):
    """A logged loss term (``loss``, ``loss_<term>``) below ``threshold`` for ``patience`` logging steps in a row:
    every positive already wins by a wide margin, so the term no longer teaches anything."""

    def __init__(self, threshold: float = 0.01, patience: int = 3) -> None:
        self.threshold, self.patience = threshold, patience
        self.streak: dict[str, int] = {}
        self.warned: set[str] = set()

    def on_log(self, args, state, control, logs: Optional[dict] = None, **kwargs: Any) -> None:
        for key, value in (logs or {}).items():
            if not (key == "loss" or key.startswith("loss_")) or not isinstance(value, (int, float)):
                continue
            self.streak[key] = self.streak.get(key, 0) + 1 if abs(value) < self.threshold else 0
            if self.streak[key] >= self.patience and key not in self.warned:
                self.warned.add(key)
                _warn(state, "%s below %g for %d logging steps (now %.2e at step %d): the negatives are too easy: "
                      "mine harder ones with `flagm3 mine` (a higher --range, e.g. 10 100, on a model close to "
                      "this one); see %s", key, self.threshold, self.streak[key], value, state.global_step, DOCS)


class NoUpdateAlarm(TrainerCallback):
    """No trainable parameter, no parameter that moved once the warmup is over, or a logged gradient norm of 0.

    A sample of each trainable parameter (``SNAPSHOT_ELEMENTS`` evenly spaced entries) is kept at the start and
    compared at each logging step until something moved; the check waits for the first step after the warmup
    (a linear warmup starts at a learning rate of 0)."""

    def __init__(self) -> None:
        self.snapshot: Optional[list[tuple[str, Tensor, Tensor]]] = None
        self.warned: set[str] = set()

    @staticmethod
    def _sample(param: Tensor) -> tuple[Tensor, Tensor]:
        flat = param.detach().reshape(-1)
        index = torch.linspace(0, flat.numel() - 1, min(SNAPSHOT_ELEMENTS, flat.numel()), device=flat.device).long()
        return index, flat[index].float().cpu().clone()

    def on_train_begin(self, args, state, control, model=None, **kwargs: Any) -> None:
        if model is None:
            return
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            self._once(state, "frozen", "no trainable parameter: every parameter has requires_grad=False, so "
                       "training changes nothing: the model is frozen (LoRA target modules that match nothing, "
                       "--fix_encoder with no head in the loss, or code that froze it); see %s", DOCS)
            return
        self.snapshot = [(n, *self._sample(p)) for n, p in trainable if p.numel() > 0]  # ZeRO-3: empty shards

    def _moved(self, model: Any) -> bool:
        params = dict(model.named_parameters())
        for name, index, values in self.snapshot or []:
            if name not in params:  # wrapped differently since the start: cannot tell, so do not warn
                return True
            now = params[name].detach().reshape(-1)
            if now.numel() > int(index[-1]) and not torch.equal(now[index].float().cpu(), values):
                return True
        return False

    def _check(self, args, state, model: Any, final: bool) -> None:
        if not self.snapshot or model is None:
            return
        warmup = args.get_warmup_steps(state.max_steps) if hasattr(args, "get_warmup_steps") else 0
        if state.global_step <= warmup and not final:
            return
        if self._moved(model):
            self.snapshot = None  # it trains: nothing more to check
            return
        self._once(state, "moved", "no trainable parameter moved in %d optimizer steps: the learning rate is 0 "
                   "(--learning_rate, or a scheduler/warmup that keeps it at 0) or every step was skipped; "
                   "set a learning rate > 0 (e.g. 1e-5 for the encoder); see %s", state.global_step, DOCS)

    def on_log(self, args, state, control, logs: Optional[dict] = None, model=None, **kwargs: Any) -> None:
        grad_norm = (logs or {}).get("grad_norm")
        if isinstance(grad_norm, (int, float)) and grad_norm == 0:
            self._once(state, "grad", "gradient norm 0 at step %d: no loss term reaches a trainable parameter: the "
                       "model is frozen where the loss reads it (--fix_encoder with heads the loss does not use, "
                       "detached outputs) or every loss term has weight 0; see %s", state.global_step, DOCS)
        self._check(args, state, model, final=False)

    def on_train_end(self, args, state, control, model=None, **kwargs: Any) -> None:
        if state.global_step > 0:
            self._check(args, state, model, final=True)
        self.snapshot = None

    def _once(self, state: Any, key: str, message: str, *args: Any) -> None:
        if key not in self.warned:
            self.warned.add(key)
            _warn(state, message, *args)


def encode_dense(model: Any, tokenizer: Any, texts: Sequence[str], max_length: int = 64) -> Tensor:
    """Dense embeddings ``[N, H]`` (fp32, CPU) of ``texts`` from a (wrapped) M3 model in eval mode; the model's
    train/eval mode is restored."""
    from .inference import M3Embedder

    was_training = model.training
    model.eval()
    try:
        embedder = M3Embedder(unwrap_m3(model), tokenizer=tokenizer, use_fp16=False)
        out: Optional[Tensor] = None
        for rows, o in embedder.iter_outputs(list(texts), max_length=max_length, heads=("dense",),
                                              show_progress=False):
            if out is None:
                out = torch.zeros(len(texts), o["dense"].shape[-1])
            out[torch.as_tensor(rows, dtype=torch.long)] = o["dense"].float().cpu()
    finally:
        model.train(was_training)
    return out if out is not None else torch.zeros(0, 0)


class EmbeddingsUnchangedAlarm(TrainerCallback):
    """The dense embeddings of (up to ``max_texts``) eval queries at each evaluation and at the end, against step
    0's: all within ``atol`` means the encoder did not train (or the model evaluated is not the one trained)."""

    def __init__(self, texts: Sequence[str], max_texts: int = 32, max_length: int = 64, atol: float = 1e-6) -> None:
        self.texts = list(texts)[:max_texts]
        self.max_length, self.atol = max_length, atol
        self.start: Optional[Tensor] = None
        self.warned = False

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs: Any) -> None:
        if self.texts and model is not None and processing_class is not None:
            self.start = encode_dense(model, processing_class, self.texts, self.max_length)

    def _check(self, state, model, tokenizer) -> None:
        if self.start is None or self.warned or model is None or state.global_step == 0:
            return
        now = encode_dense(model, tokenizer, self.texts, self.max_length)
        change = float((now - self.start).abs().max()) if now.numel() else 0.0
        if change <= self.atol:
            self.warned = True
            _warn(state, "the dense embeddings of %d eval queries are identical to step 0's after %d steps "
                  "(largest change %.1e): the encoder did not train: a frozen encoder (--fix_encoder, or LoRA "
                  "targets that match no layer), a learning rate of 0, or every step skipped; if you evaluate a "
                  "saved model, check it is the trained one (not the base path); see %s",
                  len(self.texts), state.global_step, change, DOCS)

    def on_evaluate(self, args, state, control, model=None, processing_class=None, **kwargs: Any) -> None:
        self._check(state, model, processing_class)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs: Any) -> None:
        self._check(state, model, processing_class)
        self.start = None


class MetricFallingAlarm(TrainerCallback):
    """A ranking's ``eval_<ranking>_<measure>`` lower at two evaluations in a row (three values falling)."""

    def __init__(self, measure: str = "ndcg@10") -> None:
        self.measure = measure
        self.history: dict[str, list[float]] = {}
        self.warned: set[str] = set()

    def on_evaluate(self, args, state, control, metrics: Optional[dict] = None, **kwargs: Any) -> None:
        suffix = "_" + self.measure
        for key, value in (metrics or {}).items():
            if not (key.startswith("eval_") and key.endswith(suffix)) or not isinstance(value, (int, float)):
                continue
            ranking = key[len("eval_"):-len(suffix)]
            values = self.history.setdefault(ranking, [])
            values.append(float(value))
            if len(values) >= 3 and values[-3] > values[-2] > values[-1] and ranking not in self.warned:
                self.warned.add(ranking)
                _warn(state, "eval %s %s fell two evaluations in a row (%.4f -> %.4f -> %.4f at step %d): the run "
                      "is overfitting or forgetting: lower --learning_rate or train fewer steps, keep the best "
                      "checkpoint (--load_best_model_at_end --metric_for_best_model eval_%s_%s), or merge with the "
                      "base model (`flagm3 merge --auto`); see %s", ranking, self.measure, *values[-3:],
                      state.global_step, ranking, self.measure, DOCS)
