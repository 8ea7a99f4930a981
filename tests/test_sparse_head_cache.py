"""The fitted sparse head cached beside the prepared data (flagm3.sparse_head_cache): a second run loads exactly the
head the first fitted, the key follows the model, the data and the options, a bad entry is refitted, never loaded."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
from conftest import build_cli_trainer, write_train_file

import flagm3.sparse_init as sparse_init
from flagm3.sparse_head_cache import SparseHeadCache, fit_options, head_cache_key

pytestmark = pytest.mark.usefixtures("one_thread")


def head(model) -> torch.Tensor:
    return torch.cat([model.sparse_linear.weight.detach().view(-1), model.sparse_linear.bias.detach().view(-1)])


@pytest.fixture()
def count_fits(monkeypatch):
    fits = []
    real = sparse_init.init_sparse_head_from_idf

    def counting(*args, **kwargs):
        fits.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sparse_init, "init_sparse_head_from_idf", counting)
    return fits


def entries(cache) -> list[str]:
    return sorted(n for n in os.listdir(cache) if n.startswith("flagm3-sparse-head-"))


def test_second_run_loads_exactly_the_fitted_head(tmp_path, tiny_encoder_dir, count_fits):
    data = write_train_file(tmp_path / "t.jsonl", 8)
    cache = tmp_path / "cache"
    first = build_cli_trainer(tiny_encoder_dir, data, tmp_path / "out", "--cache_path", str(cache))
    assert count_fits == [1] and len(entries(cache)) == 1
    second = build_cli_trainer(tiny_encoder_dir, data, tmp_path / "out", "--cache_path", str(cache))
    assert count_fits == [1]  # not fitted again
    assert torch.equal(head(first.model), head(second.model))  # bit for bit
    # the data changes: another entry, fitted again
    data2 = write_train_file(tmp_path / "t2.jsonl", 9)
    build_cli_trainer(tiny_encoder_dir, data2, tmp_path / "out", "--cache_path", str(cache))
    assert count_fits == [1, 1] and len(entries(cache)) == 2
    # a fit option (the passages' length) changes: fitted again
    build_cli_trainer(tiny_encoder_dir, data, tmp_path / "out", "--cache_path", str(cache), "--passage_max_len", "12")
    assert count_fits == [1, 1, 1] and len(entries(cache)) == 3


def test_a_corrupt_entry_is_refitted_with_a_warning_never_loaded(tmp_path, tiny_encoder_dir, count_fits, caplog):
    data = write_train_file(tmp_path / "t.jsonl", 8)
    cache = tmp_path / "cache"
    fitted = head(build_cli_trainer(tiny_encoder_dir, data, tmp_path / "out", "--cache_path", str(cache)).model)
    (entry,) = entries(cache)
    path = cache / entry
    good = path.read_bytes()
    for bad in (good[: len(good) // 2], b"not a safetensors file", good.replace(b"weight", b"wrong!")):
        path.write_bytes(bad)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="flagm3.sparse_head_cache"):
            model = build_cli_trainer(tiny_encoder_dir, data, tmp_path / "out", "--cache_path", str(cache)).model
        assert "unusable" in caplog.text and "fitting the head again" in caplog.text
        assert torch.equal(head(model), fitted)  # refitted (same result), not the corrupt bytes
        assert path.read_bytes() != bad  # and the entry rewritten
    assert len(count_fits) == 4


def test_an_entry_with_nan_or_another_key_is_not_loaded(tmp_path, tiny_model, caplog):
    from safetensors.torch import save_file

    cache = SparseHeadCache(str(tmp_path), "k1")
    before = head(tiny_model).clone()
    h = tiny_model.sparse_linear
    save_file({"weight": torch.full_like(h.weight, float("nan")), "bias": h.bias.detach().clone()}, cache.path,
              metadata={"key": "k1", "stats": "{}"})
    with caplog.at_level(logging.WARNING, logger="flagm3.sparse_head_cache"):
        assert cache.load(tiny_model) is None
    save_file({"weight": h.weight.detach() + 1, "bias": h.bias.detach().clone()}, cache.path,
              metadata={"key": "k2", "stats": "{}"})
    with caplog.at_level(logging.WARNING, logger="flagm3.sparse_head_cache"):
        assert cache.load(tiny_model) is None
    assert torch.equal(head(tiny_model), before)
    assert caplog.text.count("unusable") == 2


def test_key_follows_model_tokenizer_data_options_and_device(tmp_path, tiny_encoder_dir, tiny_model, tiny_tokenizer):
    options = fit_options(max_length=16)
    key = head_cache_key(str(tiny_encoder_dir), tiny_model, tiny_tokenizer, "data-a", options)
    assert key == head_cache_key(str(tiny_encoder_dir), tiny_model, tiny_tokenizer, "data-a", fit_options(max_length=16))
    assert key != head_cache_key(str(tiny_encoder_dir), tiny_model, tiny_tokenizer, "data-b", options)
    assert key != head_cache_key(str(tiny_encoder_dir), tiny_model, tiny_tokenizer, "data-a", fit_options(max_length=17))
    assert key != head_cache_key(str(tiny_encoder_dir), tiny_model, tiny_tokenizer, "data-a",
                                 fit_options(max_length=16, max_texts=10))
    assert key != head_cache_key(str(tiny_encoder_dir), tiny_model, tiny_tokenizer, "data-a", options, device="meta")
    # another copy of the model (other path), then new weights at the same path
    copy = tmp_path / "copy"
    shutil.copytree(tiny_encoder_dir, copy)
    key_copy = head_cache_key(str(copy), tiny_model, tiny_tokenizer, "data-a", options)
    assert key_copy != key
    weights = next(p for p in copy.iterdir() if p.suffix == ".safetensors")
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert head_cache_key(str(copy), tiny_model, tiny_tokenizer, "data-a", options) != key_copy
    # the tokenizer's vocabulary changes (a fresh copy: the fixture is shared)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    assert head_cache_key(str(tiny_encoder_dir), tiny_model, tokenizer, "data-a", options) == key
    tokenizer.add_tokens(["zzqx_new_token"])
    assert head_cache_key(str(tiny_encoder_dir), tiny_model, tokenizer, "data-a", options) != key
    assert head_cache_key(str(tmp_path / "no-such-dir"), tiny_model, tiny_tokenizer, "data-a", options) is None


def test_data_key_follows_the_prepared_data_and_is_none_without_a_fingerprint(tmp_path):
    import datasets

    from flagm3.data import M3TrainDataset

    data = write_train_file(tmp_path / "t.jsonl", 8)
    cache = str(tmp_path / "c")
    key = M3TrainDataset(str(data), train_group_size=2, cache_dir=cache).idf_corpus_key()
    assert key is not None
    assert M3TrainDataset(str(data), train_group_size=2, cache_dir=cache).idf_corpus_key() == key
    assert M3TrainDataset(str(data), train_group_size=2, cache_dir=cache, max_example_num_per_dataset=4,
                          ).idf_corpus_key() != key  # another subsample
    assert M3TrainDataset(str(data), train_group_size=2, cache_dir=cache).idf_corpus_key(max_texts=5) != key
    write_train_file(data, 9)  # the file changes
    assert M3TrainDataset(str(data), train_group_size=2, cache_dir=cache).idf_corpus_key() != key
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    stream = datasets.Dataset.from_list(rows).to_iterable_dataset()  # in memory: no fingerprint, never cached
    assert M3TrainDataset(stream, train_group_size=2, cache_dir=cache).idf_corpus_key() is None


def _rank_main(rank: int, port: int, encoder_dir: str, cache_dir: str, out: str) -> None:
    import torch.distributed as dist
    from conftest import SENTENCES
    from transformers import AutoTokenizer

    from flagm3 import M3Model
    from flagm3.sparse_init import fit_sparse_head_once

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    cache = SparseHeadCache(cache_dir, "k")
    heads, read = [], []
    for run in range(2):  # the second run: rank 0 loads the entry the first wrote, every rank gets it
        torch.manual_seed(10 * rank + run)  # different random heads before the fit
        model = M3Model.from_encoder(encoder_dir, tokenizer=tokenizer)
        fit_sparse_head_once(model, tokenizer, lambda run=run: read.append(run) or list(SENTENCES), "cpu", max_length=16,
                             cache=cache)
        heads.append(head(model))
    torch.save({"heads": heads, "read": read}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow  # two processes (gloo): about 10 s
def test_rank_zero_loads_the_cached_head_and_every_rank_receives_it(tmp_path, tiny_encoder_dir):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_rank_main, args=(port, str(tiny_encoder_dir), str(tmp_path / "cache"),
                                                  str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["read"] == [0] and r1["read"] == []  # the corpus read once: rank 0, first run
    for h in (r0["heads"][1], r1["heads"][0], r1["heads"][1]):
        assert torch.equal(h, r0["heads"][0])


def test_key_ignores_the_tokenizers_truncation_and_padding_state(tiny_encoder_dir, tiny_model):
    """Encoding with truncation=/padding= rewrites a fast tokenizer's truncation and padding state: the key must
    not follow it (the same tokenizer, used before or not, fits the same head)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    options = fit_options(max_length=16)
    key = head_cache_key(str(tiny_encoder_dir), tiny_model, tokenizer, "data-a", options)
    before = tokenizer.backend_tokenizer.to_str()
    tokenizer(["lift and drag of a wing"], truncation=True, max_length=3, padding="max_length")
    assert tokenizer.backend_tokenizer.to_str() != before  # the state the key must ignore did change
    assert head_cache_key(str(tiny_encoder_dir), tiny_model, tokenizer, "data-a", options) == key
