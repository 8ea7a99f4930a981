"""Before and after, by default: every head and hybrid evaluated at step 0 and at the end of training.

:class:`BeforeAfterCallback` runs each evaluator (the in-domain ``--eval_data`` and any ``--general_eval_data``
collection) on the model before the first step and after the last, compares the per-query metric of each
ranking with a paired test (:mod:`flagm3.evaluation.compare`), logs the before -> after table with a verdict per
ranking, warns when a ranking got significantly worse, and writes ``before_after.json`` to the output directory
(the model card shows it). :func:`register_diagnostics` adds it and the alarms (:mod:`flagm3.alarms`) to an
``M3Trainer``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping

from transformers import TrainerCallback

from .alarms import EmbeddingsUnchangedAlarm, LossNearZeroAlarm, MetricFallingAlarm, NoUpdateAlarm
from .evaluation.compare import (
    BEFORE_AFTER_FILE,
    DEFAULT_ALPHA,
    compare_per_query,
    comparison_table,
    summary_line,
)
from .evaluation.evaluator import M3RetrievalEvaluator

logger = logging.getLogger(__name__)

IN_DOMAIN = "in-domain"


class BeforeAfterCallback(TrainerCallback):
    """Evaluate at step 0 and at the end; ``rows`` holds the comparison once training ended.

    ``evaluators``: ``{collection name: M3RetrievalEvaluator}`` (``"in-domain"`` first, then the general
    collections). A resumed run (``global_step > 0`` at the start) has no step 0 to compare with and is left
    alone. Every process evaluates (as the trainer's own evaluation does: ZeRO-3 needs every rank's forward);
    the main process logs and writes."""

    def __init__(self, evaluators: Mapping[str, M3RetrievalEvaluator], alpha: float = DEFAULT_ALPHA) -> None:
        self.evaluators = dict(evaluators)
        self.alpha = alpha
        self.before: dict[str, dict[str, Any]] = {}
        self.rows: list[dict[str, Any]] = []

    def _evaluate(self, model: Any, tokenizer: Any) -> dict[str, dict[str, Any]]:
        out = {}
        for name, evaluator in self.evaluators.items():
            metrics = evaluator(model, tokenizer)
            out[name] = {"metrics": metrics, "per_query": evaluator.per_query(), "measure": evaluator.measure}
        return out

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs: Any) -> None:
        if not self.evaluators or model is None:
            return
        if state.global_step > 0:
            logger.info("resumed at step %d: no step-0 evaluation to compare with", state.global_step)
            return
        self.before = self._evaluate(model, processing_class)
        if state.is_world_process_zero:
            for name, result in self.before.items():
                measure = result["measure"]
                values = {r: v for r, v in _means(result["per_query"]).items()}
                logger.info("step 0, %s %s: %s", name, measure,
                            ", ".join(f"{r} {v:.4f}" for r, v in values.items()))

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs: Any) -> None:
        if not self.before or model is None:
            return
        after = self._evaluate(model, processing_class)
        self.rows = []
        for name, result in after.items():
            self.rows += compare_per_query(self.before[name]["per_query"], result["per_query"], self.alpha,
                                           collection=name, metric=result["measure"])
        if not state.is_world_process_zero:
            return
        logger.info("before -> after %d steps (paired t-test over queries, alpha %g):\n%s\n%s", state.global_step,
                    self.alpha, comparison_table(self.rows), summary_line(self.rows))
        worse = [r for r in self.rows if r["verdict"] == "worse"]
        if any(r["collection"] != IN_DOMAIN for r in worse):
            lost = ", ".join(f"{r['collection']}/{r['ranking']} {r['delta']:+.4f}" for r in worse
                             if r["collection"] != IN_DOMAIN)
            logger.warning("the run lost quality on the general collections (%s): merge the fine-tuned model with "
                           "its base (`flagm3 merge --auto`), or train with a lower learning rate or fewer steps; "
                           "see docs/diagnosing.md", lost)
        if any(r["collection"] == IN_DOMAIN for r in worse):
            logger.warning("the run made %s worse on the in-domain evaluation: see docs/diagnosing.md (false "
                           "negatives in the mined data: `flagm3 mine --false-negative-fraction`; a learning rate "
                           "too high; too many steps)", ", ".join(r["ranking"] for r in worse
                                                                   if r["collection"] == IN_DOMAIN))
        write_before_after(args.output_dir, self.rows, state.global_step, self.before, after)


def _means(per_query: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    return {r: sum(v.values()) / max(len(v), 1) for r, v in per_query.items()}


def write_before_after(output_dir: str, rows: list, steps: int, before: Mapping, after: Mapping) -> str:
    """``<output_dir>/before_after.json``: the comparison rows and both evaluations' full metrics."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, BEFORE_AFTER_FILE)
    data = {"steps": steps, "rows": rows,
            "before": {n: r["metrics"] for n, r in before.items()},
            "after": {n: r["metrics"] for n, r in after.items()}}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    return path


def general_evaluators(data_args: Any, batch_size: int, heads: Any) -> dict[str, M3RetrievalEvaluator]:
    """``{collection name: evaluator}`` for ``data_args.general_eval_data`` (named by directory)."""
    out: dict[str, M3RetrievalEvaluator] = {}
    for path in getattr(data_args, "general_eval_data", None) or []:
        name = os.path.basename(os.path.normpath(path)) or path
        if name in out or name == IN_DOMAIN:
            name = path
        out[name] = M3RetrievalEvaluator.from_beir(
            path, split=data_args.general_eval_split, heads=heads, max_query_length=data_args.query_max_len,
            max_passage_length=data_args.eval_max_length, max_corpus_size=data_args.eval_max_corpus_size,
            batch_size=batch_size,
        )
    return out


def register_diagnostics(trainer: Any) -> None:
    """Add the alarms (``args.alarms``) and, with evaluators and ``args.before_after_eval``, the before/after
    evaluation to an ``M3Trainer``: its in-domain evaluator and the ``--general_eval_data`` collections."""
    args, data_args = trainer.args, trainer.data_args
    evaluator = trainer.evaluator if isinstance(trainer.evaluator, M3RetrievalEvaluator) else None
    if getattr(args, "alarms", True):
        trainer.add_callback(LossNearZeroAlarm())
        trainer.add_callback(NoUpdateAlarm())
        trainer.add_callback(MetricFallingAlarm(evaluator.measure if evaluator else "ndcg@10"))
        if evaluator is not None:
            trainer.add_callback(EmbeddingsUnchangedAlarm(list(evaluator.queries.values()),
                                                          max_length=getattr(data_args, "query_max_len", 64)))
    if not getattr(args, "before_after_eval", True):
        return
    heads = evaluator.heads if evaluator is not None else trainer.m3_loss.config.heads
    evaluators = {IN_DOMAIN: evaluator} if evaluator is not None else {}
    evaluators.update(general_evaluators(data_args, args.per_device_eval_batch_size * 4, heads))
    if evaluators:
        trainer.add_callback(BeforeAfterCallback(evaluators))
