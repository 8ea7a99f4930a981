"""``flagm3 eval``: evaluate a saved model on a BEIR-layout collection and print/write the results."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from ..scoring import HEADS
from .beir import load_beir, subsample
from .metrics import format_results_table
from .retrieval import DEFAULT_HYBRID_WEIGHTS, HYBRIDS, _hybrid_weights, evaluate_retrieval


def run_eval(
    model_path: Union[str, os.PathLike],
    data_dir: Union[str, os.PathLike],
    split: str = "test",
    output: Optional[Union[str, os.PathLike]] = None,
    batch_size: int = 64,
    max_query_length: int = 512,
    max_passage_length: int = 512,
    hybrid_weights: Optional[Union[Sequence[float], Mapping[str, float]]] = None,
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
    backend: str = "default",
    qdrant: Optional[str] = None,
    collection: str = "flagm3-eval",
    fit_weights: Optional[str] = None,
    dense_dim: Optional[int] = None,
    colbert_dim: Optional[int] = None,
    pool_factor: Optional[int] = None,
    sparse_top_k: Optional[int] = None,
    sparse_threshold: Optional[float] = None,
    corpus_dir: Optional[Union[str, os.PathLike]] = None,
    **embedder_kwargs: Any,
) -> dict[str, dict[str, float]]:
    """``flagm3 eval``: load a model directory (flagm3 or BGE-M3 layout, or an ONNX export), evaluate it on a
    BEIR collection, print the table and write ``{"dense": {"ndcg@10": ...}, ...}`` to ``output`` (JSON) when
    given.

    ``hybrid_weights`` default to the model's fitted ones (``hybrid_weights.json``), else 1 : 0.3 : 1.
    ``fit_weights``: a split to fit them on first (:func:`flagm3.hybrid_weights.fit_hybrid_weights`, on the
    same corpus subset); they are used here, printed, and written to ``output`` (under ``"hybrid_weights"``)
    only: nothing is written beside the model (:func:`flagm3.hybrid_weights.save_hybrid_weights` does that). ``backend="qdrant"`` retrieves
    through a Qdrant collection (:func:`flagm3.qdrant.evaluate_qdrant`; ``qdrant``: a directory, ``:memory:``
    or a server URL, default a temporary embedded index; exact search; the hybrids rank the dense and sparse
    top ``rerank_depth`` candidates). ``devices`` defaults to the first GPU when there is one, else the CPU.
    ``dense_dim``, ``colbert_dim``, ``pool_factor``, ``sparse_top_k``, ``sparse_threshold``: evaluate the model
    compressed so (:class:`flagm3.compression.Compression`); the JSON written to ``output`` also holds
    ``index_bytes_per_passage`` ``{"dense", "sparse", "colbert"}`` (float32 vectors, the corpus's mean sparse
    entries and ColBERT vectors; :func:`flagm3.compression.index_bytes_per_passage`). ``corpus_dir``: keep the
    corpus's ids and texts on disk there (one subdirectory per split read), not in a dict
    (:class:`flagm3.disk_index.DiskCorpus`).
    Other keyword arguments go to ``M3Embedder`` (``use_bf16``, ``truncate_dim``, ...).
    """
    from ..compression import Compression, index_bytes
    from ..inference import M3Embedder

    def on_disk(which: str) -> Optional[str]:
        return None if corpus_dir is None else os.path.join(corpus_dir, which)

    corpus, queries, qrels = subsample(*load_beir(data_dir, split, on_disk(split)), max_corpus_size, max_queries, seed)
    if devices is None and torch.cuda.is_available():
        devices = "cuda:0"
    embedder = M3Embedder(
        str(model_path), use_fp16=use_fp16, batch_size=batch_size, devices=devices,
        query_instruction_for_retrieval=query_instruction_for_retrieval,
        query_instruction_format=query_instruction_format,
        compression=Compression(dense_dim=dense_dim, colbert_dim=colbert_dim, pool_factor=pool_factor or 1,
                                sparse_top_k=sparse_top_k, sparse_threshold=sparse_threshold),
        **embedder_kwargs,
    )
    if backend not in ("default", "qdrant"):
        raise ValueError(f"backend must be 'default' or 'qdrant', got {backend!r}")
    fitted = None
    if fit_weights is not None:
        from ..hybrid_weights import fit_hybrid_weights

        fitted = fit_hybrid_weights(
            embedder, *subsample(*load_beir(data_dir, fit_weights, on_disk(fit_weights)), max_corpus_size, None, seed),
            max_query_length=max_query_length, max_passage_length=max_passage_length, batch_size=batch_size,
            show_progress=show_progress,
        )
        fitted.update(split=fit_weights, data=str(data_dir))
        where = f"written to {output}" if output is not None else "not stored (give --output to keep them)"
        print(f"hybrid weights fitted on {fit_weights}: {fitted['weights']} ({fitted['metric']} "
              f"{fitted['value']:.4f}, {fitted['baseline_value']:.4f} at 1:0.3:1), {where}")
        embedder.hybrid_weights = fitted["weights"]
    if hybrid_weights is None:
        hybrid_weights = embedder.hybrid_weights or DEFAULT_HYBRID_WEIGHTS
    if backend == "qdrant":
        from ..qdrant import HYBRID_NAMES, evaluate_qdrant

        rankings = tuple(heads) + tuple(n for n in HYBRID_NAMES if set(HYBRIDS[n]) <= set(heads))
        results, info = evaluate_qdrant(
            embedder, corpus, queries, qrels, location=qdrant, collection=collection, rankings=rankings,
            weights=_hybrid_weights(hybrid_weights), k_values=k_values, prefetch_limit=rerank_depth,
            max_query_length=max_query_length, max_passage_length=max_passage_length, batch_size=batch_size,
            show_progress=show_progress,
        )
        print(f"Qdrant ({info['location']}, collection {collection}): indexed {info['index']['indexed']} documents "
              f"in {info['index']['seconds']:.1f} s, searched {len(queries)} queries in {info['search_seconds']:.1f} s")
    else:
        results = evaluate_retrieval(
            embedder, corpus, queries, qrels, heads=heads, hybrid_weights=hybrid_weights, k_values=k_values,
            max_query_length=max_query_length, max_passage_length=max_passage_length, batch_size=batch_size,
            colbert_mode=colbert_mode, rerank_depth=rerank_depth, show_progress=show_progress,
        )
    sizes = index_bytes(embedder)
    print("index bytes per passage: " + ", ".join(f"{h} {v:.0f}" for h, v in sizes.items()))
    print(f"{model_path} on {data_dir} ({split}: {len(queries)} queries, {len(corpus)} documents)")
    print(format_results_table(results))
    if output is not None:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w", encoding="utf-8") as f:
            extra = {"index_bytes_per_passage": sizes, **({} if fitted is None else {"hybrid_weights": fitted})}
            json.dump({**results, **extra}, f, indent=2)
    return results

