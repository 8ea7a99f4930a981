"""Where the sparse head's gap to BM25 comes from: one lexical scorer at a time, on one collection, no training.

    FLAGM3_DATA_DIR=../shared/data/cacm python bench/sparse_gap.py [--split test] [--max-length 128]
        [--model NAME=DIR ...] [--out bench/results/sparse_gap_cacm.json]

Rows (nDCG@10 and Recall@100 on the split, full-corpus ranking), each changing one thing from the row above:

1. `bm25_words`: the collection README's BM25 (bm25s: words, English stopwords, k1 1.5, b 0.75).
2. `bm25_tokens_full`: the same BM25 formula on the model's WordPiece tokens (special tokens dropped), whole texts.
3. `bm25_tokens_trunc`: ... texts cut at `--max-length` tokens, as the sparse head sees them in evaluation.
4. `idf_no_tf`: ... without term frequency or length normalisation: ``sum over shared tokens of idf(t)``. This is
   what the sparse score ``sum_t w_q(t) w_p(t)`` computes with max-pooled, context-free IDF weights.
   `idf_squared_no_tf` beside it scores ``sum idf(t)^2``: what a head whose weights are IDF itself computes.
5. `idf_head`: the sparse head as training starts: all-MiniLM-L6-v2 with the head fitted to the training
   passages' IDF (flagm3.sparse_init, as `flagm3 train` does), scored by flagm3.scoring. `--fit-texts 1024,256`
   gives one row per number of passages the regression encodes (`idf_head@1024`, `idf_head@256`).
6. each `--model NAME=DIR`: a trained checkpoint's sparse head.

Rows 1->2 measure the tokenizer, 2->3 truncation, 3->4 term frequency and length normalisation (which a max-pooled
score cannot express without context), 4->5 the linear fit of IDF from token states.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    WORK_DIR,
    data_dir,
    evaluate,
    load_corpus,
    load_qrels,
    load_queries,
    run_from_scores,
    write_json,
)


def idf_overlap_scores(queries: list[list[int]], docs: list[list[int]], power: float = 1.0) -> np.ndarray:
    """[Q, N] ``sum_{t in q and d} idf(t)^power``: the lexical score (flagm3.scoring) of context-free weights
    ``idf(t)^(power/2)`` on both sides, with the IDF of flagm3.sparse_init."""
    from flagm3.scoring import compute_lexical_matching_scores
    from flagm3.sparse_init import bm25_idf

    idf = bm25_idf(docs)

    def weights(texts: list[list[int]]) -> list[dict[str, float]]:
        return [{str(t): idf.get(t, 0.0) ** (power / 2) for t in set(text)} for text in texts]

    return compute_lexical_matching_scores(weights(queries), weights(docs))


def head_scores(model_dir: str, queries: list[str], passages: list[str], max_length: int) -> np.ndarray:
    from flagm3.inference import M3Embedder
    from flagm3.scoring import compute_lexical_matching_scores

    embedder = M3Embedder(model_dir, use_fp16=False, batch_size=32, devices="cpu")
    kw = dict(max_length=max_length, return_dense=False, return_sparse=True, return_colbert_vecs=False,
              show_progress=False)
    q = embedder.encode_queries(queries, **kw)["lexical_weights"]
    p = embedder.encode_corpus(passages, **kw)["lexical_weights"]
    return compute_lexical_matching_scores(q, p)


def idf_head(target: Path, train_passages: list[str], seed: int, fit_texts: int = 1024) -> Path:
    """all-MiniLM-L6-v2 with fresh heads (seeded) and the sparse head fitted to the training passages' IDF."""
    import torch
    from transformers import AutoTokenizer

    from flagm3 import M3Model
    from flagm3.sparse_init import init_sparse_head_from_idf

    base = WORK_DIR / "base_minilm_eos"
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(seed)
    model = M3Model.from_encoder(str(base), tokenizer=tokenizer)
    init_sparse_head_from_idf(model, tokenizer, train_passages, max_texts=fit_texts)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def training_passages(path: Path) -> list[str]:
    """The distinct positive and negative passages of a training JSONL, in first-seen order."""
    from flagm3.texts import read_jsonl

    seen: dict[str, None] = {}
    for _, record in read_jsonl(path):
        for text in record.get("pos", []) + record.get("neg", []):
            seen.setdefault(text)
    return list(seen)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="test")
    p.add_argument("--max-length", type=int, default=128, help="evaluation length in tokens, special ones included")
    p.add_argument("--train-data", default=None, help="training JSONL (default bench/work/<collection>_train.jsonl)")
    p.add_argument("--model", action="append", default=[], metavar="NAME=DIR")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--fit-texts", default="1024",
                   help="comma-separated passage counts for the IDF head's regression: one `idf_head` row each "
                        "(`idf_head@N` when several)")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from bm25_baseline import BM25Index
    from transformers import AutoTokenizer

    name = data_dir().name
    doc_ids, passages = load_corpus()
    all_queries = load_queries()
    qrels = load_qrels(args.split)
    qids = [q for q in qrels if q in all_queries]
    queries = [all_queries[q] for q in qids]
    tokenizer = AutoTokenizer.from_pretrained(WORK_DIR / "base_minilm_eos")

    def tokens(texts: list[str], max_length: int | None) -> list[list[int]]:
        kw = dict(truncation=True, max_length=max_length - 2) if max_length else {}
        return tokenizer(texts, add_special_tokens=False, **kw)["input_ids"]

    def as_strings(texts: list[list[int]]) -> list[list[str]]:
        return [[str(t) for t in text] for text in texts]

    rows: dict[str, np.ndarray] = {"bm25_words": BM25Index(passages).scores(queries)}
    q_tok = tokens(queries, args.max_length)
    p_trunc = tokens(passages, args.max_length)
    for label, docs in (("bm25_tokens_full", tokens(passages, None)), ("bm25_tokens_trunc", p_trunc)):
        rows[label] = BM25Index(as_strings(docs), tokenized=True).scores(as_strings(q_tok))
    rows["idf_no_tf"] = idf_overlap_scores(q_tok, p_trunc)
    rows["idf_squared_no_tf"] = idf_overlap_scores(q_tok, p_trunc, power=2.0)
    train_path = Path(args.train_data) if args.train_data else WORK_DIR / f"{name}_train.jsonl"
    sizes = [int(n) for n in args.fit_texts.split(",")]
    for n in sizes:
        head_dir = idf_head(WORK_DIR / f"sparse_gap_idf_head_{name}_{n}", training_passages(train_path), args.seed, n)
        label = "idf_head" if len(sizes) == 1 else f"idf_head@{n}"
        rows[label] = head_scores(str(head_dir), queries, passages, args.max_length)
    for spec in args.model:
        label, _, path = spec.partition("=")
        rows[label] = head_scores(path, queries, passages, args.max_length)

    results = {}
    for label, scores in rows.items():
        metrics = evaluate(qrels, run_from_scores(qids, doc_ids, np.asarray(scores, dtype=np.float64)))
        results[label] = {k: float(v) for k, v in metrics.items()}
    base = results["bm25_words"]["ndcg@10"]
    print(f"{name} {args.split} ({len(qids)} queries), passages cut at {args.max_length} tokens")
    print("| scorer | nDCG@10 | vs BM25 | Recall@100 |\n|---|---|---|---|")
    for label, m in results.items():
        print(f"| {label} | {m['ndcg@10']:.3f} | {m['ndcg@10'] - base:+.3f} | {m['recall@100']:.3f} |")
    write_json(args.out, {"collection": name, "split": args.split, "max_length": args.max_length,
                          "queries": len(qids), "rows": results})


if __name__ == "__main__":
    main()
