"""Workload 3: inference speed, flagm3's M3Embedder vs FlagEmbedding's BGEM3FlagModel, on one checkpoint.

    python bench/inference_speed.py MODEL_DIR --reference-python $FE_PY [--batch-size 32] [--max-length 512]
        [--max-docs N] [--split test] [--repeats 3] [--out bench/results/inference_speed.json]

MODEL_DIR is a BGE-M3-layout checkpoint (both load it); bench/run.sh passes flagm3's default model of workload 1
(its bge-m3/ export).
First the reference (bench/reference_inference_speed.py, in its venv), then flagm3 in this process, on the
same texts with the same settings: encode the corpus with all three outputs (texts/s), encode the judged
queries, and score all queries x corpus lexically: M3Embedder.compute_lexical_matching_score (one sparse
matrix product) vs BGEM3FlagModel.compute_lexical_matching_score (dict loops), minimum over --repeats.

Agreement checks (in the JSON): flagm3's vectorised scoring of the reference's own lexical weights against the
reference's loop scores (same inputs: only the scoring differs), and flagm3's end-to-end sparse and dense
scores (its own encodings) against the reference's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, WORK_DIR, peak_rss_mb, write_json  # noqa: E402
from reference_inference_speed import bench_texts  # noqa: E402


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> dict:
    """Largest absolute difference, and relative to the largest |b|."""
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    return {"max_abs_diff": diff, "max_abs_value": scale, "relative": diff / scale if scale else diff}


def timed_min(fn, repeats: int) -> tuple[float, list[float], object]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), times, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("--reference-python", default=os.environ.get("FLAGM3_REFERENCE_PYTHON"))
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-docs", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dump", default=str(WORK_DIR / "inference_reference_dump"))
    p.add_argument("--skip-reference", action="store_true", help="reuse an existing --dump")
    p.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "inference_speed.json"))
    args = p.parse_args()
    settings = ["--split", args.split, "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                "--max-docs", str(args.max_docs), "--repeats", str(args.repeats)]
    dump = Path(args.dump)
    if not args.skip_reference:
        if not args.reference_python:
            sys.exit("ERROR: --reference-python (or $FLAGM3_REFERENCE_PYTHON) is required: the FlagEmbedding venv")
        subprocess.run([args.reference_python, str(Path(__file__).with_name("reference_inference_speed.py")),
                        args.model_dir, "--dump", str(dump), *settings], check=True, stdout=subprocess.DEVNULL)
    reference = json.loads((dump / "timing.json").read_text())
    ref_scores = np.load(dump / "scores.npz")
    ref_lexical = json.loads((dump / "lexical.json").read_text())

    from flagm3.inference import M3Embedder, compute_lexical_matching_scores, lexical_matrix

    queries, doc_ids, passages = bench_texts(args.split, args.max_docs)
    model = M3Embedder(args.model_dir, use_fp16=False, devices="cpu", batch_size=args.batch_size,
                       query_max_length=args.max_length, passage_max_length=args.max_length)
    flags = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True, show_progress=False)
    t0, c0 = time.perf_counter(), time.process_time()
    docs = model.encode_corpus(passages, batch_size=args.batch_size, max_length=args.max_length, **flags)
    encode_s, encode_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    qs = model.encode_queries(queries, batch_size=args.batch_size, max_length=args.max_length, **flags)
    query_s = time.perf_counter() - t0

    q_lex, d_lex = qs["lexical_weights"], docs["lexical_weights"]
    sparse_s, sparse_all, sparse = timed_min(lambda: model.compute_lexical_matching_score(q_lex, d_lex),
                                             args.repeats)
    q_mat, d_mat = lexical_matrix(q_lex), lexical_matrix(d_lex)
    product_s, _, _ = timed_min(lambda: compute_lexical_matching_scores(q_mat, d_mat), args.repeats)
    same_inputs = compute_lexical_matching_scores(ref_lexical["queries"], ref_lexical["corpus"])
    dense = qs["dense_vecs"].astype(np.float64) @ docs["dense_vecs"].astype(np.float64).T

    ref_sparse = ref_scores["sparse"]
    agreement = {
        "sparse_scoring_same_inputs": max_abs_diff(same_inputs, ref_sparse),
        "sparse_end_to_end": max_abs_diff(sparse, ref_sparse),
        "dense_end_to_end": max_abs_diff(dense, ref_scores["dense"]),
        "sparse_top10_overlap": float(np.mean([
            len(set(np.argsort(-a)[:10]) & set(np.argsort(-b)[:10])) / 10 for a, b in zip(sparse, ref_sparse)
        ])) if len(sparse) else 1.0,
    }
    # float32 sums in a different order: agreement means a relative error at float32 rounding level.
    agreement["ok"] = (agreement["sparse_scoring_same_inputs"]["relative"] < 1e-5
                       and agreement["sparse_end_to_end"]["relative"] < 1e-3
                       and agreement["dense_end_to_end"]["max_abs_diff"] < 1e-3)
    flagm3 = {
        "implementation": "flagm3 M3Embedder (fp32, CPU)",
        "torch_threads": torch.get_num_threads(),
        "encode_corpus_seconds": encode_s, "encode_corpus_cpu_seconds": encode_cpu,
        "encode_texts_per_second": len(passages) / encode_s,
        "encode_queries_seconds": query_s,
        "sparse_scoring_seconds": sparse_s, "sparse_scoring_seconds_all": sparse_all,
        "sparse_matrix_product_seconds": product_s,
        "sparse_pairs_per_second": len(queries) * len(passages) / sparse_s,
        "peak_rss_mb": peak_rss_mb(),
    }
    write_json(args.out, {
        "workload": "Cranfield corpus encode (dense + lexical + ColBERT) and lexical scoring of all test queries",
        "model_dir": str(Path(args.model_dir).resolve()),
        "n_docs": len(passages), "n_queries": len(queries), "batch_size": args.batch_size,
        "max_length": args.max_length,
        "reference": reference, "flagm3": flagm3,
        "encode_throughput_ratio": flagm3["encode_texts_per_second"] / reference["encode_texts_per_second"],
        "encode_cpu_ratio": reference["encode_corpus_cpu_seconds"] / encode_cpu,
        "sparse_scoring_speedup": reference["sparse_scoring_seconds"] / sparse_s,
        "agreement": agreement,
    })


if __name__ == "__main__":
    main()
