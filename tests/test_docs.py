"""The documentation builds and tells the truth about the command line.

- ``mkdocs build --strict`` succeeds (every nav entry and internal link resolves);
- every argument of ``flagm3 train`` that flagm3 defines (``M3ModelArguments``, ``M3DataArguments`` and the fields
  ``M3TrainingArguments`` declares itself, ``--no_*`` spellings included) and every option of the other
  subcommands has a row in ``docs/cli.md``, under its subcommand, showing the parser's real default;
- every ``flagm3 ...`` / ``-m flagm3.train`` command line in the README and the docs uses only options the parser
  accepts;
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
def test_every_train_argument_has_a_row_with_its_default():
    text = section(CLI_MD.read_text(encoding="utf-8"), "flagm3 train")
    rows = table_rows(text)
    fields = flagm3_train_fields()
    documented = 0
    for action in train_parser()._actions:
        if action.dest not in fields:
            continue
        flag = action.option_strings[0]  # the underscore spelling: --name or --no_name
        assert flag in rows, f"docs/cli.md (flagm3 train) does not document {flag}"
        documented += 1
        if not flag.startswith("--no_"):
            expected = shown_default(field_default(fields[action.dest]))
            assert rows[flag][2] == expected, f"{flag}: docs/cli.md shows default {rows[flag][2]}, code has {expected}"
    assert documented >= len(fields)  # every field, plus its --no_ spelling where one exists
    # FlagEmbedding's argument names are all there
    for name in ("train_group_size", "negatives_cross_device", "unified_finetuning", "use_self_distill",
                 "kd_loss_type", "sub_batch_size", "colbert_dim"):
        assert f"--{name}" in rows


@pytest.mark.parametrize("command", sorted(set(subparsers()) - {"train"}))
def test_every_subcommand_option_has_a_row_with_its_default(command):
    rows = table_rows(section(CLI_MD.read_text(encoding="utf-8"), f"flagm3 {command}"))
    for action in subparsers()[command]._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = max(action.option_strings, key=len) if action.option_strings else action.dest
        assert name in rows, f"docs/cli.md (flagm3 {command}) does not document {name}"
        if action.nargs != 0:
            expected = shown_default(action.default)
            assert rows[name][2] == expected, f"flagm3 {command} {name}: docs show {rows[name][2]}, code has {expected}"


def test_every_subcommand_has_a_section():
    text = CLI_MD.read_text(encoding="utf-8")
    for command in subparsers():
        assert f"\n## flagm3 {command}\n" in text


# --------------------------------------------------------------------------------- command lines in docs
def shell_commands(text: str) -> list[str]:
    """The command lines of the ```bash blocks of a Markdown text (continuations joined, comments removed)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        block = block.replace("\\\n", " ")
        for line in block.splitlines():
            line = re.sub(r"\s#.*$", "", line).strip()
            commands.extend(part.strip() for part in line.split("&&") if part.strip())
    return commands


def accepted_options() -> dict[str, set[str]]:
    """Option strings accepted by each subcommand (``train``: the full HfArgumentParser, TrainingArguments too)."""
    options = {name: {s for a in p._actions for s in a.option_strings} for name, p in subparsers().items()}
    options["train"] = {s for a in train_parser()._actions for s in a.option_strings}
    return options


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


def test_command_lines_in_docs_use_real_options():
    accepted = accepted_options()
    checked = 0
    for path in doc_files():
        for command in shell_commands(path.read_text(encoding="utf-8")):
            tokens = shlex.split(command)
            if "flagm3" in tokens and tokens.index("flagm3") + 1 < len(tokens):
                i = tokens.index("flagm3")
                sub = tokens[i + 1]
            elif "flagm3.train" in tokens:
                i, sub = tokens.index("flagm3.train") - 1, "train"
            else:
                continue
            assert sub in accepted, f"{path.name}: `{command}` uses an unknown subcommand {sub!r}"
            for token in tokens[i + 2:]:
                if token.startswith("--"):
                    option = token.split("=", 1)[0]
                    assert option in accepted[sub], f"{path.name}: `{command}`: flagm3 {sub} has no {option}"
            checked += 1
    assert checked >= 15, f"only {checked} flagm3 command lines found in the docs"


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
    accepted = accepted_options()["train"]
    for name in names:
        assert name in rows, f"docs/migration.md does not map FlagEmbedding's {name}"
        flagm3_cell = rows[name][1]
        if flagm3_cell == "—":
            assert f"--{name}" not in accepted, f"migration.md says {name} is not accepted, but flagm3 train takes it"
        else:
            for option in re.findall(r"`(--\w+)`", flagm3_cell):
                assert option in accepted, f"migration.md maps {name} to {option}, which flagm3 train does not take"
