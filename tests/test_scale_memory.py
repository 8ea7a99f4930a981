"""Memory that must not grow with the training data (issue 17): the sampler's indices are int64 arrays, not Python
lists of Python ints, and draw the same batches as the list version did; the pages of the memory-mapped prepared
files that a process reads are given back."""

from __future__ import annotations

import json
import math
import os
import random
import sys
import tracemalloc

import pytest

from flagm3.data.sampler import M3BatchSampler


class FakeDataset:
    def __init__(self, sizes, flags=None, lengths=None):
        self.dataset_sizes = list(sizes)
        self.no_in_batch_neg = list(flags) if flags is not None else [False] * len(sizes)
        self.lengths = lengths

    def __len__(self):
        return sum(self.dataset_sizes)


def list_sampler_batches(s: M3BatchSampler, sizes, flags, lengths) -> list[list[int]]:
    """The per-device batches of one epoch as the sampler drew them with Python lists (the oracle)."""
    shared, buckets, start = [], [], 0
    for size, flag in zip(sizes, flags):
        indices = list(range(start, start + size))
        start += size
        (buckets.append(indices) if s.same_dataset_within_batch or flag else shared.extend(indices))
    buckets = ([shared] if shared else []) + [b for b in buckets if b]
    rng = random.Random(f"flagm3.sampler:{s.seed}:{s.epoch}")
    size, batches = s.global_batch_size, []
    for bucket in buckets:
        order = list(bucket)
        rng.shuffle(order)
        if s.group_by_length:
            mega = s.mega_batch_size * size
            order = [i for st in range(0, len(order), mega)
                     for i in sorted(order[st : st + mega], key=lambda i: -lengths[i])]
        n = len(order)
        batches += [order[st : st + size] for st in range(0, n - size + 1, size)]
        if n % size and not s.drop_last:
            batches.append(order[n - size :] if n >= size else (order * math.ceil(size / n))[:size])
    rng.shuffle(batches)
    return [b[r * s.batch_size : (r + 1) * s.batch_size] for b in batches for r in range(s.num_replicas)]


@pytest.mark.filterwarnings("ignore:.*smaller than one global batch")
def test_array_sampler_draws_the_list_samplers_batches():
    r = random.Random(3)
    checked = 0
    for case in range(30):
        sizes = [r.randint(1, 60) for _ in range(r.randint(1, 4))]
        flags = [r.random() < 0.3 for _ in sizes]
        lengths = [r.randint(1, 9) for _ in range(sum(sizes))]
        for options in ({}, {"group_by_length": False}, {"drop_last": True}, {"same_dataset_within_batch": True},
                        {"mega_batch_size": 2}):
            for batch_size, replicas in ((2, 1), (3, 2), (4, 1)):
                try:
                    s = M3BatchSampler(FakeDataset(sizes, flags, lengths), batch_size, num_replicas=replicas,
                                       seed=case, **options)
                except ValueError:  # drop_last and nothing to yield
                    continue
                for epoch in (0, 1):
                    s.set_epoch(epoch)
                    got = list(s)
                    assert got == list_sampler_batches(s, sizes, flags, lengths), (case, options, epoch)
                    assert all(type(i) is int for batch in got for i in batch)  # plain ints, as before
                    assert len(got) == len(s)
                    checked += 1
    assert checked > 500


@pytest.mark.parametrize("n", [200_000])
def test_sampler_memory_is_a_few_bytes_an_item(n):
    """The list version held about 56 bytes an item (a Python int and list slots) and peaked at 64; the int32
    arrays hold 8 (the bucket and the epoch's batches) and peak near 13."""
    tracemalloc.start()
    try:
        sampler = M3BatchSampler(FakeDataset([n]), 4, num_replicas=2, group_by_length=False)
        batches = iter(sampler)
        next(batches)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held / n < 10 and peak / n < 16, (held / n, peak / n)


# ------------------------------------------------------------------------------------------ mapped Arrow pages
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps and madvise: Linux")


def mapped_rss(paths) -> int:
    """Bytes of ``paths``' pages resident in this process' mappings (the sum of their ``Rss:`` in smaps)."""
    wanted = {os.path.realpath(p) for p in paths}
    total, current = 0, None
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            if fields and "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
                current = fields[5] if len(fields) >= 6 else None
            elif fields[:1] == ["Rss:"] and current in wanted:
                total += int(fields[1]) * 1024
    return total


@linux_only
def test_released_pages_read_back_the_same_bytes(tmp_path):
    import pyarrow as pa

    from flagm3.data.mapped_pages import release_mapped_pages

    path = str(tmp_path / "t.arrow")
    table = pa.table({"x": list(range(300_000)), "s": [f"text {i}" for i in range(300_000)]})
    with pa.ipc.new_stream(path, table.schema) as writer:
        writer.write_table(table, max_chunksize=4096)
    mapped = pa.ipc.open_stream(pa.memory_map(path)).read_all()
    assert mapped.equals(table) and mapped_rss([path]) > 1_000_000  # read: resident in the mapping
    assert release_mapped_pages([path]) >= os.path.getsize(path) - 4096
    assert mapped_rss([path]) < 100_000  # given back
    assert mapped.equals(table)  # and read again, unchanged
    assert release_mapped_pages([str(tmp_path / "other.arrow")]) == 0


@linux_only
def test_dataset_keeps_few_prepared_pages_mapped(tmp_path):
    """Opening prepared data, drawing an IDF corpus at random and reading items leave at most one release
    period's pages of the Arrow files mapped (before: every record batch header and list offset read when
    opening, every page the random draws touched)."""
    from flagm3.data import M3TrainDataset
    from flagm3.data.dataset import RELEASE_EVERY_RANDOM

    path = tmp_path / "train.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(20_000):
            f.write(json.dumps({"query": f"query {i}", "pos": [f"positive {i} " + "lift " * 10],
                                "neg": [f"negative {i}.{j} " + "drag " * 10 for j in range(7)]}) + "\n")
    ds = M3TrainDataset(str(path), train_group_size=8, cache_dir=str(tmp_path / "c"))
    files = [f["filename"] for t in ds._tables for f in t.cache_files]
    size = sum(os.path.getsize(p) for p in files)
    assert size > 8_000_000
    assert mapped_rss(files) < 0.02 * size  # 3.1 MB of 12 MB before
    assert len(ds.idf_corpus(max_texts=2_000)) == 2_000  # about 250 records drawn at random
    assert mapped_rss(files) < 0.02 * size
    for i in range(0, 20_000, 20_000 // (RELEASE_EVERY_RANDOM - 1)):
        assert ds[i]["passages"][0].startswith(f"positive {i} ")
    assert mapped_rss(files) < 0.25 * size
