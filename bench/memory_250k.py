"""Workload 2: training memory with a 250k-token vocabulary, flagm3 vs FlagEmbedding, and the largest batch
each fits in a memory budget. Run with flagm3's python:

    python bench/memory_250k.py --reference-python $FE_PY [--budget-gib 16] [--max-batch 256]
        [--timeout 900] [--out bench/results/memory_250k.json]
    python bench/memory_250k.py trial --batch-size B [--steps 2]      (one flagm3 trial; used internally)

The model, tokenizer and data come from `bench/reference_memory_250k.py prepare` (run here if missing): a
random 2-layer BERT (hidden 128, vocabulary 250,002), a word-level tokenizer over the whole vocabulary, and
Cranfield train rewritten into those tokens; both implementations train on exactly these files, unified +
self-distill, group 4, q64/p256, fp32, CPU, two optimizer steps per trial.

Every trial is a child process whose address space is capped with RLIMIT_AS (set in the child before it
starts) and that is killed after --timeout seconds: running out of memory ends that trial with an allocation
error, never the machine. The cap is --budget-gib, lowered to (available memory - --reserve-gib) when the
machine has less free (the JSON records the cap used). A batch "fits" when its two steps finish under the
cap; note an address-space cap is stricter than the same amount of RSS (it counts reserved, unused memory).
Batch sizes (queries per step) double from --start-batch (1) while they fit, up to --max-batch (the search is
capped there); peak RSS is compared at --compare-batch (4). `projected_max_batch_in_budget` extrapolates peak
RSS linearly from the two largest batches that fitted to the full budget (useful when the cap was lowered).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, WORK_DIR, peak_rss_mb, write_json  # noqa: E402
from reference_memory_250k import DEFAULT_DIR  # noqa: E402

GIB = 1 << 30


def flagm3_trial(directory: Path, batch_size: int, steps: int, group_size: int) -> dict:
    """flagm3's trainer for `steps` steps at `batch_size` queries (same settings as the reference trial)."""
    import tempfile

    from flagm3.train import build_trainer, parse_args

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=WORK_DIR) as out:
        flags = [
            "--model_name_or_path", str(directory / "model"), "--train_data", str(directory / "train.jsonl"),
            "--output_dir", out, "--train_group_size", str(group_size), "--query_max_len", "64",
            "--passage_max_len", "256", "--per_device_train_batch_size", str(batch_size), "--learning_rate", "2e-5",
            "--max_steps", str(steps), "--temperature", "0.02", "--unified_finetuning", "True",
            "--use_self_distill", "True", "--sentence_pooling_method", "cls", "--normalize_embeddings", "True",
            "--seed", "42", "--use_cpu", "True", "--save_strategy", "no", "--report_to", "none",
            "--disable_tqdm", "True", "--dataloader_num_workers", "0",
        ]
        trainer = build_trainer(*parse_args(flags))
        trainer.train()
    return {"implementation": "flagm3", "batch_size": batch_size, "group_size": group_size, "steps": steps,
            "peak_rss_mb": peak_rss_mb(), "seconds": time.perf_counter() - t0}


def available_bytes() -> int:
    """Memory the kernel reports as available (MemAvailable)."""
    import psutil

    return int(psutil.virtual_memory().available)


def run_trial(command: list[str], cap_bytes: int, timeout: float) -> dict:
    """Run one trial in a child capped at `cap_bytes` of address space; parse its last JSON line."""

    def limit() -> None:  # runs in the child, before exec
        resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))

    t0 = time.perf_counter()
    try:
        proc = subprocess.run(command, preexec_fn=limit, capture_output=True, text=True, timeout=timeout,
                              cwd=REPO_ROOT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    except subprocess.TimeoutExpired:
        return {"fits": False, "reason": f"timeout after {timeout:.0f} s", "seconds": time.perf_counter() - t0}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        return {"fits": True, **json.loads(lines[-1])}
    err = proc.stderr.strip().splitlines()
    oom = any(s in proc.stderr for s in ("can't allocate memory", "MemoryError", "out of memory", "std::bad_alloc"))
    return {"fits": False, "reason": ("out of memory: " if oom else f"exit {proc.returncode}: ") + (err[-1] if err else ""),
            "seconds": time.perf_counter() - t0}


def search(name: str, command: list[str], args: argparse.Namespace, cap_for_trial) -> dict:
    """Doubling search from batch 4 to --max-batch; stops at the first batch that does not fit."""
    trials, best = [], None
    batch = args.start_batch
    while batch <= args.max_batch:
        cap = cap_for_trial()
        result = run_trial(command + ["--batch-size", str(batch)], cap, args.timeout)
        result.update(batch_size=batch, cap_gib=cap / GIB)
        trials.append(result)
        print(f"[memory_250k] {name} batch {batch}: "
              + (f"fits, peak RSS {result['peak_rss_mb']:.0f} MB, {result['seconds']:.0f} s" if result["fits"]
                 else f"does not fit ({result['reason'][:160]})"), file=sys.stderr, flush=True)
        if not result["fits"]:
            break
        best = batch
        batch *= 2
    batch = args.start_batch // 2
    while best is None and batch >= 1:  # the start batch does not fit: look below it
        cap = cap_for_trial()
        result = run_trial(command + ["--batch-size", str(batch)], cap, args.timeout)
        result.update(batch_size=batch, cap_gib=cap / GIB)
        trials.append(result)
        best = batch if result["fits"] else None
        batch //= 2
    fitted = sorted((t["batch_size"], t["peak_rss_mb"]) for t in trials if t["fits"])
    at = {b: rss for b, rss in fitted}
    return {"trials": trials, "max_batch": best, "search_capped": best is not None and best * 2 > args.max_batch,
            "peak_rss_mb_by_batch": at, "peak_rss_mb_at_compare_batch": at.get(args.compare_batch),
            "projected_max_batch_in_budget": project(fitted, args.budget_gib)}


def project(fitted: list[tuple[int, float]], budget_gib: float) -> int | None:
    """Largest power-of-two batch whose peak RSS, extrapolated linearly from the two largest batches that
    fitted, stays within the budget (a projection, reported apart from the measured maximum)."""
    if len(fitted) < 2:
        return None
    (b0, m0), (b1, m1) = fitted[-2], fitted[-1]
    slope = max((m1 - m0) / (b1 - b0), 1e-9)
    batch = b1
    while m1 + slope * (batch * 2 - b1) <= budget_gib * 1024 and batch < 1 << 20:
        batch *= 2
    return batch


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["trial"]:
        p = argparse.ArgumentParser()
        p.add_argument("--dir", default=str(DEFAULT_DIR))
        p.add_argument("--batch-size", type=int, default=4)
        p.add_argument("--group-size", type=int, default=4)
        p.add_argument("--steps", type=int, default=2)
        a = p.parse_args(argv[1:])
        print(json.dumps(flagm3_trial(Path(a.dir), a.batch_size, a.steps, a.group_size)))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference-python", default=os.environ.get("FLAGM3_REFERENCE_PYTHON"), required=False)
    p.add_argument("--dir", default=str(DEFAULT_DIR))
    p.add_argument("--budget-gib", type=float, default=16.0)
    p.add_argument("--reserve-gib", type=float, default=2.0, help="memory left to the rest of the machine")
    p.add_argument("--start-batch", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--compare-batch", type=int, default=4, help="batch at which peak memory is compared")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per trial")
    p.add_argument("--only", choices=["flagm3", "reference"], help="search one implementation only")
    p.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "memory_250k.json"))
    p.add_argument("--combine", nargs=2, metavar=("FLAGM3_JSON", "REFERENCE_JSON"),
                   help="no trials: take each side's search from an earlier run's JSON and compare them")
    args = p.parse_args(argv)
    if args.combine:
        return write_json(args.out, combine(*map(Path, args.combine)))
    if not args.reference_python and args.only != "flagm3":
        sys.exit("ERROR: --reference-python (or $FLAGM3_REFERENCE_PYTHON) is required: the FlagEmbedding venv")
    directory = Path(args.dir)
    here = Path(__file__).resolve().parent
    if not (directory / "train.jsonl").is_file() and args.reference_python:
        subprocess.run([args.reference_python, str(here / "reference_memory_250k.py"), "prepare", "--dir",
                        str(directory)], check=True)
    budget = int(args.budget_gib * GIB)
    reserve = int(args.reserve_gib * GIB)
    caps_seen: list[float] = []

    def cap_for_trial() -> int:
        cap = min(budget, available_bytes() - reserve)
        if cap < GIB:
            sys.exit(f"ERROR: only {available_bytes() / GIB:.1f} GiB available: too little for a trial")
        caps_seen.append(cap / GIB)
        return cap

    common = ["--dir", str(directory), "--steps", str(args.steps)]
    commands = {
        "flagm3": [sys.executable, str(here / "memory_250k.py"), "trial", *common],
        "reference": [args.reference_python or "", str(here / "reference_memory_250k.py"), "trial", *common],
    }
    results = {name: search(name, cmd, args, cap_for_trial) for name, cmd in commands.items()
               if args.only in (None, name)}
    write_json(args.out, compare({
        "workload": "250k vocabulary: random 2-layer BERT (hidden 128), unified + self-distill, group 4, q64/p256, "
                    f"fp32 CPU, {args.steps} optimizer steps per trial",
        "budget_gib": args.budget_gib,
        "cap_gib_min": min(caps_seen) if caps_seen else None,
        "cap_reduced": bool(caps_seen) and min(caps_seen) < args.budget_gib,
        "limit": "RLIMIT_AS (address space) per child process + timeout",
        "start_batch": args.start_batch, "max_batch_searched": args.max_batch,
        "compare_batch": args.compare_batch,
        **results,
    }))


def combine(flagm3_json: Path, reference_json: Path) -> dict:
    """One comparison from two runs' JSONs: flagm3's search from the first, the reference's from the second."""
    a, b = json.loads(flagm3_json.read_text()), json.loads(reference_json.read_text())
    if a["compare_batch"] != b["compare_batch"] or a["workload"] != b["workload"]:
        sys.exit(f"ERROR: {flagm3_json} and {reference_json} are not the same workload / compare batch")
    caps = [x["cap_gib_min"] for x in (a, b) if x.get("cap_gib_min")]
    out = {**a, "flagm3": a["flagm3"], "reference": b["reference"], "cap_gib_min": min(caps),
           "cap_reduced": a["cap_reduced"] or b["cap_reduced"],
           "max_batch_searched": {"flagm3": a["max_batch_searched"], "reference": b["max_batch_searched"]},
           "combined_from": {"flagm3": str(flagm3_json), "reference": str(reference_json)}}
    for key in ("peak_rss_ratio_at_compare_batch", "max_batch_ratio", "note"):
        out.pop(key, None)
    return compare(out)


def compare(out: dict) -> dict:
    """Add the flagm3 / reference ratios when both sides were searched."""
    if "flagm3" not in out or "reference" not in out:
        return out
    f, r = out["flagm3"], out["reference"]
    if f["peak_rss_mb_at_compare_batch"] and r["peak_rss_mb_at_compare_batch"]:
        out["peak_rss_ratio_at_compare_batch"] = f["peak_rss_mb_at_compare_batch"] / r["peak_rss_mb_at_compare_batch"]
    if f["max_batch"] and r["max_batch"]:
        out["max_batch_ratio"] = f["max_batch"] / r["max_batch"]
    elif f["max_batch"]:
        out["max_batch_ratio"] = None
        out["note"] = "the reference does not fit even batch 1 under the cap"
    return out


if __name__ == "__main__":
    main()
