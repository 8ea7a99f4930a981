"""Hard-negative mining (``flagm3 mine``), as FlagEmbedding's ``hn_mine`` with an M3 model.

Each training line ``{"query": str, "pos": [str], "neg": [str], ...}`` gets ``neg`` replaced by
``negative_number`` passages drawn at random from the ranks ``[start, end)`` (0-based) of the query's ranking
over a candidate pool; positives and exact copies of the query are never drawn. Other fields are kept.

Ranking: dense inner product (faiss ``IndexFlatIP`` when faiss is importable, else torch top-k: the same
documents either way), or the hybrid ``w_d * dense + w_s * sparse`` of :mod:`flagm3.scoring` when
``use_hybrid`` (torch; lexical scores by a sparse matrix product of pooled weights).

Fewer than ``negative_number`` candidates in the rank window (a small pool, many positives): with
``fill_random`` (default, as ``hn_mine``) the rest is drawn at random from the pool outside the top ``end``
ranks (easier negatives, never from the ranks above ``start``); without it, or when the pool is exhausted, the
line keeps fewer negatives. The summary counts both cases.

With the model on an accelerator, dense mining encodes and searches on it (torch top-k on the device; only the
``[Q, end]`` ranks reach the host). ``index_dir`` writes the candidates' dense vectors to disk window by window
and searches them chunk by chunk (:mod:`flagm3.disk_index`: faiss, Qdrant or torch), and keeps their texts there
too, for a pool whose vectors or texts do not fit in memory.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence as SequenceABC
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import scipy.sparse
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .data.validation import read_training_records
from .evaluation.retrieval import encode_texts, scoring_device
from .negative_filter import check_fraction, false_negatives, teacher_scores_of
from .scoring import (
    BGE_M3_ENSEMBLE_WEIGHTS,
    compute_lexical_matching_scores,
    dense_scores,
    hybrid_scores,
)
from .texts import read_jsonl, with_instruction, write_jsonl

logger = logging.getLogger(__name__)

DENSE_SPARSE_WEIGHTS = (BGE_M3_ENSEMBLE_WEIGHTS["dense"], BGE_M3_ENSEMBLE_WEIGHTS["sparse"])  # the hybrid
_SCORE_BLOCK_ELEMENTS = 1 << 24  # entries of one [queries, pool] score block in the torch search
_FAISS_DENSE_ONLY = "faiss searches dense vectors only: use_faiss=True cannot be combined with use_hybrid"


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ reading
def read_training_data(path: Union[str, os.PathLike]) -> list[dict]:
    """Training lines ``{"query": str, "pos": [str], "neg": [str] (optional), ...}``, checked as ``flagm3 validate``
    checks training data (:func:`flagm3.data.validation.read_training_records`): every problem is raised at once,
    naming file, line and field. Each line keeps its other fields; ``pos`` is the checked one (empty passages
    dropped)."""
    return [{**line, "pos": record.pos} for line, record in read_training_records(path)]


def iter_candidate_pool(path: Union[str, os.PathLike]) -> Iterator[str]:
    """Candidate passages, streamed: JSONL lines ``{"text": str}`` or JSON strings."""
    for lineno, record in read_jsonl(path):
        text = record.get("text") if isinstance(record, dict) else record
        if not isinstance(text, str):
            raise ValueError(f"{path}:{lineno}: expected {{\"text\": str}} or a JSON string")
        yield text


def read_candidate_pool(path: Union[str, os.PathLike]) -> list[str]:
    """Candidate passages: JSONL lines ``{"text": str}`` or JSON strings."""
    return list(iter_candidate_pool(path))


class _Instructed(SequenceABC):
    """``texts`` with the embedder's passage instruction, applied as they are read (a slice gives a list)."""

    def __init__(self, embedder: Any, texts: Sequence[str]) -> None:
        self.embedder, self.texts = embedder, texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return with_instruction(self.embedder, self.texts[i], "passage")
        return with_instruction(self.embedder, [self.texts[i]], "passage")[0]


# ----------------------------------------------------------------------------------------------- encoding
def _encode(embedder: Any, texts: list[str], max_length: int, batch_size: Optional[int], sparse: bool,
            desc: str, show_progress: bool, device: Optional[torch.device] = None,
            ) -> tuple[Tensor, Optional[scipy.sparse.csr_matrix]]:
    """Dense vectors ``[N, H]`` (on ``device``, else the host) and, with ``sparse``, pooled lexical weights as a
    CSR ``[N, vocab]`` (host)."""
    logger.info("%s: encoding %d texts", desc, len(texts))
    heads = ("dense", "sparse") if sparse else ("dense",)
    encoded = encode_texts(embedder, texts, max_length, batch_size, heads, show_progress,
                           num_columns=len(embedder.tokenizer), device=device)
    return encoded.dense, encoded.lexical


def _lexical_block(q_lex: scipy.sparse.csr_matrix, p_lex: scipy.sparse.csr_matrix) -> Tensor:
    """All-pairs lexical scores ``sum_t w_q(t) * w_p(t)`` (one sparse product): ``[Q, P]``."""
    return torch.from_numpy(compute_lexical_matching_scores(q_lex, p_lex)).float()


# ------------------------------------------------------------------------------------------------ search
def search(
    q_dense: Tensor,
    p_dense: Tensor,
    k: int,
    q_lex: Optional[scipy.sparse.csr_matrix] = None,
    p_lex: Optional[scipy.sparse.csr_matrix] = None,
    weights: Sequence[float] = DENSE_SPARSE_WEIGHTS,
    use_faiss: Optional[bool] = None,
    batch_size: int = 256,
    show_progress: bool = True,
) -> tuple[Tensor, str]:
    """Indices ``[Q, k]`` of the best passages per query, best first, and the backend used.

    Dense inner product (``q_dense`` [Q, H], ``p_dense`` [P, H]), or the hybrid
    ``weights[0] * dense + weights[1] * sparse`` when ``q_lex``/``p_lex`` (CSR ``[Q|P, vocab]``) are given.
    The torch search runs where ``p_dense`` is (an accelerator: faiss is then not the default); the ranks
    come back to the host.
    """
    hybrid = q_lex is not None
    if use_faiss is None:
        use_faiss = not hybrid and faiss_available() and p_dense.device.type == "cpu"
    if use_faiss and hybrid:
        raise ValueError(_FAISS_DENSE_ONLY)
    k = min(k, p_dense.shape[0])
    if use_faiss:
        import faiss

        index = faiss.IndexFlatIP(p_dense.shape[1])
        index.add(np.ascontiguousarray(p_dense.cpu().numpy(), dtype=np.float32))
    step = max(1, min(batch_size, _SCORE_BLOCK_ELEMENTS // max(1, p_dense.shape[0])))
    found = []
    for start in tqdm(range(0, q_dense.shape[0], step), desc="Search", disable=not show_progress):
        q = q_dense[start : start + step]
        if use_faiss:
            _, idx = index.search(np.ascontiguousarray(q.cpu().numpy(), dtype=np.float32), k)
            found.append(torch.from_numpy(idx).long())
            continue
        scores = {"dense": dense_scores(q, p_dense)}
        if hybrid:
            scores["sparse"] = _lexical_block(q_lex[start : start + step], p_lex).to(p_dense.device)
        total = hybrid_scores(scores, {"dense": weights[0], "sparse": weights[1] if hybrid else 0.0})
        found.append(torch.topk(total, k, dim=1).indices)
    ranked = torch.cat(found).cpu() if found else torch.empty(0, k, dtype=torch.long)
    return ranked, "faiss" if use_faiss else "torch"


def query_scores(
    q_dense: Tensor,
    p_dense: Tensor,
    q_row: int,
    p_rows: Sequence[int],
    q_lex: Optional[scipy.sparse.csr_matrix] = None,
    p_lex: Optional[scipy.sparse.csr_matrix] = None,
    weights: Sequence[float] = DENSE_SPARSE_WEIGHTS,
) -> Tensor:
    """Mining score (dense or hybrid) of query ``q_row`` with the passages ``p_rows``: ``[n]``. ``p_dense``: a
    tensor or a :class:`flagm3.disk_index.DenseStore`."""
    q = q_dense[q_row : q_row + 1]
    p = p_dense.rows_at(list(p_rows)) if hasattr(p_dense, "rows_at") else p_dense[list(p_rows)]
    scores = {"dense": dense_scores(q, p.to(q.device))[0]}
    if q_lex is not None:
        scores["sparse"] = _lexical_block(q_lex[q_row : q_row + 1], p_lex[list(p_rows)])[0].to(q.device)
    return hybrid_scores(scores, {"dense": weights[0], "sparse": weights[1] if q_lex is not None else 0.0})


# ------------------------------------------------------------------------------------------------ mining
def _parse_range(range_for_sampling: Union[str, Sequence[int]]) -> tuple[int, int]:
    if isinstance(range_for_sampling, str):
        range_for_sampling = [int(x) for x in range_for_sampling.split("-")]
    start, end = (int(x) for x in range_for_sampling)
    if not 0 <= start < end:
        raise ValueError(
            f"range_for_sampling must be (start, end) with 0 <= start < end, got {range_for_sampling}"
        )
    return start, end


def _draw(
    rng: random.Random,
    ranked: list[int],
    texts: list[str],
    query: str,
    positives: set[str],
    start: int,
    end: int,
    number: int,
    fill_random: bool,
    pool_size: int,
) -> tuple[list[int], bool]:
    """Pool indices of the negatives of one query, and whether random fill was used."""
    allowed = lambda j: texts[j] not in positives and texts[j] != query  # noqa: E731
    window = sorted(j for j in ranked[start:end] if allowed(j))  # a set: independent of the order of ties
    if len(window) >= number:
        return rng.sample(window, number), False
    chosen = window
    if not fill_random:
        return chosen, False
    blocked = set(ranked[:end])
    need = number - len(chosen)
    if pool_size - len(blocked) <= 4 * need:  # small pool: enumerate what is left
        options = [j for j in range(pool_size) if j not in blocked and allowed(j)]
        extra = rng.sample(options, min(need, len(options)))
        return chosen + extra, bool(extra)
    extra: list[int] = []
    for _ in range(100 * need):  # most of the pool is available: rejection sampling
        j = rng.randrange(pool_size)
        if j not in blocked and allowed(j):
            blocked.add(j)
            extra.append(j)
            if len(extra) == need:
                break
    return chosen + extra, bool(extra)


def mine_hard_negatives(
    embedder: Any,
    input_jsonl: Union[str, os.PathLike],
    output_jsonl: Union[str, os.PathLike],
    candidate_pool: Optional[Union[str, os.PathLike, Sequence[str]]] = None,
    range_for_sampling: Union[str, Sequence[int]] = (10, 100),
    negative_number: int = 15,
    use_hybrid: bool = False,
    hybrid_weights: Sequence[float] = DENSE_SPARSE_WEIGHTS,
    seed: int = 42,
    teacher_scores: bool = False,
    teacher_score_temperature: float = 0.02,
    fill_random: bool = True,
    query_instruction_for_retrieval: Optional[str] = None,
    query_instruction_format: Optional[str] = None,
    query_max_length: Optional[int] = None,
    passage_max_length: Optional[int] = None,
    batch_size: Optional[int] = None,
    search_batch_size: int = 256,
    use_faiss: Optional[bool] = None,
    show_progress: bool = True,
    false_negative_fraction: Optional[float] = None,
    index_dir: Optional[Union[str, os.PathLike]] = None,
    index_backend: Optional[str] = None,
) -> dict[str, Any]:
    """Mine hard negatives for a training JSONL with ``embedder`` (an ``M3Embedder``); returns a summary.

    ``candidate_pool``: a JSONL of ``{"text": ...}`` lines or JSON strings, or a list of texts; default the
    union of every ``pos`` and ``neg`` passage of the input. Duplicate passages are merged.
    ``range_for_sampling``: 0-based ranks ``(start, end)`` (or ``"start-end"``) to draw from. ``use_hybrid``:
    rank by ``hybrid_weights[0] * dense + hybrid_weights[1] * sparse``. ``teacher_scores``: also write
    ``pos_scores`` and ``neg_scores``, the mining score of each passage with the query divided by
    ``teacher_score_temperature`` (logits, as a reranker's: training's ``teacher_temperature`` 1 then makes the
    teacher distribution softmax(score / teacher_score_temperature)); without it, stale input
    ``pos_scores``/``neg_scores`` are dropped. Queries get the query instruction (default: the
    embedder's); lengths and batch size default to the embedder's. ``seed`` makes the draw reproducible.
    ``false_negative_fraction``: drop the rank window's candidates scoring above this fraction of the positive's
    score (:mod:`flagm3.negative_filter`; teacher ``pos_scores``/``neg_scores`` of the line where given); the
    summary's ``false_negatives_dropped`` counts them.
    ``index_dir``: write the candidates' dense vectors there, window by window, and search them from disk chunk by
    chunk (:mod:`flagm3.disk_index`; ``index_backend`` ``"faiss"``, ``"qdrant"`` or ``"torch"``, default faiss
    where importable, else Qdrant; torch on an accelerator), and the pool's texts with them (deduplicated by hash,
    read back by row): memory bounded by the window, the chunk and 8-byte arrays per passage, not the pool's
    texts. Dense only (not with ``use_hybrid``); the same negatives as the in-memory search.
    """
    start, end = _parse_range(range_for_sampling)
    check_fraction(false_negative_fraction)
    if teacher_score_temperature <= 0:
        raise ValueError(f"teacher_score_temperature must be positive, got {teacher_score_temperature}")
    if negative_number < 1:
        raise ValueError(f"negative_number must be >= 1, got {negative_number}")
    if use_faiss and use_hybrid:
        raise ValueError(_FAISS_DENSE_ONLY)
    if use_faiss and not faiss_available():
        raise ImportError("use_faiss=True but faiss is not importable (pip install faiss-cpu)")
    if index_dir is not None and use_hybrid:
        raise ValueError("index_dir searches dense vectors only: it cannot be combined with use_hybrid")
    if index_backend is not None and index_dir is None:
        raise ValueError("index_backend needs index_dir")
    records = read_training_data(input_jsonl)
    if candidate_pool is None:
        source: Any = (t for r in records for t in r["pos"] + r.get("neg", []))
    elif isinstance(candidate_pool, (str, os.PathLike)):
        source = iter_candidate_pool(candidate_pool)
    else:
        source = candidate_pool
    # positives outside the pool are encoded too (for teacher scores) but never searched
    positives = ((p for r in records for p in r["pos"]) if teacher_scores or false_negative_fraction is not None
                 else ())
    row_of: Any
    if index_dir is not None:  # the texts on disk too: 24 bytes a passage in memory (flagm3.disk_index)
        from .disk_index import disk_pool

        texts, pool_size, row_of = disk_pool(source, positives, index_dir)
        pool: Sequence[str] = texts
    else:
        pool = list(dict.fromkeys(source))
        in_pool = set(pool)
        texts = pool + [t for t in dict.fromkeys(positives) if t not in in_pool]
        row_of = {t: i for i, t in enumerate(texts)}
        pool_size = len(pool)
    if not pool_size:
        raise ValueError("the candidate pool is empty")
    if end > pool_size:
        logger.warning("range_for_sampling end %d exceeds the pool of %d passages", end, pool_size)
    queries = list(dict.fromkeys(r["query"] for r in records))
    query_of = {q: i for i, q in enumerate(queries)}
    instructed = with_instruction(embedder, queries, "query", query_instruction_for_retrieval,
                                  query_instruction_format)
    q_max = query_max_length or getattr(embedder, "query_max_length", 512)
    p_max = passage_max_length or getattr(embedder, "passage_max_length", 512)
    passages = _Instructed(embedder, texts) if index_dir is not None else with_instruction(embedder, texts, "passage")
    device = None if use_hybrid else scoring_device(embedder)  # the hybrid's lexical product runs on the host
    weights = (float(hybrid_weights[0]), float(hybrid_weights[1]))
    if index_dir is not None:
        from .disk_index import search_store, write_dense_store

        p_dense = write_dense_store(embedder, passages, index_dir, p_max, batch_size, show_progress,
                                    desc="Encoding candidates to disk")
        q_dense, q_lex = _encode(embedder, instructed, q_max, batch_size, False, "queries", show_progress, device)
        p_lex = None
        ranked, backend = search_store(p_dense, q_dense, end, index_backend, limit=pool_size,
                                       device=device, show_progress=show_progress)
        backend = f"{backend} (on disk: {os.fspath(index_dir)})"
    else:
        p_dense, p_lex = _encode(embedder, passages, p_max, batch_size, use_hybrid, "candidates", show_progress,
                                 device)
        q_dense, q_lex = _encode(embedder, instructed, q_max, batch_size, use_hybrid, "queries", show_progress,
                                 device)
        searched_lex = p_lex[:pool_size] if use_hybrid else None
        ranked, backend = search(q_dense, p_dense[:pool_size], end, q_lex, searched_lex, weights, use_faiss,
                                 search_batch_size, show_progress)
    ranked_lists = ranked.tolist()

    rng = random.Random(seed)
    counts = {"filled": 0, "short": 0, "total": 0, "false_negatives": 0}

    def likely_false_negatives(record: dict, qi: int) -> set[str]:
        if false_negative_fraction is None:
            return set()
        window = [j for j in ranked_lists[qi][start:end] if pool[j] not in record["pos"]]
        p_rows = [row_of[t] for t in record["pos"]]
        scores = query_scores(q_dense, p_dense, qi, p_rows + window, q_lex, p_lex, weights)
        dropped = false_negatives([pool[j] for j in window], scores[len(p_rows):], scores[: len(p_rows)],
                                  false_negative_fraction, teacher_scores_of(record), record["pos"])
        counts["false_negatives"] += len(dropped)
        return dropped

    def mined() -> Any:
        for record in tqdm(records, desc="Sampling negatives", disable=not show_progress):
            qi = query_of[record["query"]]
            excluded = set(record["pos"]) | likely_false_negatives(record, qi)  # never drawn, as positives
            chosen, used_fill = _draw(rng, ranked_lists[qi], pool, record["query"], excluded, start,
                                      end, negative_number, fill_random, pool_size)
            out = dict(record)
            out["neg"] = [pool[j] for j in chosen]
            counts["filled"] += used_fill
            counts["short"] += len(chosen) < negative_number
            counts["total"] += len(chosen)
            if teacher_scores:
                p_rows = [row_of[t] for t in record["pos"]] + chosen
                scores = query_scores(q_dense, p_dense, qi, p_rows, q_lex, p_lex, weights) / teacher_score_temperature
                out["pos_scores"] = scores[: len(record["pos"])].tolist()
                out["neg_scores"] = scores[len(record["pos"]) :].tolist()
            else:
                out.pop("pos_scores", None)
                out.pop("neg_scores", None)
            yield out

    write_jsonl(output_jsonl, mined())
    filled, short, total = counts["filled"], counts["short"], counts["total"]
    summary = {
        "lines": len(records),
        "queries": len(queries),
        "candidate_pool": pool_size,
        "range_for_sampling": [start, end],
        "negative_number": negative_number,
        "scoring": "dense+sparse" if use_hybrid else "dense",
        "backend": backend,
        "negatives": total,
        "lines_filled_randomly": filled,
        "lines_short": short,
        "false_negative_fraction": false_negative_fraction,
        "false_negatives_dropped": counts["false_negatives"],
        "teacher_scores": teacher_scores,
        "teacher_score_temperature": teacher_score_temperature if teacher_scores else None,
        "output": os.fspath(output_jsonl),
    }
    logger.info("hard-negative mining: %s", summary)
    return summary
