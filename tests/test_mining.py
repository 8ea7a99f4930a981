"""Hard-negative mining: exclusions, rank window, determinism, faiss/torch agreement, teacher scores."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SENTENCES, spread_embedder

from flagm3.mining import faiss_available, mine_hard_negatives
from flagm3.scoring import dense_scores, sparse_scores

EXTRA = [" ".join(reversed(s.split()[:6])) for s in SENTENCES] + [
    " ".join(s.split()[2:8]) for s in SENTENCES
]
POOL = list(dict.fromkeys(SENTENCES + EXTRA))
QUERIES = ["similarity laws for models", "wing in a slipstream", "supersonic boundary layer", "heat transfer",
           "buckling of shells", "flutter of wings"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(scope="module")
def embedder(tiny_encoder_dir, tiny_tokenizer):
    return spread_embedder(tiny_encoder_dir, tiny_tokenizer, 2, batch_size=4,
                           query_max_length=32, passage_max_length=64)


@pytest.fixture()
def data(tmp_path):
    """Training lines (one with extra fields, one whose query text is also in the pool) and a pool file."""
    records = [
        {"query": q, "pos": [POOL[i], POOL[i + 10]], "neg": [POOL[i + 1]], "id": i}
        for i, q in enumerate(QUERIES)
    ]
    records[1]["pos_scores"] = [0.5, 0.4]  # stale teacher scores of an older model
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records))
    pool = tmp_path / "pool.jsonl"
    lines = [json.dumps({"text": t}) if i % 2 else json.dumps(t) for i, t in enumerate(POOL + [QUERIES[2]])]
    pool.write_text("\n".join(lines) + "\n")
    return records, train, pool


def encode_all(embedder, texts, max_length):
    [(indices, out)] = embedder.iter_outputs(texts, max_length, batch_size=len(texts), show_progress=False)
    order = torch.argsort(torch.tensor(indices))
    return {key: value[order] for key, value in out.items()}


def brute_force_ranking(embedder, queries, pool, hybrid=False):
    """Pool indices by decreasing score for each query: [Q, P], from all-pairs score matrices."""
    q, p = encode_all(embedder, queries, 32), encode_all(embedder, pool, 64)
    scores = dense_scores(q["dense"], p["dense"])
    if hybrid:
        scores = scores + 0.3 * sparse_scores(q["sparse_ids"], q["sparse_weights"], p["sparse_ids"],
                                              p["sparse_weights"])
    return torch.argsort(scores, dim=1, descending=True)


def read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.mark.parametrize("hybrid", [False, True])
def test_negatives_come_from_the_rank_window_without_positives_or_query(embedder, data, tmp_path, hybrid):
    records, train, pool_file = data
    out = tmp_path / "mined.jsonl"
    summary = mine_hard_negatives(embedder, train, out, candidate_pool=pool_file, range_for_sampling=(2, 12),
                                  negative_number=5, use_hybrid=hybrid, seed=1, show_progress=False)
    pool = list(dict.fromkeys(POOL + [QUERIES[2]]))
    ranking = brute_force_ranking(embedder, QUERIES, pool, hybrid=hybrid)
    mined = read(out)
    assert len(mined) == len(records)
    assert summary["candidate_pool"] == len(pool) and summary["lines_short"] == 0
    assert summary["scoring"] == ("dense+sparse" if hybrid else "dense")
    assert summary["negatives"] == 5 * len(records)
    for row, (record, line) in enumerate(zip(records, mined)):
        window = {pool[j] for j in ranking[row, 2:12].tolist()} - set(record["pos"]) - {record["query"]}
        assert len(line["neg"]) == 5 and len(set(line["neg"])) == 5
        assert set(line["neg"]) <= window
        assert not set(line["neg"]) & set(record["pos"]) and record["query"] not in line["neg"]
        assert {k: v for k, v in line.items() if k not in ("neg", "pos_scores")} == {
            k: v for k, v in record.items() if k not in ("neg", "pos_scores")
        }
        assert "pos_scores" not in line and "neg_scores" not in line  # stale teacher scores dropped
    # the query copied into the pool ranks in the window of its own query, yet is never drawn
    assert QUERIES[2] in {pool[j] for j in ranking[2, :12].tolist()}


def test_seeded_draws_are_reproducible(embedder, data, tmp_path):
    _, train, pool_file = data
    args = dict(candidate_pool=pool_file, range_for_sampling="1-15", negative_number=4, show_progress=False)
    a, b, c = (tmp_path / f"{n}.jsonl" for n in "abc")
    mine_hard_negatives(embedder, train, a, seed=7, **args)
    mine_hard_negatives(embedder, train, b, seed=7, **args)
    mine_hard_negatives(embedder, train, c, seed=8, **args)
    assert a.read_text() == b.read_text()
    assert a.read_text() != c.read_text()


@pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")
def test_faiss_and_torch_search_agree(embedder, data, tmp_path):
    _, train, pool_file = data
    outputs = []
    for use_faiss in (True, False):
        out = tmp_path / f"faiss_{use_faiss}.jsonl"
        summary = mine_hard_negatives(embedder, train, out, candidate_pool=pool_file,
                                      range_for_sampling=(3, 20), negative_number=6, use_faiss=use_faiss,
                                      seed=3, show_progress=False)
        assert summary["backend"] == ("faiss" if use_faiss else "torch")
        outputs.append(out.read_text())
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("hybrid", [False, True])
def test_teacher_scores_are_the_models_scores(embedder, data, tmp_path, hybrid):
    records, train, pool_file = data
    out = tmp_path / "teacher.jsonl"
    mine_hard_negatives(embedder, train, out, candidate_pool=[t for t in POOL if t != POOL[10]],
                        range_for_sampling=(0, 8), negative_number=3, use_hybrid=hybrid, teacher_scores=True,
                        show_progress=False)
    for record, line in zip(records, read(out)):
        assert len(line["pos_scores"]) == len(record["pos"]) and len(line["neg_scores"]) == 3
        pairs = [(record["query"], p) for p in record["pos"] + line["neg"]]
        ref = embedder.compute_score(pairs, weights_for_different_modes=[1.0, 0.3, 0.0], show_progress=False)
        expected = [1.3 * s for s in ref["sparse+dense"]] if hybrid else ref["dense"]
        # written as logits: score / teacher_score_temperature (0.02 by default)
        assert line["pos_scores"] + line["neg_scores"] == pytest.approx([e / 0.02 for e in expected], abs=5e-4)


def test_small_pool_fill_and_shortage(embedder, data, tmp_path):
    records, train, _ = data
    # default pool: the union of pos and neg of the input (3 passages per line, some shared)
    pool = list(dict.fromkeys(t for r in records for t in r["pos"] + r["neg"]))
    out = tmp_path / "short.jsonl"
    summary = mine_hard_negatives(embedder, train, out, range_for_sampling=(0, 100), negative_number=50,
                                  show_progress=False)
    assert summary["candidate_pool"] == len(pool) and summary["lines_short"] == len(records)
    for record, line in zip(records, read(out)):  # every passage that is not a positive
        assert sorted(line["neg"]) == sorted(set(pool) - set(record["pos"]))

    out = tmp_path / "filled.jsonl"
    summary = mine_hard_negatives(embedder, train, out, range_for_sampling=(2, 5), negative_number=6,
                                  show_progress=False)
    ranking = brute_force_ranking(embedder, QUERIES, pool)
    assert summary["lines_filled_randomly"] == len(records) and summary["lines_short"] == 0
    for row, (record, line) in enumerate(zip(records, read(out))):
        top_two = {pool[j] for j in ranking[row, :2].tolist()}
        assert len(line["neg"]) == 6 and not set(line["neg"]) & (top_two | set(record["pos"]))
    summary = mine_hard_negatives(embedder, train, out, range_for_sampling=(2, 5), negative_number=6,
                                  fill_random=False, show_progress=False)
    assert summary["lines_filled_randomly"] == 0 and summary["lines_short"] == len(records)
    assert all(len(line["neg"]) <= 3 for line in read(out))


def test_malformed_input_names_file_and_line(embedder, tmp_path):
    train = tmp_path / "bad.jsonl"
    train.write_text('{"query": "a", "pos": ["b"]}\n{"query": "c", "pos": "d"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: field 'pos': expected an array of strings"):
        mine_hard_negatives(embedder, train, tmp_path / "o.jsonl", show_progress=False)
    train.write_text('{"query": "a", "pos": ["b"]}\n')
    pool = tmp_path / "pool.jsonl"
    pool.write_text('"x"\n{"txt": "y"}\n')
    with pytest.raises(ValueError, match=r"pool\.jsonl:2: expected"):
        mine_hard_negatives(embedder, train, tmp_path / "o.jsonl", candidate_pool=pool, show_progress=False)
    with pytest.raises(ValueError, match="range_for_sampling"):
        mine_hard_negatives(embedder, train, tmp_path / "o.jsonl", range_for_sampling=(5, 5),
                            show_progress=False)


def test_mining_checks_its_input_as_validate_does(embedder, tmp_path):
    """One validation for training data: mining reports every problem of its input at once, the same lines
    ``flagm3 validate`` prints, read by the one JSONL reader (flagm3.texts.iter_jsonl)."""
    from flagm3.data import DataValidationError, validate_data

    train = tmp_path / "bad.jsonl"
    train.write_text('{"query": "a", "pos": ["b"]}\n{"query": "", "pos": ["d"]}\n{"query": "e", "pos": []}\n'
                     '{"query": "f", "pos": ["g"], "neg": ["h"], "neg_scores": [1, 2]}\nnull\n{"query": "i"\n')
    with pytest.raises(DataValidationError) as exc:
        mine_hard_negatives(embedder, train, tmp_path / "o.jsonl", show_progress=False)
    report = validate_data([train])  # (the training-time check that a dataset can lend negatives does not apply)
    assert [str(i) for i in exc.value.issues] == [str(i) for i in report.errors if i.kind != "no_corpus_negatives"]
    assert [i.line for i in exc.value.issues] == [2, 3, 4, 5, 6]
    assert "malformed JSON: Expecting ',' delimiter (column 14)" in str(exc.value)  # just past the text, not column 1
