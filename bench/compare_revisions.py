"""Workloads 1 and 2 on two revisions of flagm3 at the same time, for a before/after ratio on a shared machine.

    python bench/compare_revisions.py --before REV [--after REV] [--steps 20] [--presets bge-m3 flagm3]
        [--w2-batches 4] [--rounds 1] [--out bench/results/compare_revisions.json]

Each revision's ``flagm3/`` is extracted with ``git archive`` into bench/work/revisions/<commit>/ (``--after``
defaults to this checkout's working tree, uncommitted changes included); this checkout's bench scripts run on
both, with ``PYTHONPATH`` selecting the package. The two runs of each measurement execute side by side, one torch
thread each, so both see the same machine load and the ratio is meaningful where absolute times are not:

- W1 (bench/flagm3_train.py): seconds per optimizer step (wall, steady state after 2 warm-up steps), CPU seconds
  per step, peak RSS, and the first batch's forward+backward (min of 3), per ``--presets`` loss preset;
- W2 (bench/memory_250k.py trial): peak RSS and seconds of 2 optimizer steps at a 250k vocabulary, per
  ``--w2-batches`` batch size (queries x group 4).

Needs what bench/run.sh's setup stage makes: bench/work/cranfield_train.jsonl, bench/work/base_minilm_eos and
bench/work/vocab250k. Prints a table of before, after and after / before; ``--rounds`` repeats every pair.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, WORK_DIR  # noqa: E402

BENCH = Path(__file__).resolve().parent


def checkout(rev: str | None) -> tuple[str, Path]:
    """(label, directory holding that revision's ``flagm3/``); ``None``: this working tree."""
    if rev is None:
        return "working tree", REPO_ROOT
    commit = subprocess.run(["git", "rev-parse", "--short", rev], cwd=REPO_ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    target = WORK_DIR / "revisions" / commit
    if not (target / "flagm3" / "__init__.py").is_file():
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile() as archive:
            subprocess.run(["git", "archive", commit, "flagm3"], cwd=REPO_ROOT, stdout=archive, check=True)
            archive.seek(0)
            with tarfile.open(fileobj=archive) as tar:
                tar.extractall(target, filter="data")
    return commit, target


def side_by_side(commands: list[list[str]], trees: list[Path], logs: list[Path]) -> list[int]:
    """Start every command at once (``PYTHONPATH`` = its tree, one torch thread); wait for all."""
    procs = []
    for command, tree, log in zip(commands, trees, logs):
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "FLAGM3_EXTRA_ARGS": ""}
        log.parent.mkdir(parents=True, exist_ok=True)
        procs.append(subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=open(log, "w"),
                                      stderr=subprocess.STDOUT))
    return [p.wait() for p in procs]


def last_json_line(log: Path) -> dict:
    return json.loads([line for line in log.read_text().splitlines() if line.startswith("{")][-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="git revision of the baseline")
    p.add_argument("--after", default=None, help="git revision to compare (default: this working tree)")
    p.add_argument("--steps", type=int, default=20, help="W1 optimizer steps per run")
    p.add_argument("--presets", nargs="*", default=["bge-m3", "flagm3"], help="W1 loss presets")
    p.add_argument("--w2-batches", type=int, nargs="*", default=[4], help="W2 batch sizes (queries)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", default=str(WORK_DIR / "compare_revisions.json"))
    args = p.parse_args()
    python = sys.executable
    sides = [checkout(args.before), checkout(args.after)]
    labels = [label for label, _ in sides]
    trees = [tree for _, tree in sides]
    work = WORK_DIR / "compare"
    rows: dict[str, list[list[float]]] = {}  # metric -> per round [before, after]

    def add(metric: str, values: list[float]) -> None:
        rows.setdefault(metric, []).append(values)

    for rnd in range(args.rounds):
        for preset in args.presets:
            names = [f"w1_{preset}_{i}_r{rnd}" for i in range(2)]
            commands = [[python, str(BENCH / "flagm3_train.py"), "--loss-preset", preset, "--max-steps",
                         str(args.steps), "--warmup-steps", "2", "--breakdown-repeats", "3", "--threads", "1",
                         "--overwrite", "--output-dir", str(work / name), "--out", str(work / f"{name}.json")]
                        for name in names]
            codes = side_by_side(commands, trees, [work / f"{name}.log" for name in names])
            if any(codes):
                sys.exit(f"W1 {preset} failed ({codes}); see {work}/w1_{preset}_*.log")
            results = [json.loads((work / f"{name}.json").read_text()) for name in names]
            add(f"W1 {preset}: s/step", [r["seconds_per_step"] for r in results])
            add(f"W1 {preset}: CPU s/step", [r["cpu_seconds_per_step"] for r in results])
            add(f"W1 {preset}: first batch fwd+bwd s", [r["step_breakdown"]["full_forward_backward_s"]
                                                        for r in results])
            add(f"W1 {preset}: peak RSS MB", [r["peak_rss_mb"] for r in results])
        for batch in args.w2_batches:
            names = [f"w2_b{batch}_{i}_r{rnd}" for i in range(2)]
            commands = [[python, str(BENCH / "memory_250k.py"), "trial", "--batch-size", str(batch)]] * 2
            codes = side_by_side(commands, trees, [work / f"{name}.log" for name in names])
            if any(codes):
                sys.exit(f"W2 batch {batch} failed ({codes}); see {work}/w2_b{batch}_*.log")
            results = [last_json_line(work / f"{name}.log") for name in names]
            add(f"W2 batch {batch}: peak RSS MB", [r["peak_rss_mb"] for r in results])
            add(f"W2 batch {batch}: seconds (2 steps + setup)", [r["seconds"] for r in results])

    table = []
    for metric, values in rows.items():
        before = statistics.median(v[0] for v in values)
        after = statistics.median(v[1] for v in values)
        table.append({"metric": metric, "before": before, "after": after, "ratio": after / before,
                      "rounds": values})
    print(f"| metric | {labels[0]} (before) | {labels[1]} (after) | after / before |")
    print("|---|---|---|---|")
    for r in table:
        print(f"| {r['metric']} | {r['before']:.3f} | {r['after']:.3f} | {r['ratio']:.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"before": labels[0], "after": labels[1], "steps": args.steps,
                                          "rounds": args.rounds, "load_average": os.getloadavg(),
                                          "rows": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
