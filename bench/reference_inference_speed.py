"""Workload 3 on the REFERENCE side: BGEM3FlagModel encode throughput and lexical scoring time, with the
outputs saved so bench/inference_speed.py can check flagm3's scores against them. Reference venv's python:

    $FE_PY bench/reference_inference_speed.py MODEL_DIR --dump DIR [--batch-size 32] [--max-length 512]
        [--max-docs N] [--split test] [--repeats 3]

Encodes the Cranfield corpus (passages = title + " " + text, corpus order; --max-docs keeps the first N) with
`encode_corpus` and the split's judged queries with `encode_queries`, all three outputs, fp32, CPU, the given
batch size and max_length for both; scores all queries x corpus with `compute_lexical_matching_score` (its
Python dict loops), timed as the minimum over --repeats. Writes to --dump: `scores.npz` (sparse [Q, N] and
dense [Q, N] score matrices) and `lexical.json` (the lexical weights of queries and corpus), and prints the
timings as JSON (also written to --dump/timing.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_corpus, load_qrels, load_queries, peak_rss_mb, write_json  # noqa: E402


def bench_texts(split: str, max_docs: int) -> tuple[list[str], list[str], list[str]]:
    """(query texts in query-id order, doc ids, passages): the judged queries of `split`, the corpus head."""
    doc_ids, passages = load_corpus()
    if max_docs:
        doc_ids, passages = doc_ids[:max_docs], passages[:max_docs]
    queries = load_queries()
    query_ids = sorted((q for q in load_qrels(split) if q in queries), key=int)
    return [queries[q] for q in query_ids], doc_ids, passages


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("--dump", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-docs", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from FlagEmbedding import BGEM3FlagModel

    queries, doc_ids, passages = bench_texts(args.split, args.max_docs)
    model = BGEM3FlagModel(args.model_dir, use_fp16=False, devices="cpu", normalize_embeddings=True,
                           pooling_method="cls", batch_size=args.batch_size, query_max_length=args.max_length,
                           passage_max_length=args.max_length)
    flags = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)
    t0, c0 = time.perf_counter(), time.process_time()
    docs = model.encode_corpus(passages, batch_size=args.batch_size, max_length=args.max_length, **flags)
    encode_s, encode_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    qs = model.encode_queries(queries, batch_size=args.batch_size, max_length=args.max_length, **flags)
    query_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        sparse = np.asarray(model.compute_lexical_matching_score(qs["lexical_weights"], docs["lexical_weights"]),
                            dtype=np.float64)
        times.append(time.perf_counter() - t0)
    dense = np.asarray(qs["dense_vecs"], np.float64) @ np.asarray(docs["dense_vecs"], np.float64).T
    dump = Path(args.dump)
    dump.mkdir(parents=True, exist_ok=True)
    np.savez(dump / "scores.npz", sparse=sparse, dense=dense)
    as_float = lambda lws: [{k: float(v) for k, v in lw.items()} for lw in lws]  # noqa: E731
    (dump / "lexical.json").write_text(json.dumps({"queries": as_float(qs["lexical_weights"]),
                                                   "corpus": as_float(docs["lexical_weights"])}))
    write_json(dump / "timing.json", {
        "implementation": "FlagEmbedding 1.4.2 BGEM3FlagModel (fp32, CPU)",
        "model_dir": str(Path(args.model_dir).resolve()),
        "n_docs": len(passages), "n_queries": len(queries), "batch_size": args.batch_size,
        "max_length": args.max_length, "torch_threads": torch.get_num_threads(),
        "encode_corpus_seconds": encode_s, "encode_corpus_cpu_seconds": encode_cpu,
        "encode_texts_per_second": len(passages) / encode_s,
        "encode_queries_seconds": query_s,
        "sparse_scoring_seconds": min(times), "sparse_scoring_seconds_all": times,
        "sparse_pairs_per_second": len(queries) * len(passages) / min(times),
        "peak_rss_mb": peak_rss_mb(),
    })


if __name__ == "__main__":
    main()
