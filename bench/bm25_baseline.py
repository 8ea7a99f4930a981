"""BM25 baseline on Cranfield: nDCG@10 and Recall@100 (pytrec_eval) on a qrels split, JSON output.

    python bench/bm25_baseline.py [--split test] [--out bench/work/bm25_test.json]

bm25s (defaults: Lucene variant, k1=1.5, b=0.75), its tokenizer with English stopwords, no stemmer; passages
are `title + " " + text` (bench/common.py). Expected on test: nDCG@10 ~ 0.347 (data README).
Runs in either environment (needs bm25s, pytrec_eval, numpy).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import evaluate, load_corpus, load_qrels, load_queries, run_from_scores, write_json  # noqa: E402


class BM25Index:
    """bm25s index over passages; `scores(queries)` -> [n_queries, n_docs] full BM25 score matrix.

    Texts are tokenised by bm25s (words, English stopwords); or pass `tokenized=True` and lists of tokens (any
    strings, e.g. a model's token ids) as passages and queries."""

    def __init__(self, passages: list, k1: float = 1.5, b: float = 0.75, tokenized: bool = False):
        import bm25s

        self._bm25s = bm25s
        self.tokenized = tokenized
        self.n_docs = len(passages)
        self.retriever = bm25s.BM25(k1=k1, b=b)
        corpus = passages if tokenized else bm25s.tokenize(passages, stopwords="en", show_progress=False)
        self.retriever.index(corpus, show_progress=False)

    def scores(self, queries: list) -> np.ndarray:
        tokens = queries if self.tokenized else self._bm25s.tokenize(
            queries, stopwords="en", return_ids=False, show_progress=False)
        return np.stack([self.retriever.get_scores(t) for t in tokens])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="test", choices=["train", "dev", "test"])
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()

    doc_ids, passages = load_corpus()
    queries = load_queries()
    qrels = load_qrels(args.split)
    query_ids = [q for q in qrels if q in queries]
    t0 = time.perf_counter()
    index = BM25Index(passages)
    scores = index.scores([queries[q] for q in query_ids])
    seconds = time.perf_counter() - t0
    metrics = evaluate(qrels, run_from_scores(query_ids, doc_ids, scores))
    write_json(args.out, {
        "method": "bm25s (lucene, k1=1.5, b=0.75, English stopwords, no stemmer)",
        "split": args.split,
        "passage_text": "title + ' ' + text",
        **metrics,
        "n_docs": len(doc_ids),
        "seconds": seconds,
    })


if __name__ == "__main__":
    main()
