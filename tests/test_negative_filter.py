"""False negatives in mining: candidates scoring above a fraction of the positive's score are dropped and counted."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SENTENCES, spread_embedder

from flagm3.mining import mine_hard_negatives
from flagm3.negative_filter import false_negative_mask, false_negatives, teacher_scores_of
from flagm3.scoring import dense_scores

pytestmark = pytest.mark.usefixtures("one_thread")

POOL = SENTENCES + [s + " again" for s in SENTENCES[:5]]  # near-copies of the first five sentences


def test_mask_exactly_on_small_tensors():
    scores = torch.tensor([0.95, 0.9, 0.89, -0.1, 0.91])
    assert false_negative_mask(scores, 1.0, 0.9).tolist() == [True, False, False, False, True]
    # a negative positive score (logits): above positive - 10% of |positive| (-2.2) -> dropped
    assert false_negative_mask(torch.tensor([-2.0, -2.3, -1.0, -2.2]), -2.0, 0.9).tolist() == [
        True, False, True, False]
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        false_negative_mask(scores, 1.0, 1.5)


def test_teacher_scores_judge_the_passages_they_cover():
    record = {"query": "q", "pos": ["p"], "neg": ["a", "b"], "pos_scores": [10.0], "neg_scores": [9.5, 1.0]}
    teacher = teacher_scores_of(record)
    assert teacher == {"p": 10.0, "a": 9.5, "b": 1.0}
    # model scores: 'a' looks easy to the model, 'b' and 'c' look like the positive; the teacher knows a and b
    dropped = false_negatives(["a", "b", "c"], torch.tensor([0.1, 0.99, 0.99]), torch.tensor([1.0]), 0.9,
                              teacher, ["p"])
    assert dropped == {"a", "c"}
    assert teacher_scores_of({"pos": ["p"], "neg": [], "pos_scores": [1.0, 2.0]}) is None  # misaligned


def test_mining_drops_and_counts_candidates_near_the_positive(tiny_encoder_dir, tiny_tokenizer, tmp_path):
    embedder = spread_embedder(tiny_encoder_dir, tiny_tokenizer, 2, batch_size=4, query_max_length=32,
                               passage_max_length=64)
    queries = [s.split()[-2] + " " + s.split()[-1] for s in SENTENCES[:5]]
    records = [{"query": q, "pos": [SENTENCES[i]]} for i, q in enumerate(queries)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records))
    fraction = 0.9
    out = tmp_path / "mined.jsonl"
    summary = mine_hard_negatives(embedder, train, out, candidate_pool=POOL, range_for_sampling=(0, 15),
                                  negative_number=14, fill_random=False, false_negative_fraction=fraction,
                                  show_progress=False)
    # brute force: every pool passage other than the positive whose dense score beats fraction x the positive's
    q = embedder.encode_queries(queries, return_dense=True, return_sparse=False, return_colbert_vecs=False)
    p = embedder.encode_corpus(POOL, return_dense=True, return_sparse=False, return_colbert_vecs=False)
    scores = dense_scores(torch.as_tensor(q["dense_vecs"]), torch.as_tensor(p["dense_vecs"]))
    expected = []
    for i in range(5):
        pos = float(scores[i, i])
        expected.append({POOL[j] for j in range(len(POOL)) if j != i
                         and float(scores[i, j]) > pos - (1 - fraction) * abs(pos)})
    mined = [json.loads(line) for line in out.read_text().splitlines()]
    for record, drop in zip(mined, expected):
        assert not drop & set(record["neg"])
        assert set(record["neg"]) == set(POOL) - drop - set(record["pos"])  # the window is the whole pool
    assert summary["false_negatives_dropped"] == sum(map(len, expected)) > 0
    assert any(s + " again" in drop for s, drop in zip(SENTENCES, expected))  # a near-copy was caught
    plain = mine_hard_negatives(embedder, train, tmp_path / "plain.jsonl", candidate_pool=POOL,
                                range_for_sampling=(0, 15), negative_number=14, fill_random=False,
                                show_progress=False)
    assert plain["false_negatives_dropped"] == 0 and plain["negatives"] == 5 * 14


def test_a_bad_fraction_fails_before_encoding(tmp_path):
    train = tmp_path / "t.jsonl"
    train.write_text(json.dumps({"query": "q", "pos": ["p"]}) + "\n")
    with pytest.raises(ValueError, match=r"false-negative fraction must be in \(0, 1\], got 1.5"):
        mine_hard_negatives(None, train, tmp_path / "o.jsonl", false_negative_fraction=1.5)


def test_the_cli_option_reaches_the_miner():
    from flagm3.cli import _options, build_parser

    args = build_parser().parse_args(["mine", "--model", "m", "--input", "i", "--output", "o",
                                      "--false-negative-fraction", "0.9"])
    assert _options(args, mine_hard_negatives)["false_negative_fraction"] == 0.9
    plain = build_parser().parse_args(["mine", "--model", "m", "--input", "i", "--output", "o"])
    assert _options(plain, mine_hard_negatives)["false_negative_fraction"] is None
