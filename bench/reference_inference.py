"""Inference on the REFERENCE: FlagEmbedding 1.4.2 BGEM3FlagModel on Cranfield: speed and retrieval quality.

Run with the reference venv's python (`.ci/setup_reference_env.sh` prints it):

    $FE_PY bench/reference_inference.py MODEL_DIR [--split test] [--batch-size 32] [--max-length 512]
        [--max-docs N] [--allow-new-heads] [--out bench/work/reference_inference.json]

MODEL_DIR: BGE-M3 layout (encoder + tokenizer with an eos_token + colbert_linear.pt + sparse_linear.pt), e.g.
the output of bench/reference_train.py. --allow-new-heads accepts a plain encoder (FlagEmbedding then
initialises the heads at random, seeded by --seed), e.g. bench/work/base_minilm_eos for the untouched model.

Measured: encode throughput (texts/s) of `encode_corpus` with all three outputs (dense, lexical weights,
ColBERT vectors), batch --batch-size, max_length --max-length (512 = BGEM3FlagModel's default; its encode
sorts by length and runs one extra trial forward of the first batch to probe memory: that is part of its
cost); query encoding time; time to score all split queries x corpus with `compute_lexical_matching_score`
(its Python dict loops) and the cost per pair of `colbert_score` (one torch call per pair, timed on
--colbert-check-pairs pairs; the full ColBERT matrix is computed vectorised, the same MaxSim, and checked
against colbert_score on those pairs).
Quality (pytrec_eval, full-corpus scoring, passages = title + " " + text): nDCG@10 and Recall@100 for dense
(inner product of normalised CLS vectors), sparse (lexical matching), colbert, dense+sparse
(1 * dense + 0.3 * sparse) and all (1 * dense + 0.3 * sparse + 1 * colbert). FlagEmbedding's compute_score
divides the weighted sums by the sum of the weights: the same ranking.
--max-docs N (smoke runs) keeps the first N corpus documents and the judgements on them only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    WORK_DIR,
    evaluate,
    load_corpus,
    load_qrels,
    load_queries,
    peak_rss_mb,
    run_from_scores,
    write_json,
)

MODES = {"dense": (1.0, 0.0, 0.0), "sparse": (0.0, 1.0, 0.0), "colbert": (0.0, 0.0, 1.0),
         "dense+sparse": (1.0, 0.3, 0.0), "all": (1.0, 0.3, 1.0)}


def colbert_matrix(q_vecs: list[np.ndarray], d_vecs: list[np.ndarray]) -> np.ndarray:
    """MaxSim averaged over query tokens, as FlagEmbedding's colbert_score, for all pairs: [n_q, n_d]."""
    lengths = np.array([len(d) for d in d_vecs])
    if (lengths == 0).any():
        raise ValueError("a document has no ColBERT vectors")
    flat = np.concatenate(d_vecs, axis=0).astype(np.float32)  # [total_tokens, dim]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    out = np.empty((len(q_vecs), len(d_vecs)), dtype=np.float64)
    for i, q in enumerate(q_vecs):
        sims = np.asarray(q, dtype=np.float32) @ flat.T  # [q_len, total_tokens]
        out[i] = np.maximum.reduceat(sims, starts, axis=1).sum(axis=0) / len(q)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("--split", default="test", choices=["train", "dev", "test"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=512, help="passage and query max_length")
    p.add_argument("--max-docs", type=int, default=0, help="keep only the first N documents (0: all)")
    p.add_argument("--allow-new-heads", action="store_true")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--colbert-check-pairs", type=int, default=2000,
                   help="pairs scored with the reference's colbert_score (timing + check)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave the default)")
    p.add_argument("--out", default=str(WORK_DIR / "reference_inference.json"))
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "reference"))
    from fe_common import check_eos, check_model_dir

    check_model_dir(args.model_dir, require_heads=not args.allow_new_heads)
    doc_ids, passages = load_corpus()
    if args.max_docs:
        doc_ids, passages = doc_ids[: args.max_docs], passages[: args.max_docs]
    kept = set(doc_ids)
    qrels = {q: {d: g for d, g in docs.items() if d in kept} for q, docs in load_qrels(args.split).items()}
    qrels = {q: docs for q, docs in qrels.items() if any(g > 0 for g in docs.values())}
    queries = load_queries()
    query_ids = sorted((q for q in qrels if q in queries), key=int)

    from FlagEmbedding import BGEM3FlagModel

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = BGEM3FlagModel(args.model_dir, use_fp16=False, devices="cpu", normalize_embeddings=True,
                           pooling_method="cls", batch_size=args.batch_size,
                           query_max_length=args.max_length, passage_max_length=args.max_length)
    load_s = time.perf_counter() - t0
    check_eos(model.tokenizer, args.model_dir)
    flags = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)

    t0, c0 = time.perf_counter(), time.process_time()
    docs = model.encode_corpus(passages, batch_size=args.batch_size, max_length=args.max_length, **flags)
    encode_s, encode_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    qs = model.encode_queries([queries[q] for q in query_ids], batch_size=args.batch_size,
                              max_length=args.max_length, **flags)
    query_encode_s = time.perf_counter() - t0

    dense = np.asarray(qs["dense_vecs"], dtype=np.float64) @ np.asarray(docs["dense_vecs"], dtype=np.float64).T
    t0 = time.perf_counter()
    sparse = np.asarray(model.compute_lexical_matching_score(qs["lexical_weights"], docs["lexical_weights"]),
                        dtype=np.float64).reshape(len(query_ids), len(doc_ids))
    sparse_s = time.perf_counter() - t0
    colbert = colbert_matrix(qs["colbert_vecs"], docs["colbert_vecs"])
    # The reference's own colbert_score (one torch call per pair) on a sample: its speed, and a check that
    # the vectorised matrix above is the same quantity.
    pairs = [(i, j) for i in range(len(query_ids)) for j in range(len(doc_ids))][: args.colbert_check_pairs]
    t0 = time.perf_counter()
    ref = [float(model.colbert_score(qs["colbert_vecs"][i], docs["colbert_vecs"][j])) for i, j in pairs]
    colbert_s = (time.perf_counter() - t0) / max(len(pairs), 1)
    colbert_diff = max((abs(r - colbert[i, j]) for r, (i, j) in zip(ref, pairs)), default=0.0)

    quality = {}
    for mode, (wd, ws, wc) in MODES.items():
        scores = wd * dense + ws * sparse + wc * colbert
        quality[mode] = evaluate(qrels, run_from_scores(query_ids, doc_ids, scores))
    lengths = [len(ids) for ids in model.tokenizer(passages, truncation=True, max_length=args.max_length)["input_ids"]]
    write_json(args.out, {
        "implementation": "FlagEmbedding 1.4.2 BGEM3FlagModel (fp32, CPU)",
        "model_dir": str(Path(args.model_dir).resolve()),
        "split": args.split,
        "n_docs": len(doc_ids),
        "n_queries": len(query_ids),
        "torch_threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "mean_passage_tokens": float(np.mean(lengths)),
        "load_seconds": load_s,
        "encode_corpus_seconds": encode_s,
        "encode_texts_per_second": len(passages) / encode_s,
        "encode_corpus_cpu_seconds": encode_cpu_s,
        "encode_queries_seconds": query_encode_s,
        "sparse_scoring_seconds": sparse_s,
        "sparse_pairs_per_second": len(query_ids) * len(doc_ids) / sparse_s,
        "colbert_score_seconds_per_pair": colbert_s,
        "colbert_score_checked_pairs": len(pairs),
        "colbert_vectorised_max_abs_diff": colbert_diff,
        "peak_rss_mb": peak_rss_mb(),
        "quality": quality,
        "weights": {m: list(w) for m, w in MODES.items()},
    })


if __name__ == "__main__":
    main()
