"""Texts in and out: instruction prefixes and JSONL files (used by data, inference, evaluation and mining)."""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Iterator, NamedTuple, Optional, Union

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


BLANK = object()  # what iter_jsonl yields for a blank line (a line "null" is None)


class JsonlProblem(NamedTuple):
    """A line of a JSONL file that is not one JSON value: ``kind`` is ``encoding``, ``json_array``,
    ``malformed_json`` or ``duplicate_key`` (the kinds of :mod:`flagm3.data.validation`; ``field``: the key)."""

    kind: str
    message: str
    field: Optional[str] = None


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    """``json.loads``' ``object_pairs_hook``: an object, refusing a key given twice (JSON readers would keep only
    one of the values)."""
    obj = dict(pairs)
    if len(obj) == len(pairs):  # the common case: no key twice
        return obj
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys)  # one decoder (json.loads builds one a call)


def iter_jsonl(path: PathLike) -> Iterator[tuple[int, Any, Optional[JsonlProblem]]]:
    """Every line of a JSONL file, 1-based: ``(line, parsed JSON, None)``, ``(line, None, problem)`` for a line
    that is not UTF-8 or not JSON (reading goes on), ``(line, BLANK, None)`` for a blank line. A UTF-8 BOM is
    skipped; a file that is one JSON array gives one ``json_array`` problem and ends. The one JSONL reader of
    flagm3 (training data, BEIR collections, mining)."""
    first = True
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                msg = f"invalid UTF-8: byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line"
                yield lineno, None, JsonlProblem("encoding", msg)
                first = False
                continue
            if first:
                text = text.lstrip("\ufeff")
            if not text or text.isspace():  # (not text.strip(), without copying the line)
                yield lineno, BLANK, None
                continue
            if first and text.lstrip().startswith("["):
                msg = "file is a JSON array; expected JSON Lines (one JSON object per line)"
                yield lineno, None, JsonlProblem("json_array", msg)
                return
            first = False
            try:  # without the line end: a column past the text, not "column 1" of a next line
                yield lineno, _DECODER.decode(text.rstrip("\r\n")), None
            except json.JSONDecodeError as e:
                yield lineno, None, JsonlProblem("malformed_json", f"malformed JSON: {e.msg} (column {e.colno})")
            except _DuplicateKey as e:
                msg = f"duplicate key {e.key!r} in one object (JSON readers keep only one of the values)"
                yield lineno, None, JsonlProblem("duplicate_key", msg, e.key)


def read_jsonl(path: PathLike) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed JSON)`` per non-blank line of :func:`iter_jsonl`; the first line that is not JSON
    raises naming file and line."""
    for lineno, value, problem in iter_jsonl(path):
        if problem is not None:
            raise ValueError(f"{path}:{lineno}: {problem.message}")
        if value is not BLANK:
            yield lineno, value


def write_jsonl(path: PathLike, records: Iterable[Any]) -> None:
    """One JSON line per record (UTF-8, non-ASCII kept); the parent directory is created when missing."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
