"""``flagm3 eval``: evaluate a saved model on a BEIR-layout collection and print/write the results."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from ..scoring import HEADS
from .beir import load_beir, subsample
from .metrics import format_results_table
from .retrieval import DEFAULT_HYBRID_WEIGHTS, evaluate_retrieval


def run_eval(
    model_path: Union[str, os.PathLike],
    data_dir: Union[str, os.PathLike],
    split: str = "test",
    output: Optional[Union[str, os.PathLike]] = None,
    batch_size: int = 64,
    max_query_length: int = 512,
    max_passage_length: int = 512,
    hybrid_weights: Union[Sequence[float], Mapping[str, float]] = DEFAULT_HYBRID_WEIGHTS,
    use_fp16: bool = False,
    heads: Sequence[str] = HEADS,
    k_values: Sequence[int] = (1, 10, 100),
    colbert_mode: str = "full",
    rerank_depth: int = 100,
    max_corpus_size: Optional[int] = None,
    max_queries: Optional[int] = None,
    query_instruction_for_retrieval: Optional[str] = None,
    query_instruction_format: str = "{}{}",
    devices: Optional[Any] = None,
    seed: int = 0,
    show_progress: bool = True,
    **embedder_kwargs: Any,
) -> dict[str, dict[str, float]]:
    """``flagm3 eval``: load a model directory (flagm3 or BGE-M3 layout), evaluate it on a BEIR collection,
    print the table and write ``{"dense": {"ndcg@10": ...}, ...}`` to ``output`` (JSON) when given.

    ``devices`` defaults to the first GPU when there is one, else the CPU. Other keyword arguments go to
    ``M3Embedder`` (``use_bf16``, ``truncate_dim``, ...).
    """
    from ..inference import M3Embedder

    corpus, queries, qrels = subsample(*load_beir(data_dir, split), max_corpus_size, max_queries, seed)
    if devices is None and torch.cuda.is_available():
        devices = "cuda:0"
    embedder = M3Embedder(
        str(model_path), use_fp16=use_fp16, batch_size=batch_size, devices=devices,
        query_instruction_for_retrieval=query_instruction_for_retrieval,
        query_instruction_format=query_instruction_format, **embedder_kwargs,
    )
    results = evaluate_retrieval(
        embedder, corpus, queries, qrels, heads=heads, hybrid_weights=hybrid_weights, k_values=k_values,
        max_query_length=max_query_length, max_passage_length=max_passage_length, batch_size=batch_size,
        colbert_mode=colbert_mode, rerank_depth=rerank_depth, show_progress=show_progress,
    )
    print(f"{model_path} on {data_dir} ({split}: {len(queries)} queries, {len(corpus)} documents)")
    print(format_results_table(results))
    if output is not None:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return results
