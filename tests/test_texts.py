"""flagm3.texts: JSONL round trips with clear errors, and instruction formatting as FlagEmbedding does it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from flagm3.texts import format_instruction, read_jsonl, with_instruction, write_jsonl


def test_jsonl_round_trip_keeps_text_and_line_numbers(tmp_path):
    records = [{"query": "größe", "pos": ["α β"]}, "a plain string", [1, 2]]
    path = tmp_path / "new" / "dir" / "data.jsonl"  # parent directories are created
    write_jsonl(path, iter(records))
    assert "größe" in path.read_text(encoding="utf-8")  # non-ASCII kept as is, not \\u escapes
    path.write_text(path.read_text(encoding="utf-8") + "\n   \n", encoding="utf-8")  # blank lines are skipped
    assert list(read_jsonl(path)) == [(1, records[0]), (2, records[1]), (3, records[2])]


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n\n{"a": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: malformed JSON: Expecting value \(column 7\)"):
        list(read_jsonl(path))


def test_format_instruction():
    assert format_instruction("text", None) == "text"
    assert format_instruction("text", "Represent: ") == "Represent: text"
    assert format_instruction("text", "Q", "<{}>\\n{}") == "<Q>\ntext"  # "\n" typed on a command line
    assert format_instruction("text", "", "{}: {}") == ": text"  # only None means no instruction


def test_with_instruction_defaults_to_the_embedder_side():
    embedder = SimpleNamespace(query_instruction_for_retrieval="q: ", query_instruction_format="{}{}",
                               passage_instruction_for_retrieval=None)
    assert with_instruction(embedder, ["a", "b"], "query") == ["q: a", "q: b"]
    assert with_instruction(embedder, ["a"], "passage") == ["a"]
    assert with_instruction(embedder, ["a"], "passage", "p: ", "[{}] {}") == ["[p: ] a"]
    assert with_instruction(SimpleNamespace(), iter(["a"]), "query") == ["a"]
