"""Retrieval evaluation: BEIR loading, trec_eval metrics, corpus retrieval with every M3 head and hybrid.

* :mod:`.beir`: :func:`load_beir` reads a BEIR-layout collection (``corpus.jsonl``, ``queries.jsonl``,
  ``qrels/<split>.tsv``); :func:`subsample` draws a seeded smaller one.
* :mod:`.metrics`: :func:`evaluate_run` computes nDCG@k, Recall@k, MRR@k and MAP@k with trec_eval's
  definitions.
* :mod:`.retrieval`: :func:`retrieve` / :func:`evaluate_retrieval` rank a corpus with a running top-k.
* :mod:`.evaluator`: :class:`M3RetrievalEvaluator`, what the trainer calls during training.
* :mod:`.cli`: :func:`run_eval` is ``flagm3 eval``.
"""

from ..texts import read_jsonl, with_instruction
from .beir import Qrels, load_beir, load_qrels, read_corpus, subsample
from .cli import run_eval
from .evaluator import M3RetrievalEvaluator
from .metrics import (
    METRICS,
    Run,
    evaluate_run,
    flatten_results,
    format_results_table,
    query_metrics,
    rank_documents,
)
from .retrieval import (
    DEFAULT_HYBRID_WEIGHTS,
    HYBRIDS,
    RANKINGS,
    RunningTopK,
    evaluate_retrieval,
    retrieve,
    top_k_positions,
)

__all__ = [
    "DEFAULT_HYBRID_WEIGHTS",
    "HYBRIDS",
    "METRICS",
    "RANKINGS",
    "M3RetrievalEvaluator",
    "Qrels",
    "Run",
    "RunningTopK",
    "evaluate_retrieval",
    "evaluate_run",
    "flatten_results",
    "format_results_table",
    "load_beir",
    "load_qrels",
    "query_metrics",
    "rank_documents",
    "read_corpus",
    "read_jsonl",
    "retrieve",
    "run_eval",
    "subsample",
    "top_k_positions",
    "with_instruction",
]
