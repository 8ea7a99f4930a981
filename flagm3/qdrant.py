"""A served hybrid index in Qdrant: all three M3 heads as named vectors of one collection.

* ``dense``: one vector per document (dot product: M3's dense score);
* ``sparse``: the lexical weights as a sparse vector indexed by token id (dot product: M3's lexical score);
* ``colbert``: the document's token vectors as a multi-vector compared with MaxSim. Qdrant sums MaxSim over
  the query tokens; M3 averages, so scores read back are divided by the query's token count (same ranking).

:func:`index_corpus` encodes a corpus with an ``M3Embedder`` and upserts it in chunks, resumably: point ids are
UUIDs derived from the document ids, and documents already in the collection are skipped. :func:`search`
queries one head, or the hybrid: dense and sparse candidates (prefetch), fused by the weighted sum of
:func:`flagm3.scoring.hybrid_scores` on their exact per-head scores, or by Qdrant's reciprocal rank fusion,
and optionally reranked with ColBERT. :func:`connect` opens embedded local mode (a directory, or
``":memory:"``) or a server (``http(s)://`` URL) with the same client.

The collection holds what the embedder gives: its :class:`~flagm3.compression.Compression` dimensions, pooled
ColBERT passage vectors and pruned lexical weights (``encode_corpus``); queries get the same dimensions, never
pooling. ``quantization`` (``int8``: Qdrant's scalar quantisation, ``binary``: its binary quantisation) applies to
the dense and ColBERT vectors; searches rescore the oversampled candidates with the original vectors. Embedded
local mode stores the configuration but always searches the float32 vectors exactly: the memory saving and
the approximation only happen on a Qdrant server.
"""

from __future__ import annotations

import logging
import time
import uuid
import warnings
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from .compression import index_bytes
from .scoring import BGE_M3_ENSEMBLE_WEIGHTS, HEADS, hybrid_scores

logger = logging.getLogger(__name__)

# Point ids are uuid5(NAMESPACE, doc_id): the same document always gets the same point.
NAMESPACE = uuid.UUID("6f1c1a52-5d1e-4a3b-9d0e-6d3f1b8a9c21")
MODES = ("dense", "sparse", "colbert", "hybrid")
FUSIONS = ("weights", "rrf")
Hit = Dict[str, Any]  # {"doc_id": str, "score": float, "payload": {...}}


def _models() -> Any:
    try:
        from qdrant_client import models
    except ImportError as err:
        raise ImportError("the Qdrant index needs qdrant-client: pip install 'flagm3[deploy]'") from err
    return models


def connect(location: str, **kwargs: Any) -> Any:
    """A ``QdrantClient``: ``http(s)://...`` is a server, ``":memory:"`` an in-process index, anything else a
    directory for embedded local mode (created if needed)."""
    _models()
    from qdrant_client import QdrantClient

    if location.startswith(("http://", "https://")):
        return QdrantClient(url=location, **kwargs)
    if location == ":memory:":
        return QdrantClient(location=":memory:", **kwargs)
    return QdrantClient(path=location, **kwargs)


def point_id(doc_id: str) -> str:
    """The point id of a document: a UUID derived from its id (stable across runs)."""
    return str(uuid.uuid5(NAMESPACE, str(doc_id)))


# ------------------------------------------------------------------------------------------- collection
def quantization_config(quantization: Optional[str]) -> Any:
    """Qdrant's quantisation config for ``int8`` (scalar, kept in RAM) or ``binary``; ``None``: none."""
    models = _models()
    if quantization is None:
        return None
    if quantization == "int8":
        return models.ScalarQuantization(scalar=models.ScalarQuantizationConfig(
            type=models.ScalarType.INT8, quantile=0.99, always_ram=True))
    if quantization == "binary":
        return models.BinaryQuantization(binary=models.BinaryQuantizationConfig(always_ram=True))
    raise ValueError(f"quantization must be 'int8', 'binary' or None, got {quantization!r}")


# Searches on quantised vectors: twice the candidates, rescored with the original vectors.
RESCORE_OVERSAMPLING = 2.0


def _search_params(exact: bool) -> Any:
    models = _models()
    return models.SearchParams(exact=exact, quantization=models.QuantizationSearchParams(
        rescore=True, oversampling=RESCORE_OVERSAMPLING))


def ensure_collection(client: Any, collection: str, dense_dim: int, colbert_dim: int,
                      quantization: Optional[str] = None) -> bool:
    """Create the collection (named vectors ``dense``, ``colbert``, sparse ``sparse``; ``quantization`` of the
    dense and ColBERT vectors, see :func:`quantization_config`) unless it exists; an existing one must have the
    same vector sizes. Returns whether it was created."""
    models = _models()
    if client.collection_exists(collection):
        vectors = client.get_collection(collection).config.params.vectors
        sizes = {name: params.size for name, params in (vectors or {}).items()} if isinstance(vectors, dict) else {}
        wanted = {"dense": dense_dim, "colbert": colbert_dim}
        if sizes != wanted:
            raise ValueError(f"Qdrant collection {collection!r} has vectors {sizes}, but this model gives {wanted}: "
                             "index it into another collection (one collection per model)")
        return False
    client.create_collection(
        collection,
        vectors_config={
            "dense": models.VectorParams(size=dense_dim, distance=models.Distance.DOT,
                                         quantization_config=quantization_config(quantization)),
            "colbert": models.VectorParams(
                size=colbert_dim, distance=models.Distance.DOT,
                multivector_config=models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM),
                quantization_config=quantization_config(quantization),
            ),
        },
        sparse_vectors_config={"sparse": models.SparseVectorParams()},
    )
    return True


def sparse_vector(lexical: Mapping[str, float]) -> Any:
    """A Qdrant ``SparseVector`` (token ids, weights) from ``{str(token_id): weight}`` (``encode()``'s dicts)."""
    models = _models()
    arrays = getattr(lexical, "arrays", None)
    if arrays is not None:
        ids, weights = arrays
    else:
        ids = np.fromiter((int(k) for k in lexical), dtype=np.int64, count=len(lexical))
        weights = np.fromiter(lexical.values(), dtype=np.float64, count=len(lexical))
    return models.SparseVector(indices=ids.tolist(), values=np.asarray(weights, dtype=np.float32).tolist())


def _vectors(encoded: Mapping[str, Any], row: int) -> Dict[str, Any]:
    """The named vectors of row ``row`` of ``M3Embedder.encode`` output (a sparse vector only when non-empty)."""
    vectors: Dict[str, Any] = {"dense": encoded["dense_vecs"][row].tolist(),
                               "colbert": encoded["colbert_vecs"][row].tolist()}
    if encoded["lexical_weights"][row]:
        vectors["sparse"] = sparse_vector(encoded["lexical_weights"][row])
    return vectors


def _existing(client: Any, collection: str, ids: Sequence[str]) -> set:
    return {str(p.id) for p in client.retrieve(collection, ids=list(ids), with_payload=False, with_vectors=False)}


# ---------------------------------------------------------------------------------------------- indexing
def index_corpus(
    embedder: Any,
    client: Any,
    collection: str,
    corpus: Union[Mapping[str, str], Iterable[Tuple[str, str]]],
    max_length: Optional[int] = None,
    batch_size: Optional[int] = None,
    chunk_size: int = 256,
    store_text: bool = True,
    total: Optional[int] = None,
    show_progress: bool = True,
    quantization: Optional[str] = None,
) -> Dict[str, Any]:
    """Encode ``corpus`` (``{doc_id: text}`` or ``(doc_id, text)`` pairs) with all three heads and upsert it
    into ``collection`` (created if needed), ``chunk_size`` documents at a time.

    Documents whose point already exists are skipped, so an interrupted run resumes where it stopped and a
    re-run adds nothing. Texts get the embedder's passage instruction and compression, as ``encode_corpus``;
    ``quantization`` configures a new collection (:func:`ensure_collection`). Returns ``{"indexed": n,
    "skipped": n, "seconds": s, "bytes_per_passage": {head: bytes}}`` (the vectors the indexed passages store,
    :func:`flagm3.compression.index_bytes_per_passage`, quantised dense/ColBERT sizes when quantised).
    """
    models = _models()
    dense_dim, colbert_dim = embedder.vector_sizes()
    ensure_collection(client, collection, dense_dim, colbert_dim, quantization)
    pairs = corpus.items() if isinstance(corpus, Mapping) else corpus
    total = len(corpus) if isinstance(corpus, Mapping) else total
    indexed = skipped = 0
    start = time.perf_counter()
    bar = tqdm(total=total, desc=f"Indexing into {collection}", unit="doc", disable=not show_progress)
    for chunk in _chunks(pairs, chunk_size):
        ids = [point_id(doc_id) for doc_id, _ in chunk]
        done = _existing(client, collection, ids)
        todo = [(pid, doc_id, text) for pid, (doc_id, text) in zip(ids, chunk) if pid not in done]
        skipped += len(chunk) - len(todo)
        if todo:
            encoded = embedder.encode_corpus([text for _, _, text in todo], batch_size=batch_size,
                                             max_length=max_length, return_dense=True, return_sparse=True,
                                             return_colbert_vecs=True, show_progress=False)
            points = [
                models.PointStruct(id=pid, vector=_vectors(encoded, row),
                                   payload={"doc_id": doc_id, **({"text": text} if store_text else {})})
                for row, (pid, doc_id, text) in enumerate(todo)
            ]
            client.upsert(collection, points=points, wait=True)
            indexed += len(todo)
        bar.update(len(chunk))
    bar.close()
    sizes = index_bytes(embedder, quantization) if indexed else {}
    return {"indexed": indexed, "skipped": skipped, "seconds": time.perf_counter() - start,
            "bytes_per_passage": sizes}


def _chunks(items: Iterable[Any], size: int) -> Iterator[List[Any]]:
    chunk: List[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ------------------------------------------------------------------------------------------------ search
class EncodedQuery:
    """One query's three representations as Qdrant queries: ``dense`` list, ``sparse`` SparseVector (or
    ``None`` when it has no lexical weight), ``colbert`` list of token vectors and its token count."""

    def __init__(self, encoded: Mapping[str, Any], row: int) -> None:
        self.dense = encoded["dense_vecs"][row].tolist()
        lexical = encoded["lexical_weights"][row]
        self.sparse = sparse_vector(lexical) if lexical else None
        self.colbert = encoded["colbert_vecs"][row].tolist()
        self.num_tokens = max(1, len(self.colbert))


def encode_queries(embedder: Any, queries: Sequence[str], max_length: Optional[int] = None,
                   batch_size: Optional[int] = None) -> List[EncodedQuery]:
    """Encode queries with all three heads (``encode_queries``: the query instruction applies)."""
    encoded = embedder.encode_queries(list(queries), batch_size=batch_size, max_length=max_length,
                                      return_dense=True, return_sparse=True, return_colbert_vecs=True,
                                      show_progress=False)
    return [EncodedQuery(encoded, row) for row in range(len(queries))]


def _head_query(query: EncodedQuery, head: str) -> Any:
    return {"dense": query.dense, "sparse": query.sparse, "colbert": query.colbert}[head]


def _m3_score(query: EncodedQuery, head: str, score: float) -> float:
    """Qdrant's score as M3 scores it: ColBERT's MaxSim sum becomes the mean over query tokens."""
    return score / query.num_tokens if head == "colbert" else score


def _hits(points: Iterable[Any], query: EncodedQuery, head: Optional[str]) -> List[Hit]:
    return [{"doc_id": (p.payload or {}).get("doc_id", str(p.id)),
             "score": _m3_score(query, head, p.score) if head else p.score, "payload": p.payload or {}}
            for p in points]


def _run_requests(client: Any, collection: str, requests: List[Any]) -> List[List[Any]]:
    """Points of each request (empty for ``None`` requests), in one batch call."""
    real = [r for r in requests if r is not None]
    with warnings.catch_warnings():  # embedded local mode always searches exactly, and says so per call
        warnings.filterwarnings("ignore", message="Local mode performs exact")
        answers = iter(client.query_batch_points(collection, requests=real) if real else [])
    return [next(answers).points if r is not None else [] for r in requests]


def _request(query: EncodedQuery, head: str, limit: int, exact: bool, ids: Optional[List[str]] = None,
             with_payload: bool = True) -> Any:
    models = _models()
    vector = _head_query(query, head)
    if vector is None:  # a query without lexical weights matches nothing sparsely
        return None
    return models.QueryRequest(
        query=vector, using=head, limit=limit, with_payload=with_payload,
        params=_search_params(exact),
        filter=models.Filter(must=[models.HasIdCondition(has_id=ids)]) if ids is not None else None,
    )


def search_heads(client: Any, collection: str, queries: Sequence[EncodedQuery], head: str, limit: int = 10,
                 exact: bool = False) -> List[List[Hit]]:
    """The top ``limit`` documents of each query for one head, scored as M3 scores them."""
    points = _run_requests(client, collection, [_request(q, head, limit, exact) for q in queries])
    return [_hits(p, q, head) for p, q in zip(points, queries)]


def _rescore(client: Any, collection: str, queries: Sequence[EncodedQuery], candidates: List[List[str]],
             head: str, exact: bool) -> List[Dict[str, float]]:
    """Exact ``head`` score of each candidate point (by point id) of each query; absent: 0 (no sparse match)."""
    requests = [_request(q, head, len(ids), exact, ids=ids, with_payload=False) if ids else None
                for q, ids in zip(queries, candidates)]
    points = _run_requests(client, collection, requests)
    return [{str(p.id): _m3_score(q, head, p.score) for p in pts} for pts, q in zip(points, queries)]


def search(
    client: Any,
    collection: str,
    queries: Sequence[EncodedQuery],
    mode: str = "hybrid",
    limit: int = 10,
    fusion: str = "weights",
    weights: Optional[Mapping[str, float]] = None,
    rerank: bool = False,
    prefetch_limit: int = 100,
    exact: bool = False,
) -> List[List[Hit]]:
    """Search ``collection`` for each query: best ``limit`` hits ``{"doc_id", "score", "payload"}`` first.

    ``mode``: ``dense``, ``sparse`` or ``colbert`` alone (scores as M3's), or ``hybrid``: the top
    ``prefetch_limit`` documents of dense and of sparse are the candidates, ranked by

    * ``fusion="weights"``: ``hybrid_scores`` of their exact dense and sparse scores with ``weights``
      (default: BGE-M3's 1 : 0.3 : 1), plus ColBERT with its weight when ``rerank``;
    * ``fusion="rrf"``: Qdrant's reciprocal rank fusion of the two candidate lists; with ``rerank`` the fused
      candidates are ranked by ColBERT alone (inside Qdrant).
    """
    models = _models()
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode != "hybrid":
        return search_heads(client, collection, queries, mode, limit, exact)
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    params = _search_params(exact)

    def prefetches(q: EncodedQuery) -> List[Any]:
        found = [models.Prefetch(query=q.dense, using="dense", limit=prefetch_limit, params=params)]
        if q.sparse is not None:
            found.append(models.Prefetch(query=q.sparse, using="sparse", limit=prefetch_limit, params=params))
        return found

    if fusion == "rrf":
        requests = []
        for q in queries:
            rrf = models.FusionQuery(fusion=models.Fusion.RRF)
            if rerank:  # ColBERT MaxSim over the fused candidates
                inner = models.Prefetch(prefetch=prefetches(q), query=rrf, limit=prefetch_limit)
                requests.append(models.QueryRequest(prefetch=inner, query=q.colbert, using="colbert",
                                                    limit=limit, with_payload=True, params=params))
            else:
                requests.append(models.QueryRequest(prefetch=prefetches(q), query=rrf, limit=limit,
                                                    with_payload=True))
        points = _run_requests(client, collection, requests)
        return [_hits(p, q, "colbert" if rerank else None) for p, q in zip(points, queries)]

    weights = dict(BGE_M3_ENSEMBLE_WEIGHTS if weights is None else weights)
    heads = ["dense", "sparse"] + (["colbert"] if rerank else [])
    first = {h: _run_requests(client, collection, [_request(q, h, prefetch_limit, exact) for q in queries])
             for h in ("dense", "sparse")}
    payloads: List[Dict[str, Dict[str, Any]]] = [{} for _ in queries]
    for points in first.values():
        for found, pts in zip(payloads, points):
            found.update({str(p.id): p.payload or {} for p in pts})
    candidates = [sorted(found) for found in payloads]
    per_head = {h: _rescore(client, collection, queries, candidates, h, exact) for h in heads}
    results = []
    for row, ids in enumerate(candidates):
        if not ids:
            results.append([])
            continue
        scores = {h: torch.tensor([per_head[h][row].get(i, 0.0) for i in ids], dtype=torch.float64) for h in heads}
        fused = hybrid_scores(scores, {h: weights.get(h, 0.0) for h in heads})
        order = torch.argsort(fused, descending=True, stable=True)[:limit].tolist()
        results.append([{"doc_id": payloads[row][ids[i]].get("doc_id", ids[i]), "score": float(fused[i]),
                         "payload": payloads[row][ids[i]]} for i in order])
    return results


HYBRID_NAMES = {"dense+sparse": False, "all": True}  # evaluator ranking -> ColBERT rerank


def retrieve(
    embedder: Any,
    client: Any,
    collection: str,
    queries: Mapping[str, str],
    rankings: Sequence[str] = HEADS + tuple(HYBRID_NAMES),
    weights: Optional[Mapping[str, float]] = None,
    top_k: int = 100,
    prefetch_limit: int = 100,
    max_query_length: Optional[int] = None,
    batch_size: Optional[int] = None,
    query_batch: int = 64,
    exact: bool = True,
    show_progress: bool = True,
) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Runs ``{ranking: {qid: {doc_id: score}}}`` through the collection, for :func:`flagm3.evaluation`'s
    metrics: heads ``dense``/``sparse``/``colbert`` (exact search by default) and the weighted hybrids
    ``dense+sparse`` and ``all`` (ColBERT rerank of the dense and sparse candidates)."""
    qids = list(queries)
    runs: Dict[str, Dict[str, Dict[str, float]]] = {name: {} for name in rankings}
    bar = tqdm(total=len(qids), desc="Qdrant search", unit="query", disable=not show_progress)
    for start in range(0, len(qids), query_batch):
        batch = qids[start : start + query_batch]
        encoded = encode_queries(embedder, [queries[q] for q in batch], max_query_length, batch_size)
        for name in rankings:
            if name in HEADS:
                hits = search(client, collection, encoded, name, limit=top_k, exact=exact)
            else:
                hits = search(client, collection, encoded, "hybrid", limit=top_k, weights=weights,
                              rerank=HYBRID_NAMES[name], prefetch_limit=max(prefetch_limit, top_k), exact=exact)
            for qid, found in zip(batch, hits):
                runs[name][qid] = {hit["doc_id"]: hit["score"] for hit in found}
        bar.update(len(batch))
    bar.close()
    return runs


def evaluate_qdrant(
    embedder: Any,
    corpus: Mapping[str, str],
    queries: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    location: Optional[str] = None,
    collection: str = "flagm3-eval",
    rankings: Sequence[str] = HEADS + tuple(HYBRID_NAMES),
    weights: Optional[Mapping[str, float]] = None,
    k_values: Sequence[int] = (1, 10, 100),
    metrics: Optional[Sequence[str]] = None,
    top_k: Optional[int] = None,
    prefetch_limit: int = 100,
    max_query_length: Optional[int] = None,
    max_passage_length: Optional[int] = None,
    batch_size: Optional[int] = None,
    exact: bool = True,
    show_progress: bool = True,
    return_runs: bool = False,
) -> Tuple[Dict[str, Dict[str, float]], Dict[str, Any]]:
    """The default evaluator's metrics, retrieved through a Qdrant collection: ``(results, info)``.

    ``location`` (default: a temporary directory, embedded local mode) holds ``collection``; the corpus is
    indexed into it first (resumably: documents already there are skipped). Documents a head does not return
    (sparse: no shared token) score 0 and fill its ranking up to ``top_k`` in the evaluator's tie order
    (document id, descending), so the per-head metrics are those of the full ranking. ``info``: index time,
    search time, and with ``return_runs`` the runs ``{ranking: {qid: {doc_id: score}}}``.
    """
    import tempfile

    from .evaluation.metrics import METRICS, evaluate_run

    top_k = top_k or max(k_values)
    with tempfile.TemporaryDirectory(prefix="flagm3-qdrant-") as tmp:
        client = connect(location or tmp)
        try:
            indexed = index_corpus(embedder, client, collection, corpus, max_length=max_passage_length,
                                   batch_size=batch_size, show_progress=show_progress)
            start = time.perf_counter()
            runs = retrieve(embedder, client, collection, queries, rankings=rankings, weights=weights, top_k=top_k,
                            prefetch_limit=prefetch_limit, max_query_length=max_query_length,
                            batch_size=batch_size, exact=exact, show_progress=show_progress)
            seconds = time.perf_counter() - start
        finally:
            client.close()
    by_id_desc = sorted(corpus, reverse=True)
    for name in HEADS:
        for run in runs.get(name, {}).values():
            for doc_id in by_id_desc:
                if len(run) >= min(top_k, len(corpus)):
                    break
                run.setdefault(doc_id, 0.0)
    results = {name: evaluate_run(run, qrels, k_values, metrics or METRICS) for name, run in runs.items()}
    info = {"index": indexed, "search_seconds": seconds, "queries": len(queries),
            "location": location or "temporary embedded index", "collection": collection}
    if return_runs:
        info["runs"] = runs
    return results, info
