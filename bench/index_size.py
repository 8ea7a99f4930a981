"""Index size against quality: bytes per passage vs nDCG@10 for each head and the hybrid, compressed at encode
time (flagm3.compression), on Cranfield and CACM, for the untouched model and trained models over seeds.

    python bench/index_size.py [--collections cranfield,cacm] [--seeds 1,2,3] [--steps 40]
        [--variant NAME="flagm3 train flags" ...] [--no-untouched] [--jobs 2] [--eval-max-length 128]
        [--split test] [--out bench/results/index_size.json]

Models: the untouched model (all-MiniLM-L6-v2 with fresh seeded heads, bench/quality.py's make_untouched) and,
per seed, each variant trained as a bench/quality_seeds.py cell (same data, base model, batch, learning rate,
steps; bench/flagm3_train.py): by default ``flagm3_default`` (the package's recipe) and ``flagm3_mrl`` (plus
``--mrl_dims 96 192``: Matryoshka at 1/4 and 1/2 of MiniLM's 384 dimensions). Each model's corpus and queries
are encoded once (flagm3's M3Embedder, raw outputs); every compression point is then applied with flagm3's own
functions (``truncate``, ``pool_colbert_batch``, ``prune_lexical``) and scored over the whole corpus with
flagm3.scoring, nDCG@10 by flagm3.evaluation.metrics. ColBERT and the hybrid ``all`` rank the top 100 documents
of the dense + 0.3 sparse hybrid (as ``flagm3 search --rerank`` serves them): ColBERT points use the
full-size first stage, so only ColBERT's compression changes between them; ``all`` points use their own
compressed first stage. (A full-corpus MaxSim per point did not fit the shared 2-core machine.)

Points: dense dims {full, 192, 96, 48}; ColBERT dims {full, 192, 96, 48} x pool factor {1, 2, 4}; sparse
top-k {all, 64, 32, 16, 8, half the model's mean active tokens}; int8 and binary quantisation of dense and ColBERT (scores on the dequantised
vectors: the quality of an index serving them without Qdrant's float32 rescoring, its worst case); hybrid
``all`` (1 : 0.3 : 1) at a few combined settings. Bytes per passage: flagm3.compression.index_bytes_per_passage
at the corpus's mean sparse entries and ColBERT vectors.

Finished cells are kept (bench/work/index_size/<collection>/<split>/<model>/<seed>.json) and not rerun; each
training and evaluation runs in its own process with one torch thread, ``--jobs`` at a time. Writes the JSON,
a Markdown table (.md) and a Pareto plot (.png) beside ``--out``, with each target of issue 18 marked met or
missed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, WORK_DIR, write_json  # noqa: E402
from quality_seeds import code_version, collection_dir, env_for, run, train_data  # noqa: E402

ROOT = WORK_DIR / "index_size"
VARIANTS = {"flagm3_default": [], "flagm3_mrl": ["--mrl_dims", "96", "192"]}
DIMS = (None, 192, 96, 48)
POOLS = (1, 2, 4)
TOP_K = (None, 64, 32, 16, 8)
QUANTIZED = ((96, 2), (48, 2))  # ColBERT (dims, pool) points also scored int8 and binary
RERANK_DEPTH = 100  # ColBERT and "all" rank the top 100 of dense + 0.3 sparse
COMBOS = {  # hybrid "all" settings: dense dim, ColBERT dim, pool factor, sparse top-k
    "full": (None, None, 1, None),
    "dims/4": (96, 96, 1, None),
    "dims/4 pool2 top32": (96, 96, 2, 32),
    "dims/8 pool2 top16": (48, 48, 2, 16),
}


# ------------------------------------------------------------------------------------ one model's grid
def dequantized(x: Any, kind: Optional[str]) -> Any:
    """``x`` [..., D] after a round trip through Qdrant-style quantisation: ``int8`` (one range over all values,
    its 0.01-0.99 quantiles, 256 levels) or ``binary`` (the sign, scaled to unit norm); ``None``: ``x``."""
    import torch

    if kind is None:
        return x
    if kind == "binary":
        return torch.sign(x) / x.shape[-1] ** 0.5
    flat = x[x != 0].flatten()
    sample = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
    lo, hi = torch.quantile(sample, 0.01), torch.quantile(sample, 0.99)
    step = (hi - lo) / 255
    q = torch.round((x.clamp(lo, hi) - lo) / step) * step + lo
    return q * (x != 0)  # padding stays zero


def grid(model_dir: str, data: str, split: str, max_length: int, batch_size: int = 32, cache: Optional[str] = None,
         max_docs: int = 0) -> dict:
    """Every compression point of one model on one collection: {name: {head, bytes, ndcg@10, ...}}.

    ``cache``: a file keeping the encoded corpus and queries (reused when present); ``max_docs``: a corpus of
    every judged document plus random others up to that size (flagm3.evaluation.subsample, seed 0)."""
    import torch

    from flagm3.compression import (
        index_bytes_per_passage,
        pool_colbert_batch,
        prune_lexical,
        truncate,
    )
    from flagm3.evaluation import load_beir, subsample
    from flagm3.evaluation.metrics import evaluate_run
    from flagm3.inference import M3Embedder
    from flagm3.scoring import (
        colbert_scores,
        compute_lexical_matching_scores,
        concat_lexical,
        dense_scores,
        hybrid_scores,
        lexical_matrix,
        pool_lexical,
    )

    corpus, queries, qrels = subsample(*load_beir(data, split), max_corpus_size=max_docs or None)
    queries = {q: queries[q] for q in qrels}
    doc_ids, qids = sorted(corpus, reverse=True), list(queries)
    embedder = M3Embedder(model_dir, use_fp16=False, batch_size=batch_size, devices="cpu")
    normalize = embedder.normalize_embeddings
    t0 = time.perf_counter()

    def encode(texts: list[str]) -> tuple[list, torch.Tensor]:
        batches = list(embedder.iter_outputs(texts, max_length, show_progress=False))
        dense = torch.zeros(len(texts), batches[0][1]["dense"].shape[1])
        for rows, out in batches:
            dense[rows] = out["dense"]
        return [(torch.as_tensor(rows), out) for rows, out in batches], dense

    if cache and Path(cache).is_file():
        p_batches, p_dense, q_batches, q_dense = torch.load(cache, weights_only=True)
    else:
        p_batches, p_dense = encode([corpus[d] for d in doc_ids])
        q_batches, q_dense = encode([queries[q] for q in qids])
        if cache:
            torch.save((p_batches, p_dense, q_batches, q_dense), cache)
    encode_seconds = time.perf_counter() - t0
    hidden, colbert_size = p_dense.shape[1], p_batches[0][1]["colbert"].shape[-1]
    q_lexical = lexical_matrix(concat_lexical([(rows, pool_lexical(out["sparse_ids"], out["sparse_weights"]))
                                               for rows, out in q_batches], len(qids)))

    def ndcg(scores: torch.Tensor) -> float:
        top = torch.topk(scores, min(100, scores.shape[1]), dim=1)
        run = {q: {doc_ids[j]: float(s) for s, j in zip(vals.tolist(), idx.tolist())}
               for q, vals, idx in zip(qids, top.values, top.indices)}
        return evaluate_run(run, qrels, (10,), ("ndcg",))["ndcg@10"]

    def dense(dim: Optional[int], quant: Optional[str] = None) -> torch.Tensor:
        return dense_scores(dequantized(truncate(q_dense, dim, normalize), None),
                            dequantized(truncate(p_dense, dim, normalize), quant))

    def sparse(top_k: Optional[int]) -> tuple[torch.Tensor, float]:
        parts = [(rows, pool_lexical(out["sparse_ids"], prune_lexical(out["sparse_ids"], out["sparse_weights"], top_k)))
                 for rows, out in p_batches]
        pooled = concat_lexical(parts, len(doc_ids))
        scores = compute_lexical_matching_scores(q_lexical, lexical_matrix(pooled))
        return torch.from_numpy(scores).float(), pooled.token_ids.numel() / len(doc_ids)

    q_colbert = torch.zeros(len(qids), max(o["colbert"].shape[1] for _, o in q_batches), colbert_size)
    q_mask = torch.zeros(q_colbert.shape[:2], dtype=torch.long)
    for rows, out in q_batches:
        q_colbert[rows, : out["colbert"].shape[1]], q_mask[rows, : out["colbert"].shape[1]] = out["colbert"], \
            out["colbert_mask"]

    def colbert(dim: Optional[int], pool: int, quant: Optional[str] = None,
                candidates: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, float]:
        """ColBERT scores of each query's ``candidates`` (default: the full-size dense+sparse top 100; the
        others score -inf) and the mean number of (pooled) vectors per passage over the whole corpus."""
        candidates = base_candidates if candidates is None else candidates
        docs = [None] * len(doc_ids)
        vectors = 0
        for rows, out in p_batches:
            vecs, mask = pool_colbert_batch(truncate(out["colbert"], dim, normalize), out["colbert_mask"], pool,
                                            normalize)
            vecs = dequantized(vecs, quant)
            vectors += int(mask.sum())
            for row, v, m in zip(rows.tolist(), vecs, mask):
                docs[row] = v[: int(m.sum())]
        q_vecs = truncate(q_colbert, dim, normalize)
        scores = torch.full((len(qids), len(doc_ids)), float("-inf"))
        for qi, cand in enumerate(candidates.tolist()):
            length = max(docs[j].shape[0] for j in cand)
            p_vecs = torch.zeros(len(cand), length, q_vecs.shape[-1])
            p_mask = torch.zeros(len(cand), length, dtype=torch.long)
            for k, j in enumerate(cand):
                p_vecs[k, : docs[j].shape[0]], p_mask[k, : docs[j].shape[0]] = docs[j], 1
            scores[qi, cand] = colbert_scores(q_vecs[qi : qi + 1], q_mask[qi : qi + 1], p_vecs, p_mask)[0]
        return scores, vectors / len(doc_ids)

    points: dict[str, dict] = {}
    full_sparse, full_entries = sparse(None)
    weights = {"dense": 1.0, "sparse": 0.3, "colbert": 1.0}

    def first_stage(dense_scores_: torch.Tensor, sparse_scores_: torch.Tensor) -> torch.Tensor:
        fused = hybrid_scores({"dense": dense_scores_, "sparse": sparse_scores_}, weights)
        return torch.topk(fused, min(RERANK_DEPTH, fused.shape[1]), dim=1).indices

    base_candidates = first_stage(dense(None), full_sparse)
    full_colbert, full_vectors = colbert(None, 1)

    def add(name: str, head: str, scores: torch.Tensor, dense_dim: int, entries: float, vectors: float,
            colbert_dim: int, quant: Optional[str] = None, **settings: Any) -> None:
        sizes = index_bytes_per_passage(dense_dim, entries, vectors, colbert_dim, quant)
        size = sum(sizes.values()) if head == "all" else sizes[head]
        points[name] = {"head": head, "bytes": size, "ndcg@10": ndcg(scores), "quantization": quant,
                        "sparse_entries": entries, "colbert_vectors": vectors, **settings}

    for dim in DIMS:
        for quant in (None, "int8", "binary") if dim in (None, 96) else (None,):
            add(f"dense d={dim or hidden}{' ' + quant if quant else ''}", "dense", dense(dim, quant),
                dim or hidden, 0, 0, 0, quant, dim=dim or hidden)
    for k in TOP_K:
        scores, entries = (full_sparse, full_entries) if k is None else sparse(k)
        add(f"sparse top-k={k or 'all'}", "sparse", scores, 0, entries, 0, 0, top_k=k)
    half = max(1, int(full_entries // 2))  # the model's own halving point: top-k at half its mean active tokens
    scores, entries = sparse(half)
    add("sparse top-k=half", "sparse", scores, 0, entries, 0, 0, top_k=half)
    for dim in DIMS:
        for pool in POOLS:
            quants = (None, "int8", "binary") if (dim, pool) in QUANTIZED else (None,)
            for quant in quants:
                scores, vectors = (full_colbert, full_vectors) if (dim, pool, quant) == (None, 1, None) else \
                    colbert(dim, pool, quant)
                add(f"colbert d={dim or colbert_size} pool={pool}{' ' + quant if quant else ''}", "colbert", scores,
                    0, 0, vectors, dim or colbert_size, quant, dim=dim or colbert_size, pool_factor=pool)
    for name, (d_dim, c_dim, pool, k) in COMBOS.items():
        s_scores, entries = (full_sparse, full_entries) if k is None else sparse(k)
        d_scores = dense(d_dim)
        c_scores, vectors = colbert(c_dim, pool, candidates=first_stage(d_scores, s_scores))
        fused = hybrid_scores({"dense": d_scores, "sparse": s_scores, "colbert": c_scores}, weights)
        add(f"all {name}", "all", fused, d_dim or hidden, entries, vectors, c_dim or colbert_size,
            d=d_dim or hidden, c=c_dim or colbert_size, pool_factor=pool, top_k=k)
    return {"points": points, "encode_seconds": encode_seconds, "seconds": time.perf_counter() - t0,
            "hidden": hidden, "colbert_size": colbert_size, "queries": len(qids), "documents": len(doc_ids)}


# ---------------------------------------------------------------------------------------------- cells
def evaluate_cell(args: argparse.Namespace, coll: str, model_dir: Path, out: Path) -> dict:
    code = (f"import sys, json, torch; torch.set_num_threads(1); sys.path.insert(0, 'bench'); "
            f"from index_size import grid; json.dump(grid({str(model_dir)!r}, {str(collection_dir(coll))!r}, "
            f"{args.split!r}, {args.eval_max_length}, cache={str(out.with_suffix('.pt'))!r}, max_docs={args.max_docs}), "
            f"open({str(out)!r}, 'w'))")
    run([args.python, "-c", code], env_for(coll), out.with_suffix(".log"))
    return json.loads(out.read_text())


def cell(args: argparse.Namespace, coll: str, name: str, flags: Optional[list[str]], seed: int) -> dict:
    """Train (``flags``; ``None``: the untouched model) and evaluate the grid, or read the finished cell."""
    out = ROOT / coll / args.split / name / f"{seed}.json"
    if out.is_file():
        return json.loads(out.read_text())
    if args.collect_only:
        raise RuntimeError("not run")
    out.parent.mkdir(parents=True, exist_ok=True)
    code = code_version()
    env = env_for(coll)
    if flags is None:
        from quality import make_untouched

        model_dir, train_s = make_untouched(WORK_DIR / "untouched_m3", 42), 0.0
    else:
        model_dir = ROOT / coll / "models" / name / str(seed)
        cmd = [args.python, "bench/flagm3_train.py", "--max-steps", str(args.steps), "--query-max-len",
               str(args.query_max_len), "--passage-max-len", str(args.passage_max_len), "--seed", str(seed),
               "--threads", "1", "--breakdown-repeats", "0", "--train-data", str(train_data(coll, args.python)),
               "--base-model", str(WORK_DIR / "base_minilm_eos"), "--output-dir", str(model_dir),
               "--out", str(model_dir) + ".train.json", "--overwrite", "--", *flags]
        train_s = run(cmd, env, out.with_suffix(".train.log"))
    result = evaluate_cell(args, coll, model_dir, out.with_suffix(".grid.json"))
    result.update(collection=coll, model=name, seed=seed, flags=flags, code=code, train_seconds=train_s)
    write_json(out, result)
    if flags is not None and not args.keep_models:
        import shutil

        shutil.rmtree(model_dir, ignore_errors=True)
    return result


# -------------------------------------------------------------------------------------------- summary
def summarise(cells: list[dict]) -> dict:
    """{model: {point: {mean, std, n, bytes, head, ...}}} of nDCG@10 over seeds."""
    out: dict[str, dict] = {}
    for c in cells:
        for name, point in c["points"].items():
            entry = out.setdefault(c["model"], {}).setdefault(name, {k: v for k, v in point.items() if k != "ndcg@10"}
                                                              | {"values": [], "bytes_values": []})
            entry["values"].append(point["ndcg@10"])
            entry["bytes_values"].append(point["bytes"])
    for points in out.values():
        for entry in points.values():
            vals = entry["values"]
            entry.update(mean=statistics.mean(vals), std=statistics.stdev(vals) if len(vals) > 1 else 0.0,
                         n=len(vals), bytes=statistics.mean(entry.pop("bytes_values")))
    return out


def _best(points: dict, head: str, full: str, ratio: float, quant: Optional[str] = None) -> Optional[tuple]:
    """The point of ``head`` with at least ``ratio`` x fewer bytes than ``full`` and the best mean nDCG@10."""
    base = points[full]
    found = [(name, p) for name, p in points.items() if p["head"] == head and p.get("quantization") == quant
             and base["bytes"] / max(p["bytes"], 1e-9) >= ratio]
    if not found:
        return None
    name, p = max(found, key=lambda item: item[1]["mean"])
    return name, base["mean"] - p["mean"], base["bytes"] / p["bytes"]


def targets(summary: dict, trained: str, plain: str) -> list[dict]:
    """Issue 18's targets on one collection, each met or missed (``trained``: the Matryoshka model; without
    it, the compression targets are checked on the untouched model and the training ones are not run)."""
    rows: list[dict] = []
    if trained not in summary and "untouched" in summary:
        trained = "untouched"
    model = summary.get(trained) or {}
    if not model:
        return rows
    hidden = max(p["dim"] for p in model.values() if p["head"] == "dense")
    size = max(p["dim"] for p in model.values() if p["head"] == "colbert")
    full_c = f"colbert d={size} pool=1"

    def row(target: str, limit: float, found: Optional[tuple], what: str) -> None:
        if found is None:
            rows.append({"target": target, "status": "missed", "detail": f"no {what} point", "model": trained})
            return
        name, loss, ratio = found
        rows.append({"target": target, "status": "met" if loss <= limit else "missed", "point": name,
                     "loss": loss, "ratio": ratio, "limit": limit, "model": trained})

    row("ColBERT >= 8x fewer bytes (dims x pooling), <= 0.005 lost", 0.005, _best(model, "colbert", full_c, 8), "8x")
    row("ColBERT >= 32x with int8, <= 0.01 lost", 0.01, _best(model, "colbert", full_c, 32, "int8"), "32x int8")
    quarter = f"dense d={hidden // 4}"
    for name, label in (("flagm3_mrl", "with Matryoshka"), (plain, "without Matryoshka (reported)"),
                        ("untouched", "untouched model (reported)")):
        pts = summary.get(name) or {}
        if quarter in pts:
            loss = pts[f"dense d={hidden}"]["mean"] - pts[quarter]["mean"]
            mrl = name == "flagm3_mrl"
            rows.append({"target": f"dense at 1/4 dims {label}, <= 0.01 lost", "point": quarter, "loss": loss,
                         "ratio": 4.0, "limit": 0.01, "model": name,
                         "status": ("met" if loss <= 0.01 else "missed") if mrl else "reference"})
    full_s = model["sparse top-k=all"]
    halved = [(n, p) for n, p in model.items() if p["head"] == "sparse" and p["sparse_entries"] <= full_s["sparse_entries"] / 2]
    if halved:
        name, p = max(halved, key=lambda item: item[1]["mean"])
        rows.append({"target": "sparse active tokens halved, <= 0.005 lost", "point": name, "model": trained,
                     "loss": full_s["mean"] - p["mean"], "ratio": full_s["sparse_entries"] / p["sparse_entries"],
                     "limit": 0.005, "status": "met" if full_s["mean"] - p["mean"] <= 0.005 else "missed"})
    if plain in summary and trained == "flagm3_mrl":
        for head, point in (("dense", f"dense d={hidden}"), ("sparse", "sparse top-k=all"), ("colbert", full_c),
                            ("all", "all full")):
            loss = summary[plain][point]["mean"] - model[point]["mean"]
            rows.append({"target": f"Matryoshka training costs <= 0.005 at full size ({head})", "point": point,
                         "model": "flagm3_mrl vs flagm3_default",
                         "loss": loss, "limit": 0.005, "status": "met" if loss <= 0.005 else "missed"})
    return rows


def write_report(result: dict, out: Path) -> None:
    """The Markdown table and the Pareto plot beside ``out``."""
    lines = [f"# Index size vs nDCG@10 ({result['settings']['split']} split)", "",
             "Bytes per passage (vectors only) and nDCG@10, mean ± std over the seeds run. "
             + result.get("note", ""), ""]
    for coll, data in result["collections"].items():
        lines += [f"## {coll}", "", "| model | point | bytes/passage | nDCG@10 | seeds |", "| --- | --- | ---: | ---: | ---: |"]
        for model, points in data["summary"].items():
            for name, p in sorted(points.items(), key=lambda item: (item[1]["head"], -item[1]["bytes"])):
                lines.append(f"| {model} | {name} | {p['bytes']:.0f} | {p['mean']:.4f} ± {p['std']:.4f} | {p['n']} |")
        lines += ["", "| target | status | model | point | nDCG@10 lost | fewer bytes |",
                  "| --- | --- | --- | --- | ---: | ---: |"]
        for t in data["targets"]:
            loss = f"{t['loss']:.4f}" if "loss" in t else ""
            ratio = f"{t['ratio']:.1f}x" if t.get("ratio") else ""
            lines.append(f"| {t['target']} | {t['status']} | {t.get('model', '')} | "
                         f"{t.get('point', t.get('detail', ''))} | {loss} | {ratio} |")
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    colls = list(result["collections"])
    fig, axes = plt.subplots(1, len(colls), figsize=(7 * len(colls), 5), squeeze=False)
    colours = {"dense": "tab:blue", "sparse": "tab:green", "colbert": "tab:red", "all": "black"}
    markers = {"untouched": "x", "flagm3_default": "o", "flagm3_mrl": "s"}
    for ax, coll in zip(axes[0], colls):
        for model, points in result["collections"][coll]["summary"].items():
            for head, colour in colours.items():
                pts = sorted((p["bytes"], p["mean"]) for p in points.values() if p["head"] == head)
                if not pts:
                    continue
                frontier, best = [], -1.0
                for b, v in pts:  # Pareto: each point better than every smaller one
                    if v > best:
                        frontier.append((b, v))
                        best = v
                ax.scatter(*zip(*pts), color=colour, marker=markers.get(model, "^"), alpha=0.35, s=18)
                ax.plot(*zip(*frontier), color=colour, alpha=0.8, label=f"{head} ({model})",
                        linestyle="-" if model == "flagm3_mrl" else ":")
        ax.set_xscale("log")
        ax.set_xlabel("bytes per passage (log)")
        ax.set_ylabel("nDCG@10")
        ax.set_title(coll)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--collections", default="cranfield,cacm")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--variant", action="append", default=[], metavar='NAME="FLAGS"',
                   help="trained models (default: flagm3_default and flagm3_mrl)")
    p.add_argument("--no-untouched", action="store_true")
    p.add_argument("--no-train", action="store_true", help="the untouched model only")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--query-max-len", type=int, default=32)
    p.add_argument("--passage-max-len", type=int, default=128)
    p.add_argument("--eval-max-length", type=int, default=128)
    p.add_argument("--max-docs", type=int, default=0,
                   help="evaluate on every judged document plus random others up to this many (0: the whole corpus)")
    p.add_argument("--split", default="test")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--keep-models", action="store_true")
    p.add_argument("--collect-only", action="store_true",
                   help="run nothing: summarise the finished cells and list the others as not run")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "index_size.json"))
    p.add_argument("--note", default="", help="a sentence on how the cells ran, kept in the outputs")
    args = p.parse_args()
    variants = dict(VARIANTS)
    if args.variant:
        variants = {}
        for spec in args.variant:
            name, sep, flags = spec.partition("=")
            if not sep:
                sys.exit(f"ERROR: --variant {spec!r}: expected NAME=\"flags\"")
            variants[name] = shlex.split(flags)
    if args.no_train:
        variants = {}
    seeds = [int(s) for s in args.seeds.split(",")]
    colls = [c for c in args.collections.split(",") if c]
    from reference_train import prepare_base_model

    prepare_base_model(WORK_DIR / "base_minilm_eos")
    if not args.no_untouched and not args.collect_only:
        from quality import make_untouched

        make_untouched(WORK_DIR / "untouched_m3", 42)  # once, before cells run in parallel
    if variants and not args.collect_only:  # the training data, once per collection, before cells run in parallel
        (WORK_DIR / "seeds").mkdir(parents=True, exist_ok=True)
        for c in colls:
            train_data(c, args.python)
    tasks = [(c, "untouched", None, 0) for c in colls if not args.no_untouched]
    tasks += [(c, name, flags, s) for s in seeds for c in colls for name, flags in variants.items()]
    t0 = time.perf_counter()
    cells, failed = [], []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(cell, args, *t) for t in tasks]
        for t, f in zip(tasks, futures):
            try:
                cells.append(f.result())
            except Exception as e:  # a failed cell is reported, the others still count
                failed.append({"cell": [t[0], t[1], t[3]], "error": str(e)})
                print(f"[index_size] FAILED {t[0]} {t[1]} seed {t[3]}: {e}", file=sys.stderr, flush=True)
    result: dict[str, Any] = {
        "settings": {k: getattr(args, k) for k in ("steps", "query_max_len", "passage_max_len", "eval_max_length",
                                                   "split", "jobs", "max_docs")} | {"seeds": seeds, "variants": variants},
        "wall_seconds": time.perf_counter() - t0, "note": args.note, "collections": {}, "failed": failed,
    }
    for c in colls:
        summary = summarise([x for x in cells if x["collection"] == c])
        result["collections"][c] = {"summary": summary, "targets": targets(summary, "flagm3_mrl", "flagm3_default")}
    out = Path(args.out)
    write_json(out, result)
    write_report(result, out)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
