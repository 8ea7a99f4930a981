"""The documentation builds and tells the truth about the command line.

- ``mkdocs build --strict`` succeeds (every nav entry and internal link resolves);
- one test checks docs/cli.md against the parsers both ways: every argument of ``flagm3 train`` that flagm3
  defines (``M3ModelArguments``, ``M3DataArguments`` and the fields ``M3TrainingArguments`` declares itself,
  ``--no_*`` spellings included) and every option of the other subcommands has a row under its subcommand showing
  the parser's real default, every ``--flag`` written in a subcommand's section exists in that parser, and every
  ``flagm3 ...`` / ``-m flagm3.train`` command line in the README, the docs and examples/launch parses;
- ``docs/api.md`` documents every name the package exports;
- ``docs/migration.md`` maps every FlagEmbedding 1.4.2 M3 argument, and its "not accepted" rows are really
  rejected while the others exist.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, reference_python

import flagm3
import flagm3.data
from flagm3.cli import build_parser

DOCS = REPO / "docs"
CLI_MD = DOCS / "cli.md"


# ------------------------------------------------------------------------------------------------ helpers
def section(text: str, heading: str) -> str:
    """The text of a ``## heading`` section up to the next ``## `` heading."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"docs/cli.md has no '## {heading}' section"
    return match.group(1)


def split_row(line: str) -> list[str]:
    """Cells of a Markdown table row; pipes inside code spans or escaped with a backslash do not split."""
    cells, cell, in_code, prev = [], "", False, ""
    for ch in line.strip().strip("|"):
        if ch == "`":
            in_code = not in_code
        if ch == "|" and not in_code and prev != "\\":
            cells.append(cell.strip())
            cell = ""
        else:
            cell += ch
        prev = ch
    cells.append(cell.strip())
    return cells


def table_rows(text: str) -> dict[str, list[str]]:
    """``{flag: cells}`` for every table row whose first cell names options (``--a`` / ``--b``) or a positional."""
    rows = {}
    for line in text.splitlines():
        if not line.startswith("| `"):
            continue
        cells = split_row(line)
        for name in re.findall(r"`([^`]+)`", cells[0]):
            rows[name] = cells
    return rows


def shown_default(value) -> str:
    """How docs/cli.md shows a default: ``—`` for none, else the value in a code span (lists space-joined)."""
    if value is None or value is dataclasses.MISSING or (isinstance(value, (list, tuple)) and not value):
        return "—"
    if isinstance(value, (list, tuple)):
        return f"`{' '.join(str(v) for v in value)}`"
    return f"`{value}`"


def train_parser():
    """The parser of ``flagm3 train``: the argument classes plus FlagEmbedding's legacy arguments."""
    from flagm3.arguments import M3ArgumentParser

    return M3ArgumentParser()


def flagm3_train_fields() -> dict[str, dataclasses.Field]:
    """The fields documented for ``flagm3 train``: model and data arguments, and the training fields flagm3 declares
    (FlagEmbedding's names and its own), not the inherited ``TrainingArguments``."""
    from flagm3.training_args import M3DataArguments, M3ModelArguments, M3TrainingArguments

    own = set(M3TrainingArguments.__annotations__)
    fields = [*dataclasses.fields(M3ModelArguments), *dataclasses.fields(M3DataArguments)]
    fields += [f for f in dataclasses.fields(M3TrainingArguments) if f.name in own]
    return {f.name: f for f in fields}


def field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


# -------------------------------------------------------------------------------------------------- build
def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    for page in ("index.html", "cli/index.html", "heads-and-loss/index.html", "migration/index.html"):
        assert (tmp_path / "site" / page).is_file(), page


# ----------------------------------------------------------------------------------------- cli reference
def shell_commands(text: str) -> list[str]:
    """The command lines of the ```bash blocks of a Markdown text (continuations joined, comments removed)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        block = block.replace("\\\n", " ")
        for line in block.splitlines():
            line = re.sub(r"\s#.*$", "", line).strip()
            commands.extend(part.strip() for part in line.split("&&") if part.strip())
    return commands


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.glob("*.md")), *sorted((REPO / "examples").rglob("*.md"))]


FLAG = re.compile(r"--[A-Za-z][\w-]*(?![\w<-])")
COMMAND = re.compile(r"flagm3(?:\.train| (\w+))")


def flags_written(text: str, command: str, commands: set[str]) -> list[tuple[str, str, str]]:
    """``(subcommand, --flag, line)`` for every option written in a section of docs/cli.md: it belongs to the
    section's subcommand unless the line names another one before it (``flagm3 mine --teacher-scores``)."""
    found = []
    for line in text.splitlines():
        for match in FLAG.finditer(line):
            owner = command
            for named in COMMAND.finditer(line[: match.start()]):
                owner = "train" if named.group(1) is None else named.group(1)
            if owner in commands:
                found.append((owner, match.group(0), line))
    return found


def command_line_options(path: Path, command: str) -> list[tuple[str, str]]:
    """``(subcommand, --option)`` of a ``flagm3 ...``, ``-m flagm3.train`` or ``examples/launch`` command line."""
    tokens = shlex.split(command)
    if "flagm3" in tokens and tokens.index("flagm3") + 1 < len(tokens):
        i = tokens.index("flagm3")
        sub = tokens[i + 1]
    elif "flagm3.train" in tokens:
        i, sub = tokens.index("flagm3.train") - 1, "train"
    elif any(t.startswith("examples/launch/") for t in tokens):  # extra arguments go to flagm3 train
        i = next(n for n, t in enumerate(tokens) if t.startswith("examples/launch/")) - 1
        sub = "train"
    else:
        return []
    if sub.startswith("-"):  # flagm3 --version / --help
        return [("", sub)]
    return [(sub, t.split("=", 1)[0]) for t in tokens[i + 2:] if t.startswith("--")] or [(sub, "")]


def test_documented_flags_and_commands_match_the_parsers():
    """docs/cli.md and the parsers agree both ways, and every command line written in the docs, the README and
    examples/launch parses: every option of every subcommand has a row under its section with the parser's
    default; every ``--flag`` written in a subcommand's section exists in that subcommand's parser (a former name
    kept as an alias counts); every documented command line uses real subcommands and options."""
    text = CLI_MD.read_text(encoding="utf-8")
    parsers = {**subparsers(), "train": train_parser()}
    top = build_parser()
    problems = []
    for command, parser in parsers.items():
        body = section(text, f"flagm3 {command}")
        rows = table_rows(body)
        if command == "train":
            fields = flagm3_train_fields()
            documented = {a.option_strings[0]: a for a in parser._actions if a.dest in fields}
            for flag, action in documented.items():  # the underscore spelling: --name or --no_name
                if flag not in rows:
                    problems.append(f"cli.md (flagm3 train) does not document {flag}")
                elif not flag.startswith("--no_") and rows[flag][2] != shown_default(field_default(fields[action.dest])):
                    problems.append(f"cli.md: train {flag} shows default {rows[flag][2]}")
            for name in ("train_group_size", "negatives_cross_device", "unified_finetuning", "use_self_distill",
                         "kd_loss_type", "sub_batch_size", "colbert_dim"):  # FlagEmbedding's names
                if f"--{name}" not in rows:
                    problems.append(f"cli.md (flagm3 train) does not document FlagEmbedding's --{name}")
        else:
            for action in parser._actions:
                if isinstance(action, argparse._HelpAction):
                    continue
                name = action.option_strings[0] if action.option_strings else action.dest
                if name not in rows:
                    problems.append(f"cli.md (flagm3 {command}) does not document {name}")
                elif action.nargs != 0 and rows[name][2] != shown_default(action.default):
                    problems.append(f"cli.md: {command} {name} shows default {rows[name][2]}, "
                                    f"code has {shown_default(action.default)}")
        for owner, flag, line in flags_written(body, command, set(parsers)):
            if not parsers[owner].accepts(flag):
                problems.append(f"cli.md (flagm3 {command}): flagm3 {owner} has no {flag}: {line.strip()[:100]}")
    checked = 0
    sources = [(path, shell_commands(path.read_text(encoding="utf-8"))) for path in doc_files()]
    for script in sorted((REPO / "examples" / "launch").glob("*.sh")):  # their argument lines go to flagm3 train
        lines = [ln.split("#")[0].strip().rstrip("\\") for ln in script.read_text(encoding="utf-8").splitlines()]
        sources.append((script, [f"flagm3 train {ln}" for ln in lines if ln.startswith("--")]))
    for path, commands in sources:
        for command in commands:
            for sub, option in command_line_options(path, command):
                checked += 1
                if sub == "":
                    ok = top.accepts(option)
                elif sub not in parsers:
                    problems.append(f"{path.name}: `{command}` uses an unknown subcommand {sub!r}")
                    continue
                else:
                    ok = option == "" or parsers[sub].accepts(option)
                if not ok:
                    problems.append(f"{path.name}: `{command}`: flagm3 {sub} has no {option}")
    assert checked >= 60, f"only {checked} documented options found"
    assert not problems, "\n".join(problems)


def test_readme_quick_start_commands():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    commands = shell_commands(readme)
    assert "flagm3 demo" in commands
    assert "python3 -m pytest -q" in commands
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    # .ci/run runs the README's demo and test blocks as written, read from README.md by .ci/readme_command.py
    for name, expected in (("demo", "flagm3 demo"), ("test", "python3 -m pytest -q")):
        assert f'"$(python3 .ci/readme_command.py {name})"' in ci, f".ci/run no longer runs the README's {name} command"
        out = subprocess.run([sys.executable, str(REPO / ".ci" / "readme_command.py"), name], capture_output=True,
                             text=True, check=True).stdout.strip()
        assert out.startswith("pip install torch==") and out.endswith(expected), out


# ------------------------------------------------------------------------------------------- api reference
def test_api_reference_documents_every_export():
    api = (DOCS / "api.md").read_text(encoding="utf-8")
    headings = set(re.findall(r"^#{3,4} `([\w.]+)`", api, re.M))
    short = {h.rsplit(".", 1)[-1] for h in headings}
    for module in (flagm3, flagm3.data):
        for name in module.__all__:
            if name.startswith("__") or name == "BGEM3FlagModel":  # the alias is described in the text
                continue
            assert name in short, f"docs/api.md has no entry for {module.__name__}.{name}"
    assert "BGEM3FlagModel" in api


# ------------------------------------------------------------------------------------------------ migration
def flagembedding_source() -> Path:
    """FlagEmbedding's package directory in the reference environment (nothing is imported)."""
    python = reference_python()
    code = "import importlib.util; print(importlib.util.find_spec('FlagEmbedding').submodule_search_locations[0])"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return Path(out.stdout.strip())


def dataclass_fields(path: Path) -> dict[str, list[str]]:
    """``{class name: [field names]}`` of the annotated class attributes in a Python file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        node.name: [s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
        for node in tree.body
        if isinstance(node, ast.ClassDef)
    }


def test_migration_maps_every_flagembedding_argument():
    root = flagembedding_source()
    names = []
    for rel in ("abc/finetune/embedder/AbsArguments.py", "finetune/embedder/encoder_only/m3/arguments.py"):
        for fields in dataclass_fields(root / rel).values():
            names += fields
    assert len(names) > 30, names
    text = (DOCS / "migration.md").read_text(encoding="utf-8")
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = split_row(line)
            for name in re.findall(r"`(\w+)`", cells[0]):
                rows[name] = cells
    parser = train_parser()
    for name in names:
        assert name in rows, f"docs/migration.md does not map FlagEmbedding's {name}"
        flagm3_cell = rows[name][1]
        if flagm3_cell == "—":
            assert not parser.accepts(f"--{name}"), f"migration.md says {name} is not accepted, but flagm3 train takes it"
        else:
            for option in re.findall(r"`(--\w+)`", flagm3_cell):
                assert parser.accepts(option), f"migration.md maps {name} to {option}, which flagm3 train does not take"
