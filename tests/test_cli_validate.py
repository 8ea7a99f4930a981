"""``flagm3 validate DATA`` and ``flagm3 train`` on bad data: every problem named by file:line and field, exit
code 1, and training refuses before the model is even loaded (not a tensor-shape crash hours in)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SENTENCES

from flagm3.cli import main

GOOD = [
    {"query": "what is lift", "pos": [SENTENCES[4]], "neg": [SENTENCES[2]]},
    {"query": "what is flutter", "pos": [SENTENCES[8]], "neg": [SENTENCES[4], SENTENCES[5]]},
    {"query": "shock waves", "pos": [SENTENCES[9]]},  # no negatives: drawn from the other records
]
# (line of bad.jsonl, expected summary line without the path)
BAD = [
    ('{"query": "drag", "pos": "a string, not a list", "neg": ["x"]}',
     "field 'pos': expected an array of strings, got string [wrong_type]"),
    ('{"query": "", "pos": ["x"], "neg": ["y"]}', "field 'query': empty query [empty_query]"),
    ('{"query": "cut", "pos": ["x"]', "malformed JSON: Expecting ',' delimiter (column 30) [malformed_json]"),
    ('{"query": "kd", "pos": ["x"], "neg": ["y", "z"], "neg_scores": [0.5]}',
     "field 'neg_scores': has 1 score(s) but 'neg' has 2 text(s) [length_mismatch]"),
    ('["not", "an", "object"]', "expected a JSON object, got array [not_an_object]"),
]


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture()
def good(tmp_path) -> Path:
    return write(tmp_path / "good.jsonl", [json.dumps(GOOD[0]), json.dumps(GOOD[1]), "", json.dumps(GOOD[2])])


@pytest.fixture()
def bad(tmp_path) -> Path:
    """Many good records, then the bad lines at the end (what a run would meet hours in)."""
    lines = [json.dumps(GOOD[i % 2]) for i in range(300)] + [line for line, _ in BAD]
    return write(tmp_path / "bad.jsonl", lines)


def expected_issues(bad: Path) -> list[str]:
    return [f"{bad}:{301 + k}: {message}" for k, (_, message) in enumerate(BAD)]


def test_validate_good_file_prints_a_summary_and_exits_0(good, capsys):
    main(["validate", str(good)])
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "training data: 3 valid record(s) in 1 dataset(s)",
        f"  {good}: 3 valid record(s)",
        "errors: 0",
        "warnings: 0",
        "fixes applied: 2 (blank_line_skipped: 1, negatives_sampled_from_corpus: 1)",
        "OK",
    ]


def test_validate_bad_files_lists_every_problem_and_exits_1(good, bad, tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(SystemExit) as exit_:
        main(["validate", str(bad), str(good), str(missing)])
    assert exit_.value.code == 1
    out = capsys.readouterr().out
    assert out.startswith("training data: 303 valid record(s) in 2 dataset(s)\n")
    assert f"  {bad}: 300 valid record(s) [5 error(s)]\n" in out
    assert ("errors: 6 (empty_query: 1, file_not_found: 1, length_mismatch: 1, malformed_json: 1, "
            "not_an_object: 1, wrong_type: 1)") in out
    assert f"  {missing}: no such file or directory [file_not_found]\n" in out
    for issue in expected_issues(bad):
        assert f"\n  {issue}" in out
    assert out.endswith("FAILED\n")


def test_validate_counts_truncation_with_the_tokenizer(good, tiny_encoder_dir, tiny_tokenizer, capsys):
    main(["validate", str(good), "--tokenizer", str(tiny_encoder_dir), "--passage-max-len", "11",
          "--query-max-len", "5"])
    out = capsys.readouterr().out
    texts = [(name, t) for r in GOOD for name in ("pos", "neg") for t in r.get(name, [])]
    long_passages = sum(len(tiny_tokenizer(t)["input_ids"]) > 11 for _, t in texts)
    long_queries = sum(len(tiny_tokenizer(r["query"])["input_ids"]) > 5 for r in GOOD)
    assert 0 < long_passages < len(texts) and 0 < long_queries < len(GOOD)
    assert f"warnings: {long_passages + long_queries} (truncated_passage: {long_passages}, " \
           f"truncated_query: {long_queries})" in out
    assert "texts that will be truncated (lengths tokenizer)" in out and out.endswith("OK\n")


def test_validate_command_exit_code_in_a_real_process(bad):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "flagm3", "validate", str(bad)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    assert all(issue in proc.stdout for issue in expected_issues(bad))


def test_train_on_bad_data_fails_before_loading_the_model_with_the_same_lines(bad, tiny_encoder_dir, tmp_path,
                                                                              monkeypatch):
    import flagm3.train

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was validated")

    monkeypatch.setattr(flagm3.train, "load_model", no_model)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--model_name_or_path", str(tiny_encoder_dir), "--train_data", str(bad),
              "--output_dir", str(out), "--use_cpu", "True", "--report_to", "none"])
    message = str(exit_.value.code)
    assert message.startswith("flagm3 train: invalid training data: 5 problem(s) in 1 source(s)\n")
    for issue in expected_issues(bad):
        assert f"\n  {issue}" in message
    assert message.endswith("Nothing was trained; `flagm3 validate DATA` prints a full summary.")
    assert not out.exists() or not any(out.iterdir())
