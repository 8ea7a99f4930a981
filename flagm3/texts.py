"""Texts in and out: instruction prefixes and JSONL files (used by data, inference, evaluation and mining)."""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Iterator, Optional, Union

PathLike = Union[str, os.PathLike]


def unescape_newlines(fmt: str) -> str:
    """FlagEmbedding accepts ``\\n`` typed on a command line as a newline in instruction formats."""
    return fmt.replace("\\n", "\n")


def format_instruction(text: str, instruction: Optional[str], instruction_format: str = "{}{}") -> str:
    """``instruction_format.format(instruction, text)``; ``text`` unchanged when ``instruction`` is None."""
    if instruction is None:
        return text
    return unescape_newlines(instruction_format).format(instruction, text)


def with_instruction(
    embedder: Any,
    texts: Iterable[str],
    side: str = "query",
    instruction: Optional[str] = None,
    instruction_format: Optional[str] = None,
) -> list[str]:
    """Texts prefixed with an instruction, as the embedder's ``encode_queries``/``encode_corpus`` do:
    ``instruction_format.format(instruction, text)``; both default to the embedder's
    ``<side>_instruction_for_retrieval``/``<side>_instruction_format``. Unchanged without an instruction."""
    texts = list(texts)
    instruction = instruction or getattr(embedder, f"{side}_instruction_for_retrieval", None)
    if not instruction:
        return texts
    fmt = instruction_format or getattr(embedder, f"{side}_instruction_format", "{}{}")
    return [format_instruction(t, instruction, fmt) for t in texts]


def read_jsonl(path: PathLike) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed JSON)`` per non-blank line; a malformed line raises naming file and line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line.rstrip("\r\n"))  # a column past the text, not "column 1" of a next line
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno})"
                ) from err


def write_jsonl(path: PathLike, records: Iterable[Any]) -> None:
    """One JSON line per record (UTF-8, non-ASCII kept); the parent directory is created when missing."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
