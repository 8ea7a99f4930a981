"""Quality as statistics: seeds x implementations x collections, each cell trained and evaluated on its own.

    python bench/quality_seeds.py [--collections cranfield,cacm] [--impls reference,flagm3_default,flagm3_bge-m3]
        [--seeds 1,2,3] [--steps 40] [--query-max-len 32] [--passage-max-len 128] [--eval-max-length 128]
        [--split test] [--variant NAME="flagm3 train flags" ...] [--jobs 2] [--out bench/results/quality_seeds.json]

A cell is one (collection, implementation, seed): train on `<collection>_train.jsonl` (bench/make_cranfield_train.py
with FLAGM3_DATA_DIR pointing at the collection: its train split, BM25 hard negatives), then nDCG@10 / Recall@100
of every head and hybrid on `--split` through flagm3's evaluator (bench/quality.py). Implementations:
`reference` (FlagEmbedding 1.4.2, bench/reference_train.py in $FLAGM3_REFERENCE_PYTHON), `flagm3_default` (the
package's default recipe), `flagm3_bge-m3` (`--loss_preset bge-m3`), and any `--variant NAME="flags"` (flagm3's
default recipe plus those `flagm3 train` flags: the recipe experiments). Every implementation gets the same model,
data, batch (4 x group 4), learning rate (2e-5), temperature (0.02), steps and lengths. Each training and each
evaluation runs in its own process with one torch thread; `--jobs` cells run at the same time.

Finished cells are kept (bench/work/seeds/<collection>/<split>/<impl>/<seed>.json) and not rerun, so the
command resumes. The summary JSON has every cell, mean and sample standard deviation per head, the untouched
model (all-MiniLM-L6-v2 with fresh seeded heads, bench/quality.py --untouched) and BM25 per collection.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, WORK_DIR, write_json  # noqa: E402

SHARED = Path(os.environ.get("FLAGM3_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
RANKINGS = ("dense", "sparse", "colbert", "dense+sparse", "all")
BUILTIN = {"reference": None, "flagm3_default": [], "flagm3_bge-m3": ["--loss_preset", "bge-m3"]}


def collection_dir(name: str) -> Path:
    for base in (SHARED, REPO_ROOT.parent.parent / "shared" / "data"):
        if (base / name / "corpus.jsonl").is_file():
            return base / name
    raise FileNotFoundError(f"collection {name!r} not found under {SHARED} (set FLAGM3_SHARED_DATA)")


def env_for(coll: str) -> dict:
    env = dict(os.environ, FLAGM3_DATA_DIR=str(collection_dir(coll)), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def run(cmd: list[str], env: dict, log: Path) -> float:
    """Run `cmd` with its output appended to `log`; its wall seconds. Raises on failure."""
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    if rc:
        raise RuntimeError(f"exit {rc}: {shlex.join(cmd[:4])} ... (log {log})")
    return time.perf_counter() - t0


def code_version() -> str:
    """The commit the cell ran on, with ``+changes`` when flagm3/ or bench/ differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+changes" if git("status", "--porcelain", "--", "flagm3", "bench/*.py") else "")


def train_data(coll: str, python: str) -> Path:
    path = WORK_DIR / f"{coll}_train.jsonl"
    if not path.is_file():
        run([python, "bench/make_cranfield_train.py", "--out", str(path)], env_for(coll),
            WORK_DIR / "seeds" / f"make_{coll}.log")
    return path


def cell(args: argparse.Namespace, coll: str, impl: str, flags: list[str] | None, seed: int) -> dict:
    """Train and evaluate one cell (or read it back when it is done)."""
    root = WORK_DIR / "seeds" / coll
    out = root / args.split / impl / f"{seed}.json"
    if out.is_file():
        return json.loads(out.read_text())
    if args.collect_only:
        raise RuntimeError("not run")
    out.parent.mkdir(parents=True, exist_ok=True)
    code = code_version()  # before training: the code the cell runs on
    model_dir = root / "models" / impl / str(seed)
    log = out.with_suffix(".log")
    log.unlink(missing_ok=True)
    env = env_for(coll)
    common = ["--max-steps", str(args.steps), "--query-max-len", str(args.query_max_len),
              "--passage-max-len", str(args.passage_max_len), "--seed", str(seed), "--threads", "1",
              "--breakdown-repeats", "0", "--train-data", str(train_data(coll, args.python)),
              "--base-model", str(WORK_DIR / "base_minilm_eos"), "--output-dir", str(model_dir),
              "--out", str(model_dir) + ".train.json", "--overwrite"]
    if flags is None:
        cmd = [args.reference_python, "bench/reference_train.py", *common]
        evaluated = model_dir
    else:
        cmd = [args.python, "bench/flagm3_train.py", *common, "--", *flags]
        evaluated = model_dir
    train_json = Path(str(model_dir) + ".train.json")
    if train_json.is_file() and (model_dir / "config.json").is_file():  # trained already (evaluation failed)
        train_s = json.loads(train_json.read_text()).get("train_and_save_seconds", 0.0)
    else:
        train_s = run(cmd, env, log)
    t0 = time.perf_counter()
    metrics_json = out.with_suffix(".metrics.json")
    run([args.python, "-c", "import sys, json, torch; torch.set_num_threads(1); sys.path.insert(0, 'bench'); "
         "from quality import flagm3_metrics; "
         f"json.dump(flagm3_metrics({str(evaluated)!r}, {args.split!r}, 0, {args.eval_max_length}, 32), "
         f"open({str(metrics_json)!r}, 'w'))"], env, log)
    train_info = json.loads(train_json.read_text())
    result = {"collection": coll, "impl": impl, "seed": seed, "split": args.split, "flags": flags, "code": code,
              "metrics": json.loads(metrics_json.read_text()), "train_seconds": train_s,
              "eval_seconds": time.perf_counter() - t0,
              "seconds_per_step": train_info.get("seconds_per_step"), "losses": train_info.get("losses")}
    write_json(out, result)
    print(f"[seeds] {coll} {impl} seed {seed}: " + ", ".join(
        f"{r} {v['ndcg@10']:.3f}" for r, v in result["metrics"].items()) + f" ({train_s:.0f} s + "
        f"{result['eval_seconds']:.0f} s)", file=sys.stderr, flush=True)
    if not args.keep_models:
        import shutil

        shutil.rmtree(model_dir, ignore_errors=True)
    return result


def baselines(args: argparse.Namespace, coll: str) -> dict:
    """Untouched model and BM25 on the collection's split (cached)."""
    out = WORK_DIR / "seeds" / coll / args.split / "baselines.json"
    if out.is_file():
        return json.loads(out.read_text())
    if args.collect_only:
        from quality import bm25_metrics

        os.environ["FLAGM3_DATA_DIR"] = str(collection_dir(coll))
        return {"bm25": bm25_metrics(args.split, 0)}  # cheap; the untouched model is not run
    out.parent.mkdir(parents=True, exist_ok=True)
    code = ("import sys, json, torch; torch.set_num_threads(1); sys.path.insert(0, 'bench'); "
            "from quality import flagm3_metrics, bm25_metrics, make_untouched; from common import WORK_DIR; "
            "d = make_untouched(WORK_DIR / 'untouched_m3', 42); "
            f"json.dump({{'untouched': flagm3_metrics(str(d), {args.split!r}, 0, {args.eval_max_length}, 32), "
            f"'bm25': bm25_metrics({args.split!r}, 0)}}, open({str(out)!r}, 'w'))")
    run([args.python, "-c", code], env_for(coll), out.with_suffix(".log"))
    return json.loads(out.read_text())


def summarise(cells: list[dict]) -> dict:
    """{impl: {ranking: {mean, std, n, values}}} of nDCG@10 and Recall@100."""
    groups: dict[str, list[dict]] = {}
    for c in cells:
        groups.setdefault(c["impl"], []).append(c)
    summary = {}
    for impl, items in groups.items():
        summary[impl] = {}
        for r in RANKINGS:
            for key in ("ndcg@10", "recall@100"):
                vals = [c["metrics"][r][key] for c in items if r in c["metrics"]]
                if vals:
                    summary[impl].setdefault(r, {})[key] = {
                        "mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                        "n": len(vals), "values": vals}
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--collections", default="cranfield,cacm")
    p.add_argument("--impls", default="reference,flagm3_default,flagm3_bge-m3")
    p.add_argument("--variant", action="append", default=[], metavar='NAME="FLAGS"')
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--query-max-len", type=int, default=32)
    p.add_argument("--passage-max-len", type=int, default=128)
    p.add_argument("--eval-max-length", type=int, default=128)
    p.add_argument("--split", default="test")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--keep-models", action="store_true")
    p.add_argument("--no-baselines", action="store_true", help="skip the untouched model and BM25")
    p.add_argument("--collect-only", action="store_true",
                   help="run nothing: summarise the finished cells and list the others as not run")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--reference-python", default=os.environ.get(
        "FLAGM3_REFERENCE_PYTHON", str(Path.home() / ".cache" / "flagm3" / "fe-venv" / "bin" / "python")))
    p.add_argument("--out", default=None, help="summary JSON (default bench/results/quality_seeds.json)")
    p.add_argument("--note", default=None, help="a sentence on how the cells ran, kept in the summary JSON")
    args = p.parse_args()
    impls = {name: BUILTIN[name] for name in filter(None, args.impls.split(","))}
    for spec in args.variant:
        name, sep, flags = spec.partition("=")
        if not sep:
            sys.exit(f"ERROR: --variant {spec!r}: expected NAME=\"flags\"")
        impls[name] = shlex.split(flags)
    seeds = [int(s) for s in args.seeds.split(",")]
    colls = [c for c in args.collections.split(",") if c]
    t0 = time.perf_counter()
    tasks = [(c, name, flags, s) for s in seeds for c in colls for name, flags in impls.items()]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(cell, args, *t) for t in tasks]
        if args.collect_only:  # in this process, one collection after the other (FLAGM3_DATA_DIR is set)
            base = {c: baselines(args, c) for c in colls if not args.no_baselines}
        else:
            base = {c: pool.submit(baselines, args, c) for c in colls if not args.no_baselines}
        cells, failed = [], []
        for t, f in zip(tasks, futures):
            try:
                cells.append(f.result())
            except Exception as e:  # a failed cell is reported, the others still count
                failed.append({"cell": list(t[:2]) + [t[3]], "error": str(e)})
                print(f"[seeds] FAILED {t[0]} {t[1]} seed {t[3]}: {e}", file=sys.stderr, flush=True)
        base = {c: f if isinstance(f, dict) else f.result() for c, f in base.items()}
    result = {
        "settings": {k: getattr(args, k) for k in ("steps", "query_max_len", "passage_max_len", "eval_max_length",
                                                   "split", "jobs")} | {"seeds": seeds, "impls": impls},
        "wall_seconds": time.perf_counter() - t0,
        "cell_seconds": sum(c["train_seconds"] + c["eval_seconds"] for c in cells),
        "collections": {c: {"summary": summarise([x for x in cells if x["collection"] == c]),
                            **(base.get(c) or {})} for c in colls},
        "cells": cells, "failed": failed,
    }
    if args.note:
        result["note"] = args.note
    out = args.out or (REPO_ROOT / "bench" / "results" / ("quality_seeds.json" if args.split == "test"
                                                          else f"quality_seeds_{args.split}.json"))
    write_json(out, result)
    for c in colls:
        print(f"== {c} ({args.split}) nDCG@10, mean ± std over seeds", file=sys.stderr)
        for impl, s in result["collections"][c]["summary"].items():
            print(f"  {impl:28s} " + "  ".join(f"{r} {v['ndcg@10']['mean']:.3f}±{v['ndcg@10']['std']:.3f}"
                                              for r, v in s.items()), file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
