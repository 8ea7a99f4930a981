"""A run that says whether it helped: before/after evaluation with paired tests, alarms that name the fix,
in-batch false-negative masking (issue 20)."""

from __future__ import annotations

import json
import logging
import math
import types
from pathlib import Path

import pytest
import torch
from conftest import SENTENCES, build_cli_trainer, write_train_file
from scipy import stats

from flagm3.alarms import EmbeddingsUnchangedAlarm, LossNearZeroAlarm, MetricFallingAlarm, NoUpdateAlarm
from flagm3.before_after import BeforeAfterCallback
from flagm3.evaluation.compare import (
    compare_per_query,
    comparison_table,
    load_before_after,
    paired_test,
    per_query_metric,
    verdict,
)
from flagm3.evaluation.metrics import evaluate_run
from flagm3.losses import M3Loss, M3LossConfig
from flagm3.losses.false_negatives import mask_logits, near_duplicate_mask
from flagm3.model_card import render_model_card
from flagm3.modeling_m3 import M3Output

pytestmark = pytest.mark.usefixtures("one_thread")


def write_beir(root: Path, passages: list[str], queries: dict[str, tuple[str, list[int]]], split: str = "dev"):
    """A BEIR-layout collection: passages ``d<i>``, queries ``qid: (text, [relevant passage numbers])``."""
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n"
                                               for i, t in enumerate(passages)))
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n"
                                                for q, (t, _) in queries.items()))
    (root / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\td{i}\t1\n" for q, (_, rel) in queries.items() for i in rel))
    return root


# ------------------------------------------------------------------------------------------ paired statistics
def test_per_query_metric_averages_to_evaluate_run():
    qrels = {"a": {"d1": 1, "d2": 2}, "b": {"d3": 1}, "c": {"d9": 1}}
    runs = {"dense": {"a": {"d2": 0.9, "d5": 0.8, "d1": 0.1}, "b": {"d4": 0.5, "d3": 0.4}}}  # c: not retrieved
    per_query = per_query_metric(runs, qrels, "ndcg@10")
    assert set(per_query["dense"]) == {"a", "b", "c"} and per_query["dense"]["c"] == 0.0
    mean = sum(per_query["dense"].values()) / 3
    assert mean == pytest.approx(evaluate_run(runs["dense"], qrels, [10], ["ndcg"])["ndcg@10"], abs=1e-12)
    assert per_query["dense"]["b"] == pytest.approx(1 / math.log2(3))


def test_paired_test_is_scipys_paired_t_test_and_the_verdicts():
    before = [0.1, 0.4, 0.35, 0.8, 0.2, 0.5]
    after = [0.3, 0.45, 0.5, 0.85, 0.1, 0.7]
    diffs = [a - b for a, b in zip(after, before)]
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
    t = mean / (sd / math.sqrt(len(diffs)))
    expected = 2 * stats.t.sf(abs(t), len(diffs) - 1)
    assert paired_test(before, after) == pytest.approx(expected, rel=1e-9)
    assert paired_test(before, before) == 1.0  # nothing changed
    assert paired_test([0.1, 0.2], [0.2, 0.3]) == 0.0  # the same gain on every query
    assert verdict(0.05, 0.01) == "improved" and verdict(-0.05, 0.01) == "worse"
    assert verdict(0.05, 0.2) == "unchanged" and verdict(-0.3, 0.06) == "unchanged"
    with pytest.raises(ValueError, match="differ in length"):
        paired_test([0.1], [0.1, 0.2])


def test_compare_rows_and_table():
    qids = [f"q{i}" for i in range(8)]
    before = {"dense": dict.fromkeys(qids, 0.2), "sparse": {q: 0.1 * i for i, q in enumerate(qids)}}
    after = {"dense": {q: 0.2 + 0.1 + 0.01 * (i % 2) for i, q in enumerate(qids)},
             "sparse": {q: 0.1 * i + (0.01 if i % 2 else -0.01) for i, q in enumerate(qids)}}
    rows = compare_per_query(before, after, collection="in-domain")
    dense, sparse = rows
    assert dense["verdict"] == "improved" and dense["delta"] == pytest.approx(0.105)
    assert dense["p_value"] < 1e-6 and dense["queries"] == 8
    assert sparse["verdict"] == "unchanged" and sparse["delta"] == pytest.approx(0.0, abs=1e-12)
    table = comparison_table(rows)
    assert "| in-domain | dense | ndcg@10 | 0.2000 | 0.3050 | +0.1050 | <0.001 | improved |" in table
    worse = compare_per_query(after, before)[0]
    assert worse["verdict"] == "worse" and worse["delta"] == pytest.approx(-0.105)


# ---------------------------------------------------------------------------------- before/after in training
@pytest.fixture(scope="module")
def collections(tmp_path_factory):
    root = tmp_path_factory.mktemp("beir")
    in_domain = write_beir(root / "in", SENTENCES, {f"q{i}": (SENTENCES[i][:30], [(i + 1) % 10]) for i in range(10)})
    general = write_beir(root / "general", SENTENCES[::-1],
                         {f"g{i}": (SENTENCES[i].split()[-3], [9 - i]) for i in range(10)})
    return in_domain, general


def test_step_0_and_final_evaluation_table_log_and_card(tmp_path, tiny_encoder_dir, collections, caplog):
    in_domain, general = collections
    data = write_train_file(tmp_path / "train.jsonl", 10)
    trainer = build_cli_trainer(tiny_encoder_dir, data, tmp_path / "out", "--eval_data", str(in_domain),
                                "--general_eval_data", str(general), "--max_steps", "3", "--learning_rate", "1e-3",
                                "--head_learning_rate", "1e-2", "--eval_max_length", "32")
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, BeforeAfterCallback))
    assert list(callback.evaluators) == ["in-domain", "general"]
    untrained = callback.evaluators["in-domain"](trainer.model, trainer.processing_class)
    with caplog.at_level(logging.INFO, logger="flagm3"):
        trainer.train()
    # step 0 is the untouched model's evaluation
    assert callback.before["in-domain"]["metrics"] == pytest.approx(untrained, abs=1e-6)
    after = callback.evaluators["in-domain"](trainer.model, trainer.processing_class)
    rows = {(r["collection"], r["ranking"]): r for r in callback.rows}
    assert set(rows) == {(c, r) for c in ("in-domain", "general")
                         for r in ("dense", "sparse", "colbert", "dense+sparse", "all")}
    for ranking in ("dense", "all"):
        row = rows[("in-domain", ranking)]
        assert row["before"] == pytest.approx(untrained[f"{ranking}_ndcg@10"], abs=1e-9)
        assert row["after"] == pytest.approx(after[f"{ranking}_ndcg@10"], abs=1e-6)
        assert row["verdict"] in ("improved", "unchanged", "worse") and 0 <= row["p_value"] <= 1
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "before -> after 3 steps" in logged and "| general | colbert | ndcg@10 |" in logged
    saved = load_before_after(str(tmp_path / "out"))
    assert saved["rows"] == json.loads(json.dumps(callback.rows)) and saved["steps"] == 3
    card = render_model_card(str(tmp_path / "out"), trainer=trainer)
    assert "## Before and after training" in card and comparison_table(callback.rows) in card


def test_no_before_after_without_evaluation_data_or_when_off(tmp_path, tiny_encoder_dir, collections):
    data = write_train_file(tmp_path / "train.jsonl", 4)
    plain = build_cli_trainer(tiny_encoder_dir, data, tmp_path / "a")
    assert not any(isinstance(c, BeforeAfterCallback) for c in plain.callback_handler.callbacks)
    off = build_cli_trainer(tiny_encoder_dir, data, tmp_path / "b", "--eval_data", str(collections[0]),
                            "--before_after_eval", "False", "--alarms", "False")
    kinds = {type(c) for c in off.callback_handler.callbacks}
    assert not kinds & {BeforeAfterCallback, LossNearZeroAlarm, NoUpdateAlarm, MetricFallingAlarm}


# ------------------------------------------------------------------------------------------------------ alarms
def state(step: int = 5, max_steps: int = 10):
    return types.SimpleNamespace(global_step=step, max_steps=max_steps, is_world_process_zero=True)


def alarm_messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "flagm3.alarms"]


def test_loss_near_zero_warns_once_after_patience(caplog):
    alarm = LossNearZeroAlarm(threshold=0.01, patience=3)
    with caplog.at_level(logging.WARNING):
        for logs in ({"loss_dense": 0.001, "loss": 0.5}, {"loss_dense": 0.002}, {"loss_dense": 0.5},
                     {"loss_dense": 0.001}, {"loss_dense": 0.001}):
            alarm.on_log(None, state(), None, logs=logs)
        assert alarm_messages(caplog) == []  # the streak was broken
        for _ in range(3):
            alarm.on_log(None, state(), None, logs={"loss_dense": 0.0005, "loss_sparse": 1.0, "grad_norm": 0.0})
    [message] = alarm_messages(caplog)
    assert message.startswith("loss_dense below 0.01 for 3 logging steps")
    assert "the negatives are too easy: mine harder ones with `flagm3 mine`" in message


def test_metric_falling_two_evaluations_in_a_row(caplog):
    alarm = MetricFallingAlarm("ndcg@10")
    with caplog.at_level(logging.WARNING):
        for dense, sparse in ((0.5, 0.3), (0.45, 0.35), (0.47, 0.34), (0.46, 0.33), (0.44, 0.2)):
            alarm.on_evaluate(None, state(), None, metrics={"eval_dense_ndcg@10": dense,
                                                            "eval_sparse_ndcg@10": sparse,
                                                            "eval_dense_recall@10": 0.1})
    messages = alarm_messages(caplog)
    assert len(messages) == 2  # sparse at the 4th evaluation, dense at the 5th; each once
    assert messages[0].startswith("eval sparse ndcg@10 fell two evaluations in a row (0.3500 -> 0.3400 -> 0.3300")
    assert "flagm3 merge --auto" in messages[1] and "eval dense" in messages[1]


def test_zero_gradient_norm_warns(caplog):
    alarm = NoUpdateAlarm()
    with caplog.at_level(logging.WARNING):
        alarm.on_log(types.SimpleNamespace(), state(), None, logs={"grad_norm": 0.0})
        alarm.on_log(types.SimpleNamespace(), state(), None, logs={"grad_norm": 0.0})
    [message] = alarm_messages(caplog)
    assert message.startswith("gradient norm 0 at step 5") and "frozen" in message


def test_learning_rate_0_fires_no_update_and_unchanged_embeddings(tmp_path, tiny_encoder_dir, collections, caplog):
    data = write_train_file(tmp_path / "train.jsonl", 6)
    trainer = build_cli_trainer(tiny_encoder_dir, data, tmp_path / "out", "--eval_data", str(collections[0]),
                                "--before_after_eval", "False", "--max_steps", "2", "--learning_rate", "0", "--sparse_learning_rate", "0",
                                "--logging_steps", "1")
    with caplog.at_level(logging.WARNING):
        trainer.train()
    messages = alarm_messages(caplog)
    assert any(m.startswith("no trainable parameter moved in") and "the learning rate is 0" in m for m in messages)
    assert any(m.startswith("the dense embeddings of 10 eval queries are identical to step 0's") for m in messages)


def test_a_frozen_model_is_named(tmp_path, tiny_encoder_dir, caplog):
    data = write_train_file(tmp_path / "train.jsonl", 4)
    trainer = build_cli_trainer(tiny_encoder_dir, data, tmp_path / "out")
    alarm = NoUpdateAlarm()
    model = torch.nn.Linear(2, 2).requires_grad_(False)
    with caplog.at_level(logging.WARNING):
        alarm.on_train_begin(trainer.args, state(0), None, model=model)
    [message] = alarm_messages(caplog)
    assert message.startswith("no trainable parameter: every parameter has requires_grad=False")


def test_no_alarm_when_training_works(tmp_path, tiny_encoder_dir, collections, caplog):
    data = write_train_file(tmp_path / "train.jsonl", 6)
    trainer = build_cli_trainer(tiny_encoder_dir, data, tmp_path / "out", "--eval_data", str(collections[0]),
                                "--before_after_eval", "False", "--max_steps", "2", "--learning_rate", "1e-3",
                                "--logging_steps", "1")
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert alarm_messages(caplog) == []


def test_unchanged_embeddings_alarm_compares_with_step_0(tiny_model, tiny_tokenizer, caplog):
    alarm = EmbeddingsUnchangedAlarm(SENTENCES[:4], max_length=16)
    alarm.on_train_begin(None, state(0), None, model=tiny_model, processing_class=tiny_tokenizer)
    with torch.no_grad():
        tiny_model.encoder.embeddings.word_embeddings.weight.mul_(1.01)
    with caplog.at_level(logging.WARNING):
        alarm.on_evaluate(None, state(3), None, model=tiny_model, processing_class=tiny_tokenizer)
    assert alarm_messages(caplog) == []  # changed: no alarm
    alarm.on_train_begin(None, state(0), None, model=tiny_model, processing_class=tiny_tokenizer)
    with caplog.at_level(logging.WARNING):
        alarm.on_train_end(None, state(3), None, model=tiny_model, processing_class=tiny_tokenizer)
    [message] = alarm_messages(caplog)
    assert "identical to step 0's after 3 steps" in message


# -------------------------------------------------------------------------------- in-batch false negatives
def test_near_duplicate_mask_and_masked_logits_exactly():
    # 2 queries x group 2: passages [pos0, neg0, pos1, neg1]; neg1 is a near-copy of pos0, neg0 of nobody
    passages = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.99, 0.141]])
    positive_index = torch.tensor([0, 2])
    mask = near_duplicate_mask(passages, positive_index, threshold=0.95)
    assert mask.tolist() == [[False, False, False, True], [False, False, False, False]]
    logits = torch.tensor([[5.0, 1.0, 2.0, 4.0], [0.5, 1.5, 3.0, 2.0]])
    low = torch.finfo(torch.float32).min
    assert mask_logits(logits, mask).tolist() == [[5.0, 1.0, 2.0, low], [0.5, 1.5, 3.0, 2.0]]
    # the positive itself is never masked, even at threshold -1 (everything else is)
    everything = near_duplicate_mask(passages, positive_index, threshold=-1.0)
    assert everything.tolist() == [[False, True, True, True], [True, True, False, True]]


def test_loss_with_false_negative_masking_equals_info_nce_without_the_masked_column():
    torch.manual_seed(0)
    dense = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    dense[3] = dense[0]  # passage 3 (query 1's negative) duplicates query 0's positive
    queries = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    q, p = M3Output(dense=queries), M3Output(dense=dense)
    ids_q, ids_p = torch.ones(2, 3, dtype=torch.long), torch.ones(4, 3, dtype=torch.long)
    config = dict(heads=("dense",), use_self_distill=False, temperature=0.05)
    off = M3Loss(M3LossConfig(**config))(q, ids_q, p, ids_p, group_size=2)
    on = M3Loss(M3LossConfig(**config, false_negative_threshold=0.99))(q, ids_q, p, ids_p, group_size=2)
    logits = queries @ dense.T / 0.05
    expected_0 = torch.nn.functional.cross_entropy(logits[0, :3].unsqueeze(0), torch.tensor([0]))
    expected_1 = torch.nn.functional.cross_entropy(logits[1:2], torch.tensor([2]))
    assert on.logs["loss_dense"].item() == pytest.approx(((expected_0 + expected_1) / 2).item(), rel=1e-6)
    assert off.logs["loss_dense"].item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])).item(), rel=1e-6)
    assert on.stats["false_negatives_masked"].item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="needs|dense"):
        M3LossConfig(heads=("sparse",), false_negative_threshold=0.9).validate()
