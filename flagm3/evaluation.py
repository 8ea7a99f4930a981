"""Retrieval evaluation: BEIR loading, trec_eval metrics, corpus retrieval with every M3 head and hybrid.

* :func:`load_beir` reads a BEIR-layout collection (``corpus.jsonl``, ``queries.jsonl``,
  ``qrels/<split>.tsv``).
* :func:`evaluate_run` computes nDCG@k, Recall@k, MRR@k and MAP@k with trec_eval's definitions (the numbers of
  ``pytrec_eval`` ``ndcg_cut``, ``recall``, ``recip_rank`` on the top k and ``map_cut``).
* :func:`retrieve` / :func:`evaluate_retrieval` encode the queries once, stream the corpus through
  ``M3Embedder.iter_outputs`` in chunks and keep a running top-k per ranking: memory is bounded by
  ``[Q, corpus_chunk_size]`` score blocks and ``[Q, k]`` top-k tensors, never all ColBERT vectors at once.
* :class:`M3RetrievalEvaluator` is what the trainer calls during training; :func:`run_eval` is
  ``flagm3 eval``.

Every score comes from :mod:`flagm3.scoring`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections import defaultdict
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .scoring import (
    HEADS,
    PooledLexical,
    colbert_scores,
    colbert_scores_paired,
    dense_scores,
    hybrid_scores,
    pool_lexical,
)

logger = logging.getLogger(__name__)

HYBRIDS = {"dense+sparse": ("dense", "sparse"), "all": ("dense", "sparse", "colbert")}
RANKINGS = HEADS + tuple(HYBRIDS)
METRICS = ("ndcg", "recall", "mrr", "map")
DEFAULT_HYBRID_WEIGHTS = (1.0, 0.3, 1.0)  # dense : sparse : ColBERT, as BGE-M3's ensemble
# Elements of one [pairs, Lq, Lp] token-score block when ColBERT reranks candidate pairs.
_PAIR_BLOCK_ELEMENTS = 1 << 25

Run = dict[str, dict[str, float]]  # query id -> document id -> score
Qrels = dict[str, dict[str, int]]  # query id -> document id -> graded relevance


# ------------------------------------------------------------------------------------------------ loading
def read_jsonl(path: Union[str, os.PathLike]) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed JSON)`` per non-blank line; a malformed line raises naming file and line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno})"
                ) from err


def _field(path: Any, lineno: int, record: Any, name: str, required: bool = True) -> str:
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object, found {type(record).__name__}")
    value = record.get(name)
    if value is None:
        if required:
            raise ValueError(f"{path}:{lineno}: missing field {name!r}")
        return ""
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise ValueError(f"{path}:{lineno}: field {name!r} must be a string, found {type(value).__name__}")
    return str(value)


def load_qrels(path: Union[str, os.PathLike]) -> Qrels:
    """``query-id<TAB>corpus-id<TAB>score`` lines (an optional header line) -> ``{qid: {did: score}}``."""
    qrels: Qrels = defaultdict(dict)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            cols = line.rstrip("\n\r").split("\t")
            if len(cols) != 3:
                raise ValueError(
                    f"{path}:{lineno}: expected 3 tab-separated columns (query-id, corpus-id, score), "
                    f"found {len(cols)}"
                )
            try:
                score = int(float(cols[2]))
            except ValueError as err:
                if lineno == 1:  # header
                    continue
                raise ValueError(f"{path}:{lineno}: relevance score {cols[2]!r} is not a number") from err
            qrels[cols[0].strip()][cols[1].strip()] = score
    return dict(qrels)


def load_beir(
    data_dir: Union[str, os.PathLike], split: str = "test"
) -> tuple[dict[str, str], dict[str, str], Qrels]:
    """Read a BEIR-layout collection: ``(corpus, queries, qrels)``.

    Passage text is ``(title + " " + text).strip()``; only the queries judged in ``qrels/<split>.tsv`` are
    returned. A judged query missing from ``queries.jsonl`` is an error; judged documents missing from the
    corpus are kept in the qrels (they count as relevant and unretrievable, as in trec_eval) with a warning.
    """
    data_dir = os.fspath(data_dir)
    files = {name: os.path.join(data_dir, name) for name in ("corpus.jsonl", "queries.jsonl")}
    files["qrels"] = os.path.join(data_dir, "qrels", f"{split}.tsv")
    for path in files.values():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: {data_dir} is not a BEIR-layout collection with a "
                                    f"{split!r} split (corpus.jsonl, queries.jsonl, qrels/{split}.tsv)")
    corpus: dict[str, str] = {}
    for lineno, record in read_jsonl(files["corpus.jsonl"]):
        doc_id = _field(files["corpus.jsonl"], lineno, record, "_id")
        title = _field(files["corpus.jsonl"], lineno, record, "title", required=False)
        text = _field(files["corpus.jsonl"], lineno, record, "text", required=False)
        corpus[doc_id] = (title + " " + text).strip()
    qrels = load_qrels(files["qrels"])
    all_queries = {
        _field(files["queries.jsonl"], n, r, "_id"): _field(files["queries.jsonl"], n, r, "text")
        for n, r in read_jsonl(files["queries.jsonl"])
    }
    missing = [qid for qid in qrels if qid not in all_queries]
    if missing:
        raise ValueError(
            f"{files['qrels']}: {len(missing)} judged queries are not in {files['queries.jsonl']} "
            f"(first: {missing[:5]})"
        )
    unknown_docs = {did for judged in qrels.values() for did in judged if did not in corpus}
    if unknown_docs:
        logger.warning("%s: %d judged documents are not in the corpus", files["qrels"], len(unknown_docs))
    queries = {qid: all_queries[qid] for qid in all_queries if qid in qrels}
    return corpus, queries, qrels


# ------------------------------------------------------------------------------------------------ metrics
def rank_documents(scores: Mapping[str, float]) -> list[str]:
    """Document ids by decreasing score, ties by decreasing id (trec_eval's order)."""
    return [doc for doc, _ in sorted(scores.items(), key=lambda item: (item[1], item[0]), reverse=True)]


def query_metrics(
    ranked: Sequence[str], judged: Mapping[str, int], k_values: Iterable[int]
) -> dict[str, float]:
    """trec_eval metrics of one ranking against graded judgements (relevant: grade >= 1; nDCG gain: grade)."""
    grades = [judged.get(doc, 0) for doc in ranked]
    num_relevant = sum(1 for g in judged.values() if g >= 1)
    ideal = sorted((g for g in judged.values() if g > 0), reverse=True)
    discounts = [1.0 / math.log2(i + 2) for i in range(max(len(grades), len(ideal)))]
    out = {}
    for k in k_values:
        top = grades[:k]
        dcg = sum(g * discounts[i] for i, g in enumerate(top) if g > 0)
        idcg = sum(g * discounts[i] for i, g in enumerate(ideal[:k]))
        hits = [i for i, g in enumerate(top) if g >= 1]
        out[f"ndcg@{k}"] = dcg / idcg if idcg > 0 else 0.0
        out[f"recall@{k}"] = len(hits) / num_relevant if num_relevant else 0.0
        out[f"mrr@{k}"] = 1.0 / (hits[0] + 1) if hits else 0.0
        precision_sum = sum((n + 1) / (i + 1) for n, i in enumerate(hits))
        out[f"map@{k}"] = precision_sum / num_relevant if num_relevant else 0.0
    return out


def evaluate_run(
    run: Mapping[str, Mapping[str, float]],
    qrels: Mapping[str, Mapping[str, int]],
    k_values: Iterable[int] = (1, 10, 100),
    metrics: Iterable[str] = METRICS,
) -> dict[str, float]:
    """Mean of each ``metric@k`` over every query in ``qrels`` (a query absent from ``run`` scores 0)."""
    k_values, metrics = sorted(set(k_values)), list(metrics)
    unknown = set(metrics) - set(METRICS)
    if unknown or not k_values or min(k_values) < 1:
        raise ValueError(
            f"metrics must be among {METRICS} (got {metrics}) and k_values positive (got {k_values})"
        )
    names = [f"{m}@{k}" for m in metrics for k in k_values]
    totals = dict.fromkeys(names, 0.0)
    for qid, judged in qrels.items():
        per_query = query_metrics(rank_documents(run.get(qid, {})), judged, k_values)
        for name in names:
            totals[name] += per_query[name]
    return {name: total / max(len(qrels), 1) for name, total in totals.items()}


# --------------------------------------------------------------------------------------------- retrieval
def top_k_positions(scores: Tensor, k: int) -> Tensor:
    """Column positions ``[R, min(k, C)]`` of the ``k`` best scores per row of ``scores`` [R, C], best first;
    among equal scores the leftmost column wins (a stable sort's order, at the cost of a partial top-k)."""
    k = min(k, scores.shape[1])
    if k == 0:
        return torch.empty(scores.shape[0], 0, dtype=torch.long)
    kth = torch.topk(scores, k, dim=1).values[:, -1:]
    above, equal = scores > kth, scores == kth
    take = above | (equal & (equal.cumsum(1) <= k - above.sum(1, keepdim=True)))
    positions = take.nonzero()[:, 1].view(scores.shape[0], k)  # row-major: column order within a row
    order = torch.argsort(scores.gather(1, positions), dim=1, descending=True, stable=True)
    return positions.gather(1, order)


class RunningTopK:
    """The ``k`` best (score, column index) per row over column blocks seen one at a time.

    Ties go to the smaller column index, so the result does not depend on how the columns were chunked.
    ``extras`` names other ``[R, c]`` score blocks whose values are kept at the selected positions.
    """

    def __init__(self, num_rows: int, k: int, extras: Iterable[str] = ()) -> None:
        self.k = k
        self.scores = torch.empty(num_rows, 0)
        self.indices = torch.empty(num_rows, 0, dtype=torch.long)
        self.extras = {name: torch.empty(num_rows, 0) for name in extras}

    def update(self, scores: Tensor, indices: Tensor, extras: Optional[Mapping[str, Tensor]] = None) -> None:
        """``scores`` [R, c] for columns ``indices`` ([c] shared by all rows, or [R, c])."""
        blocks = {"": scores.float(), **{name: extras[name].float() for name in self.extras}}
        if indices.dim() == 1:  # put the new columns in index order: a cheap 1-D sort
            order = torch.argsort(indices)
            indices, blocks = indices[order], {name: b[:, order] for name, b in blocks.items()}
        rows = scores.shape[0]
        all_indices = torch.cat([self.indices, indices.expand(rows, -1)], dim=1)
        kept = {"": self.scores, **self.extras}
        merged = {name: torch.cat([kept[name], b], dim=1) for name, b in blocks.items()}
        in_index_order = indices.dim() == 1 and (
            self.indices.numel() == 0 or int(indices[0]) > int(self.indices.max())
        )  # kept entries (ties already by index) all precede the new ones, which are sorted
        if not in_index_order:
            order = torch.argsort(all_indices, dim=1, stable=True)
            all_indices = all_indices.gather(1, order)
            merged = {name: m.gather(1, order) for name, m in merged.items()}
        keep = top_k_positions(merged[""], self.k)
        self.indices = all_indices.gather(1, keep)
        self.scores = merged.pop("").gather(1, keep)
        self.extras = {name: m.gather(1, keep) for name, m in merged.items()}

    def to_run(self, row_ids: Sequence[str], column_ids: Sequence[str], k: Optional[int] = None) -> Run:
        """``{row id: {column id: score}}`` in ranked order, at most ``k`` entries per row."""
        k = self.k if k is None else k
        scores, indices = self.scores[:, :k].tolist(), self.indices[:, :k].tolist()
        return {
            rid: {column_ids[i]: s for s, i in zip(row_scores, row_indices)}
            for rid, row_scores, row_indices in zip(row_ids, scores, indices)
        }


class _EncodedQueries:
    """Query outputs of every head: dense stacked ``[Q, H]``, lexical weights as a CSR ``[Q, vocab]``,
    ColBERT vectors kept per encoding batch (no padding to a common length)."""

    def __init__(self, embedder: Any, texts: list[str], max_length: int, batch_size: Optional[int],
                 heads: Sequence[str], show_progress: bool) -> None:
        from .inference import lexical_matrix

        self.num = len(texts)
        self.dense: Optional[Tensor] = None
        self.lexical = None
        self.batches: list[tuple[Tensor, dict[str, Tensor]]] = []
        pooled: list[PooledLexical] = []
        for indices, out in embedder.iter_outputs(
            texts, max_length=max_length, batch_size=batch_size, heads=tuple(heads),
            show_progress=show_progress,
        ):
            rows = torch.as_tensor(indices, dtype=torch.long)
            if "dense" in heads:
                if self.dense is None:
                    self.dense = torch.zeros(self.num, out["dense"].shape[-1])
                self.dense[rows] = out["dense"].float()
            if "sparse" in heads:
                p = pool_lexical(out["sparse_ids"], out["sparse_weights"].float())
                pooled.append(PooledLexical(rows[p.rows], p.token_ids, p.weights, self.num))
            if "colbert" in heads:
                colbert = {"colbert": out["colbert"].float(), "colbert_mask": out["colbert_mask"]}
                self.batches.append((rows, colbert))
        if "sparse" in heads:
            rows, ids, weights = (torch.cat([p[f] for p in pooled]) for f in range(3))
            self.lexical = lexical_matrix(PooledLexical(rows, ids, weights, self.num))

    def per_batch(self, fn: Any, num_cols: int) -> Tensor:
        """``[Q, num_cols]`` from ``fn(batch outputs) -> [b, num_cols]`` over the query batches."""
        full = torch.empty(self.num, num_cols)
        for rows, out in self.batches:
            full[rows] = fn(out).float()
        return full


def _head_scores(
    queries: _EncodedQueries, out: Mapping[str, Tensor], heads: Iterable[str]
) -> dict[str, Tensor]:
    """``[Q, b]`` score of each head for one batch of passage outputs (lexical: one sparse matrix product)."""
    from .inference import compute_lexical_matching_scores

    scores = {}
    if "dense" in heads:
        scores["dense"] = dense_scores(queries.dense, out["dense"].float())
    if "sparse" in heads:
        passages = pool_lexical(out["sparse_ids"], out["sparse_weights"].float())
        lexical = compute_lexical_matching_scores(queries.lexical, passages)
        scores["sparse"] = torch.from_numpy(lexical).float()
    if "colbert" in heads:
        p_vecs, p_mask = out["colbert"].float(), out["colbert_mask"]
        scores["colbert"] = queries.per_batch(
            lambda q: colbert_scores(q["colbert"], q["colbert_mask"], p_vecs, p_mask), p_vecs.shape[0]
        )
    return scores


def _with_hybrids(
    scores: dict[str, Tensor], hybrids: Iterable[str], weights: Mapping[str, float]
) -> dict[str, Tensor]:
    """Head scores plus every hybrid of ``hybrids`` whose heads are all present."""
    out = dict(scores)
    for name in hybrids:
        if all(h in scores for h in HYBRIDS[name]):
            parts = HYBRIDS[name]
            out[name] = hybrid_scores({h: scores[h] for h in parts}, {h: weights[h] for h in parts})
    return out


def _hybrid_weights(weights: Union[Sequence[float], Mapping[str, float]]) -> dict[str, float]:
    if isinstance(weights, Mapping):
        return {h: float(weights.get(h, 0.0)) for h in HEADS}
    if len(weights) != 3:
        raise ValueError(f"hybrid_weights must be (dense, sparse, colbert), got {weights}")
    return dict(zip(HEADS, map(float, weights)))


def with_instruction(
    embedder: Any,
    texts: Iterable[str],
    side: str = "query",
    instruction: Optional[str] = None,
    instruction_format: Optional[str] = None,
) -> list[str]:
    """Texts prefixed with an instruction, as the embedder's ``encode_queries``/``encode_corpus`` do:
    ``instruction_format.format(instruction, text)``; both default to the embedder's
    ``<side>_instruction_for_retrieval``/``<side>_instruction_format``. Unchanged without an instruction."""
    texts = list(texts)
    instruction = instruction or getattr(embedder, f"{side}_instruction_for_retrieval", None)
    if not instruction:
        return texts
    fmt = instruction_format or getattr(embedder, f"{side}_instruction_format", "{}{}")
    fmt = fmt.replace("\\n", "\n")
    return [fmt.format(instruction, t) for t in texts]


def _check_rankings(
    heads: Sequence[str], hybrids: Optional[Sequence[str]]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if isinstance(heads, str) or not heads or not set(heads) <= set(HEADS):
        raise ValueError(f"heads must be a non-empty subset of {HEADS}, got {heads!r}")
    heads = tuple(h for h in HEADS if h in set(heads))
    if hybrids is None:
        return heads, tuple(name for name, parts in HYBRIDS.items() if set(parts) <= set(heads))
    for name in hybrids:
        if name not in HYBRIDS:
            raise ValueError(f"unknown hybrid {name!r}; choose from {tuple(HYBRIDS)}")
        if not set(HYBRIDS[name]) <= set(heads):
            raise ValueError(f"hybrid {name!r} needs the heads {HYBRIDS[name]}, but heads={heads}")
    return heads, tuple(name for name in HYBRIDS if name in hybrids)


def _colbert_on_candidates(
    embedder: Any,
    queries: _EncodedQueries,
    texts: Sequence[str],
    candidates: Tensor,
    max_length: int,
    batch_size: Optional[int],
    chunk_size: int,
    progress: Any,
) -> Tensor:
    """ColBERT scores ``[Q, d]`` of each query with its candidate documents ``candidates`` [Q, d].

    Only the union of the candidates is encoded, ``chunk_size`` documents per ``iter_outputs`` call; each
    query is scored against its own candidates only (paired MaxSim), so the cost is ``Q * d`` pairs.
    """
    result = torch.full(candidates.shape, float("nan"))
    union = torch.unique(candidates)
    position = torch.full((len(texts),), -1, dtype=torch.long)  # global doc index -> row in the current batch
    for start in range(0, union.numel(), chunk_size):
        chunk = union[start : start + chunk_size]
        for local, out in embedder.iter_outputs(
            [texts[i] for i in chunk.tolist()], max_length=max_length, batch_size=batch_size,
            heads=("colbert",), show_progress=False,
        ):
            docs = chunk[torch.as_tensor(local, dtype=torch.long)]
            position[docs] = torch.arange(docs.numel())
            p_vecs, p_mask = out["colbert"].float(), out["colbert_mask"]
            for rows, q in queries.batches:
                where = position[candidates[rows]]  # [b, d]
                r, c = (where >= 0).nonzero(as_tuple=True)
                step = max(1, _PAIR_BLOCK_ELEMENTS // max(1, q["colbert"].shape[1] * p_vecs.shape[1]))
                for s in range(0, r.numel(), step):
                    rs, cs = r[s : s + step], c[s : s + step]
                    docs_at = where[rs, cs]
                    result[rows[rs], cs] = colbert_scores_paired(
                        q["colbert"][rs].float(), q["colbert_mask"][rs], p_vecs[docs_at], p_mask[docs_at]
                    )
            position[docs] = -1
            progress.update(docs.numel())
    return result


def retrieve(
    embedder: Any,
    corpus: Mapping[str, str],
    queries: Mapping[str, str],
    heads: Sequence[str] = HEADS,
    hybrids: Optional[Sequence[str]] = None,
    hybrid_weights: Union[Sequence[float], Mapping[str, float]] = DEFAULT_HYBRID_WEIGHTS,
    top_k: int = 100,
    max_query_length: int = 512,
    max_passage_length: int = 512,
    batch_size: Optional[int] = None,
    corpus_chunk_size: int = 8192,
    colbert_mode: str = "full",
    rerank_depth: int = 100,
    rerank_source: Optional[str] = None,
    show_progress: bool = True,
) -> dict[str, Run]:
    """Rank ``corpus`` for every query with each head of ``heads`` and each hybrid: ``{ranking: run}``.

    ``embedder`` is an ``M3Embedder`` (``iter_outputs``); its query/passage instructions, if any, are
    applied as ``encode_queries``/``encode_corpus`` do. The corpus is encoded ``corpus_chunk_size``
    documents per ``iter_outputs`` call; score blocks ``[Q, corpus_chunk_size]`` are merged into a running
    top-``top_k`` per ranking. Hybrids (``"dense+sparse"``, ``"all"``; default: those whose heads are
    computed) are weighted sums ``w_d*dense + w_s*sparse + w_c*colbert`` with ``hybrid_weights`` (default
    1 : 0.3 : 1).

    ``colbert_mode="full"`` scores ColBERT against the whole corpus; ``"rerank"`` scores it only on the top
    ``rerank_depth`` documents of ``rerank_source`` (default ``"dense+sparse"``, else ``"dense"``), which
    gives the ``"colbert"`` and ``"all"`` rankings of those candidates (a second encoding pass over them).
    """
    heads, hybrids = _check_rankings(heads, hybrids)
    weights = _hybrid_weights(hybrid_weights)
    if colbert_mode not in ("full", "rerank"):
        raise ValueError(f"colbert_mode must be 'full' or 'rerank', got {colbert_mode!r}")
    rerank = colbert_mode == "rerank" and "colbert" in heads
    first_heads = tuple(h for h in heads if not (rerank and h == "colbert"))
    first_rankings = first_heads + tuple(n for n in hybrids if set(HYBRIDS[n]) <= set(first_heads))
    if rerank:
        default_source = "dense+sparse" if "dense+sparse" in first_rankings else first_rankings[0]
        rerank_source = rerank_source or default_source
        if rerank_source not in first_rankings:
            raise ValueError(
                f"rerank_source {rerank_source!r} must be one of the first-pass rankings {first_rankings}"
            )
        if rerank_depth < top_k:
            logger.warning("rerank_depth %d < top_k %d: ColBERT rankings hold %d documents",
                           rerank_depth, top_k, rerank_depth)

    # Columns in descending document-id order: ties at the top-k cut then go as trec_eval ranks them (score,
    # then document id descending), so a truncated run scores as the full ranking would.
    qids, doc_ids = list(queries), sorted(corpus, reverse=True)
    if not qids or not doc_ids:
        raise ValueError(f"nothing to retrieve: {len(qids)} queries, {len(doc_ids)} documents")
    texts = with_instruction(embedder, (corpus[d] for d in doc_ids), "passage")
    q_texts = with_instruction(embedder, (queries[q] for q in qids), "query")
    encoded = _EncodedQueries(embedder, q_texts, max_query_length, batch_size, heads,
                              show_progress=False)
    keepers = {name: RunningTopK(len(qids), top_k) for name in first_rankings}
    if rerank:
        keepers[rerank_source] = RunningTopK(len(qids), max(top_k, rerank_depth), extras=first_heads)
    total = len(texts) + (min(len(texts), len(qids) * rerank_depth) if rerank else 0)
    progress = tqdm(total=total, desc="Retrieval", unit="doc", disable=not show_progress)
    for start in range(0, len(texts), corpus_chunk_size):
        blocks: dict[str, list[Tensor]] = defaultdict(list)
        columns = []
        for local, out in embedder.iter_outputs(
            texts[start : start + corpus_chunk_size], max_length=max_passage_length, batch_size=batch_size,
            heads=first_heads, show_progress=False,
        ):
            scores = _with_hybrids(_head_scores(encoded, out, first_heads), hybrids, weights)
            for name, block in scores.items():
                blocks[name].append(block)
            columns.append(torch.as_tensor(local, dtype=torch.long) + start)
            progress.update(len(local))
        indices = torch.cat(columns)
        chunk_scores = {name: torch.cat(parts, dim=1) for name, parts in blocks.items()}
        for name, keeper in keepers.items():
            keeper.update(chunk_scores[name], indices, extras=chunk_scores)
    runs = {name: keeper.to_run(qids, doc_ids, top_k) for name, keeper in keepers.items()}

    if rerank:
        source = keepers[rerank_source]
        candidates = source.indices[:, :rerank_depth]
        colbert = _colbert_on_candidates(embedder, encoded, texts, candidates, max_passage_length, batch_size,
                                         corpus_chunk_size, progress)
        candidate_scores = {h: s[:, :rerank_depth] for h, s in source.extras.items()}
        candidate_scores["colbert"] = colbert
        for name, scores in _with_hybrids(candidate_scores, hybrids, weights).items():
            if name in runs:
                continue
            ranked = RunningTopK(len(qids), top_k)
            ranked.update(scores, candidates)
            runs[name] = ranked.to_run(qids, doc_ids)
    progress.close()
    return {name: runs[name] for name in RANKINGS if name in runs}


def evaluate_retrieval(
    embedder: Any,
    corpus: Mapping[str, str],
    queries: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    heads: Sequence[str] = HEADS,
    hybrids: Optional[Sequence[str]] = None,
    hybrid_weights: Union[Sequence[float], Mapping[str, float]] = DEFAULT_HYBRID_WEIGHTS,
    k_values: Sequence[int] = (1, 10, 100),
    metrics: Sequence[str] = METRICS,
    max_query_length: int = 512,
    max_passage_length: int = 512,
    batch_size: Optional[int] = None,
    corpus_chunk_size: int = 8192,
    colbert_mode: str = "full",
    rerank_depth: int = 100,
    rerank_source: Optional[str] = None,
    top_k: Optional[int] = None,
    show_progress: bool = True,
    return_runs: bool = False,
) -> Union[dict[str, dict[str, float]], tuple[dict[str, dict[str, float]], dict[str, Run]]]:
    """Retrieve for the judged queries and score every ranking: ``{"dense": {"ndcg@10": ...}, ...}``.

    Arguments as :func:`retrieve`; ``top_k`` defaults to ``max(k_values)``. With ``return_runs=True`` the
    result is ``(metrics, runs)``. Metrics are averaged over the queries of ``qrels``.
    """
    missing = [qid for qid in qrels if qid not in queries]
    if missing:
        raise ValueError(f"{len(missing)} judged queries have no text in `queries` (first: {missing[:5]})")
    judged_queries = {qid: queries[qid] for qid in qrels}
    runs = retrieve(
        embedder, corpus, judged_queries, heads=heads, hybrids=hybrids, hybrid_weights=hybrid_weights,
        top_k=top_k or max(k_values), max_query_length=max_query_length,
        max_passage_length=max_passage_length, batch_size=batch_size, corpus_chunk_size=corpus_chunk_size,
        colbert_mode=colbert_mode, rerank_depth=rerank_depth, rerank_source=rerank_source,
        show_progress=show_progress,
    )
    results = {name: evaluate_run(run, qrels, k_values, metrics) for name, run in runs.items()}
    return (results, runs) if return_runs else results


# ---------------------------------------------------------------------------------------------- rendering
def format_results_table(results: Mapping[str, Mapping[str, float]], digits: int = 4) -> str:
    """A plain-text table: one row per ranking, one column per metric (ordered by metric, then k)."""
    metrics: list[str] = []
    for values in results.values():
        metrics += [m for m in values if m not in metrics]

    def order(name: str) -> tuple:
        base, _, k = name.partition("@")
        return (METRICS.index(base) if base in METRICS else len(METRICS), base, int(k) if k.isdigit() else 0)

    metrics.sort(key=order)
    header = ["ranking"] + metrics
    rows = [[name] + [f"{values[m]:.{digits}f}" if m in values else "-" for m in metrics]
            for name, values in results.items()]
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in [header] + rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def flatten_results(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """``{"dense": {"ndcg@10": x}}`` -> ``{"dense_ndcg@10": x}``."""
    return {f"{name}_{metric}": value for name, values in results.items() for metric, value in values.items()}


# ---------------------------------------------------------------------------------------------- subsets
def subsample(
    corpus: Mapping[str, str],
    queries: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    max_corpus_size: Optional[int] = None,
    max_queries: Optional[int] = None,
    seed: int = 0,
) -> tuple[dict[str, str], dict[str, str], Qrels]:
    """A smaller collection for quick evaluations: ``max_queries`` judged queries drawn at random, and a
    corpus of every document judged for them plus random others up to ``max_corpus_size`` (order kept)."""
    rng = random.Random(seed)
    qids = [qid for qid in queries if qid in qrels]
    if max_queries is not None and len(qids) > max_queries:
        chosen = set(rng.sample(qids, max_queries))
        qids = [qid for qid in qids if qid in chosen]
    qrels = {qid: dict(qrels[qid]) for qid in qids}
    if max_corpus_size is not None and len(corpus) > max_corpus_size:
        judged = {did for judged in qrels.values() for did in judged if did in corpus}
        if len(judged) > max_corpus_size:
            logger.warning("max_corpus_size=%d is below the %d judged documents: keeping them all",
                           max_corpus_size, len(judged))
        others = [did for did in corpus if did not in judged]
        fill = set(rng.sample(others, max(0, max_corpus_size - len(judged))))
        corpus = {did: text for did, text in corpus.items() if did in judged or did in fill}
    return dict(corpus), {qid: queries[qid] for qid in qids}, qrels


# -------------------------------------------------------------------------------------- trainer evaluator
class M3RetrievalEvaluator:
    """Retrieval metrics of a model under training, for ``M3Trainer``: ``evaluator(model, tokenizer)``.

    Returns flat keys ``"<ranking>_<metric>"`` (``"dense_ndcg@10"``, ``"all_ndcg@10"``, ...), which the
    trainer logs with the ``eval_`` prefix (``metric_for_best_model="eval_all_ndcg@10"``). Give ``data_dir``
    (BEIR layout, ``split``) or ``corpus``/``queries``/``qrels``; ``max_corpus_size``/``max_queries``
    evaluate on a seeded subset (all judged documents kept). ``main_metric`` (the key to select checkpoints
    on) defaults to ``"all_ndcg@10"``, or the nDCG of the widest ranking computed. ``model`` may be wrapped
    (DDP ``.module``, PEFT ``get_base_model()``); it is encoded in eval mode (fp32 unless
    ``use_fp16``/``use_bf16``: autocast, weights untouched) and its previous train/eval mode is restored.
    """

    def __init__(
        self,
        data_dir: Optional[Union[str, os.PathLike]] = None,
        split: str = "dev",
        corpus: Optional[Mapping[str, str]] = None,
        queries: Optional[Mapping[str, str]] = None,
        qrels: Optional[Mapping[str, Mapping[str, int]]] = None,
        heads: Sequence[str] = HEADS,
        hybrids: Optional[Sequence[str]] = None,
        hybrid_weights: Union[Sequence[float], Mapping[str, float]] = DEFAULT_HYBRID_WEIGHTS,
        k_values: Sequence[int] = (1, 10, 100),
        metrics: Sequence[str] = METRICS,
        max_query_length: int = 512,
        max_passage_length: int = 512,
        batch_size: int = 32,
        main_metric: Optional[str] = None,
        max_corpus_size: Optional[int] = None,
        max_queries: Optional[int] = None,
        seed: int = 0,
        colbert_mode: str = "full",
        rerank_depth: int = 100,
        query_instruction_for_retrieval: Optional[str] = None,
        query_instruction_format: str = "{}{}",
        use_fp16: bool = False,
        use_bf16: bool = False,
        show_progress: bool = False,
    ) -> None:
        if data_dir is not None:
            if corpus is not None or queries is not None or qrels is not None:
                raise ValueError("give either data_dir or corpus/queries/qrels, not both")
            corpus, queries, qrels = load_beir(data_dir, split)
        elif corpus is None or queries is None or qrels is None:
            raise ValueError("M3RetrievalEvaluator needs data_dir, or all of corpus, queries and qrels")
        subset = subsample(corpus, queries, qrels, max_corpus_size, max_queries, seed)
        self.corpus, self.queries, self.qrels = subset
        self.heads, self.hybrids = _check_rankings(heads, hybrids)
        k_values = sorted(set(k_values))
        self.keys = [f"{r}_{m}@{k}" for r in self.heads + self.hybrids for m in metrics for k in k_values]
        if main_metric is None:  # nDCG@10 of the widest hybrid computed, else of the first head
            ranking = self.hybrids[-1] if self.hybrids else self.heads[0]
            main_metric = f"{ranking}_{metrics[0]}@{10 if 10 in k_values else k_values[-1]}"
        if main_metric not in self.keys:
            raise ValueError(f"main_metric {main_metric!r} is not among the evaluator's keys {self.keys}")
        self.main_metric = main_metric
        self.options = dict(
            heads=self.heads, hybrids=self.hybrids, hybrid_weights=hybrid_weights, k_values=tuple(k_values),
            metrics=tuple(metrics), max_query_length=max_query_length, max_passage_length=max_passage_length,
            batch_size=batch_size, colbert_mode=colbert_mode, rerank_depth=rerank_depth,
            show_progress=show_progress,
        )
        self.embedder_options = dict(
            batch_size=batch_size, use_fp16=use_fp16, use_bf16=use_bf16,
            query_instruction_for_retrieval=query_instruction_for_retrieval,
            query_instruction_format=query_instruction_format,
        )

    @classmethod
    def from_beir(
        cls, data_dir: Union[str, os.PathLike], split: str = "dev", **kwargs: Any
    ) -> M3RetrievalEvaluator:
        """An evaluator on the ``split`` of a BEIR-layout directory (other arguments as the constructor)."""
        return cls(data_dir=data_dir, split=split, **kwargs)

    def __call__(self, model: Any, tokenizer: Any) -> dict[str, float]:
        from .inference import M3Embedder

        outer = model
        model = getattr(model, "module", model)  # DistributedDataParallel
        if hasattr(model, "get_base_model"):  # PEFT: the M3Model with its adapters injected
            model = model.get_base_model()
        was_training = outer.training
        outer.eval()
        try:
            embedder = M3Embedder(model, tokenizer=tokenizer, **self.embedder_options)
            results = evaluate_retrieval(embedder, self.corpus, self.queries, self.qrels, **self.options)
        finally:
            outer.train(was_training)
        return flatten_results(results)


# ------------------------------------------------------------------------------------------------- CLI
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
    from .inference import M3Embedder

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
