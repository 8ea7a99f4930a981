"""A model's hybrid weights (dense, sparse, ColBERT): fitted on a dev split, and the one file that stores them.

:func:`fit_hybrid_weights` encodes the corpus once, chunk by chunk, ranks it by
:func:`flagm3.scoring.hybrid_scores` for each weight triple of a small grid (a running top-k per triple) and keeps
the one with the best metric (BGE-M3's 1 : 0.3 : 1 wins ties). This module alone writes and reads ``hybrid_weights.json``
(:func:`save_hybrid_weights`, :func:`read_hybrid_weights`): beside a model, ``M3Embedder`` (``compute_score``),
``flagm3 eval``, ``flagm3 search`` use it and the exports copy it. ``flagm3 eval --fit-weights`` writes the
fitted weights only into its ``--output``; storing them beside a model is an explicit
``save_hybrid_weights(model_dir, fitted)``.
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from tqdm.auto import tqdm

from .scoring import BGE_M3_ENSEMBLE_WEIGHTS, HEADS, hybrid_scores

HYBRID_WEIGHTS_FILE = "hybrid_weights.json"  # beside a model: {"weights": {"dense": w, "sparse": w, "colbert": w}, ...}

# dense 0 or 1 (only the ratios matter for a ranking), sparse and ColBERT relative to it
WEIGHT_GRID: Dict[str, Sequence[float]] = {
    "dense": (0.0, 1.0),
    "sparse": (0.0, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0),
    "colbert": (0.0, 0.25, 0.5, 1.0, 2.0, 4.0),
}


def hybrid_metrics(
    embedder: Any,
    corpus: Mapping[str, str],
    queries: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    weight_sets: Iterable[Mapping[str, float]],
    metric: str = "ndcg@10",
    max_query_length: int = 512,
    max_passage_length: int = 512,
    batch_size: Optional[int] = None,
    show_progress: bool = True,
    corpus_chunk_size: int = 8192,
) -> List[float]:
    """``metric`` of the full-corpus hybrid ranking for each of ``weight_sets``, from one encoding of the
    corpus: each chunk's ``[queries, chunk]`` score block per head is fused with every weight set and merged
    into that set's running top-k (k from ``metric``), so memory is bounded by the chunk and the top-k, not by
    ``queries x documents``, and the rankings are exact."""
    from .evaluation.metrics import evaluate_run
    from .evaluation.retrieval import (
        RunningTopK,
        corpus_columns,
        encode_texts,
        iter_score_blocks,
        scoring_device,
    )
    from .texts import with_instruction

    base, _, k = metric.partition("@")
    if not k.isdigit():
        raise ValueError(f"metric must look like 'ndcg@10', got {metric!r}")
    weight_sets = [dict(w) for w in weight_sets]
    qids = [qid for qid in qrels if qid in queries]
    doc_ids, texts = corpus_columns(embedder, corpus)  # column order = the evaluator's tie order
    device = scoring_device(embedder)  # the embedder's accelerator, else the host path
    encoded = encode_texts(embedder, with_instruction(embedder, (queries[q] for q in qids), "query"),
                           max_query_length, batch_size, HEADS, device=device)
    keepers = [RunningTopK(len(qids), int(k), device=device) for _ in weight_sets]
    progress = tqdm(total=len(texts), desc="Hybrid weights", unit="doc", disable=not show_progress)
    for indices, blocks in iter_score_blocks(embedder, encoded, texts, HEADS, max_passage_length, batch_size,
                                             corpus_chunk_size, progress):
        blocks = {h: b.double() for h, b in blocks.items()}
        for keeper, weights in zip(keepers, weight_sets):
            keeper.update(hybrid_scores(blocks, weights), indices)
    progress.close()
    return [evaluate_run(keeper.to_run(qids, doc_ids), qrels, (int(k),), (base,))[metric] for keeper in keepers]


def fit_hybrid_weights(
    embedder: Any,
    corpus: Mapping[str, str],
    queries: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    metric: str = "ndcg@10",
    grid: Mapping[str, Sequence[float]] = WEIGHT_GRID,
    max_query_length: int = 512,
    max_passage_length: int = 512,
    batch_size: Optional[int] = None,
    show_progress: bool = True,
) -> Dict[str, Any]:
    """The grid's best weights for ``metric`` of the full-corpus hybrid ranking on ``qrels``' queries.

    Returns ``{"weights": {head: w}, "metric", "value", "baseline_weights" (1 : 0.3 : 1), "baseline_value",
    "grid_size", "queries", "documents"}``; the baseline wins ties.
    """
    baseline = dict(BGE_M3_ENSEMBLE_WEIGHTS)
    candidates = [dict(zip(HEADS, map(float, combo))) for combo in itertools.product(*(grid[h] for h in HEADS))]
    candidates = [w for w in candidates if any(w.values())]
    values = hybrid_metrics(embedder, corpus, queries, qrels, [baseline, *candidates], metric, max_query_length,
                            max_passage_length, batch_size, show_progress)
    best, best_value = baseline, values[0]
    for weights, score in zip(candidates, values[1:]):
        if score > best_value + 1e-12:
            best, best_value = weights, score
    return {"weights": best, "metric": metric, "value": best_value, "baseline_weights": baseline,
            "baseline_value": values[0], "grid_size": len(candidates), "queries": len(qrels),
            "documents": len(corpus)}


def save_hybrid_weights(model_dir: str, fitted: Mapping[str, Any]) -> str:
    """Write ``fitted`` (from :func:`fit_hybrid_weights`, plus anything to record) to
    ``model_dir/hybrid_weights.json``; return the file's path."""
    if not os.path.isdir(model_dir):
        raise ValueError(f"{model_dir}: fitted hybrid weights are stored beside a local model directory")
    path = hybrid_weights_path(model_dir)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(dict(fitted), f, indent=2)
    return path


def read_hybrid_weights(path: Any) -> Optional[Dict[str, float]]:
    """``{"dense": w, "sparse": w, "colbert": w}`` from a model directory's ``hybrid_weights.json`` (``None``
    without one, or when ``path`` is no local directory), or from such a file itself, or from the ``--output``
    JSON of ``flagm3 eval --fit-weights`` (its ``"hybrid_weights"`` entry). A malformed file raises naming it."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    file = os.path.join(path, HYBRID_WEIGHTS_FILE) if os.path.isdir(path) else os.fspath(path)
    if not os.path.isfile(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            saved = json.load(f)
        if "weights" not in saved and "hybrid_weights" in saved:  # flagm3 eval --fit-weights --output FILE
            saved = saved["hybrid_weights"]
        return {head: float(saved["weights"][head]) for head in HEADS}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{file}: expected {{\"weights\": {{\"dense\": w, \"sparse\": w, \"colbert\": w}}}} "
                         f"({err})") from err


def hybrid_weights_path(model_dir: Union[str, os.PathLike]) -> str:
    """Where a model directory keeps its fitted hybrid weights."""
    return os.path.join(model_dir, HYBRID_WEIGHTS_FILE)
