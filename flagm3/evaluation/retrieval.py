"""Corpus retrieval with every M3 head and hybrid: a running top-k over streamed corpus chunks.

:func:`retrieve` / :func:`evaluate_retrieval` encode the queries once, stream the corpus through
``M3Embedder.iter_outputs`` in chunks and keep a running top-k per ranking: memory is bounded by
``[Q, corpus_chunk_size]`` score blocks and ``[Q, k]`` top-k tensors, never all ColBERT vectors at once.
Every score comes from :mod:`flagm3.scoring`.

With the model on an accelerator (or ``score_on_device=True``) the outputs stay on the model's device and every
score, the running top-k included, is computed there (lexical scores by :func:`flagm3.scoring.sparse_scores_columns`
instead of the host's sparse matrix product); only the ``[Q, k]`` top-k reaches the host. On the CPU the scores
are the host path's (scipy for lexical scores), unchanged.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import scipy.sparse
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..scoring import (
    BGE_M3_ENSEMBLE_WEIGHTS,
    DEFAULT_BLOCK_ELEMENTS,
    HEADS,
    LexicalColumns,
    PooledLexical,
    colbert_scores,
    colbert_scores_paired,
    compute_lexical_matching_scores,
    concat_lexical,
    dense_scores,
    hybrid_scores,
    lexical_columns,
    lexical_matrix,
    pool_lexical,
    sparse_scores_columns,
)
from ..texts import with_instruction
from .metrics import METRICS, Run, evaluate_run

logger = logging.getLogger(__name__)

HYBRIDS = {"dense+sparse": ("dense", "sparse"), "all": ("dense", "sparse", "colbert")}
RANKINGS = HEADS + tuple(HYBRIDS)
DEFAULT_HYBRID_WEIGHTS = tuple(BGE_M3_ENSEMBLE_WEIGHTS[h] for h in HEADS)  # dense : sparse : ColBERT


def top_k_positions(scores: Tensor, k: int) -> Tensor:
    """Column positions ``[R, min(k, C)]`` of the ``k`` best scores per row of ``scores`` [R, C], best first;
    among equal scores the leftmost column wins (a stable sort's order, at the cost of a partial top-k)."""
    k = min(k, scores.shape[1])
    if k == 0:
        return torch.empty(scores.shape[0], 0, dtype=torch.long, device=scores.device)
    kth = torch.topk(scores, k, dim=1).values[:, -1:]
    above, equal = scores > kth, scores == kth
    take = above | (equal & (equal.cumsum(1) <= k - above.sum(1, keepdim=True)))
    positions = take.nonzero()[:, 1].view(scores.shape[0], k)  # row-major: column order within a row
    order = torch.argsort(scores.gather(1, positions), dim=1, descending=True, stable=True)
    return positions.gather(1, order)


class RunningTopK:
    """The ``k`` best (score, column index) per row over column blocks seen one at a time.

    Ties go to the smaller column index, so the result does not depend on how the columns were chunked.
    ``extras`` names other ``[R, c]`` score blocks whose values are kept at the selected positions. The kept
    tensors live on ``device`` (that of the blocks given to :meth:`update`); :meth:`to_run` reads them to the host.
    """

    def __init__(self, num_rows: int, k: int, extras: Iterable[str] = (), device: Any = None) -> None:
        self.k = k
        self.scores = torch.empty(num_rows, 0, device=device)
        self.indices = torch.empty(num_rows, 0, dtype=torch.long, device=device)
        self.extras = {name: torch.empty(num_rows, 0, device=device) for name in extras}

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


class EncodedTexts:
    """Outputs of the asked heads for ``num`` texts, ready to search with: ``dense`` stacked ``[N, H]`` (fp32),
    ``lexical`` weights as a CSR ``[N, vocab]`` (host) or :class:`~flagm3.scoring.LexicalColumns` (``device``),
    ``batches`` of ColBERT vectors as encoded (``(rows [b], {"colbert": [b, L, D], "colbert_mask": [b, L]})``, no
    padding to a common length). ``device``: where the tensors are and scores are computed (``None``: the host
    path, lexical scores by scipy)."""

    def __init__(self, num: int, device: Optional[torch.device] = None) -> None:
        self.num = num
        self.device = device
        self.dense: Optional[Tensor] = None
        self.lexical: Optional[Union[scipy.sparse.csr_matrix, LexicalColumns]] = None
        self.batches: list[tuple[Tensor, dict[str, Tensor]]] = []

    def per_batch(self, fn: Any, num_cols: int) -> Tensor:
        """``[N, num_cols]`` from ``fn(batch outputs) -> [b, num_cols]`` over the ColBERT batches."""
        full = torch.empty(self.num, num_cols, device=self.device)
        for rows, out in self.batches:
            full[rows] = fn(out).float()
        return full


def scoring_device(embedder: Any, on_device: Optional[bool] = None) -> Optional[torch.device]:
    """The device to score on (the embedder's), or ``None`` for the host path. ``on_device`` ``None``: the
    embedder's device unless it is the CPU."""
    device = getattr(embedder, "device", None)
    if on_device is None:
        on_device = device is not None and torch.device(device).type != "cpu"
    if on_device and device is None:
        raise ValueError("score_on_device=True needs an embedder with a .device")
    return torch.device(device) if on_device else None


def encode_texts(embedder: Any, texts: Sequence[str], max_length: int, batch_size: Optional[int],
                 heads: Sequence[str], show_progress: bool = False,
                 num_columns: Optional[int] = None, device: Optional[torch.device] = None) -> EncodedTexts:
    """Encode ``texts`` once through ``embedder.iter_outputs`` into an :class:`EncodedTexts` of ``heads``;
    ``num_columns`` fixes the lexical matrix's width (the vocabulary size), else its largest id + 1. ``device``
    (:func:`scoring_device`): keep the outputs on the embedder's device, lexical weights as
    :class:`~flagm3.scoring.LexicalColumns` (``num_columns`` unused)."""
    encoded = EncodedTexts(len(texts), device)
    lexical: list[tuple[Tensor, PooledLexical]] = []
    lexical_batches: list[tuple[Tensor, Tensor, Tensor]] = []
    extra = {"on_device": True} if device is not None else {}
    for indices, out in embedder.iter_outputs(
        texts, max_length=max_length, batch_size=batch_size, heads=tuple(heads), show_progress=show_progress,
        **extra,
    ):
        rows = torch.as_tensor(indices, dtype=torch.long, device=device)
        if "dense" in heads:
            if encoded.dense is None:
                encoded.dense = torch.zeros(encoded.num, out["dense"].shape[-1], device=device)
            encoded.dense[rows] = out["dense"].float()
        if "sparse" in heads and device is not None:
            lexical_batches.append((rows, out["sparse_ids"], out["sparse_weights"].float()))
        elif "sparse" in heads:
            lexical.append((rows, pool_lexical(out["sparse_ids"], out["sparse_weights"].float())))
        if "colbert" in heads:
            encoded.batches.append((rows, {"colbert": out["colbert"].float(), "colbert_mask": out["colbert_mask"]}))
    if "sparse" in heads and device is not None:
        encoded.lexical = lexical_columns(lexical_batches, encoded.num)
    elif "sparse" in heads:
        encoded.lexical = lexical_matrix(concat_lexical(lexical, encoded.num), num_columns=num_columns)
    return encoded


def _head_scores(
    queries: EncodedTexts, out: Mapping[str, Tensor], heads: Iterable[str]
) -> dict[str, Tensor]:
    """``[Q, b]`` score of each head for one batch of passage outputs (lexical: one sparse matrix product)."""
    scores = {}
    if "dense" in heads:
        scores["dense"] = dense_scores(queries.dense, out["dense"].float())
    if "sparse" in heads and isinstance(queries.lexical, LexicalColumns):  # on the device
        scores["sparse"] = sparse_scores_columns(queries.lexical, out["sparse_ids"], out["sparse_weights"].float())
    elif "sparse" in heads:
        passages = pool_lexical(out["sparse_ids"], out["sparse_weights"].float())
        lexical = compute_lexical_matching_scores(queries.lexical, passages)
        scores["sparse"] = torch.from_numpy(lexical).float()
    if "colbert" in heads:
        p_vecs, p_mask = out["colbert"].float(), out["colbert_mask"]
        scores["colbert"] = queries.per_batch(
            lambda q: colbert_scores(q["colbert"], q["colbert_mask"], p_vecs, p_mask), p_vecs.shape[0]
        )
    return scores


def iter_score_blocks(
    embedder: Any,
    queries: EncodedTexts,
    texts: Sequence[str],
    heads: Sequence[str],
    max_length: int,
    batch_size: Optional[int],
    chunk_size: int = 8192,
    progress: Any = None,
) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
    """``(columns [c], {head: [Q, c] scores})`` for each chunk of ``chunk_size`` of ``texts``, encoded as they
    come (``embedder.iter_outputs``): memory bounded by the chunk, whatever the corpus size. ``progress``: a
    tqdm bar advanced by the texts encoded. The blocks are on ``queries.device`` (the host when ``None``)."""
    extra = {"on_device": True} if queries.device is not None else {}
    for start in range(0, len(texts), chunk_size):
        blocks: dict[str, list[Tensor]] = defaultdict(list)
        columns = []
        for local, out in embedder.iter_outputs(
            texts[start : start + chunk_size], max_length=max_length, batch_size=batch_size, heads=tuple(heads),
            show_progress=False, passage=True, **extra,
        ):
            for name, block in _head_scores(queries, out, heads).items():
                blocks[name].append(block)
            columns.append(torch.as_tensor(local, dtype=torch.long, device=queries.device) + start)
            if progress is not None:
                progress.update(len(local))
        yield torch.cat(columns), {name: torch.cat(parts, dim=1) for name, parts in blocks.items()}


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


def check_rankings(
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
    queries: EncodedTexts,
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
    device = queries.device
    result = torch.full(candidates.shape, float("nan"), device=device)
    union = torch.unique(candidates)
    position = torch.full((len(texts),), -1, dtype=torch.long, device=device)  # doc index -> row in the batch
    extra = {"on_device": True} if device is not None else {}
    for start in range(0, union.numel(), chunk_size):
        chunk = union[start : start + chunk_size]
        for local, out in embedder.iter_outputs(
            [texts[i] for i in chunk.tolist()], max_length=max_length, batch_size=batch_size,
            heads=("colbert",), show_progress=False, passage=True, **extra,
        ):
            docs = chunk[torch.as_tensor(local, dtype=torch.long, device=device)]
            position[docs] = torch.arange(docs.numel(), device=device)
            p_vecs, p_mask = out["colbert"].float(), out["colbert_mask"]
            for rows, q in queries.batches:
                where = position[candidates[rows]]  # [b, d]
                r, c = (where >= 0).nonzero(as_tuple=True)
                step = max(1, DEFAULT_BLOCK_ELEMENTS // max(1, q["colbert"].shape[1] * p_vecs.shape[1]))
                for s in range(0, r.numel(), step):
                    rs, cs = r[s : s + step], c[s : s + step]
                    docs_at = where[rs, cs]
                    result[rows[rs], cs] = colbert_scores_paired(
                        q["colbert"][rs].float(), q["colbert_mask"][rs], p_vecs[docs_at], p_mask[docs_at]
                    )
            position[docs] = -1
            progress.update(docs.numel())
    return result


def corpus_columns(embedder: Any, corpus: Mapping[str, str]) -> tuple[Sequence[str], Sequence[str]]:
    """Document ids in descending order and their texts with the embedder's passage instruction: the columns of
    every ranking. Descending ids make ties at the top-k cut go as trec_eval ranks them (score, then document id
    descending), so a truncated run scores as the full ranking would. A corpus kept on disk
    (:class:`flagm3.disk_index.DiskCorpus`) gives lazy sequences read by row, not lists."""
    if hasattr(corpus, "descending_columns"):
        return corpus.descending_columns(lambda values: with_instruction(embedder, values, "passage"))
    doc_ids = sorted(corpus, reverse=True)
    return doc_ids, with_instruction(embedder, (corpus[d] for d in doc_ids), "passage")


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
    score_on_device: Optional[bool] = None,
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

    ``score_on_device`` (default: when the embedder is not on the CPU) keeps the outputs on the embedder's
    device and scores there; only the top-k is read to the host (:func:`scoring_device`).
    """
    heads, hybrids = check_rankings(heads, hybrids)
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

    qids = list(queries)
    doc_ids, texts = corpus_columns(embedder, corpus)
    if not qids or not doc_ids:
        raise ValueError(f"nothing to retrieve: {len(qids)} queries, {len(doc_ids)} documents")
    q_texts = with_instruction(embedder, (queries[q] for q in qids), "query")
    device = scoring_device(embedder, score_on_device)
    encoded = encode_texts(embedder, q_texts, max_query_length, batch_size, heads, device=device)
    keepers = {name: RunningTopK(len(qids), top_k, device=device) for name in first_rankings}
    if rerank:
        keepers[rerank_source] = RunningTopK(len(qids), max(top_k, rerank_depth), extras=first_heads, device=device)
    total = len(texts) + (min(len(texts), len(qids) * rerank_depth) if rerank else 0)
    progress = tqdm(total=total, desc="Retrieval", unit="doc", disable=not show_progress)
    for indices, head_blocks in iter_score_blocks(embedder, encoded, texts, first_heads, max_passage_length,
                                                  batch_size, corpus_chunk_size, progress):
        chunk_scores = _with_hybrids(head_blocks, hybrids, weights)
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
            ranked = RunningTopK(len(qids), top_k, device=device)
            ranked.update(scores, candidates)
            runs[name] = ranked.to_run(qids, doc_ids)
    progress.close()
    return {name: runs[name] for name in RANKINGS if name in runs}


def evaluate_retrieval(
    embedder: Any,
    corpus: Mapping[str, str],
    queries: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    k_values: Sequence[int] = (1, 10, 100),
    metrics: Sequence[str] = METRICS,
    top_k: Optional[int] = None,
    return_runs: bool = False,
    **retrieve_options: Any,
) -> Union[dict[str, dict[str, float]], tuple[dict[str, dict[str, float]], dict[str, Run]]]:
    """Retrieve for the judged queries and score every ranking: ``{"dense": {"ndcg@10": ...}, ...}``.

    ``retrieve_options`` are :func:`retrieve`'s (``heads``, ``hybrids``, ``hybrid_weights``, lengths,
    ``batch_size``, ``corpus_chunk_size``, ``colbert_mode``, ...); ``top_k`` defaults to ``max(k_values)``.
    With ``return_runs=True`` the result is ``(metrics, runs)``. Metrics are averaged over the queries of
    ``qrels``.
    """
    missing = [qid for qid in qrels if qid not in queries]
    if missing:
        raise ValueError(f"{len(missing)} judged queries have no text in `queries` (first: {missing[:5]})")
    judged_queries = {qid: queries[qid] for qid in qrels}
    runs = retrieve(embedder, corpus, judged_queries, top_k=top_k or max(k_values), **retrieve_options)
    results = {name: evaluate_run(run, qrels, k_values, metrics) for name, run in runs.items()}
    return (results, runs) if return_runs else results
