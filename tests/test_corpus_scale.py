"""Evaluation and mining at corpus scale: scoring on the model's device (only the top-k read to the host), the
on-disk dense index (faiss, Qdrant, torch) with the in-memory candidates and bounded memory, progress totals."""

from __future__ import annotations

import functools
import gc
import importlib.util
import json
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
from conftest import SENTENCES, spread_embedder
from torch.overrides import TorchFunctionMode

import flagm3.inference as inference
from flagm3.evaluation import retrieve
from flagm3.mining import faiss_available, mine_hard_negatives
from flagm3.scoring import (
    compute_lexical_matching_scores,
    lexical_columns,
    pool_lexical,
    sparse_scores_columns,
)

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = Path(__file__).parent / "fixtures" / "retrieval_rankings_302dad8.json"
DOCS = [f"{s} {t}" for s in SENTENCES for t in ("wing", "flow", "shock")]
CORPUS = {f"doc{i:02d}": t for i, t in enumerate(DOCS)}
QUERIES = {f"q{i}": s[:25] for i, s in enumerate(SENTENCES)}
OPTIONS = dict(top_k=10, max_query_length=32, max_passage_length=32, corpus_chunk_size=7, rerank_depth=12,
               show_progress=False)


@pytest.fixture(scope="module")
def embedder(tiny_encoder_dir, tiny_tokenizer):
    return spread_embedder(tiny_encoder_dir, tiny_tokenizer, 2, batch_size=4)


def as_lists(runs):
    return {name: {q: [[d, s] for d, s in run[q].items()] for q in run} for name, run in runs.items()}


# ------------------------------------------------------------------------------------------- device scoring
@pytest.mark.parametrize("mode", ["full", "rerank"])
def test_host_rankings_equal_the_implementation_before_device_scoring(embedder, mode):
    """Regression test: on the CPU every ranking (documents in order, scores) equals what commit 302dad8 (host
    scoring, before device scoring existed) gave on this corpus, written to the fixture by that code."""
    expected = json.loads(FIXTURE.read_text())[mode]
    got = as_lists(retrieve(embedder, CORPUS, QUERIES, colbert_mode=mode, **OPTIONS))
    assert set(got) == set(expected)
    for name in expected:
        for q in expected[name]:
            assert [d for d, _ in got[name][q]] == [d for d, _ in expected[name][q]], (name, q)
            assert [s for _, s in got[name][q]] == pytest.approx([s for _, s in expected[name][q]], abs=1e-6)


def same_ranking(a, b, tol=1e-5):
    """Equal scores (to ``tol``) at each rank, and equal documents except among scores within ``tol``."""
    scores_a, scores_b = [s for _, s in a], [s for _, s in b]
    if scores_a != pytest.approx(scores_b, abs=tol):
        return False
    for (da, sa), (db, _) in zip(a, b):
        near = {d for d, s in b if abs(s - sa) <= tol}
        if da != db and da not in near:
            return False
    return True


@pytest.mark.parametrize("mode", ["full", "rerank"])
def test_device_scoring_path_equals_the_host_path(embedder, mode):
    """score_on_device=True (the path an accelerator takes: outputs kept where the model is, lexical scores by
    sparse_scores_columns, running top-k there) ranks as the host path, here with both on the CPU."""
    host = as_lists(retrieve(embedder, CORPUS, QUERIES, colbert_mode=mode, **OPTIONS))
    device = as_lists(retrieve(embedder, CORPUS, QUERIES, colbert_mode=mode, score_on_device=True, **OPTIONS))
    assert set(host) == set(device)
    for name in host:
        for q in host[name]:
            assert same_ranking(device[name][q], host[name][q]), (name, q, device[name][q], host[name][q])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_rankings_and_negatives_equal_the_cpus(tiny_encoder_dir, tiny_tokenizer, tmp_path):
    """On a GPU (the device path for real): every ranking as on the CPU, and mining (in memory and on disk) draws
    the CPU's negatives."""
    gpu = spread_embedder(tiny_encoder_dir, tiny_tokenizer, 2, batch_size=4, devices="cuda:0")
    cpu = spread_embedder(tiny_encoder_dir, tiny_tokenizer, 2, batch_size=4)
    for mode in ("full", "rerank"):
        on_gpu = as_lists(retrieve(gpu, CORPUS, QUERIES, colbert_mode=mode, **OPTIONS))
        on_cpu = as_lists(retrieve(cpu, CORPUS, QUERIES, colbert_mode=mode, **OPTIONS))
        for name in on_cpu:
            for q in on_cpu[name]:
                assert same_ranking(on_gpu[name][q], on_cpu[name][q], tol=1e-4), (mode, name, q)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"query": q, "pos": [MINE_POOL[i]]}) + "\n"
                             for i, q in enumerate(MINE_QUERIES)))
    common = dict(candidate_pool=MINE_POOL, range_for_sampling=(2, 20), negative_number=4, show_progress=False)
    mine_hard_negatives(cpu, train, tmp_path / "cpu.jsonl", use_faiss=False, **common)
    mine_hard_negatives(gpu, train, tmp_path / "gpu.jsonl", **common)
    mine_hard_negatives(gpu, train, tmp_path / "disk.jsonl", index_dir=tmp_path / "index", **common)
    expected = [json.loads(line)["neg"] for line in open(tmp_path / "cpu.jsonl")]
    for name in ("gpu", "disk"):
        assert [json.loads(line)["neg"] for line in open(tmp_path / f"{name}.jsonl")] == expected, name


class HostReads(TorchFunctionMode):
    """Records every read of tensor data to the host: ``(function, number of elements)``."""

    NAMES = {"tolist", "numpy", "__array__", "cpu", "item", "__int__", "__float__", "__bool__", "__index__"}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.NAMES and args and isinstance(args[0], torch.Tensor):
            self.reads.append((name, args[0].numel()))
        return func(*args, **(kwargs or {}))


def test_device_path_reads_only_the_top_k_to_the_host(embedder, monkeypatch):
    """On the device path the outputs are produced for the embedder's device (never copied to the host), no score
    goes through numpy/scipy, and the largest read to the host is a [Q, k] top-k (or the candidates' indices);
    the host path, for contrast, reads lexical weights through numpy."""
    targets = []
    original = inference._to_host

    def recording(t, device=None):
        targets.append(device)
        return original(t, device)

    monkeypatch.setattr(inference, "_to_host", recording)
    bound = len(QUERIES) * max(OPTIONS["top_k"], OPTIONS["rerank_depth"])
    for mode in ("full", "rerank"):
        targets.clear()
        with HostReads() as mode_reads:
            retrieve(embedder, CORPUS, QUERIES, colbert_mode=mode, score_on_device=True, **OPTIONS)
        assert targets and set(targets) == {embedder.device}
        names = {name for name, _ in mode_reads.reads}
        assert not names & {"numpy", "__array__", "cpu"}, names
        assert max(n for _, n in mode_reads.reads) <= bound
        assert max(n for name, n in mode_reads.reads if name == "tolist") >= len(QUERIES) * OPTIONS["top_k"]
    with HostReads() as host_reads:
        retrieve(embedder, CORPUS, QUERIES, **OPTIONS)
    assert {name for name, _ in host_reads.reads} & {"numpy", "__array__"}  # the check can fail


def test_lexical_columns_score_as_the_sparse_matrix_product(embedder):
    """sparse_scores_columns over queries encoded in batches of different lengths equals scipy's product."""
    batches, pooled = [], []
    for indices, out in embedder.iter_outputs(list(QUERIES.values()), 32, batch_size=3, heads=("sparse",),
                                              show_progress=False):
        rows = torch.tensor(indices)
        batches.append((rows, out["sparse_ids"], out["sparse_weights"]))
        pooled.append((rows, pool_lexical(out["sparse_ids"], out["sparse_weights"])))
    [(indices, p)] = embedder.iter_outputs(DOCS, 32, batch_size=len(DOCS), heads=("sparse",), show_progress=False)
    got = sparse_scores_columns(lexical_columns(batches, len(QUERIES)), p["sparse_ids"], p["sparse_weights"],
                                chunk_size=7)
    from flagm3.scoring import concat_lexical

    expected = compute_lexical_matching_scores(concat_lexical(pooled, len(QUERIES)),
                                               pool_lexical(p["sparse_ids"], p["sparse_weights"]))
    assert len({len(b[1][0]) for b in batches}) > 1  # the batches have different lengths
    assert (got > 0).sum() > 10
    torch.testing.assert_close(got, torch.from_numpy(expected).float(), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ on-disk index
MINE_POOL = list(dict.fromkeys(SENTENCES + [" ".join(reversed(s.split()[:6])) for s in SENTENCES]
                                + [" ".join(s.split()[2:8]) for s in SENTENCES] + DOCS))
MINE_QUERIES = ["similarity laws for models", "wing in a slipstream", "supersonic boundary layer", "heat transfer",
                "buckling of shells", "flutter of wings"]


@pytest.fixture()
def mine_data(tmp_path):
    records = [{"query": q, "pos": [MINE_POOL[i]], "neg": [MINE_POOL[i + 1]]} for i, q in enumerate(MINE_QUERIES)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records))
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"text": t}) + "\n" for t in MINE_POOL))
    return train, pool


BACKENDS = [
    pytest.param("faiss", marks=pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")),
    pytest.param("qdrant", marks=pytest.mark.skipif(importlib.util.find_spec("qdrant_client") is None,
                                                   reason="qdrant-client is not installed")),
    "torch",
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_disk_index_mines_the_in_memory_negatives(embedder, mine_data, tmp_path, monkeypatch, backend):
    """--index-dir (vectors written window by window, searched in chunks) writes the same lines as the in-memory
    search, with teacher scores read back from the file."""
    train, pool = mine_data
    common = dict(candidate_pool=pool, range_for_sampling=(2, 20), negative_number=4, teacher_scores=True,
                  show_progress=False, query_max_length=32, passage_max_length=32)
    mine_hard_negatives(embedder, train, tmp_path / "memory.jsonl", use_faiss=False, **common)
    monkeypatch.setattr(inference, "_ENCODE_WINDOW", 8)  # several windows
    monkeypatch.setattr("flagm3.disk_index.DEFAULT_CHUNK_ROWS", 9)  # several chunks
    summary = mine_hard_negatives(embedder, train, tmp_path / "disk.jsonl", index_dir=tmp_path / "index",
                                  index_backend=backend, **common)
    assert summary["backend"].startswith(backend)
    assert (tmp_path / "index" / "dense.f32").stat().st_size == len(MINE_POOL) * embedder.vector_sizes()[0] * 4
    memory = [json.loads(line) for line in open(tmp_path / "memory.jsonl")]
    disk = [json.loads(line) for line in open(tmp_path / "disk.jsonl")]
    assert [r["neg"] for r in disk] == [r["neg"] for r in memory]
    for a, b in zip(disk, memory):
        assert a["pos_scores"] + a["neg_scores"] == pytest.approx(b["pos_scores"] + b["neg_scores"], abs=1e-4)


def test_on_disk_index_refuses_the_hybrid(embedder, mine_data, tmp_path):
    train, pool = mine_data
    with pytest.raises(ValueError, match="dense vectors only"):
        mine_hard_negatives(embedder, train, tmp_path / "out.jsonl", candidate_pool=pool, use_hybrid=True,
                            index_dir=tmp_path / "index", show_progress=False)


def test_on_disk_index_memory_does_not_grow_with_the_corpus(embedder, tmp_path, monkeypatch):
    """Peak Python allocations (tracemalloc: lists, numpy buffers) of encoding to disk and searching do not grow
    from 200 to 2,000 passages: bounded by the window and the chunk. The encoder's forward leaves reference
    cycles (in transformers, a few objects a batch) that Python's collector frees at its own pace: collected
    after each batch here, so that the peak measures what the store and the search hold."""
    from flagm3.disk_index import search_store, write_dense_store

    monkeypatch.setattr(inference, "_ENCODE_WINDOW", 64)
    iter_outputs = embedder.iter_outputs

    def collecting(*args, **kwargs):
        for item in iter_outputs(*args, **kwargs):
            yield item
            gc.collect(1)  # the young generations: where a batch's cycles are

    monkeypatch.setattr(embedder, "iter_outputs", collecting)
    queries = torch.randn(20, embedder.vector_sizes()[0])
    peaks = {}
    for n in (200, 2000):
        texts = [f"{DOCS[i % len(DOCS)]} {i}" for i in range(n)]
        tracemalloc.start()
        store = write_dense_store(embedder, texts, tmp_path / f"index{n}", 16, batch_size=100)
        found, _ = search_store(store, queries, 10, "faiss" if faiss_available() else "torch", chunk_rows=128)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert found.shape == (20, 10)
    assert peaks[2000] < 1.3 * peaks[200], peaks


@pytest.mark.parametrize("collide", [False, True])
def test_disk_pool_deduplicates_and_looks_up_texts(tmp_path, monkeypatch, collide):
    """The pool on disk: first occurrences in order, then the extra texts not in the pool; lookup by text. With
    every hash equal (collide) the texts are still told apart by comparing them."""
    import flagm3.disk_index as disk_index

    if collide:
        monkeypatch.setattr(disk_index, "hash", lambda text: 7, raising=False)
    pool = ["b", "a", "b", "é ünïcode", "", "a", "c"]
    texts, size, rows = disk_index.disk_pool(iter(pool), ["c", "x", "x", "y"], tmp_path)
    assert list(texts) == ["b", "a", "é ünïcode", "", "c", "x", "y"] and size == 5
    assert texts[1:3] == ["a", "é ünïcode"] and texts[-1] == "y"
    assert [rows[t] for t in ["b", "a", "é ünïcode", "", "c", "x", "y"]] == list(range(7))
    assert "z" not in rows and rows.get("z") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["texts.bin", "texts.idx"]


def test_mining_on_disk_holds_no_pool_in_memory(embedder, tmp_path, monkeypatch):
    """Peak Python allocations of the whole of mine_hard_negatives with index_dir (pool file read, deduplicated,
    encoded, searched, negatives drawn and written) grow from 200 to 2,000 pool passages by under 150 bytes a
    passage: the texts stay on disk, only arrays of 8-byte hashes and offsets (and the deduplication's sort of
    the hashes) are in memory. The in-memory path holds the texts and dicts over them: measured 270 to 290 bytes
    a passage for these short texts (67 to 100 on disk, with the encoder's garbage collected as it comes)."""
    monkeypatch.setattr(inference, "_ENCODE_WINDOW", 64)
    monkeypatch.setattr("flagm3.disk_index.LIST_ROWS", 128)  # Python lists bounded at 128 rows, not 65,536
    iter_outputs = embedder.iter_outputs

    def collecting(*args, **kwargs):  # the encoder's reference cycles collected (see the test above)
        for item in iter_outputs(*args, **kwargs):
            yield item
            gc.collect(1)  # the young generations: where a batch's cycles are

    monkeypatch.setattr(embedder, "iter_outputs", collecting)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"query": q, "pos": [f"{q} positive"]}) + "\n" for q in MINE_QUERIES))
    peaks = {}
    for where in ("disk", "memory"):
        for n in (200, 2000):
            pool = tmp_path / f"pool{n}.jsonl"
            pool.write_text("".join(json.dumps({"text": f"{DOCS[i % len(DOCS)]} number {i}"}) + "\n"
                                    for i in range(n)))
            options = dict(index_dir=tmp_path / f"index{n}", index_backend="torch") if where == "disk" else {}
            tracemalloc.start()
            mine_hard_negatives(embedder, train, tmp_path / "out.jsonl", candidate_pool=pool, range_for_sampling=(2, 20),
                                negative_number=4, teacher_scores=True, show_progress=False, passage_max_length=16,
                                batch_size=100, **options)
            peaks[where, n] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    per_passage = {where: (peaks[where, 2000] - peaks[where, 200]) / 1800 for where in ("disk", "memory")}
    assert per_passage["disk"] < 150, (per_passage, peaks)
    assert per_passage["memory"] > 230, (per_passage, peaks)  # the check can fail


# ------------------------------------------------------------------------------------------ corpus on disk
def test_corpus_on_disk_ranks_as_the_dict(embedder, tmp_path):
    """A DiskCorpus (ids and texts on disk, read by row) is the same mapping as the dict, its descending order is
    Python's, and every ranking equals the dict corpus's exactly."""
    from flagm3.disk_index import DiskCorpus

    corpus = {**CORPUS, "é-doc": "a wing in supersonic flow", "doc0": "the lift of a cone", "z": "heat transfer"}
    on_disk = DiskCorpus(iter(corpus.items()), tmp_path / "corpus")
    assert len(on_disk) == len(corpus) and list(on_disk) == list(corpus)
    assert all(on_disk[d] == t for d, t in corpus.items()) and "missing" not in on_disk
    assert [on_disk.ids[i] for i in on_disk.descending()] == sorted(corpus, reverse=True)
    for mode in ("full", "rerank"):
        assert as_lists(retrieve(embedder, on_disk, QUERIES, colbert_mode=mode, **OPTIONS)) == as_lists(
            retrieve(embedder, corpus, QUERIES, colbert_mode=mode, **OPTIONS))
    with pytest.raises(ValueError, match="corpus.jsonl: a document id occurs twice"):
        DiskCorpus(iter([("a", "x"), ("b", "y"), ("a", "z")]), tmp_path / "dup", "corpus.jsonl")


def test_eval_with_corpus_dir_equals_in_memory(tiny_encoder_dir, tiny_tokenizer, tmp_path):
    from flagm3 import M3Model
    from flagm3.evaluation import run_eval

    torch.manual_seed(0)
    M3Model.from_encoder(str(tiny_encoder_dir), colbert_dim=16).save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    data = tmp_path / "beir"
    (data / "qrels").mkdir(parents=True)
    (data / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "text": t}) + "\n" for d, t in CORPUS.items()))
    (data / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in QUERIES.items()))
    (data / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\tdoc{3 * i:02d}\t1\n" for i in range(len(QUERIES))))
    options = dict(batch_size=8, max_query_length=32, max_passage_length=32, show_progress=False, use_fp16=False)
    expected = run_eval(tmp_path / "m", data, **options)
    got = run_eval(tmp_path / "m", data, corpus_dir=tmp_path / "corpus", **options)
    assert got == expected
    assert (tmp_path / "corpus" / "test" / "texts.bin").is_file()


def test_evaluation_with_the_corpus_on_disk_holds_no_texts(embedder, tmp_path, monkeypatch):
    """Peak Python allocations of reading a BEIR collection and ranking it grow by under 120 bytes a document
    with the corpus on disk (8-byte arrays, the deduplication's sort and the ids' sort keys; measured 72 to 76)
    from 300 to 3,000 documents; with the corpus in a dict they grow by its texts (measured 270)."""
    from flagm3.evaluation import load_beir

    monkeypatch.setattr("flagm3.disk_index.LIST_ROWS", 128)  # Python lists bounded at 128 rows, not 65,536
    iter_outputs = embedder.iter_outputs

    def collecting(*args, **kwargs):  # the encoder's reference cycles collected (see above)
        for item in iter_outputs(*args, **kwargs):
            yield item
            gc.collect(1)

    monkeypatch.setattr(embedder, "iter_outputs", collecting)
    peaks = {}
    for n in (300, 300, 3000):  # the first run imports and caches what later runs reuse: measured again
        data = tmp_path / f"beir{n}"
        (data / "qrels").mkdir(parents=True, exist_ok=True)
        (data / "corpus.jsonl").write_text("".join(
            json.dumps({"_id": f"d{i}", "title": "", "text": f"{DOCS[i % len(DOCS)]} number {i}"}) + "\n"
            for i in range(n)))
        (data / "queries.jsonl").write_text("".join(
            json.dumps({"_id": q, "text": t}) + "\n" for q, t in QUERIES.items()))
        (data / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
            f"{q}\td{i}\t1\n" for i, q in enumerate(QUERIES)))
        for where in ("disk", "memory"):
            tracemalloc.start()
            corpus, queries, qrels = load_beir(data, "test", tmp_path / f"c{n}{len(peaks)}" if where == "disk" else None)
            retrieve(embedder, corpus, queries, top_k=10, max_query_length=32, max_passage_length=16,
                     batch_size=50, corpus_chunk_size=100, show_progress=False)  # full chunks at both sizes
            peaks[where, n] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            del corpus
    per_document = {where: (peaks[where, 3000] - peaks[where, 300]) / 2700 for where in ("disk", "memory")}
    assert per_document["disk"] < 120, (per_document, peaks)
    assert per_document["memory"] > 200, (per_document, peaks)  # the check can fail


# -------------------------------------------------------------------------------------------------- progress
class Bars:
    """A tqdm stand-in that records each bar's description, total and count."""

    def __init__(self):
        self.bars = []

    def __call__(self, iterable=None, total=None, desc=None, disable=False, **kwargs):
        bars = self

        class Bar:
            def __init__(self):
                if total is None and hasattr(iterable, "__len__"):  # as tqdm does
                    self.total = len(iterable)
                else:
                    self.total = total
                self.desc, self.n, self.disable = desc, 0, disable
                bars.bars.append(self)

            def update(self, n=1):
                self.n += n

            def close(self):
                pass

            def __iter__(self):
                for item in iterable:
                    self.n += 1
                    yield item

        return Bar()

    def shown(self):
        return {b.desc: (b.total, b.n) for b in self.bars if not b.disable}


def test_progress_bars_count_to_their_totals(embedder, mine_data, tmp_path, monkeypatch):
    """Evaluation's bar has the corpus (plus the reranked candidates) as total and reaches it; mining's on-disk
    encoding and search bars have the pool as total: tqdm can show an ETA."""
    bars = Bars()
    for module in ("flagm3.evaluation.retrieval", "flagm3.disk_index", "flagm3.inference", "flagm3.mining"):
        monkeypatch.setattr(f"{module}.tqdm", bars)
    retrieve(embedder, CORPUS, QUERIES, **{**OPTIONS, "show_progress": True})
    assert bars.shown()["Retrieval"] == (len(CORPUS), len(CORPUS))
    bars.bars.clear()
    train, pool = mine_data
    mine_hard_negatives(embedder, train, tmp_path / "out.jsonl", candidate_pool=pool, index_dir=tmp_path / "i",
                        index_backend="torch", show_progress=True, passage_max_length=32)
    shown = bars.shown()
    assert shown["Encoding candidates to disk"] == (len(MINE_POOL), len(MINE_POOL))
    assert shown["Search (torch)"] == (len(MINE_POOL), len(MINE_POOL))
    assert shown["Sampling negatives"] == (len(MINE_QUERIES), len(MINE_QUERIES))


def test_cli_mine_passes_the_index_options_and_no_progress_without_a_tty(monkeypatch, tmp_path):
    import flagm3.cli as cli
    import flagm3.mining as mining

    seen = {}

    @functools.wraps(mining.mine_hard_negatives)  # the CLI passes the options the signature names
    def fake(embedder, *args, **kwargs):
        seen.update(kwargs)
        return {}

    monkeypatch.setattr(mining, "mine_hard_negatives", fake)
    monkeypatch.setattr(cli, "_embedder", lambda args: None)
    monkeypatch.setattr(cli, "_check_inputs", lambda args: None)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    cli.main(["mine", "--model", "m", "--input", "in.jsonl", "--output", "out.jsonl", "--index-dir",
              str(tmp_path), "--index_backend", "qdrant"])
    assert seen["index_dir"] == str(tmp_path) and seen["index_backend"] == "qdrant"
    assert seen["show_progress"] is False
