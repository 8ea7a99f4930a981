"""Training-time sparse scoring on a 250k vocabulary: query-token columns against the earlier union columns.

    python bench/sparse_scoring.py [--batches 4 32 128] [--group 4] [--repeats 5] [--out JSON]

``flagm3.scoring.sparse_scores`` max-pools each side's token weights over a compact vocabulary and multiplies
the two ``[rows, columns]`` matrices. It used to take as columns the union of query and passage token ids
(``union_columns_scores`` below, flagm3 up to commit f904da1); only ids that occur in a query can score, so it
now takes the query's ids alone. This script scores ``B`` queries (64 tokens) against ``B * group`` passages
(256 tokens) both ways, forward and backward, with fp32 weights, and prints a table:

- peak memory: the most bytes of tensors alive at once from the scoring's forward to the end of its backward
  (the inputs excluded, the weights' gradients included), counted exactly by a ``TorchDispatchMode`` (independent of machine load);
- time: median wall seconds of ``--repeats`` forward+backward runs after one warm-up, one torch thread;
- the largest absolute score and gradient difference between the two.

Token ids are real text: Cranfield queries and passages (``FLAGM3_DATA_DIR``, default ../shared/data/cranfield),
every word hashed (crc32) onto the 250,002-id vocabulary, as bench/memory_250k.py's data; passages are the
corpus in order, queries cycle through the query set.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import weakref
import zlib
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_dir  # noqa: E402

from flagm3.scoring import pool_lexical, sparse_scores  # noqa: E402

VOCAB = 250_002
SPECIAL = 4  # ids 0-3: <s>, <pad>, </s>, <unk>


def union_columns_scores(q_ids, q_weights, p_ids, p_weights, chunk_size: int = 4096):
    """``sparse_scores`` as it was: columns over the union of query and passage ids (the baseline)."""
    q_pooled = pool_lexical(q_ids, q_weights)
    blocks = []
    for start in range(0, max(p_ids.shape[0], 1), chunk_size):
        p_pooled = pool_lexical(p_ids[start : start + chunk_size], p_weights[start : start + chunk_size])
        columns = torch.unique(torch.cat([q_pooled.token_ids, p_pooled.token_ids]))

        def compact(pooled, columns=columns):
            out = pooled.weights.new_zeros(pooled.num_rows, columns.shape[0])
            return out.index_put((pooled.rows, torch.searchsorted(columns, pooled.token_ids)), pooled.weights)

        blocks.append(compact(q_pooled) @ compact(p_pooled).T)
    return torch.cat(blocks, dim=1)[:, : p_ids.shape[0]]


class PeakTensorMemory(TorchDispatchMode):
    """Bytes of the tensors created under this mode that are alive at once (forward, autograd's saved tensors
    and the backward's own), peak and current; storages are counted once."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def ignore(self, *tensors: torch.Tensor) -> None:
        """Storages that exist already (the inputs): never counted, also not through their views."""
        self._seen.update(t.untyped_storage().data_ptr() for t in tensors)

    def _release(self, key: int, size: int) -> None:
        self._seen.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._seen:
                    self._seen.add(key)
                    size = storage.nbytes()
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._release, key, size)
        return out


def hashed_ids(text: str, length: int) -> list[int]:
    """<s> + crc32-hashed words (ids >= 4) + </s>, cut to ``length``."""
    words = [SPECIAL + zlib.crc32(w.encode()) % (VOCAB - SPECIAL) for w in text.lower().split()]
    return [0, *words[: length - 2], 2]


def batch(texts: list[str], length: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [n, length] and weights (uniform (0, 1], zero at padding and <s>/</s>)."""
    ids = torch.full((len(texts), length), 1, dtype=torch.long)
    for i, text in enumerate(texts):
        row = hashed_ids(text, length)
        ids[i, : len(row)] = torch.tensor(row)
    weights = (1.0 - torch.rand(ids.shape, generator=gen)) * (ids >= SPECIAL)
    return ids, weights


def measure(fn, q_ids, q_w, p_ids, p_w, repeats: int) -> dict:
    def run(mem: PeakTensorMemory | None = None):
        qw, pw = q_w.clone().requires_grad_(), p_w.clone().requires_grad_()
        if mem is not None:
            mem.ignore(q_ids, p_ids, qw, pw)
        with mem if mem is not None else contextlib.nullcontext():
            scores = fn(q_ids, qw, p_ids, pw)
            scores.sum().backward()
        return scores.detach(), qw.grad, pw.grad

    result = run()
    mem = PeakTensorMemory()
    run(mem)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"peak_mb": mem.peak / 2**20, "seconds": statistics.median(times), "result": result}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[4, 32, 128], help="queries per batch")
    p.add_argument("--group", type=int, default=4, help="passages per query")
    p.add_argument("--query-length", type=int, default=64)
    p.add_argument("--passage-length", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="JSON file for the rows")
    args = p.parse_args()
    torch.set_num_threads(1)
    root = data_dir()
    read = lambda name: [json.loads(line) for line in open(root / name, encoding="utf-8")]  # noqa: E731
    corpus = [(d.get("title", "") + " " + d["text"]).strip() for d in read("corpus.jsonl")]
    queries = [q["text"] for q in read("queries.jsonl")]
    gen = torch.Generator().manual_seed(0)
    rows = []
    for b in args.batches:
        n = b * args.group
        q_ids, q_w = batch([queries[i % len(queries)] for i in range(b)], args.query_length, gen)
        p_ids, p_w = batch([corpus[i % len(corpus)] for i in range(n)], args.passage_length, gen)
        before = measure(union_columns_scores, q_ids, q_w, p_ids, p_w, args.repeats)
        after = measure(sparse_scores, q_ids, q_w, p_ids, p_w, args.repeats)
        diff = max(float((x - y).abs().max()) for x, y in zip(before.pop("result"), after.pop("result")))
        rows.append({
            "queries": b, "passages": n,
            "query_columns": int(torch.unique(q_ids[q_w > 0]).numel()),
            "union_columns": int(torch.unique(torch.cat([q_ids[q_w > 0], p_ids[p_w > 0]])).numel()),
            "before_peak_mb": round(before["peak_mb"], 3), "after_peak_mb": round(after["peak_mb"], 3),
            "memory_ratio": round(before["peak_mb"] / after["peak_mb"], 1),
            "before_ms": round(before["seconds"] * 1e3, 2), "after_ms": round(after["seconds"] * 1e3, 2),
            "speedup": round(before["seconds"] / after["seconds"], 2),
            "max_abs_difference": diff,
        })
    header = ("queries x passages", "columns before/after", "peak MB before", "peak MB after", "memory ratio",
              "ms before", "ms after", "speed-up", "max |diff|")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(f"| {r['queries']} x {r['passages']} | {r['union_columns']} / {r['query_columns']} | "
              f"{r['before_peak_mb']} | {r['after_peak_mb']} | {r['memory_ratio']}x | {r['before_ms']} | "
              f"{r['after_ms']} | {r['speedup']}x | {r['max_abs_difference']:.1e} |")
    if args.out:
        payload = {"vocabulary": VOCAB, "query_length": args.query_length, "passage_length": args.passage_length,
                   "group": args.group, "threads": 1, "repeats": args.repeats, "rows": rows}
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
