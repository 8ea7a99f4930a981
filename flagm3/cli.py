"""The ``flagm3`` command: train, eval, mine, validate, export, demo."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from typing import Any, Optional, Sequence

from . import compression_options as compression
from .errors import check_file, check_model, user_errors
from .mining import DENSE_SPARSE_WEIGHTS
from .scoring import HEADS


def _export(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from .convert_bge_m3 import resolve_checkpoint
    from .modeling_m3 import M3Model

    source = resolve_checkpoint(args.model, {})
    model = M3Model.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if args.quantize and args.format != "onnx":
        sys.exit("flagm3 export: --quantize applies to --format onnx only")
    if args.format == "onnx":
        from .export import export_onnx

        graph = export_onnx(model, tokenizer, args.output, quantize=args.quantize, source=source,
                            compression=compression.from_arguments(args))
        print(f"wrote ONNX graph (dense, sparse, colbert outputs) to {graph}")
        return
    if args.format == "sentence-transformers":
        from .export import export_sentence_transformers

        summary = export_sentence_transformers(model, tokenizer, args.output, source=source,
                                               compression=compression.from_arguments(args))
        for head, directory in summary["written"].items():
            print(f"wrote the {head} head as sentence-transformers model to {directory}")
        for head, reason in summary["left_out"].items():
            print(f"left out the {head} head: {reason}")
        return
    if args.format == "bge-m3":
        model.save_bge_m3(args.output, tokenizer)
    else:
        model.save_pretrained(args.output)
        tokenizer.save_pretrained(args.output)
    print(f"wrote {args.format} checkpoint to {args.output}")


def _options(args: argparse.Namespace, fn: Any) -> dict[str, Any]:
    """The parsed options that ``fn`` takes, by name: a subcommand's ``dest`` names are its function's parameters."""
    params = inspect.signature(fn).parameters
    return {name: value for name, value in vars(args).items() if name in params}


def _eval(args: argparse.Namespace) -> None:
    from .evaluation import run_eval

    run_eval(args.model, args.data, **_options(args, run_eval))


def _embedder(args: argparse.Namespace) -> Any:
    from .inference import M3Embedder

    return M3Embedder(args.model, batch_size=args.batch_size, query_max_length=args.max_query_length,
                      passage_max_length=args.max_passage_length,
                      query_instruction_for_retrieval=args.query_instruction_for_retrieval,
                      compression=compression.from_arguments(args))


def _index(args: argparse.Namespace) -> None:
    from . import qdrant
    from .evaluation import read_corpus

    embedder = _embedder(args)
    total = sum(1 for line in open(args.corpus, encoding="utf-8") if line.strip())
    client = qdrant.connect(args.qdrant)
    summary = qdrant.index_corpus(embedder, client, args.collection, read_corpus(args.corpus),
                                  chunk_size=args.chunk_size, store_text=not args.no_text, total=total,
                                  quantization=args.quantization)
    summary["points"] = client.count(args.collection).count
    print(json.dumps(summary))


def _search(args: argparse.Namespace) -> None:
    from . import qdrant

    embedder = _embedder(args)
    client = qdrant.connect(args.qdrant)
    weights = dict(zip(HEADS, args.weights)) if args.weights else embedder.hybrid_weights
    queries = qdrant.encode_queries(embedder, args.query)
    results = qdrant.search(client, args.collection, queries, mode=args.mode, limit=args.limit,
                            fusion=args.fusion, weights=weights, rerank=args.rerank,
                            prefetch_limit=args.prefetch_limit, exact=args.exact)
    for query, hits in zip(args.query, results):
        print(json.dumps({"query": query, "hits": [
            {"rank": rank, "doc_id": hit["doc_id"], "score": round(hit["score"], 6),
             **({"text": hit["payload"]["text"]} if "text" in hit["payload"] else {})}
            for rank, hit in enumerate(hits, 1)]}, ensure_ascii=False))


def _mine(args: argparse.Namespace) -> None:
    from .mining import mine_hard_negatives

    summary = mine_hard_negatives(_embedder(args), args.input, args.output, **_options(args, mine_hard_negatives),
                                  fill_random=not args.no_fill_random, use_faiss=False if args.no_faiss else None)
    print(json.dumps(summary, indent=2, default=str))


def _validate(args: argparse.Namespace) -> None:
    from .data import validate_data

    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    report = validate_data(
        args.data,
        tokenizer=tokenizer,
        query_max_len=args.query_max_len,
        passage_max_len=args.passage_max_len,
        sample_negatives_from_corpus=not args.no_sampled_negatives,
    )
    print(report.summary())
    if not report.ok:
        sys.exit(1)


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(output_dir=args.output_dir, max_steps=args.max_steps, quick=args.quick)


class _Parser(argparse.ArgumentParser):
    """Usage mistakes in one line (``flagm3 eval: error: ...``), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flagm3", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="fine-tune (arguments as FlagEmbedding's M3 fine-tuning; --help for all)",
                   add_help=False)

    p = sub.add_parser("export", help="convert a checkpoint to the BGE-M3 layout, flagm3's, ONNX or sentence-transformers")
    p.add_argument("--model", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--format", choices=["bge-m3", "flagm3", "onnx", "sentence-transformers"], default="bge-m3",
                   help="onnx: one graph with the three heads, run by M3Embedder(OUTPUT); sentence-transformers: "
                        "the dense head, the sparse head in OUTPUT/sparse (SparseEncoder) and ColBERT in OUTPUT/colbert "
                        "where supported")
    p.add_argument("--quantize", action="store_true", help="onnx: int8 dynamic quantisation of the weights")
    compression.add_arguments(p, passage=False)
    p.set_defaults(func=_export)

    p = sub.add_parser("eval", help="retrieval metrics of every head and hybrid on a BEIR-layout dataset")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="directory with corpus.jsonl, queries.jsonl, qrels/")
    p.add_argument("--split", default="test")
    p.add_argument("--output", help="write the metrics as JSON here")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-query-length", type=int, default=512)
    p.add_argument("--max-passage-length", type=int, default=512)
    p.add_argument("--weights", type=float, nargs=3, default=None, metavar=("DENSE", "SPARSE", "COLBERT"),
                   dest="hybrid_weights",
                   help="hybrid weights (default: the model's fitted hybrid_weights.json, else 1 0.3 1)")
    p.add_argument("--fp16", action="store_true", dest="use_fp16")
    p.add_argument("--heads", nargs="+", default=list(HEADS), choices=HEADS)
    p.add_argument("--k-values", type=int, nargs="+", default=[1, 10, 100])
    p.add_argument("--colbert-mode", choices=["full", "rerank"], default="full",
                   help="score the whole corpus, or rerank the top of the dense+sparse ranking")
    p.add_argument("--rerank-depth", type=int, default=100)
    p.add_argument("--max-corpus-size", type=int, help="subsample the corpus (judged documents are kept)")
    p.add_argument("--max-queries", type=int)
    p.add_argument("--query-instruction", dest="query_instruction_for_retrieval")
    p.add_argument("--device", dest="devices", help="e.g. cuda:0 (default: the first GPU, else CPU)")
    p.add_argument("--backend", choices=["default", "qdrant"], default="default",
                   help="qdrant: index the corpus into Qdrant and retrieve through it (exact search)")
    p.add_argument("--qdrant", help="qdrant backend: a directory, :memory: or a server URL "
                                    "(default: a temporary embedded index)")
    p.add_argument("--collection", default="flagm3-eval", help="qdrant backend: the collection")
    p.add_argument("--fit-weights", metavar="SPLIT",
                   help="first fit the hybrid weights on this split (e.g. dev) and store them beside the model")
    compression.add_arguments(p)
    p.set_defaults(func=_eval)

    def serving_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="model directory (flagm3, BGE-M3 layout or ONNX export)")
        p.add_argument("--qdrant", required=True,
                       help="Qdrant: a directory (embedded local mode), :memory:, or a server URL http(s)://...")
        p.add_argument("--collection", required=True, help="Qdrant collection (one per model)")
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--max-query-length", type=int, default=512)
        p.add_argument("--max-passage-length", type=int, default=512)
        p.add_argument("--query-instruction", dest="query_instruction_for_retrieval")

    p = sub.add_parser("index", help="index a corpus into Qdrant with all three heads (resumable)")
    serving_args(p)
    p.add_argument("--corpus", required=True, help="BEIR corpus.jsonl (_id, title, text)")
    p.add_argument("--chunk-size", type=int, default=256, help="documents encoded and upserted at a time")
    p.add_argument("--no-text", action="store_true", help="do not store the passage text in the payload")
    compression.add_arguments(p, quantization=True)
    p.set_defaults(func=_index)

    p = sub.add_parser("search", help="search a Qdrant index: one head or the hybrid")
    serving_args(p)
    p.add_argument("--query", required=True, nargs="+", help="one or more query texts")
    p.add_argument("--mode", choices=["dense", "sparse", "colbert", "hybrid"], default="hybrid",
                   help="one head, or dense + sparse candidates fused (see --fusion)")
    p.add_argument("--fusion", choices=["weights", "rrf"], default="weights",
                   help="hybrid: weighted sum of exact head scores, or reciprocal rank fusion")
    p.add_argument("--rerank", action="store_true", help="hybrid: rerank the candidates with ColBERT")
    p.add_argument("--weights", type=float, nargs=3, metavar=("DENSE", "SPARSE", "COLBERT"),
                   help="hybrid weights (default: the model's fitted hybrid_weights.json, else 1 0.3 1)")
    p.add_argument("--limit", type=int, default=10, help="hits per query")
    p.add_argument("--prefetch-limit", type=int, default=100, help="hybrid: candidates per head")
    p.add_argument("--exact", action="store_true", help="exact search (no HNSW approximation)")
    compression.add_arguments(p, passage=False)
    p.set_defaults(func=_search)

    p = sub.add_parser("mine", help="mine hard negatives for a training JSONL")
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--candidate-pool", help="JSONL of passages (default: all pos/neg of the input)")
    p.add_argument("--range", type=int, nargs=2, default=[10, 100], metavar=("FROM", "TO"), dest="range_for_sampling")
    p.add_argument("--negative-number", type=int, default=15)
    p.add_argument("--hybrid", action="store_true", dest="use_hybrid", help="rank by dense + sparse instead of dense")
    p.add_argument("--hybrid-weights", type=float, nargs=2, default=list(DENSE_SPARSE_WEIGHTS), metavar=("DENSE", "SPARSE"))
    p.add_argument("--teacher-scores", action="store_true",
                   help="write pos_scores/neg_scores: the mining scores divided by --teacher-score-temperature")
    p.add_argument("--teacher-score-temperature", type=float, default=0.02,
                   help="scores are written as score / this (logits for training's --teacher_temperature 1)")
    p.add_argument("--no-fill-random", action="store_true",
                   help="keep fewer negatives when the rank window is short (default: fill from lower ranks)")
    p.add_argument("--no-faiss", action="store_true", help="search with torch even when faiss is installed")
    p.add_argument("--query-instruction", dest="query_instruction_for_retrieval")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-query-length", type=int, default=64)
    p.add_argument("--max-passage-length", type=int, default=512)
    p.add_argument("--seed", type=int, default=42)
    p.set_defaults(func=_mine)

    p = sub.add_parser("validate", help="check training data and print a summary")
    p.add_argument("data", nargs="+")
    p.add_argument("--tokenizer", help="count truncated texts with this tokenizer")
    p.add_argument("--query-max-len", type=int, default=32)
    p.add_argument("--passage-max-len", type=int, default=128)
    p.add_argument("--no-sampled-negatives", action="store_true",
                   help="records without negatives are errors (default: negatives come from other records)")
    p.set_defaults(func=_validate)

    p = sub.add_parser("demo", help="offline demo: fine-tune all-MiniLM-L6-v2 on chatterbot-corpus Q&A")
    p.add_argument("--output-dir", default="flagm3-demo")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="a tiny run for smoke tests")
    p.set_defaults(func=_demo)
    return parser


def _check_inputs(args: argparse.Namespace) -> None:
    """Missing models and files named on the command line, found before anything loads."""
    for option in ("model", "tokenizer"):
        check_model(getattr(args, option, None), f"--{option}")
    for option in ("input", "candidate_pool", "corpus"):
        check_file(getattr(args, option, None), f"--{option.replace('_', '-')}")
    if getattr(args, "data", None) and args.command == "eval" and not os.path.isdir(args.data):
        raise FileNotFoundError(f"--data {args.data}: no such directory (a BEIR-layout collection: corpus.jsonl, "
                                "queries.jsonl, qrels/)")


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        from .train import main as train_main

        train_main(argv[1:])
        return
    args = build_parser().parse_args(argv)
    with user_errors(f"flagm3 {args.command}"):
        _check_inputs(args)
        args.func(args)


if __name__ == "__main__":
    main()
