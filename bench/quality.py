"""Workload 4: retrieval quality on the Cranfield test split after workload 1, every model through flagm3's
evaluator (`flagm3 eval`, i.e. `flagm3.evaluation.run_eval`), plus BM25.

    python bench/quality.py --model NAME=DIR [--model NAME=DIR ...] [--untouched NAME] [--jobs N]
        [--max-docs N] [--max-length 512] [--batch-size 32] [--out bench/results/quality.json]

DIR: a flagm3 checkpoint or a BGE-M3-layout directory (FlagEmbedding's trained output loads as is).
`--untouched NAME` adds the untouched model: all-MiniLM-L6-v2 (bench/work/base_minilm_eos) with fresh heads
drawn under torch.manual_seed(--seed), saved once in BGE-M3 layout to bench/work/untouched_m3 (so the
reference evaluator can load the very same heads).
Rankings: dense, sparse, colbert, dense+sparse and all (weights dense 1 : sparse 0.3 : ColBERT 1); metrics
nDCG@10 and Recall@100, queries and passages up to --max-length tokens. BM25 (bench/bm25_baseline.py's
BM25Index: bm25s, English stopwords) is scored on the same documents and queries.
--max-docs N (smoke runs) keeps the first N corpus documents and the judgements on them, as
bench/reference_inference.py does; 0 (default) runs `run_eval` on the whole split.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, WORK_DIR, data_dir, evaluate, run_from_scores, write_json  # noqa: E402

RANKINGS = ("dense", "sparse", "colbert", "dense+sparse", "all")
WEIGHTS = (1.0, 0.3, 1.0)
KEYS = ("ndcg@10", "recall@100")


def collection(split: str, max_docs: int) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]]]:
    """(corpus, queries, qrels) as flagm3 loads them; with max_docs, the first N documents only, the
    judgements on them, and the queries left with a relevant one (bench/reference_inference.py's subset)."""
    from flagm3.evaluation import load_beir

    corpus, queries, qrels = load_beir(data_dir(), split)
    if max_docs:
        corpus = dict(list(corpus.items())[:max_docs])
        qrels = {q: {d: g for d, g in judged.items() if d in corpus} for q, judged in qrels.items()}
        qrels = {q: judged for q, judged in qrels.items() if any(g > 0 for g in judged.values())}
        queries = {q: t for q, t in queries.items() if q in qrels}
    return corpus, queries, qrels


def flagm3_metrics(model_dir: str, split: str = "test", max_docs: int = 0, max_length: int = 512,
                   batch_size: int = 32, output: str | None = None) -> dict[str, dict[str, float]]:
    """nDCG@10 / Recall@100 of every ranking with flagm3's evaluator: run_eval, or evaluate_retrieval on the
    max_docs subset."""
    from flagm3.evaluation import evaluate_retrieval, run_eval

    options = dict(hybrid_weights=WEIGHTS, k_values=(10, 100), max_query_length=max_length,
                   max_passage_length=max_length, batch_size=batch_size, show_progress=False)
    if not max_docs:
        results = run_eval(model_dir, data_dir(), split=split, output=output, **options)
    else:
        from flagm3.inference import M3Embedder

        corpus, queries, qrels = collection(split, max_docs)
        embedder = M3Embedder(model_dir, use_fp16=False, batch_size=batch_size, devices="cpu")
        results = evaluate_retrieval(embedder, corpus, queries, qrels, **options)
    return {name: {k: float(results[name][k]) for k in KEYS} for name in RANKINGS if name in results}


def timed_metrics(*args) -> tuple[dict, float]:
    """flagm3_metrics(*args) and its wall time (for worker processes)."""
    t0 = time.perf_counter()
    return flagm3_metrics(*args), time.perf_counter() - t0


def bm25_metrics(split: str, max_docs: int) -> dict[str, float]:
    from bm25_baseline import BM25Index

    corpus, queries, qrels = collection(split, max_docs)
    doc_ids, qids = list(corpus), sorted(qrels, key=int)
    scores = BM25Index(list(corpus.values())).scores([queries[q] for q in qids])
    metrics = evaluate(qrels, run_from_scores(qids, doc_ids, np.asarray(scores)))
    return {k: metrics[k] for k in KEYS}


def make_untouched(target: Path, seed: int) -> Path:
    """all-MiniLM-L6-v2 + fresh heads (seeded) in BGE-M3 layout, written once."""
    if (target / "sparse_linear.pt").is_file():
        return target
    import torch
    from transformers import AutoTokenizer

    from flagm3 import M3Model

    base = WORK_DIR / "base_minilm_eos"
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(seed)
    model = M3Model.from_encoder(str(base), tokenizer=tokenizer)
    model.save_bge_m3(str(target), tokenizer)
    return target


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], metavar="NAME=DIR")
    p.add_argument("--untouched", default=None, metavar="NAME", help="also evaluate the untouched model")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--split", default="test")
    p.add_argument("--max-docs", type=int, default=0)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--jobs", type=int, default=1, help="models evaluated at the same time (processes)")
    p.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "quality.json"))
    args = p.parse_args()
    models = {}
    if args.untouched:
        models[args.untouched] = str(make_untouched(WORK_DIR / "untouched_m3", args.seed))
    for spec in args.model:
        name, sep, path = spec.partition("=")
        if not sep or not Path(path, "config.json").is_file():
            sys.exit(f"ERROR: --model {spec!r}: expected NAME=DIR with DIR a model directory")
        models[name] = path
    results, seconds = {}, {}
    jobs = [(args.split, args.max_docs, args.max_length, args.batch_size)] * len(models)
    # Worker processes are spawned, not forked: a fork of a process that has run torch can deadlock.
    pool = ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) if args.jobs > 1 else None
    outputs = (pool.map if pool else map)(timed_metrics, list(models.values()), *zip(*jobs))
    for name, (metrics, secs) in zip(models, outputs):
        results[name], seconds[name] = metrics, secs
        print(f"[quality] {name}: " + ", ".join(f"{r} {v['ndcg@10']:.3f}" for r, v in metrics.items()),
              file=sys.stderr, flush=True)
    if pool:
        pool.shutdown()
    write_json(args.out, {
        "evaluator": "flagm3.evaluation (run_eval / evaluate_retrieval)",
        "split": args.split, "max_docs": args.max_docs, "max_length": args.max_length,
        "hybrid_weights": {"dense": WEIGHTS[0], "sparse": WEIGHTS[1], "colbert": WEIGHTS[2]},
        "models": models, "results": results, "bm25": bm25_metrics(args.split, args.max_docs),
        "eval_seconds": seconds,
    })


if __name__ == "__main__":
    main()
