"""Long inputs: peak memory and time of the three heads and the training loss's scoring, against passage length.

    python bench/long_inputs.py [--lengths 512 2048 8192] [--queries 1] [--group 4] [--query-length 64]
        [--repeats 3] [--out bench/results/long_inputs.json]
    python bench/long_inputs.py trial --length L ...        (one measurement in this process; used internally)

BGE-M3's real head sizes (hidden 1024, ColBERT 1024x1024, sparse 1024x1) and vocabulary (250,002 ids), fp32,
CPU. The encoder is left out: its output is stood in for by random hidden states [P, L, 1024] (requires_grad),
so the numbers are those of what flagm3 adds on top of the encoder. One measurement = the heads on queries and
passages, M3Loss (loss_preset bge-m3: dense, sparse, ColBERT, ensemble and self-distillation, in-batch
negatives) and the backward pass down to the hidden states.

Each length runs in its own child process. Peak memory = peak RSS (getrusage) minus RSS once the inputs exist,
so it is what heads + scoring + backward allocate; it grows linearly in length when no tensor is
length x vocabulary (the sparse head scores pooled token weights, never a [P, L, 250002] tensor) and ColBERT
MaxSim runs in passage chunks of bounded size ([Q, chunk, Lq, Lp]). Time: median of --repeats runs after one
warm-up. Torch runs with one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, peak_rss_mb, write_json  # noqa: E402

HIDDEN = 1024
VOCAB = 250_002


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def trial(args: argparse.Namespace) -> dict:
    import torch
    from transformers import XLMRobertaConfig

    from flagm3.configuration_m3 import M3Config
    from flagm3.losses import M3Loss, M3LossConfig
    from flagm3.modeling_m3 import M3Model, M3Output

    torch.set_num_threads(1)
    torch.manual_seed(0)
    # Heads only: the encoder is a 1-layer stand-in on the meta device (no memory), never called.
    backbone = XLMRobertaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=16,
                                intermediate_size=HIDDEN, max_position_embeddings=8194, pad_token_id=1)
    with torch.device("meta"):
        model = M3Model(M3Config(backbone_config=backbone, sparse_ignore_token_ids=[0, 1, 2, 3]))
    heads = {"sparse_linear": torch.nn.Linear(HIDDEN, 1), "colbert_linear": torch.nn.Linear(HIDDEN, HIDDEN)}
    for name, module in heads.items():
        setattr(model, name, module)
    model.sparse_ignore_ids = torch.tensor([0, 1, 2, 3])
    loss_fn = M3Loss(M3LossConfig.preset("bge-m3", use_self_distill=True))

    n_q, n_p = args.queries, args.queries * args.group

    def side(rows: int, length: int) -> tuple:
        ids = torch.randint(4, VOCAB, (rows, length))
        ids[:, 0], ids[:, -1] = 0, 2
        return torch.randn(rows, length, HIDDEN, requires_grad=True), ids, torch.ones(rows, length, dtype=torch.long)

    q_in, p_in = side(n_q, args.query_length), side(n_p, args.length)

    def run() -> float:
        start = time.perf_counter()
        outs = []
        for hidden, ids, mask in (q_in, p_in):
            outs.append(M3Output(dense=model.dense_embedding(hidden, mask), sparse=model.sparse_embedding(hidden, ids, mask),
                                 colbert=model.colbert_embedding(hidden, mask), colbert_mask=mask[:, 1:]))
        result = loss_fn(outs[0], q_in[1], outs[1], p_in[1], group_size=args.group, step=1)
        result.loss.backward()
        for hidden, _, _ in (q_in, p_in):
            hidden.grad = None
        for module in heads.values():
            module.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    baseline = rss_mb()
    times = [run() for _ in range(args.repeats + 1)][1:]
    peak = peak_rss_mb()
    passage_tokens = n_p * args.length
    return {
        "passage_length": args.length,
        "queries": n_q,
        "passages": n_p,
        "query_length": args.query_length,
        "inputs_mb": round(baseline, 1),
        "peak_above_inputs_mb": round(peak - baseline, 1),
        "mb_per_1k_passage_tokens": round((peak - baseline) / passage_tokens * 1000, 3),
        "seconds_median": round(statistics.median(times), 4),
        "seconds_all": [round(t, 4) for t in times],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="all", choices=["all", "trial"])
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--queries", type=int, default=1)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--query-length", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "long_inputs.json"))
    args = p.parse_args()
    if args.mode == "trial":
        print(json.dumps(trial(args)))
        return

    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for length in args.lengths:
        cmd = [sys.executable, __file__, "trial", "--length", str(length), "--queries", str(args.queries),
               "--group", str(args.group), "--query-length", str(args.query_length), "--repeats", str(args.repeats)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            sys.exit(f"trial at length {length} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    print(f"\nheads + M3Loss (bge-m3) + backward, hidden {HIDDEN}, vocabulary {VOCAB:,}, "
          f"{args.queries} x group {args.group}, query length {args.query_length}, fp32, 1 thread")
    print(f"{'passage length':>14} | {'peak above inputs (MB)':>22} | {'MB per 1k passage tokens':>24} | "
          f"{'time (s, median)':>16}")
    for r in rows:
        print(f"{r['passage_length']:>14} | {r['peak_above_inputs_mb']:>22} | {r['mb_per_1k_passage_tokens']:>24} | "
              f"{r['seconds_median']:>16}")
    import torch

    write_json(args.out, {"rows": rows, "settings": {k: v for k, v in vars(args).items() if k not in ("mode", "out")},
                          "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                          "cpus": os.cpu_count()})


if __name__ == "__main__":
    main()
