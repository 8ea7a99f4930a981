"""Regenerate the generated parts of docs/cli.md and docs/api.md from the code.

    python docs/gen_reference.py          # rewrite the generated blocks in place
    python docs/gen_reference.py --check  # exit 1 if a generated block is out of date

``cli.md``: one table per argument group of ``flagm3 train`` (the ``HfArgumentParser`` over
``M3ModelArguments``, ``M3DataArguments`` and the fields ``M3TrainingArguments`` declares itself) and one per
other subcommand (the ``argparse`` parser of :func:`flagm3.cli.build_parser`). ``api.md``: signature and
docstring of every object listed in :data:`API`. Text between ``<!-- BEGIN GENERATED name -->`` and
``<!-- END GENERATED name -->`` is replaced; everything else in the pages is written by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

DOCS = Path(__file__).resolve().parent
BLOCK = re.compile(r"(<!-- BEGIN GENERATED (?P<name>[\w:.-]+) -->\n)(?P<body>.*?)(<!-- END GENERATED (?P=name) -->)", re.S)

# ------------------------------------------------------------------------------------------------ CLI
def _code(value: Any) -> str:
    text = str(value)
    return f"`{text}`" if text else "`''`"


def format_default(value: Any) -> str:
    """How a default is shown in the tables (the tests compare against this)."""
    if value is None or value is dataclasses.MISSING:
        return "—"
    if isinstance(value, (list, tuple)):
        return _code(" ".join(str(v) for v in value)) if value else "—"
    return _code(value)


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def train_groups() -> list[tuple[str, type, list[dataclasses.Field]]]:
    """(title, class, fields) of ``flagm3 train``: model, data and the training fields flagm3 declares."""
    from flagm3.training_args import M3DataArguments, M3ModelArguments, M3TrainingArguments

    own = set(M3TrainingArguments.__annotations__)
    return [
        ("Model arguments (`M3ModelArguments`)", M3ModelArguments, list(dataclasses.fields(M3ModelArguments))),
        ("Data arguments (`M3DataArguments`)", M3DataArguments, list(dataclasses.fields(M3DataArguments))),
        (
            "Training arguments (`M3TrainingArguments`: FlagEmbedding's names and flagm3's)",
            M3TrainingArguments,
            [f for f in dataclasses.fields(M3TrainingArguments) if f.name in own],
        ),
    ]


def _field_type(f: dataclasses.Field) -> str:
    text = str(f.type).replace("typing.", "")
    if f.metadata.get("choices"):
        return " \\| ".join(f"`{c}`" for c in f.metadata["choices"])
    return f"`{_escape(text)}`"


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def field_flags(f: dataclasses.Field) -> list[str]:
    """Command-line spellings documented for a field: ``--name``, plus ``--no_name`` for a bool defaulting to True."""
    flags = [f"--{f.name}"]
    if f.type in (bool, "bool") and f.default is True:
        flags.append(f"--no_{f.name}")
    return flags


def render_train() -> str:
    out = []
    for title, _cls, fields in train_groups():
        out += [f"### {title}", "", "| Argument | Type | Default | Description |", "| --- | --- | --- | --- |"]
        for f in fields:
            flags = " / ".join(f"`{flag}`" for flag in field_flags(f))
            default = _field_default(f)
            required = " **(required)**" if default is dataclasses.MISSING else ""
            help_text = f.metadata.get("help", "")
            if f.metadata.get("nargs") == "+":
                help_text += " One or more values."
            out.append(f"| {flags} | {_field_type(f)} | {format_default(default)} | "
                       f"{_escape(help_text)}{required} |")
        out.append("")
    return "\n".join(out)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    """The ``flagm3`` subcommand parsers except ``train`` (whose arguments are the dataclasses above)."""
    from flagm3.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: p for name, p in action.choices.items() if name != "train"}


def subcommand_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def action_name(action: argparse.Action) -> str:
    """``--long-option`` (the longest spelling) or the positional's name."""
    if action.option_strings:
        return max(action.option_strings, key=len)
    return action.dest


def render_subcommand(name: str, parser: argparse.ArgumentParser) -> str:
    out = ["| Argument | Type | Default | Description |", "| --- | --- | --- | --- |"]
    for action in subcommand_actions(parser):
        key = action_name(action)
        if action.nargs == 0:
            kind = "flag"
        elif action.choices:
            kind = " \\| ".join(f"`{c}`" for c in action.choices)
        else:
            kind = f"`{getattr(action.type, '__name__', 'str') if action.type else 'str'}`"
        if action.nargs not in (None, 0, "?"):
            metavar = action.metavar if isinstance(action.metavar, tuple) else None
            count = action.nargs if isinstance(action.nargs, int) else "one or more"
            kind += f" × {count}" + (f" ({', '.join(metavar)})" if metavar else "")
        default = None if action.nargs == 0 else action.default
        help_text = (action.help or "").rstrip()
        aliases = sorted(old for old, new in getattr(parser, "option_aliases", {}).items()
                         if new in action.option_strings and "_" not in old)
        if aliases:
            help_text += " Also accepted: " + ", ".join(f"`{a}`" for a in aliases) + "."
        required = " **(required)**" if action.required or not action.option_strings else ""
        out.append(f"| `{key}` | {kind} | {format_default(default)} | {_escape(help_text)}{required} |")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------ API
# (module, [names]) in page order; a class entry also documents its own public methods.
API: list[tuple[str, str, list[str]]] = [
    ("model", "flagm3", ["M3Model", "M3Config", "M3Output", "CheckpointError", "sparse_ignore_ids_from_tokenizer"]),
    ("convert", "flagm3.convert_bge_m3", ["save_bge_m3", "load_bge_m3_heads", "checkpoint_layout",
                                          "resolve_checkpoint", "sep_as_eos"]),
    ("inference", "flagm3.inference", ["M3Embedder", "LexicalDict"]),
    ("training", "flagm3", ["M3Trainer", "M3TrainingArguments", "M3ModelArguments", "M3DataArguments"]),
    ("train", "flagm3.train", ["build_trainer", "load_model", "build_dataset", "add_lora", "parse_args", "main"]),
    ("loss", "flagm3.losses", ["M3Loss", "M3LossConfig", "M3LossOutput", "M3BatchLoss", "info_nce", "kl_distill",
                               "m3_kd_loss", "group_logits"]),
    ("scoring", "flagm3.scoring", ["dense_scores", "dense_scores_paired", "pool_lexical", "PooledLexical",
                                   "sparse_scores", "sparse_scores_paired", "colbert_scores",
                                   "colbert_scores_paired", "hybrid_scores", "lexical_matrix",
                                   "compute_lexical_matching_scores", "concat_lexical"]),
    ("data", "flagm3.data", ["M3TrainDataset", "M3Collator", "M3BatchSampler", "validate_data", "validate_file",
                             "ValidationReport", "Issue", "DataValidationError",
                             "approx_num_tokens", "padding_fraction"]),
    ("evaluation", "flagm3.evaluation", ["load_beir", "evaluate_retrieval", "retrieve", "evaluate_run",
                                         "M3RetrievalEvaluator", "run_eval", "subsample", "format_results_table",
                                         "flatten_results"]),
    ("mining", "flagm3.mining", ["mine_hard_negatives"]),
    ("sparse-init", "flagm3.sparse_init", ["init_sparse_head_from_idf", "bm25_idf"]),
    ("attention", "flagm3.attention", ["set_attention_dropout", "use_recompute_attention",
                                       "recompute_sdpa_attention"]),
    ("distributed", "flagm3.distributed", ["gather_passages", "gather_with_grad", "setup_process_group",
                                           "shutdown_process_group"]),
    ("gradcache", "flagm3.losses.gradcache", ["encode_without_graph", "attach_replay"]),
    ("chunking", "flagm3.losses.chunking", ["length_chunks", "split_by_length", "chunked_padding_fraction",
                                            "trim_padding"]),
    ("recipe", "flagm3.recipe", ["Recipe", "prepare_for_training", "freeze_untrained", "set_training_attention"]),
    ("callbacks", "flagm3.callbacks", ["NonFiniteStepGuard", "SparseHealthCallback", "ModelCardCallback",
                                       "ModelCardData", "LossTermLogs", "NonFiniteLossError"]),
    ("checkpointing", "flagm3.checkpointing", ["CheckpointCallback", "resolve_resume", "last_checkpoint",
                                               "is_complete_checkpoint", "remove_incomplete_checkpoints",
                                               "write_manifest", "IncompleteCheckpointError"]),
    ("demo", "flagm3.demo", ["run_demo"]),
    ("model-card", "flagm3.model_card", ["write_model_card", "render_model_card"]),
    ("compression", "flagm3.compression", ["Compression", "truncate", "pool_tokens", "pool_colbert_batch",
                                           "prune_lexical", "index_bytes_per_passage", "PassageStats"]),
    ("compression-training", "flagm3.losses.matryoshka", ["nested_dims", "matryoshka_terms"]),
    ("flops", "flagm3.losses.flops", ["flops", "flops_penalty"]),
    ("st-modules", "flagm3.st_modules", ["M3SparsePooling"]),
]

_ROLE = re.compile(r":(?:class|meth|func|data|mod|attr|obj):`~?([^`]+)`")


def _markdown(text: str) -> str:
    """RST roles and double backticks of a docstring as Markdown code spans."""
    text = _ROLE.sub(lambda m: f"`{m.group(1)}`", text)
    return text.replace("``", "`")


def _annotation(value: Any) -> str:
    if value is inspect.Parameter.empty:
        return ""
    if isinstance(value, str):
        return value
    return inspect.formatannotation(value).replace("typing.", "")


def format_signature(name: str, obj: Callable, prefix: str = "") -> str:
    """``prefix name(param: annotation = default, ...) -> return``, one parameter per line when long."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return f"{prefix}{name}(...)"
    parts = []
    kw_only_marked = False
    for p in sig.parameters.values():
        if p.name in ("self", "cls") and not parts:
            continue
        if p.kind is p.KEYWORD_ONLY and not kw_only_marked:
            parts.append("*")
            kw_only_marked = True
        text = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        if p.kind is p.VAR_POSITIONAL:
            kw_only_marked = True
        ann = _annotation(p.annotation)
        if ann:
            text += f": {ann}"
        if p.default is not inspect.Parameter.empty:
            text += f" = {p.default!r}" if ann else f"={p.default!r}"
        parts.append(text)
    ret = _annotation(sig.return_annotation)
    tail = f" -> {ret}" if ret and not prefix.startswith("class") else ""
    one_line = f"{prefix}{name}({', '.join(parts)}){tail}"
    if len(one_line) <= 100:
        return one_line
    body = "".join(f"    {p},\n" for p in parts)
    return f"{prefix}{name}(\n{body}){tail}"


def _doc_blocks(obj: Any) -> list[str]:
    doc = inspect.getdoc(obj) or ""
    if not doc:
        return []
    summary, _, rest = doc.partition("\n\n")
    out = [_markdown(" ".join(summary.split())), ""]
    if rest.strip():
        out += ["```text", _markdown(rest.rstrip()), "```", ""]
    return out


def _own_methods(cls: type) -> Iterable[tuple[str, Any]]:
    """Public methods the class defines itself, with a docstring of their own."""
    for name, value in vars(cls).items():
        func = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
        if name.startswith("_") or not inspect.isfunction(func) or not func.__doc__:
            continue
        yield name, getattr(cls, name)


def render_api_section(module_name: str, names: list[str]) -> str:
    module = importlib.import_module(module_name)
    out: list[str] = []
    for name in names:
        if not hasattr(module, name):
            raise AttributeError(f"{module_name} has no attribute {name!r}: update API in {__file__}")
        obj = getattr(module, name)
        home = getattr(obj, "__module__", module_name)
        out += [f"### `{module_name}.{name}`", ""]
        if home != module_name:
            out += [f"*Defined in `{home}`.*", ""]
        if inspect.isclass(obj):
            if dataclasses.is_dataclass(obj) and module_name == "flagm3" and name.endswith("Arguments"):
                out += ["```python", f"@dataclass\nclass {name}({', '.join(b.__name__ for b in obj.__bases__)})",
                        "```", ""]
                out += _doc_blocks(obj) + ["Fields: see [the command line reference](cli.md).", ""]
            else:
                out += ["```python", format_signature(name, obj, prefix="class "), "```", ""]
                out += _doc_blocks(obj)
            for meth_name, meth in _own_methods(obj):
                out += [f"#### `{name}.{meth_name}`", "", "```python", format_signature(meth_name, meth), "```", ""]
                out += _doc_blocks(meth)
        else:
            out += ["```python", format_signature(name, obj), "```", ""]
            out += _doc_blocks(obj)
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- files
def generated_blocks() -> dict[str, dict[str, str]]:
    """``{file name: {block name: text}}`` of everything generated."""
    cli = {"train": render_train()}
    cli.update({f"cli:{name}": render_subcommand(name, parser) for name, parser in subcommands().items()})
    api = {f"api:{section}": render_api_section(module, names) for section, module, names in API}
    return {"cli.md": cli, "api.md": api}


def update(path: Path, blocks: dict[str, str]) -> tuple[str, list[str]]:
    """The page with its generated blocks replaced, and the names of blocks the page lacks."""
    text = path.read_text(encoding="utf-8")
    seen = set()

    def replace(match: re.Match) -> str:
        name = match.group("name")
        seen.add(name)
        if name not in blocks:
            raise KeyError(f"{path}: generated block {name!r} has no generator")
        return f"{match.group(1)}{blocks[name].rstrip()}\n{match.group(4)}"

    new = BLOCK.sub(replace, text)
    return new, sorted(set(blocks) - seen)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a page is out of date")
    args = parser.parse_args(argv)
    stale = []
    for file_name, blocks in generated_blocks().items():
        path = DOCS / file_name
        new, missing = update(path, blocks)
        if missing:
            print(f"{path}: no place for generated block(s) {missing}", file=sys.stderr)
            stale.append(file_name)
        if new != path.read_text(encoding="utf-8"):
            stale.append(file_name)
            if not args.check:
                path.write_text(new, encoding="utf-8")
                print(f"updated {path}")
    if args.check and stale:
        print(f"out of date: {sorted(set(stale))}; run python docs/gen_reference.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
