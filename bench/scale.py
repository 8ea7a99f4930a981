"""How start-up, memory, evaluation and mining grow with the data: flagm3 beside FlagEmbedding, in one run.

    python bench/scale.py [--train-sizes 10000,100000,1000000] [--minilm-size 10000]
        [--corpus-sizes 10000,100000,1000000] [--steps 4] [--out bench/results/scale.json]
        [--plot bench/results/scale.png] [--reference-python ~/.cache/flagm3/fe-venv/bin/python]

Training start-up: synthetic training files (query, 1 positive, 7 negatives, every text unique; 9 texts of about
60 characters a record), one process per run, started fresh (flagm3 with an empty ``--cache_path``; FlagEmbedding
with an empty datasets cache). Settings for both: batch 4 x group 8, q32/p128, ``--max_steps`` steps, CPU fp32,
no checkpoint, FlagEmbedding's unified + self-distill flags; flagm3's default recipe (so its fresh sparse head is
fitted to the passages' IDF, which FlagEmbedding does not do). Models: a tiny random BERT (2 layers, hidden 32,
all-MiniLM-L6-v2's vocabulary and tokenizer) so that the encoder does not dominate, and all-MiniLM-L6-v2 at
``--minilm-size``. Measured per run: wall time from process start to the end of the first optimizer step, the
mean of the later steps' step-end-to-step-end times (steady step time), the same two in process CPU seconds
(user + sys, all threads: on a shared machine they vary far less than wall time), and the peak RSS (getrusage) of
the process (the only rank). flagm3 is also run a second time on the same file with its cache kept ("cached"):
the prepared data and the fitted sparse head (flagm3.sparse_head_cache) both come from ``--cache_path`` then, so
that run neither validates the data nor fits the head.

Evaluation and mining: a synthetic BEIR collection of N passages (short: about 10 words, ``--corpus-queries``
queries, one relevant passage each), the tiny random BERT with fresh heads saved as a flagm3 checkpoint, passages
truncated to ``--passage-max-len`` tokens, batch 256; ``flagm3 eval`` (dense, sparse, ColBERT and their hybrids,
``--colbert-mode``) with the corpus in memory (up to ``--in-memory-max`` passages) and with ``--corpus-dir`` (its
ids and texts on disk), ``flagm3 mine`` in memory (up to ``--in-memory-max``) and ``flagm3 mine --index-dir``
(the pool's dense vectors and texts written to disk, searched chunk by chunk, faiss), each in its own process, the
N passages as the candidate pool: wall time, CPU seconds (user + sys) and peak RSS.

The table goes to stdout, the numbers to ``--out`` (JSON), the growth curves to ``--plot``. The machine this
runs on is usually shared: compare ratios within one run, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK_DIR, write_json  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_REFERENCE = Path.home() / ".cache" / "flagm3" / "fe-venv" / "bin" / "python"
WORDS = ("lift drag wing flow shock boundary layer supersonic cylinder pressure heat transfer plate cone wake "
         "mach number vortex jet nozzle panel flutter buckling shell load stress").split()


# ----------------------------------------------------------------------------------------------------------- data
def text(rng, i: int, kind: str) -> str:
    return f"{kind} {i} " + " ".join(rng.choices(WORDS, k=8))


def synthetic_train(path: Path, n: int, negatives: int = 7) -> Path:
    """``n`` records (query, 1 positive, ``negatives`` negatives), every text unique; written once."""
    if path.is_file():
        return path
    import random

    rng = random.Random(n)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".tmp"), "w", encoding="utf-8") as f:
        for i in range(n):
            record = {"query": text(rng, i, "query"), "pos": [text(rng, i, "positive")],
                      "neg": [text(rng, i * negatives + j, "negative") for j in range(negatives)]}
            f.write(json.dumps(record) + "\n")
    os.replace(path.with_suffix(".tmp"), path)
    return path


def synthetic_beir(directory: Path, n: int, n_queries: int = 100) -> Path:
    """A BEIR-layout collection of ``n`` passages and ``n_queries`` queries (query i judges passage i)."""
    if (directory / "qrels" / "test.tsv").is_file():
        return directory
    import random

    rng = random.Random(n)
    (directory / "qrels").mkdir(parents=True, exist_ok=True)
    with open(directory / "corpus.jsonl", "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"_id": f"d{i}", "title": "", "text": text(rng, i, "passage")}) + "\n")
    with open(directory / "queries.jsonl", "w", encoding="utf-8") as f:
        for i in range(n_queries):
            f.write(json.dumps({"_id": f"q{i}", "text": text(rng, i, "query")}) + "\n")
    with open(directory / "qrels" / "test.tsv", "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(n_queries)))
    with open(directory / "mine_input.jsonl", "w", encoding="utf-8") as f:
        for i in range(n_queries):
            f.write(json.dumps({"query": text(rng, i, "query"), "pos": [text(rng, i, "passage")]}) + "\n")
    with open(directory / "pool.jsonl", "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"text": text(rng, i, "passage")}) + "\n")
    return directory


def tiny_bert(target: Path) -> Path:
    """A random 2-layer BERT (hidden 32) with all-MiniLM-L6-v2's tokenizer (eos = SEP, as FlagEmbedding needs)."""
    if (target / "config.json").is_file():
        return target
    import torch
    from reference_train import prepare_base_model
    from transformers import AutoTokenizer, BertConfig, BertModel

    base = prepare_base_model(WORK_DIR / "base_minilm_eos")
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    BertModel(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


# -------------------------------------------------------------------------------------------------------- workers
def _timer():
    from transformers import TrainerCallback

    class FirstSteps(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

            self.cpu: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.time())
            self.cpu.append(time.process_time())

    return FirstSteps()


def _report(out: str, timer) -> None:
    steps = [b - a for a, b in zip(timer.ends, timer.ends[1:])]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    cpu_steps = [b - a for a, b in zip(timer.cpu, timer.cpu[1:])]
    Path(out).write_text(json.dumps({"first_step_end": timer.ends[0], "steady_step_s": sum(steps) / max(len(steps), 1),
                                     "cpu_first_step_s": timer.cpu[0],
                                     "cpu_steady_step_s": sum(cpu_steps) / max(len(cpu_steps), 1),
                                     "peak_rss_mb": peak}))


def worker_flagm3(args) -> None:
    sys.path.insert(0, str(REPO))
    from flagm3.train import build_trainer, parse_args

    flags = ["--model_name_or_path", args.model, "--train_data", args.data, "--output_dir", args.output_dir,
             "--cache_path", args.cache, "--per_device_train_batch_size", "4", "--train_group_size", "8",
             "--query_max_len", "32", "--passage_max_len", "128", "--max_steps", str(args.steps),
             "--save_strategy", "no", "--use_cpu", "True", "--report_to", "none", "--disable_tqdm", "True",
             "--dataloader_num_workers", "0", "--logging_steps", "1000", "--seed", "42"]
    trainer = build_trainer(*parse_args(flags))
    timer = _timer()
    trainer.add_callback(timer)
    trainer.train()
    _report(args.out, timer)


def worker_reference(args) -> None:
    from FlagEmbedding.finetune.embedder.encoder_only.m3 import (
        EncoderOnlyEmbedderM3DataArguments,
        EncoderOnlyEmbedderM3ModelArguments,
        EncoderOnlyEmbedderM3Runner,
        EncoderOnlyEmbedderM3TrainingArguments,
    )
    from transformers import HfArgumentParser

    flags = ["--model_name_or_path", args.model, "--train_data", args.data, "--output_dir", args.output_dir,
             "--cache_path", args.cache, "--train_group_size", "8", "--query_max_len", "32",
             "--passage_max_len", "128", "--per_device_train_batch_size", "4", "--learning_rate", "2e-5",
             "--max_steps", str(args.steps), "--temperature", "0.02", "--unified_finetuning", "True",
             "--use_self_distill", "True", "--sentence_pooling_method", "cls", "--normalize_embeddings", "True",
             "--seed", "42", "--use_cpu", "True", "--save_strategy", "no", "--logging_steps", "1000",
             "--report_to", "none", "--disable_tqdm", "True", "--dataloader_num_workers", "0"]
    parser = HfArgumentParser((EncoderOnlyEmbedderM3ModelArguments, EncoderOnlyEmbedderM3DataArguments,
                               EncoderOnlyEmbedderM3TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=flags)
    timer = _timer()

    class Runner(EncoderOnlyEmbedderM3Runner):
        def load_trainer(self):
            trainer = super().load_trainer()
            trainer.add_callback(timer)
            return trainer

        def run(self):  # train only: no final save
            self.trainer.train()

    Runner(model_args=model_args, data_args=data_args, training_args=training_args).run()
    _report(args.out, timer)


# ---------------------------------------------------------------------------------------------------- orchestration
def run_training(python: str, mode: str, model: Path, data: Path, steps: int, cache: Path) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix=f"scale-{mode}-"))
    out = scratch / "result.json"
    cmd = [python, __file__, f"worker-{mode}", "--model", str(model), "--data", str(data), "--steps", str(steps),
           "--out", str(out), "--output-dir", str(scratch / "model"), "--cache", str(cache)]
    env = {**os.environ, "PYTHONPATH": str(REPO) if mode == "flagm3" else "", "TOKENIZERS_PARALLELISM": "false"}
    start = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - start
    try:
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}",
                    "wall_s": wall}
        result = json.loads(out.read_text())
        return {"first_step_s": result["first_step_end"] - start, "steady_step_s": result["steady_step_s"],
                "cpu_first_step_s": result["cpu_first_step_s"], "cpu_steady_step_s": result["cpu_steady_step_s"],
                "peak_rss_mb": result["peak_rss_mb"], "wall_s": wall}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_command(cmd: list[str], threads: int = 0) -> dict:
    """Wall time, CPU seconds (user + sys) and peak RSS (the child's getrusage, through /usr/bin/time's format)
    of one command; ``threads`` > 0 sets its torch/OpenMP threads."""
    start = time.time()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if threads > 0:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", *cmd], capture_output=True, text=True, env=env)
    wall = time.time() - start
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-2:][0], "wall_s": wall}
    peak_kb, user, system = proc.stderr.strip().splitlines()[-1].split()
    return {"wall_s": wall, "cpu_s": float(user) + float(system), "peak_rss_mb": int(peak_kb) / 1024.0}


def flagm3_checkpoint(target: Path, encoder: Path) -> Path:
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoTokenizer

    sys.path.insert(0, str(REPO))
    from flagm3 import M3Model

    tokenizer = AutoTokenizer.from_pretrained(encoder)
    torch.manual_seed(0)
    M3Model.from_encoder(str(encoder), tokenizer=tokenizer).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def sizes(value: str) -> list[int]:
    return [int(v) for v in value.split(",") if v.strip() and int(v) > 0] if value else []  # "0": none


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("worker-"):
        p = argparse.ArgumentParser()
        for name in ("--model", "--data", "--out", "--output-dir", "--cache"):
            p.add_argument(name, required=True)
        p.add_argument("--steps", type=int, default=4)
        args = p.parse_args(sys.argv[2:])
        {"worker-flagm3": worker_flagm3, "worker-reference": worker_reference}[sys.argv[1]](args)
        return

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-sizes", default="10000,100000,1000000")
    p.add_argument("--minilm-size", type=int, default=10000, help="0: no all-MiniLM-L6-v2 row")
    p.add_argument("--corpus-sizes", default="10000,100000,1000000")
    p.add_argument("--corpus-queries", type=int, default=100, help="queries of the eval and mine rows")
    p.add_argument("--passage-max-len", type=int, default=32, help="eval and mine rows: passage tokens")
    p.add_argument("--colbert-mode", choices=["full", "rerank"], default="full", help="eval rows")
    p.add_argument("--corpus-threads", type=int, default=1,
                   help="eval and mine rows: OMP_NUM_THREADS of the process (0: torch's default). On the shared "
                        "2-core machine two threads contending with other processes took 1.8x the CPU time of one")
    p.add_argument("--in-memory-max", type=int, default=100000,
                   help="larger corpora are evaluated only with --corpus-dir and mined only with --index-dir")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--reference-python", default=str(DEFAULT_REFERENCE))
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "scale.json"))
    p.add_argument("--plot", default=str(REPO / "bench" / "results" / "scale.png"))
    args = p.parse_args()

    work = WORK_DIR / "scale"
    tiny = tiny_bert(work / "tiny_bert")
    from reference_train import prepare_base_model

    minilm = prepare_base_model(WORK_DIR / "base_minilm_eos")
    reference = args.reference_python if Path(args.reference_python).is_file() else None
    runs = [("tiny", tiny, n) for n in sizes(args.train_sizes)]
    if args.minilm_size:
        runs.append(("minilm", minilm, args.minilm_size))
    rows = []
    for model_name, model, n in runs:
        data = synthetic_train(work / f"train_{n}.jsonl", n)
        cache = Path(tempfile.mkdtemp(prefix="scale-cache-"))
        try:
            flagm3 = run_training(sys.executable, "flagm3", model, data, args.steps, cache)
            cached = run_training(sys.executable, "flagm3", model, data, args.steps, cache)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        ref_cache = Path(tempfile.mkdtemp(prefix="scale-ref-cache-"))
        try:
            ref = run_training(reference, "reference", model, data, args.steps, ref_cache) if reference else {}
        finally:
            shutil.rmtree(ref_cache, ignore_errors=True)
        rows.append({"model": model_name, "records": n, "flagm3": flagm3, "flagm3_cached": cached,
                     "flagembedding": ref})
        print(json.dumps(rows[-1]), flush=True)

    checkpoint = flagm3_checkpoint(work / "tiny_m3", tiny)
    corpus_rows = []
    for n in sizes(args.corpus_sizes):
        beir = synthetic_beir(work / f"beir_{n}_q{args.corpus_queries}", n, args.corpus_queries)
        length = ["--batch-size", "256", "--passage-max-len", str(args.passage_max_len)]
        evaluate = [sys.executable, "-m", "flagm3", "eval", "--model", str(checkpoint), "--data", str(beir),
                    "--split", "test", "--colbert-mode", args.colbert_mode, *length]
        evaluation = run_command(evaluate, args.corpus_threads) if n <= args.in_memory_max else {}
        corpus_dir = work / f"corpus_{n}"
        shutil.rmtree(corpus_dir, ignore_errors=True)
        evaluation_on_disk = run_command([*evaluate, "--corpus-dir", str(corpus_dir)], args.corpus_threads)
        shutil.rmtree(corpus_dir, ignore_errors=True)
        mine = [sys.executable, "-m", "flagm3", "mine", "--model", str(checkpoint), "--input",
                str(beir / "mine_input.jsonl"), "--candidate-pool", str(beir / "pool.jsonl"),
                "--output", str(work / f"mined_{n}.jsonl"), *length]
        mining = run_command(mine, args.corpus_threads) if n <= args.in_memory_max else {}
        index = work / f"index_{n}"
        shutil.rmtree(index, ignore_errors=True)
        on_disk = run_command([*mine, "--index-dir", str(index), "--index-backend", "faiss"], args.corpus_threads)
        shutil.rmtree(index, ignore_errors=True)
        corpus_rows.append({"passages": n, "eval": evaluation, "eval_on_disk": evaluation_on_disk, "mine": mining,
                            "mine_on_disk": on_disk,
                            "queries": args.corpus_queries, "passage_max_len": args.passage_max_len,
                            "colbert_mode": args.colbert_mode, "threads": args.corpus_threads})
        print(json.dumps(corpus_rows[-1]), flush=True)

    print_tables(rows, corpus_rows)
    write_json(args.out, {"steps": args.steps, "training": rows, "corpus": corpus_rows,
                          "note": "shared 2-core machine: compare ratios within this run"})
    plot(rows, corpus_rows, args.plot)


def _cell(run: dict, key: str, fmt: str) -> str:
    return format(run[key], fmt) if run and key in run else ("error" if run and "error" in run else "-")


def print_tables(rows: list[dict], corpus_rows: list[dict]) -> None:
    print("| model | records | to first step, wall (s): flagm3 / cached / FlagEmbedding | CPU (s): flagm3 / cached / "
          "FlagEmbedding | CPU ratio cold / cached | peak RSS (MB): flagm3 / FlagEmbedding | steady step CPU (s): "
          "flagm3 / FlagEmbedding |")
    print("|---|---|---|---|---|---|---|")

    def ratio(a: dict, b: dict, key: str) -> str:
        return f"{a[key] / b[key]:.2f}" if key in a and key in b else "-"

    for r in rows:
        f, c, ref = r["flagm3"], r["flagm3_cached"], r["flagembedding"]
        print(f"| {r['model']} | {r['records']:,} | {_cell(f, 'first_step_s', '.0f')} / {_cell(c, 'first_step_s', '.0f')} "
              f"/ {_cell(ref, 'first_step_s', '.0f')} | {_cell(f, 'cpu_first_step_s', '.1f')} / "
              f"{_cell(c, 'cpu_first_step_s', '.1f')} / {_cell(ref, 'cpu_first_step_s', '.1f')} | "
              f"{ratio(f, ref, 'cpu_first_step_s')} / {ratio(c, ref, 'cpu_first_step_s')} | "
              f"{_cell(f, 'peak_rss_mb', '.0f')} / {_cell(ref, 'peak_rss_mb', '.0f')} | "
              f"{_cell(f, 'cpu_steady_step_s', '.2f')} / {_cell(ref, 'cpu_steady_step_s', '.2f')} |")
    if corpus_rows:
        print("\n| passages | wall (s): eval / eval on disk / mine / mine on disk | CPU (s): same | CPU s per 1k more "
              "passages than the row above: eval on disk / mine on disk | peak RSS (MB): eval / eval on disk / mine "
              "/ mine on disk |")
        print("|---|---|---|---|---|")
        previous: dict = {}
        for r in corpus_rows:
            runs = (r["eval"], r.get("eval_on_disk", {}), r["mine"], r.get("mine_on_disk", {}))
            per_k = " / ".join(
                f"{(run['cpu_s'] - before['cpu_s']) / (r['passages'] - previous['passages']) * 1000:.3f}"
                if "cpu_s" in run and "cpu_s" in before else "-"
                for run, before in zip((runs[1], runs[3]), (previous.get("eval_on_disk", {}),
                                                           previous.get("mine_on_disk", {}))))
            previous = r
            print(f"| {r['passages']:,} | {' / '.join(_cell(run, 'wall_s', '.1f') for run in runs)} | "
                  f"{' / '.join(_cell(run, 'cpu_s', '.1f') for run in runs)} | {per_k} | "
                  f"{' / '.join(_cell(run, 'peak_rss_mb', '.0f') for run in runs)} |")


def plot(rows: list[dict], corpus_rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    tiny = [r for r in rows if r["model"] == "tiny"]
    for key, label, ax in (("cpu_first_step_s", "CPU seconds to first step", axes[0]),
                           ("peak_rss_mb", "peak RSS (MB)", axes[1])):
        for impl, name in (("flagm3", "flagm3"), ("flagm3_cached", "flagm3 (cached)"), ("flagembedding", "FlagEmbedding")):
            points = [(r["records"], r[impl][key]) for r in tiny if key in r[impl]]
            if points:
                axes_x, axes_y = zip(*points)
                ax.plot(axes_x, axes_y, marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("training records (tiny BERT)")
        ax.set_ylabel(label)
        ax.legend()
    for key, label, ax in (("cpu_s", "CPU seconds", axes[2]), ("peak_rss_mb", "peak RSS (MB)", axes[3])):
        for what, name in (("eval", "flagm3 eval"), ("eval_on_disk", "flagm3 eval --corpus-dir"),
                           ("mine", "flagm3 mine"), ("mine_on_disk", "flagm3 mine --index-dir")):
            points = [(r["passages"], r[what][key]) for r in corpus_rows if key in r.get(what, {})]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", label=name)
        ax.set_xscale("log")
        if key == "cpu_s":
            ax.set_yscale("log")
        ax.set_xlabel("passages (tiny BERT)")
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
