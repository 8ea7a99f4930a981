"""Shared helpers for the Cranfield benchmarks: data loading, the passage-text convention, evaluation.

Plain numpy + pytrec_eval (+ bm25s for BM25), no flagm3 import: the same module serves the flagm3 environment
and the FlagEmbedding reference venv.

Passage-text convention (used for training data AND evaluation): `passage_text(doc)` =
`(doc["title"] + " " + doc["text"]).strip()`. Queries are `queries.jsonl` "text" as is.
Metrics: nDCG@10 (`ndcg_cut_10`) and Recall@100 (`recall_100`) from pytrec_eval over the queries judged in
the split, graded qrels as stored (score 5 - original grade), full-corpus ranking.
"""

from __future__ import annotations

import csv
import json
import os
import resource
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
WORK_DIR = REPO_ROOT / "bench" / "work"
METRICS = ("ndcg_cut_10", "recall_100")


def data_dir() -> Path:
    """Cranfield in BEIR layout: $FLAGM3_DATA_DIR, else `../shared/data/cranfield` beside the repo root."""
    env = os.environ.get("FLAGM3_DATA_DIR")
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "data" / "cranfield"
    if not (path / "corpus.jsonl").is_file():
        raise FileNotFoundError(f"Cranfield data not found at {path} (set FLAGM3_DATA_DIR)")
    return path


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {n}: invalid JSON ({e})") from e
    return rows


def passage_text(doc: dict) -> str:
    """The one passage-text convention: title + " " + text, stripped."""
    return (doc.get("title", "") + " " + doc.get("text", "")).strip()


def load_corpus(path: Path | None = None) -> tuple[list[str], list[str]]:
    """Returns (doc_ids, passage texts) in corpus.jsonl order."""
    rows = _read_jsonl((path or data_dir()) / "corpus.jsonl")
    return [str(r["_id"]) for r in rows], [passage_text(r) for r in rows]


def load_queries(path: Path | None = None) -> dict[str, str]:
    """query id -> query text."""
    return {str(r["_id"]): r["text"] for r in _read_jsonl((path or data_dir()) / "queries.jsonl")}


def load_qrels(split: str, path: Path | None = None) -> dict[str, dict[str, int]]:
    """qrels/{split}.tsv (with header) -> {query_id: {doc_id: grade}}."""
    qrels: dict[str, dict[str, int]] = {}
    file = (path or data_dir()) / "qrels" / f"{split}.tsv"
    with open(file, encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader)
        if header[:3] != ["query-id", "corpus-id", "score"]:
            raise ValueError(f"{file}, line 1: unexpected header {header}")
        for n, row in enumerate(reader, 2):
            if len(row) < 3:
                raise ValueError(f"{file}, line {n}: expected 3 columns, got {row}")
            qrels.setdefault(row[0], {})[row[1]] = int(row[2])
    return qrels


def run_from_scores(
    query_ids: list[str], doc_ids: list[str], scores: np.ndarray, top_k: int | None = None
) -> dict[str, dict[str, float]]:
    """Score matrix [n_queries, n_docs] -> pytrec_eval run (every document unless ``top_k``: a cut through tied
    scores would pick arbitrary documents; pytrec_eval orders ties itself, by document id)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(query_ids), len(doc_ids)):
        raise ValueError(f"scores shape {scores.shape} != ({len(query_ids)}, {len(doc_ids)})")
    k = len(doc_ids) if top_k is None else min(top_k, len(doc_ids))
    run = {}
    for qi, qid in enumerate(query_ids):
        top = np.argpartition(-scores[qi], k - 1)[:k] if k < len(doc_ids) else range(len(doc_ids))
        run[qid] = {doc_ids[j]: float(scores[qi, j]) for j in top}
    return run


def evaluate(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean nDCG@10 and Recall@100 over the judged queries (a judged query missing from run counts 0)."""
    import pytrec_eval

    evaluator = pytrec_eval.RelevanceEvaluator(qrels, set(METRICS))
    per_query = evaluator.evaluate({q: run.get(q, {}) for q in qrels})
    out = {}
    for metric in METRICS:
        values = [per_query.get(q, {}).get(metric, 0.0) for q in qrels]
        out[metric] = float(np.mean(values)) if values else 0.0
    return {"ndcg@10": out["ndcg_cut_10"], "recall@100": out["recall_100"], "n_queries": len(qrels)}


def peak_rss_mb() -> float:
    """Peak resident set size of this process (MB), from getrusage (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 if sys.platform != "darwin" else peak / (1024.0 * 1024.0)


def write_json(path: str | os.PathLike | None, payload: dict[str, Any]) -> None:
    """Print `payload` as JSON and, when `path` is given, write it there too."""
    text = json.dumps(payload, indent=2)
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n", encoding="utf-8")
