"""One command-line convention for every ``flagm3`` subcommand (flagm3/cli_convention.py): both spellings, "did
you mean" for unknown options, one name per concept with the old names as aliases, help and defaults shown,
``--version``, a fast ``--help``, and options added later get all of it."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO

import flagm3
from flagm3.arguments import M3ArgumentParser
from flagm3.cli import build_parser
from flagm3.cli import main as cli_main

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: p for name, p in action.choices.items() if name != "train"}


def all_parsers() -> dict[str, argparse.ArgumentParser]:
    return {**subparsers(), "train": M3ArgumentParser()}


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err.strip()


# ------------------------------------------------------------------------------------------- spellings
@pytest.mark.parametrize("command", sorted(all_parsers()))
def test_every_option_of_every_subcommand_takes_both_spellings(command):
    parser = all_parsers()[command]
    options = [o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    assert options
    for option in options:
        other = "--" + (option[2:].replace("_", "-") if "_" in option[2:] else option[2:].replace("-", "_"))
        assert parser.accepts(other), f"flagm3 {command}: {other} (for {option}) is not accepted"
        assert parser.normalize_args([other, "x"])[0] in parser._option_string_actions


def test_underscores_parse_like_dashes_outside_train():
    parser = build_parser()
    dashes = parser.parse_args(["eval", "--model", "m", "--data", "d", "--batch-size", "3", "--k-values", "1", "5",
                                "--query-max-len", "16"])
    underscores = parser.parse_args(["eval", "--model", "m", "--data", "d", "--batch_size=3", "--k_values", "1", "5",
                                     "--query_max_len", "16"])
    assert vars(dashes) == vars(underscores)
    assert dashes.batch_size == 3 and dashes.max_query_length == 16


def test_train_takes_dashes_for_flagembedding_legacy_arguments_too():
    (_, data, training), _ = M3ArgumentParser().parse(
        ["--model-name-or-path", "m", "--output-dir", "/tmp/o", "--train-data", "a.jsonl", "--train-group-size", "4",
         "--warmup-ratio", "0.1", "--cache-path", "/tmp/c"])
    assert data.train_group_size == 4 and training.warmup_steps == 0.1


# ----------------------------------------------------------------------------------------- one concept
@pytest.mark.parametrize("command, old, new, dest, value", [
    ("eval", "--max-query-length", "--query-max-len", "max_query_length", "7"),
    ("eval", "--max_passage_length", "--passage-max-len", "max_passage_length", "9"),
    ("mine", "--max-query-length", "--query-max-len", "query_max_len", "7"),
    ("index", "--max-passage-length", "--passage-max-len", "passage_max_len", "9"),
    ("search", "--max-query-length", "--query-max-len", "query_max_len", "7"),
    ("search", "--query-instruction", "--query-instruction-for-retrieval", "query_instruction_for_retrieval", "q: "),
    ("validate", "--tokenizer", "--tokenizer-name", "tokenizer", "t"),
])
def test_one_name_per_concept_and_the_old_names_still_work(command, old, new, dest, value):
    required = {"eval": ["--model", "m", "--data", "d"], "mine": ["--model", "m", "--input", "i", "--output", "o"],
                "index": ["--model", "m", "--qdrant", "q", "--collection", "c", "--corpus", "c.jsonl"],
                "search": ["--model", "m", "--qdrant", "q", "--collection", "c", "--query", "x"],
                "validate": ["data.jsonl"]}[command]
    parser = build_parser()
    by_old = parser.parse_args([command, *required, old, value])
    by_new = parser.parse_args([command, *required, new, value])
    assert getattr(by_old, dest) == getattr(by_new, dest) != parser.parse_args([command, *required]).__dict__[dest]
    assert old not in parser.format_help()  # --help lists the one name


def test_max_length_has_one_name_across_subcommands():
    """train's FlagEmbedding names, with dashes or underscores, everywhere a subcommand truncates texts."""
    train = M3ArgumentParser()
    assert train.accepts("--query_max_len") and train.accepts("--passage_max_len")
    for command, parser in subparsers().items():
        names = {o for a in parser._actions for o in a.option_strings if "max" in o and "len" in o}
        assert names <= {"--query-max-len", "--passage-max-len"}, (command, names)


def test_unused_length_options_are_gone():
    """index encodes only passages, search only queries."""
    assert not subparsers()["index"].accepts("--query-max-len")
    assert not subparsers()["search"].accepts("--passage-max-len")


# -------------------------------------------------------------------------------------------- mistakes
@pytest.mark.parametrize("argv, typo, suggestion", [
    (["eval", "--model", "m", "--data", "d", "--batch_sise", "3"], "--batch_sise", "--batch-size"),
    (["eval", "--modle", "m", "--data", "d"], "--modle", "--model"),
    (["mine", "--model", "m", "--input", "i", "--output", "o", "--negative_numbr", "3"], "--negative_numbr",
     "--negative-number"),
    (["validate", "x.jsonl", "--query-max-length", "3"], "--query-max-length", "--query-max-len"),
    (["demo", "--max_step", "3"], "--max_step", "--max-steps"),
    (["train", "--model_name_or_path", "m", "--output_dir", "o", "--warmup-ratoi", "0.1"], "--warmup-ratoi",
     "--warmup_ratio"),
])
def test_an_unknown_option_is_one_line_with_did_you_mean_and_exit_2(argv, typo, suggestion, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2
    assert "\n" not in err and "Traceback" not in err, err
    assert typo in err and f"did you mean {suggestion}?" in err, err


def test_an_option_added_later_gets_the_convention(capsys):
    """A helper adding an option to a subcommand (or a new parser from the factory) needs nothing else."""
    from flagm3.cli_convention import ConventionParser, build_convention_parser

    parser = build_convention_parser(prog="flagm3 x")
    parser.add_argument("--new-knob", type=int, default=5, help="A new knob.")
    assert parser.parse_args(["--new_knob", "7"]).new_knob == 7
    assert "(default: 5)" in parser.format_help()
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--new-knbo", "1"])
    assert exc.value.code == 2 and "did you mean --new-knob?" in capsys.readouterr().err
    sub = build_parser()
    eval_parser = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices["eval"]
    assert isinstance(eval_parser, ConventionParser)
    eval_parser.add_argument("--later-option", default="x", help="Added by another module.")
    assert sub.parse_args(["eval", "--model", "m", "--data", "d", "--later_option", "y"]).later_option == "y"


def test_no_abbreviations():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--model", "m", "--data", "d", "--batch", "3"])


# ------------------------------------------------------------------------------------------------ help
@pytest.mark.parametrize("command", sorted(all_parsers()))
def test_every_option_has_help_and_shows_its_default(command):
    parser = all_parsers()[command]
    own = None
    if command == "train":  # flagm3's own fields (transformers documents TrainingArguments' own)
        from test_docs import flagm3_train_fields

        own = set(flagm3_train_fields()) | set(parser.legacy)
    text = parser.format_help()
    for action in parser._actions:
        if own is not None and action.dest not in own:
            continue
        name = action.option_strings[0] if action.option_strings else action.dest
        assert action.help and action.help.strip(), f"flagm3 {command} {name} has no help text"
        default = action.default
        if action.option_strings and default not in (None, False, argparse.SUPPRESS, []) and action.nargs != 0:
            shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
            assert f"(default: {shown})" in " ".join(parser._get_formatter()._get_help_string(action).split()) \
                .replace("%(default)s", shown), (command, name)
    assert "``" not in text


def test_version():
    assert flagm3.__version__ and flagm3.__version__[0].isdigit()
    out = subprocess.run([sys.executable, "-m", "flagm3", "--version"], capture_output=True, text=True, env=ENV,
                         timeout=60, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == f"flagm3 {flagm3.__version__}", out


def test_help_is_fast_lists_every_subcommand_and_imports_no_torch():
    code = ("import sys, io, contextlib\n"
            "from flagm3.cli import main\n"
            "buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n"
            "    try: main(['--help'])\n"
            "    except SystemExit: pass\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'numpy', 'scipy') if m in sys.modules)\n"
            "print(heavy); print(buf.getvalue())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "[]", out.stdout.splitlines()[0]
    for command in ("train", "export", "eval", "index", "search", "mine", "validate", "demo"):
        assert f"    {command} " in out.stdout or f"    {command}\n" in out.stdout, command
    start = time.perf_counter()  # a bare interpreter start, then flagm3 --help (the machine is shared)
    subprocess.run([sys.executable, "-c", "pass"], env=ENV, timeout=60, cwd=REPO, check=True)
    bare, start = time.perf_counter() - start, time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "flagm3", "--help"], capture_output=True, text=True, env=ENV,
                         timeout=60, cwd=REPO)
    assert out.returncode == 0 and time.perf_counter() - start - bare < 1.0


# ------------------------------------------------------------------------------------------- model path
def test_a_mistyped_relative_model_path_says_it_does_not_exist(tmp_path, capsys, monkeypatch):
    (tmp_path / "runs" / "m3").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    for argv in (["export", "--model", "runs/m3x", "--output", "o"],
                 ["eval", "--model", "runs/m3x", "--data", "runs"],
                 ["train", "--model_name_or_path", "runs/m3x", "--output_dir", "o", "--train_data", "x.jsonl"]):
        code, _, err = run(argv, capsys)
        err = err or str(code)  # sys.exit(message): the message is the exit code (status 1)
        assert code not in (0, None, 2) and "runs/m3x" in err and "no such model directory" in err, err
        assert "internet" not in err


def test_a_failed_hub_lookup_for_a_missing_model_names_the_option():
    from flagm3.errors import hub_lookup_failed

    err = OSError("An error happened while trying to locate the files on the Hub ... Please check your internet "
                  "connection and try again.")
    message = hub_lookup_failed(err, {"--model": "m3-typo"})
    assert message.startswith("--model m3-typo: no such model directory") and "internet" not in message
    assert hub_lookup_failed(OSError("permission denied"), {"--model": "m3-typo"}) is None
