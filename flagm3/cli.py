"""The ``flagm3`` command: train, eval, mine, merge, validate, export, index, search, demo (see docs/cli.md)."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from typing import Any, Optional, Sequence

from . import compression_options as compression
from .cli_convention import ConventionFormatter, ConventionParser, build_convention_parser
from .defaults import BGE_M3_ENSEMBLE_WEIGHTS, HEADS
from .errors import check_file, check_model, user_errors
from .version import __version__


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

    run_eval(args.model, args.data, **_options(args, run_eval), show_progress=sys.stderr.isatty())


def _embedder(args: argparse.Namespace) -> Any:
    from .inference import M3Embedder

    lengths = {"query_max_length": getattr(args, "query_max_len", None),  # index encodes no queries,
               "passage_max_length": getattr(args, "passage_max_len", None)}  # search no passages
    return M3Embedder(args.model, batch_size=args.batch_size, devices=getattr(args, "devices", None),
                      query_instruction_for_retrieval=getattr(args, "query_instruction_for_retrieval", None),
                      compression=compression.from_arguments(args),
                      **{k: v for k, v in lengths.items() if v is not None})


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
    weights = dict(zip(HEADS, args.hybrid_weights)) if args.hybrid_weights else embedder.hybrid_weights
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
    import torch

    from .mining import mine_hard_negatives

    if args.devices is None and torch.cuda.is_available():
        args.devices = "cuda:0"
    summary = mine_hard_negatives(_embedder(args), args.input, args.output, **_options(args, mine_hard_negatives),
                                  fill_random=not args.no_fill_random, use_faiss=False if args.no_faiss else None,
                                  show_progress=sys.stderr.isatty())
    print(json.dumps(summary, indent=2, default=str))


def _merge(args: argparse.Namespace) -> None:
    from .merge import Merger, auto_merge, save_merged

    if args.auto:
        if args.weights:
            sys.exit("flagm3 merge: --auto picks the weights: drop --weights")
        if not args.eval_data:
            sys.exit("flagm3 merge: --auto needs --eval-data (the in-domain collection with a dev split)")
        options = {"max_query_length": args.query_max_len, "max_passage_length": args.passage_max_len,
                   "batch_size": args.batch_size, "max_corpus_size": args.max_corpus_size}
        model, report = auto_merge(args.models, args.eval_data, args.general_data or [], split=args.split,
                                   tolerance=args.tolerance, grid=args.grid, evaluator_options=options)
        save_merged(model, args.output, args.models[1], report)
        print(json.dumps({"output": args.output, "weights": report["weights"], "chosen": report["chosen"]},
                         indent=2))
        return
    merger = Merger(args.models)
    model = merger.merged(args.weights)
    weights = args.weights or [1 / len(args.models)] * len(args.models)
    save_merged(model, args.output, merger.template_path, {"models": args.models, "weights": weights})
    print(json.dumps({"output": args.output, "models": args.models, "weights": weights}))


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


DESCRIPTION = """flagm3: train and serve BGE-M3-style retrievers (dense, sparse and ColBERT heads on one encoder).

Every option may be spelled with dashes or underscores (--batch-size, --batch_size). `flagm3 COMMAND --help`
lists a command's options with their defaults."""

MODEL_HELP = "Model directory or hub id: a flagm3 checkpoint, the BGE-M3 layout, or an ONNX export (flagm3 export)."
QUERY_INSTRUCTION_HELP = "Instruction put before every query (FlagEmbedding's query_instruction_for_retrieval)."


def add_model_option(p: ConventionParser, help: str = MODEL_HELP) -> None:
    """``--model`` (``--model-name-or-path``, train's name, is an alias)."""
    p.add_argument("--model", required=True, help=help)
    p.add_alias("--model-name-or-path", "--model")


def add_length_options(p: ConventionParser, query: Optional[int], passage: Optional[int],
                       dests: tuple[str, str] = ("query_max_len", "passage_max_len")) -> None:
    """``--query-max-len`` / ``--passage-max-len``, FlagEmbedding's and ``flagm3 train``'s names (``None``: the
    subcommand encodes no such texts); the former ``--max-query-length`` / ``--max-passage-length`` are aliases."""
    if query is not None:
        p.add_argument("--query-max-len", type=int, default=query, dest=dests[0], metavar="TOKENS",
                       help="Queries are truncated to this many tokens.")
        p.add_alias("--max-query-length", "--query-max-len")
    if passage is not None:
        p.add_argument("--passage-max-len", type=int, default=passage, dest=dests[1], metavar="TOKENS",
                       help="Passages are truncated to this many tokens.")
        p.add_alias("--max-passage-length", "--passage-max-len")


def add_query_instruction_option(p: ConventionParser) -> None:
    p.add_argument("--query-instruction-for-retrieval", dest="query_instruction_for_retrieval", metavar="TEXT",
                   help=QUERY_INSTRUCTION_HELP)
    p.add_alias("--query-instruction", "--query-instruction-for-retrieval")


def add_hybrid_weights_option(p: ConventionParser, heads: Sequence[str], help: str, default: Any = None,
                              alias: Optional[str] = None) -> None:
    """``--hybrid-weights`` (one weight per head in ``heads``); ``alias``: a former name."""
    p.add_argument("--hybrid-weights", type=float, nargs=len(heads), default=default, dest="hybrid_weights",
                   metavar=tuple(h.upper() for h in heads), help=help)
    if alias:
        p.add_alias(alias, "--hybrid-weights")


_WEIGHTS_HELP = ("Hybrid weights (default: the model's fitted hybrid_weights.json, else BGE-M3's "
                 f"{' '.join(f'{BGE_M3_ENSEMBLE_WEIGHTS[h]:g}' for h in HEADS)}).")


def build_parser() -> ConventionParser:
    """The ``flagm3`` parser (``train`` is only listed: :mod:`flagm3.arguments` parses it). Imports neither torch
    nor transformers, so ``flagm3 --help`` is fast."""
    parser = build_convention_parser(prog="flagm3", description=DESCRIPTION,
                                     formatter_class=_RawDescriptionFormatter)
    parser.add_argument("--version", action="version", version=f"flagm3 {__version__}",
                        help="Print flagm3's version and exit.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("train", help="Fine-tune an M3 model (FlagEmbedding's M3 fine-tuning arguments; "
                   "`flagm3 train --help` lists them all).", add_help=False)

    p = sub.add_parser("export", help="Convert a checkpoint to the BGE-M3 layout, flagm3's, ONNX or sentence-transformers.")
    add_model_option(p, "Model directory or hub id (flagm3 checkpoint or BGE-M3 layout).")
    p.add_argument("--output", required=True, help="Directory to write.")
    p.add_argument("--format", choices=["bge-m3", "flagm3", "onnx", "sentence-transformers"], default="bge-m3",
                   help="onnx: one graph with the three heads, run by M3Embedder(OUTPUT); sentence-transformers: "
                        "the dense head, the sparse head in OUTPUT/sparse (a SparseEncoder) and ColBERT in "
                        "OUTPUT/colbert where supported.")
    p.add_argument("--quantize", action="store_true", help="onnx: int8 dynamic quantisation of the weights.")
    compression.add_arguments(p, passage=False)
    p.set_defaults(func=_export)

    p = sub.add_parser("eval", help="Retrieval metrics of every head and hybrid on a BEIR-layout collection.")
    add_model_option(p)
    p.add_argument("--data", required=True, help="BEIR-layout directory: corpus.jsonl, queries.jsonl, qrels/.")
    p.add_argument("--split", default="test", help="Qrels split to evaluate (qrels/<split>.tsv).")
    p.add_argument("--output", help="Write the metrics (and the weights --fit-weights fitted) as JSON here.")
    p.add_argument("--batch-size", type=int, default=64, help="Texts per forward pass.")
    add_length_options(p, 512, 512, dests=("max_query_length", "max_passage_length"))
    add_hybrid_weights_option(p, HEADS, _WEIGHTS_HELP, alias="--weights")
    p.add_argument("--fp16", action="store_true", dest="use_fp16", help="Encode in float16 (ignored on CPU).")
    p.add_argument("--heads", nargs="+", default=list(HEADS), choices=HEADS,
                   help="Heads to rank with (the hybrids of the heads given are added).")
    p.add_argument("--k-values", type=int, nargs="+", default=[1, 10, 100], help="Cut-offs k of the metrics.")
    p.add_argument("--colbert-mode", choices=["full", "rerank"], default="full",
                   help="Score the whole corpus with ColBERT, or rerank the top of the dense+sparse ranking.")
    p.add_argument("--rerank-depth", type=int, default=100,
                   help="With --colbert-mode rerank (and the qdrant backend's hybrids): first-pass documents rescored.")
    p.add_argument("--max-corpus-size", type=int, help="Subsample the corpus (seeded; judged documents are kept).")
    p.add_argument("--max-queries", type=int, help="Evaluate a seeded sample of this many judged queries.")
    add_query_instruction_option(p)
    p.add_argument("--device", dest="devices", metavar="DEVICE", help="e.g. cuda:0 (default: the first GPU, else the CPU).")
    p.add_argument("--backend", choices=["default", "qdrant"], default="default",
                   help="qdrant: index the corpus into Qdrant and retrieve through it (exact search).")
    p.add_argument("--qdrant", help="Qdrant backend: a directory, :memory: or a server URL "
                                    "(default: a temporary embedded index).")
    p.add_argument("--collection", default="flagm3-eval", help="Qdrant backend: the collection.")
    p.add_argument("--corpus-dir", metavar="DIR",
                   help="Keep the corpus's ids and texts on disk in DIR (written as corpus.jsonl is read, read back by "
                        "row) instead of in memory: memory does not grow with the corpus's texts. Default: in memory.")
    p.add_argument("--fit-weights", metavar="SPLIT",
                   help="First fit the hybrid weights on this split (e.g. dev) and evaluate with them; they are "
                        "printed and written to --output, never beside the model.")
    compression.add_arguments(p)
    p.set_defaults(func=_eval)

    def serving_args(p: ConventionParser) -> None:
        add_model_option(p, "Model directory (flagm3, BGE-M3 layout or ONNX export).")
        p.add_argument("--qdrant", required=True,
                       help="Qdrant: a directory (embedded local mode), :memory:, or a server URL http(s)://...")
        p.add_argument("--collection", required=True, help="Qdrant collection (one per model).")
        p.add_argument("--batch-size", type=int, default=32, help="Texts per forward pass.")

    p = sub.add_parser("index", help="Index a corpus into Qdrant with all three heads (resumable).")
    serving_args(p)
    add_length_options(p, None, 512)
    p.add_argument("--corpus", required=True, help="BEIR corpus.jsonl (_id, title, text).")
    p.add_argument("--chunk-size", type=int, default=256, help="Documents encoded and upserted at a time.")
    p.add_argument("--no-text", action="store_true", help="Do not store the passage text in the payload.")
    compression.add_arguments(p, quantization=True)
    p.set_defaults(func=_index)

    p = sub.add_parser("search", help="Search a Qdrant index: one head or the hybrid.")
    serving_args(p)
    add_length_options(p, 512, None)
    add_query_instruction_option(p)
    p.add_argument("--query", required=True, nargs="+", help="One or more query texts.")
    p.add_argument("--mode", choices=["dense", "sparse", "colbert", "hybrid"], default="hybrid",
                   help="One head, or dense + sparse candidates fused (see --fusion).")
    p.add_argument("--fusion", choices=["weights", "rrf"], default="weights",
                   help="Hybrid: weighted sum of exact head scores, or reciprocal rank fusion.")
    p.add_argument("--rerank", action="store_true", help="Hybrid: rerank the candidates with ColBERT.")
    add_hybrid_weights_option(p, HEADS, _WEIGHTS_HELP, alias="--weights")
    p.add_argument("--limit", type=int, default=10, help="Hits per query.")
    p.add_argument("--prefetch-limit", type=int, default=100, help="Hybrid: candidates per head.")
    p.add_argument("--exact", action="store_true", help="Exact search (no HNSW approximation).")
    compression.add_arguments(p, passage=False)
    p.set_defaults(func=_search)

    p = sub.add_parser("mine", help="Mine hard negatives for a training JSONL.")
    add_model_option(p)
    p.add_argument("--input", required=True, help="Training JSONL to mine negatives for.")
    p.add_alias("--input-file", "--input")  # FlagEmbedding's hn_mine names
    p.add_argument("--output", required=True, help="The training JSONL to write, with the mined negatives.")
    p.add_alias("--output-file", "--output")
    p.add_argument("--candidate-pool", help="JSONL of passages (default: all pos/neg of the input).")
    p.add_argument("--range", type=int, nargs=2, default=[10, 100], metavar=("FROM", "TO"), dest="range_for_sampling",
                   help="0-based ranks [FROM, TO) of the ranking to draw negatives from.")
    p.add_argument("--negative-number", type=int, default=15, help="Negatives per line.")
    p.add_argument("--hybrid", action="store_true", dest="use_hybrid", help="Rank by dense + sparse instead of dense.")
    add_hybrid_weights_option(p, ("dense", "sparse"), "Weights of the dense and sparse scores with --hybrid.",
                              default=[BGE_M3_ENSEMBLE_WEIGHTS["dense"], BGE_M3_ENSEMBLE_WEIGHTS["sparse"]])
    p.add_argument("--teacher-scores", action="store_true",
                   help="Write pos_scores/neg_scores: the mining scores divided by --teacher-score-temperature.")
    p.add_argument("--teacher-score-temperature", type=float, default=0.02,
                   help="Scores are written as score / this (logits for flagm3 train --teacher_temperature 1).")
    p.add_argument("--no-fill-random", action="store_true",
                   help="Keep fewer negatives when the rank window is short (default: fill from lower ranks).")
    p.add_argument("--no-faiss", action="store_true", help="Search with torch even when faiss is installed.")
    p.add_argument("--index-dir", metavar="DIR",
                   help="Write the candidates' dense vectors to DIR as they are encoded and search them from disk "
                        "chunk by chunk: memory bounded by the window and the chunk, not the pool (dense only; "
                        "the same negatives). Default: in memory.")
    p.add_argument("--index-backend", choices=["faiss", "qdrant", "torch"],
                   help="--index-dir: faiss (flat inner product per chunk), a local Qdrant collection in DIR, or "
                        "torch (default: torch on a GPU, else faiss where installed, else Qdrant).")
    p.add_argument("--device", dest="devices", metavar="DEVICE",
                   help="e.g. cuda:0: encode and search there (default: the first GPU, else the CPU).")
    p.add_argument("--false-negative-fraction", type=float, metavar="F",
                   help="Drop candidates scoring above F times the positive's score (likely false negatives; the "
                        "mining score, or the line's teacher pos_scores/neg_scores where given), e.g. 0.95; the "
                        "summary counts them (default: keep all).")
    add_query_instruction_option(p)
    p.add_argument("--batch-size", type=int, default=64, help="Texts per forward pass.")
    add_length_options(p, 64, 512)
    p.add_argument("--seed", type=int, default=42, help="Random seed of the draw.")
    p.set_defaults(func=_mine)

    p = sub.add_parser("merge", help="Merge whole M3 models linearly (encoder and heads; LM-Cocktail's method).")
    p.add_argument("--models", nargs="+", required=True,
                   help="flagm3 / BGE-M3-layout checkpoints (a plain encoder contributes to the encoder only); "
                        "with --auto: the base model, then the fine-tuned one.")
    p.add_argument("--weights", type=float, nargs="+", help="One weight per model, summing to 1 (default: equal).")
    p.add_argument("--output", required=True, help="Directory of the merged flagm3 checkpoint.")
    p.add_argument("--auto", action="store_true",
                   help="Pick the fine-tuned model's weight on dev splits: the best in-domain metric whose general "
                        "collections stay within --tolerance of the base model.")
    p.add_argument("--eval-data", help="--auto: the in-domain BEIR-layout collection.")
    p.add_argument("--general-data", nargs="+", help="--auto: one or more general-domain BEIR-layout collections.")
    p.add_argument("--split", default="dev", help="--auto: the qrels split the weights are picked on.")
    p.add_argument("--tolerance", type=float, default=0.005,
                   help="--auto: the largest loss of the main metric (all_ndcg@10) allowed on each general "
                        "collection against the base model.")
    p.add_argument("--grid", type=float, nargs="+", default=[i / 10 for i in range(11)],
                   help="--auto: the fine-tuned model's weights tried (0 = the base model, always tried).")
    p.add_argument("--batch-size", type=int, default=64, help="--auto: texts per forward pass.")
    add_length_options(p, 64, 256)
    p.add_argument("--max-corpus-size", type=int,
                   help="--auto: subsample each corpus to this many documents (judged ones kept).")
    p.set_defaults(func=_merge)

    p = sub.add_parser("validate", help="Check training data and print a summary of every problem.")
    p.add_argument("data", nargs="+", help="JSONL files or directories of them.")
    p.add_argument("--tokenizer-name", dest="tokenizer",
                   help="Count the texts this tokenizer truncates (a directory or hub id).")
    p.add_alias("--tokenizer", "--tokenizer-name")
    add_length_options(p, 32, 128)
    p.add_argument("--no-sample-negatives-from-corpus", action="store_true", dest="no_sampled_negatives",
                   help="Records without negatives are errors (default: negatives come from other records, as in "
                        "training).")
    p.add_alias("--no-sampled-negatives", "--no-sample-negatives-from-corpus")
    p.set_defaults(func=_validate)

    p = sub.add_parser("demo", help="Offline demo: fine-tune all-MiniLM-L6-v2 on chatterbot-corpus Q&A.")
    p.add_argument("--output-dir", default="flagm3-demo", help="Directory for the model, data, metrics and plot.")
    p.add_argument("--max-steps", type=int, default=None, help="Training steps (default: the preset's).")
    p.add_argument("--quick", action="store_true", help="A tiny run for smoke tests.")
    p.set_defaults(func=_demo)
    return parser


class _RawDescriptionFormatter(ConventionFormatter, argparse.RawDescriptionHelpFormatter):
    """The top-level description keeps its line breaks."""


def _check_inputs(args: argparse.Namespace) -> None:
    """Missing models and files named on the command line, found before anything loads."""
    for option, name in (("model", "--model"), ("tokenizer", "--tokenizer-name")):
        check_model(getattr(args, option, None), name)
    for model in getattr(args, "models", None) or []:
        check_model(model, "--models")
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
    models = {"--model": getattr(args, "model", None), "--tokenizer-name": getattr(args, "tokenizer", None)}
    with user_errors(f"flagm3 {args.command}", models):
        _check_inputs(args)
        args.func(args)


if __name__ == "__main__":
    main()
