"""Training data at scale: validated once into memory-mapped Arrow (flagm3.data.prepared), cached by the files'
fingerprint, prepared by rank 0 only; lengths and tokenisation only when asked; the IDF fit once and broadcast."""

from __future__ import annotations

import json
import os
import socket
import tracemalloc
from pathlib import Path

import pytest
import torch
from conftest import SENTENCES

from flagm3.data import M3BatchSampler, M3TrainDataset
from flagm3.data.prepared import prepare_training_data
from flagm3.data.validation import DataValidationError


def synthetic(path: Path, n: int, negatives: int = 3, start: int = 0) -> Path:
    """``n`` records, every text unique (as bench/scale.py writes them)."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(start, start + n):
            record = {"query": f"query {i} about wings", "pos": [f"positive {i}: lift on a wing in flow {i}"],
                      "neg": [f"negative {i}.{j}: heat transfer at Mach {j}" for j in range(negatives)]}
            f.write(json.dumps(record) + "\n")
    return path


class NoTokenizer:
    """A tokenizer that must not be called."""

    def __call__(self, *args, **kwargs):
        raise AssertionError("tokenised outside the collator")


def test_prepared_once_then_reused_from_the_cache_until_a_file_changes(tmp_path):
    path = synthetic(tmp_path / "train.jsonl", 50)
    cache = tmp_path / "cache"
    first = prepare_training_data(path, cache_dir=str(cache), train_group_size=4)
    again = prepare_training_data(path, cache_dir=str(cache), train_group_size=4)
    assert not first.from_cache and again.from_cache and again.directory == first.directory
    assert again.report.num_records == 50 and len(again.sources[0].data) == 50
    assert again.sources[0].data[7]["query"] == "query 7 about wings"
    other_options = prepare_training_data(path, cache_dir=str(cache), train_group_size=1)
    assert other_options.directory != first.directory
    synthetic(path, 51)  # the file changed: prepared again
    changed = prepare_training_data(path, cache_dir=str(cache), train_group_size=4)
    assert not changed.from_cache and changed.report.num_records == 51
    # bad data leaves no cache behind and still names file:line:field, on the second try too
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": "q", "pos": ["p"], "neg": [3]}) + "\n")
    for _ in range(2):
        with pytest.raises(DataValidationError, match=r"bad.jsonl:1: field 'neg\[0\]'"):
            M3TrainDataset(bad, cache_dir=str(cache))
    assert sorted(p.name.startswith("flagm3-") for p in cache.iterdir()) == [True] * 3


def test_the_cached_report_is_json_and_reads_back_equal(tmp_path):
    """The cache keeps its validation report as JSON (no pickle is loaded), fixes and warnings included."""
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"query": "q1", "pos": ["p1", " "], "neg": ["n1"]}) + "\n"
                    + json.dumps({"query": "q2", "pos": ["p2"], "neg": ["n2", "n3"]}) + "\n")
    cache = tmp_path / "cache"
    first = prepare_training_data(path, cache_dir=str(cache), train_group_size=2)
    again = prepare_training_data(path, cache_dir=str(cache), train_group_size=2)
    assert again.from_cache and not list(Path(again.directory).glob("*.pkl"))
    json.loads((Path(again.directory) / "report.json").read_text())
    assert again.report == first.report and sum(again.report.fixes.values()) >= 1


def test_construction_does_not_hold_the_records_in_python(tmp_path):
    """Python allocations while building the dataset stay bounded as the file grows (the records live in Arrow,
    memory-mapped); before, every record was a Python object (about 3 kB each here)."""
    peaks = {}
    for n in (2_000, 20_000):
        path = synthetic(tmp_path / f"train{n}.jsonl", n)
        tracemalloc.start()
        ds = M3TrainDataset(path, train_group_size=4, tokenizer=NoTokenizer(), cache_dir=str(tmp_path / "c"))
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(ds) == n and ds[n - 1]["passages"][0] == f"positive {n - 1}: lift on a wing in flow {n - 1}"
    assert peaks[20_000] < 1.5 * peaks[2_000] + 2e6, peaks  # measured 2.6 MB and 2.7 MB


def test_lengths_only_when_grouping_by_length(tmp_path, tiny_tokenizer):
    tokenizer = tiny_tokenizer
    path = synthetic(tmp_path / "train.jsonl", 40)
    ds = M3TrainDataset(path, train_group_size=2, tokenizer=tokenizer, passage_max_len=12, cache_dir=str(tmp_path))
    M3BatchSampler(ds, batch_size=4, group_by_length=False)
    assert ds._lengths is None
    M3BatchSampler(ds, batch_size=4, group_by_length=True)
    expected = [min(round(sum(len(tokenizer(t)["input_ids"]) for t in texts) / len(texts)), 12)
                for texts in ([f"positive {i}: lift on a wing in flow {i}"] +
                              [f"negative {i}.{j}: heat transfer at Mach {j}" for j in range(3)] for i in range(40))]
    assert ds._lengths.tolist() == expected


def test_load_dataset_directory_and_iterable_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    parquet_dir = tmp_path / "hub_like"
    parquet_dir.mkdir()
    rows = [json.loads(line) for line in synthetic(tmp_path / "t.jsonl", 12).read_text().splitlines()]
    datasets.Dataset.from_list(rows).to_parquet(str(parquet_dir / "train.parquet"))
    ds = M3TrainDataset(f"hf:{parquet_dir}", train_group_size=3, cache_dir=str(tmp_path / "c"))
    assert len(ds) == 12 and ds[3]["query"] == "query 3 about wings" and len(ds[3]["passages"]) == 3
    stream = datasets.Dataset.from_list(rows).to_iterable_dataset()
    ds = M3TrainDataset(stream, train_group_size=3, cache_dir=str(tmp_path / "c"))
    assert len(ds) == 12 and ds[11]["passages"][0].startswith("positive 11:")
    bad = datasets.Dataset.from_list([rows[0], {"query": "", "pos": ["p"], "neg": ["n"]}]).to_iterable_dataset()
    with pytest.raises(DataValidationError, match=r"<datasets.IterableDataset #0>:2: field 'query'"):
        M3TrainDataset(bad, cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataValidationError, match="file_not_found"):
        M3TrainDataset(f"hf:{tmp_path / 'nowhere'}", cache_dir=str(tmp_path / "c"))


def test_corpus_negatives_and_idf_corpus_read_only_what_they_use(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"query": f"q{i}", "pos": [f"p{i}"]}) + "\n" for i in range(30)))
    ds = M3TrainDataset(path, train_group_size=4, cache_dir=str(tmp_path))
    for i in range(30):
        passages = ds[i]["passages"]
        assert passages[0] == f"p{i}" and len(set(passages[1:])) == 3 and f"p{i}" not in passages[1:]
    assert ds.idf_corpus() == [f"p{i}" for i in range(30)]  # all of them, in order, when few
    sample = ds.idf_corpus(max_texts=10, seed=1)
    assert len(sample) == 10 and set(sample) < {f"p{i}" for i in range(30)} and sample != ds.idf_corpus()[:10]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, data: str, cache: str, encoder_dir: str, out: str) -> None:
    import torch.distributed as dist
    from transformers import AutoTokenizer

    import flagm3.data.prepared as prepared
    from flagm3 import M3Model
    from flagm3.sparse_init import fit_sparse_head_once

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    validated = []
    original = prepared._prepare
    prepared._prepare = lambda *a, **k: validated.append(rank) or original(*a, **k)
    ds = M3TrainDataset(data, train_group_size=2, cache_dir=cache)
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    torch.manual_seed(rank)  # different random heads before the fit
    model = M3Model.from_encoder(encoder_dir, tokenizer=tokenizer)
    called = []

    def corpus():
        called.append(rank)
        return ds.idf_corpus()

    fit_sparse_head_once(model, tokenizer, corpus, "cpu", max_length=16)
    head = torch.cat([model.sparse_linear.weight.view(-1), model.sparse_linear.bias.view(-1)])
    torch.save({"validated": validated, "called": called, "head": head, "directory": ds.prepared_dir,
                "query": ds[3]["query"]}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow  # two processes (gloo): about 10 s
def test_rank_zero_prepares_and_fits_the_others_map_and_receive(tmp_path, tiny_encoder_dir):
    data = synthetic(tmp_path / "train.jsonl", 20)
    torch.multiprocessing.spawn(_rank_main, args=(free_port(), str(data), str(tmp_path / "cache"),
                                                  str(tiny_encoder_dir), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["validated"] == [0] and r1["validated"] == []  # one validation pass, on rank 0
    assert r0["called"] == [0] and r1["called"] == []  # one IDF fit, on rank 0
    assert r0["directory"] == r1["directory"] and r0["query"] == r1["query"] == "query 3 about wings"
    assert torch.equal(r0["head"], r1["head"])  # broadcast


def test_resume_does_not_refit_the_sparse_head(tmp_path, tiny_encoder_dir, monkeypatch):
    from conftest import build_cli_trainer, write_train_file

    import flagm3.train as train

    fits = []
    monkeypatch.setattr(train, "fit_sparse_head_once", lambda *a, **k: fits.append(1))
    data = write_train_file(tmp_path / "t.jsonl", 8)
    build_cli_trainer(tiny_encoder_dir, data, tmp_path / "out", "--cache_path", str(tmp_path / "c"))
    assert fits == [1]
    build_cli_trainer(tiny_encoder_dir, data, tmp_path / "out", "--resume_from_checkpoint", str(tmp_path / "ck"),
                      "--cache_path", str(tmp_path / "c"))
    assert fits == [1]
    assert SENTENCES  # the training file is made of conftest's sentences
