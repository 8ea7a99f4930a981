"""Fuzzed training data through ``flagm3 validate`` and ``flagm3 train`` (issue 16): property tests.

Files mix valid records (any Unicode text, escaped control characters, 100 kB texts, ASCII or raw UTF-8) with
broken ones (wrong types, missing fields, an empty ``pos``, truncated lines, raw control characters, duplicate
keys), with or without a BOM and CRLF line ends. Every broken line is reported as ``file:line`` with its field
(or, for JSON that does not parse, the column where the JSON itself reports the error on that line), the exit
code is 1, nothing prints a traceback, and no valid record is ever rejected. Only the command-line behaviour is
asserted, so the tests hold whatever reads the files.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flagm3.train
from flagm3.cli import main

TEXT = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20).map(
        lambda t: t if t.strip() else t + "x"),  # never blank (a blank passage is dropped, a blank query an error)
    st.just("long " * 20_000),  # 100 kB
)


@st.composite
def valid_record(draw) -> dict:
    pos = list(dict.fromkeys(draw(st.lists(TEXT, min_size=1, max_size=2))))
    neg = [t for t in dict.fromkeys(draw(st.lists(TEXT, min_size=1, max_size=3))) if t not in pos]
    return {"query": draw(TEXT), "pos": pos, "neg": neg or ["-".join(pos) + " (a negative)"]}


def _json_column(text: str) -> int:
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        assert err.lineno == 1
        return err.colno
    raise AssertionError(f"{text!r} parses")


@st.composite
def bad_line(draw) -> tuple[str, str]:
    """A broken line and what its report must contain (the field, or the JSON error's real column)."""
    record = draw(valid_record())
    kind = draw(st.sampled_from(["wrong_type", "missing", "empty_pos", "truncated", "control", "duplicate"]))
    if kind == "wrong_type":
        field = draw(st.sampled_from(["query", "pos", "neg"]))
        wrong = {"query": [3, None, True, {"a": 1}, ["x"]], "pos": [3, None, True, {"a": 1}, "x", [3]],
                 "neg": [3, True, {"a": 1}, "x", [3]]}[field]
        record[field] = draw(st.sampled_from(wrong))
        return json.dumps(record), f"field '{field}"
    if kind == "missing":
        field = draw(st.sampled_from(["query", "pos"]))
        del record[field]
        return json.dumps(record), f"field '{field}"
    if kind == "empty_pos":
        record["pos"] = []
        return json.dumps(record), "field 'pos"
    if kind == "duplicate":
        line = json.dumps(record)
        return '{"query": "again", ' + line[1:], "field 'query"
    line = json.dumps(record, ensure_ascii=draw(st.booleans()))
    if kind == "truncated":
        line = line[: draw(st.integers(1, len(line) - 1))]
    else:  # a raw control character inside the query string
        at = line.index('"query": "') + len('"query": "')
        line = line[:at] + draw(st.sampled_from(["\x00", "\x01", "\x1f", "\t", "\x0b"])) + line[at:]
    return line, f"(column {_json_column(line)})"


@st.composite
def data_file(draw) -> tuple[list[str], dict[int, str], int]:
    """``(lines, {line number: expected text}, number of valid records)``."""
    good = draw(st.lists(valid_record(), min_size=0, max_size=6))
    bad = draw(st.lists(bad_line(), min_size=0, max_size=6))
    order = draw(st.permutations([("good", r) for r in good] + [("bad", b) for b in bad]))
    ascii_only = draw(st.booleans())
    lines, expected = [], {}
    for i, (kind, item) in enumerate(order, 1):
        if kind == "good":
            lines.append(json.dumps(item, ensure_ascii=ascii_only))
        else:
            lines.append(item[0])
            expected[i] = item[1]
    return lines, expected, len(good)


def write(lines: list[str], bom: bool, crlf: bool) -> Path:
    path = Path(tempfile.mkdtemp(prefix="fuzz")) / "train.jsonl"
    end = "\r\n" if crlf else "\n"
    path.write_bytes((("\ufeff" if bom else "") + "".join(line + end for line in lines)).encode("utf-8"))
    return path


def run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
        if not isinstance(exit_.code, int) and exit_.code is not None:
            print(exit_.code)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def check_report(path: Path, output: str, expected: dict[int, str]) -> None:
    assert "Traceback" not in output
    reported = {}
    for line in output.splitlines():
        line = line.strip()
        number = line[len(str(path)) + 1 :].split(":", 1)[0]
        if line.startswith(f"{path}:") and number.isdigit():
            reported.setdefault(int(number), []).append(line)
    assert set(reported) == set(expected), (reported, expected)  # every bad line, and no good one
    for number, text in expected.items():
        assert any(text in issue for issue in reported[number]), (number, text, reported[number])


SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                            HealthCheck.too_slow,
                                                                            HealthCheck.data_too_large])


@SETTINGS
@given(data=data_file(), bom=st.booleans(), crlf=st.booleans())
def test_validate_reports_every_bad_line_and_accepts_every_good_one(data, bom, crlf, capsys):
    lines, expected, n_good = data
    path = write(lines, bom, crlf)
    code, output = run(["validate", str(path)], capsys)
    if not lines:
        assert code == 1 and "Traceback" not in output
        return
    assert code == (1 if expected else 0), output[-2000:]
    assert f"{path}: {n_good} valid record(s)" in output
    check_report(path, output, expected)


@SETTINGS
@given(data=data_file(), bom=st.booleans(), crlf=st.booleans())
def test_train_refuses_bad_data_before_the_model_and_accepts_good_data(data, bom, crlf, tiny_encoder_dir, capsys,
                                                                       monkeypatch):
    lines, expected, n_good = data

    class DataAccepted(Exception):
        pass

    def accepted(*args, **kwargs):
        raise DataAccepted

    monkeypatch.setattr(flagm3.train, "load_model", accepted)
    path = write(lines, bom, crlf)
    argv = ["train", "--model_name_or_path", str(tiny_encoder_dir), "--train_data", str(path), "--output_dir",
            str(path.parent / "out"), "--use_cpu", "True", "--report_to", "none"]
    if expected or not n_good:
        code, output = run(argv, capsys)
        assert code == 1 and output.startswith("flagm3 train: "), output[-2000:]
        if expected:
            check_report(path, output, expected)
        return
    with pytest.raises(DataAccepted):
        main(argv)
