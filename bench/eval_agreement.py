"""Check flagm3's evaluator against an independent one on the same checkpoints.

    python bench/eval_agreement.py --reference-python $FE_PY \
        --pair NAME FLAGM3_DIR BGE_M3_DIR [--pair ...] [--quality bench/results/quality.json]
        [--max-docs N] [--max-length 512] [--batch-size 32] [--tolerance 0.005] [--jobs N] [--wait-pid PID]
        [--out bench/results/eval_agreement.json]

For each pair: flagm3's evaluator (bench/quality.py's `flagm3_metrics`: `run_eval`) on FLAGM3_DIR, and the
independent evaluation (bench/reference_inference.py: FlagEmbedding's BGEM3FlagModel encodings, numpy scoring,
pytrec_eval) on BGE_M3_DIR, which holds the same weights in BGE-M3 layout (for a BGE-M3 checkpoint both are
the same directory; for a flagm3 checkpoint, its `bge-m3/` export). With --quality, flagm3's numbers are taken
from bench/quality.py's JSON when it evaluated NAME with the same --max-docs and --max-length.
Pass: |nDCG@10 difference| <= --tolerance for dense and sparse on every pair (all rankings and Recall@100 are
reported as well).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, WORK_DIR, write_json  # noqa: E402
from quality import KEYS, RANKINGS, flagm3_metrics  # noqa: E402

CHECKED = ("dense", "sparse")


def reference_metrics(python: str, model_dir: str, name: str, args: argparse.Namespace) -> dict:
    """bench/reference_inference.py's quality block for `model_dir`."""
    out = WORK_DIR / f"reference_eval_{name}.json"
    subprocess.run([python, str(Path(__file__).with_name("reference_inference.py")), model_dir,
                    "--split", args.split, "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                    "--max-docs", str(args.max_docs), "--colbert-check-pairs", "200", "--out", str(out)],
                   check=True, stdout=subprocess.DEVNULL)
    quality = json.loads(out.read_text())["quality"]
    return {r: {k: float(quality[r][k]) for k in KEYS} for r in RANKINGS}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference-python", default=os.environ.get("FLAGM3_REFERENCE_PYTHON"))
    p.add_argument("--pair", nargs=3, action="append", required=True, metavar=("NAME", "FLAGM3_DIR", "BGE_M3_DIR"))
    p.add_argument("--quality", default=None, help="reuse flagm3's metrics from bench/quality.py's JSON")
    p.add_argument("--split", default="test")
    p.add_argument("--max-docs", type=int, default=0)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tolerance", type=float, default=0.005)
    p.add_argument("--jobs", type=int, default=1, help="reference evaluations run at the same time")
    p.add_argument("--wait-pid", type=int, default=0,
                   help="wait for --quality to appear while this process (bench/quality.py's) runs")
    p.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "eval_agreement.json"))
    args = p.parse_args()
    if not args.reference_python:
        sys.exit("ERROR: --reference-python (or $FLAGM3_REFERENCE_PYTHON) is required: the FlagEmbedding venv")
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:  # each reference run is a subprocess
        refs = dict(zip([name for name, _, _ in args.pair], pool.map(
            lambda pair: reference_metrics(args.reference_python, pair[2], pair[0], args), args.pair)))
    reuse = {}
    while args.quality and not Path(args.quality).is_file() and args.wait_pid and alive(args.wait_pid):
        time.sleep(10)  # bench/quality.py running at the same time (run.sh --parallel)
    if args.quality and Path(args.quality).is_file():
        q = json.loads(Path(args.quality).read_text())
        if q.get("max_docs") == args.max_docs and q.get("max_length") == args.max_length and q["split"] == args.split:
            reuse = q["results"]
    pairs, ok = {}, True
    for name, flagm3_dir, bge_dir in args.pair:
        mine = reuse.get(name) or flagm3_metrics(flagm3_dir, args.split, args.max_docs, args.max_length,
                                                 args.batch_size)
        ref = refs[name]
        diffs = {r: {k: mine[r][k] - ref[r][k] for k in KEYS} for r in RANKINGS}
        passed = all(abs(diffs[r]["ndcg@10"]) <= args.tolerance for r in CHECKED)
        ok = ok and passed
        pairs[name] = {"flagm3_dir": flagm3_dir, "bge_m3_dir": bge_dir, "flagm3": mine, "reference": ref,
                       "difference": diffs, "pass": passed, "flagm3_reused_from_quality": name in reuse}
        print(f"[eval_agreement] {name}: " + ", ".join(f"{r} {diffs[r]['ndcg@10']:+.4f}" for r in RANKINGS)
              + (" ok" if passed else " MISMATCH"), file=sys.stderr, flush=True)
    write_json(args.out, {
        "check": f"|nDCG@10(flagm3 evaluator) - nDCG@10(BGEM3FlagModel + pytrec_eval)| <= {args.tolerance} "
                 f"for {', '.join(CHECKED)}",
        "split": args.split, "max_docs": args.max_docs, "max_length": args.max_length,
        "pairs": pairs, "pass": ok,
    })
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
