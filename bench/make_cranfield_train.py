"""Build the Cranfield training JSONL (FlagEmbedding / flagm3 format) with BM25 hard negatives.

    python bench/make_cranfield_train.py [--split train] [--negatives 15] [--out bench/work/cranfield_train.jsonl]

One line per query judged in the split, in query-id order:
    {"query": str, "pos": [str], "neg": [str], "query_id": str, "pos_ids": [str], "neg_ids": [str]}
- pos: the query's judged-relevant documents, highest grade first (ties by BM25 rank, then doc id);
- neg: the top BM25-ranked documents (bm25s, English stopwords, as bench/bm25_baseline.py) that are not
  judged relevant to that query, best first, `--negatives` of them;
- passage text = `title + " " + text`, stripped (bench/common.py `passage_text`; evaluation uses the same).
No score fields are written (no pos_scores/neg_scores), so knowledge distillation is off with this file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bm25_baseline import BM25Index  # noqa: E402
from common import WORK_DIR, load_corpus, load_qrels, load_queries  # noqa: E402


def build(split: str, n_neg: int) -> list[dict]:
    """Training rows for every judged query of `split`."""
    doc_ids, passages = load_corpus()
    queries = load_queries()
    qrels = load_qrels(split)
    query_ids = sorted((q for q in qrels if q in queries), key=int)
    index = BM25Index(passages)
    scores = index.scores([queries[q] for q in query_ids])
    text = dict(zip(doc_ids, passages))
    rows = []
    for qi, qid in enumerate(query_ids):
        order = np.argsort(-scores[qi], kind="stable")
        rank = {doc_ids[j]: r for r, j in enumerate(order)}
        judged = qrels[qid]
        pos_ids = sorted((d for d, g in judged.items() if g > 0), key=lambda d: (-judged[d], rank[d], d))
        neg_ids = [doc_ids[j] for j in order if doc_ids[j] not in judged][:n_neg]
        rows.append({
            "query": queries[qid],
            "pos": [text[d] for d in pos_ids],
            "neg": [text[d] for d in neg_ids],
            "query_id": qid,
            "pos_ids": pos_ids,
            "neg_ids": neg_ids,
        })
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="train", choices=["train", "dev", "test"])
    p.add_argument("--negatives", type=int, default=15)
    p.add_argument("--out", default=str(WORK_DIR / "cranfield_train.jsonl"))
    args = p.parse_args()
    rows = build(args.split, args.negatives)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    n_pos = [len(r["pos"]) for r in rows]
    print(json.dumps({
        "out": str(out), "split": args.split, "queries": len(rows), "negatives_per_query": args.negatives,
        "positives_per_query": {"min": min(n_pos), "mean": float(np.mean(n_pos)), "max": max(n_pos)},
    }))


if __name__ == "__main__":
    main()
