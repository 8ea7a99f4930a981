"""Validation of FlagEmbedding-style training data before training starts.

A training record is one JSON object per line::

    {"query": str, "pos": [str, ...], "neg": [str, ...],
     "pos_scores": [float, ...], "neg_scores": [float, ...], "prompt": str}

(``pos_scores``, ``neg_scores`` and ``prompt`` are optional). Inputs are a JSONL file, a directory of
``.json``/``.jsonl`` files (each file is one dataset), a ``datasets.Dataset``, or a list of those.

Every record of every file is checked and *all* problems are collected (not only the first), each
naming the file, the 1-based line and the field. Documented fixes are applied and counted instead:

- an empty (or whitespace-only) passage is dropped (with its score); a record left without positives
  is an error;
- a negative identical to one of the record's positives is dropped (with its score);
- a record without negatives gets negatives drawn from the other records of its dataset at sampling time
  (when ``sample_negatives_from_corpus=True``; otherwise it is an error);
- blank lines are skipped.

Texts longer than the maximum lengths are counted as "will be truncated" (exact token counts when a
tokenizer is given, otherwise :func:`approx_num_tokens`).
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from ..texts import BLANK, iter_jsonl

DATA_FILE_SUFFIXES = (".jsonl", ".json")
NO_IN_BATCH_NEG_MARK = "no_in_batch_neg"
MAX_ISSUES_KEPT = 1000  # per kind and source; counts are always complete
MAX_ISSUES_SHOWN = 20

# error kinds
FILE_NOT_FOUND = "file_not_found"
NO_DATA_FILES = "no_data_files"
ENCODING = "encoding"
MALFORMED_JSON = "malformed_json"
DUPLICATE_KEY = "duplicate_key"
JSON_ARRAY = "json_array"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
EMPTY_QUERY = "empty_query"
EMPTY_POS = "empty_pos"
LENGTH_MISMATCH = "length_mismatch"
BAD_SCORE = "bad_score"
NO_NEGATIVES = "no_negatives"
NO_CORPUS_NEGATIVES = "no_corpus_negatives"
NO_RECORDS = "no_records"
# warning kinds
TRUNCATED_QUERY = "truncated_query"
TRUNCATED_PASSAGE = "truncated_passage"
EMPTY_FILE = "empty_file"
NO_TEACHER_SCORES = "no_teacher_scores"
# fix kinds
EMPTY_TEXT_DROPPED = "empty_text_dropped"
NEG_EQUALS_POS_DROPPED = "negative_equal_to_positive_dropped"
NEGATIVES_FROM_CORPUS = "negatives_sampled_from_corpus"
BLANK_LINE_SKIPPED = "blank_line_skipped"

DataInput = Union[str, "os.PathLike[str]", Any]  # a path, a datasets.Dataset, or a list of those


@dataclass
class Issue:
    """One problem (or warning) found in the data; ``line`` is 1-based (a row number for in-memory data)."""

    kind: str
    source: str
    line: Optional[int]
    field: Optional[str]
    message: str

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        what = f" field '{self.field}':" if self.field else ""
        return f"{where}:{what} {self.message} [{self.kind}]"


@dataclass
class Record:
    """A validated training record (after fixes); ``line`` is where it came from."""

    query: str
    pos: List[str]
    neg: List[str]
    pos_scores: Optional[List[float]] = None
    neg_scores: Optional[List[float]] = None
    prompt: Optional[str] = None
    line: int = 0


class DataValidationError(ValueError):
    """Raised when training data has problems; lists them as ``file:line: field 'f': message``."""

    def __init__(
        self, issues: Sequence[Issue], total: Optional[int] = None, max_shown: int = MAX_ISSUES_SHOWN
    ):
        self.issues = list(issues)
        total = len(self.issues) if total is None else total
        shown = [f"  {issue}" for issue in self.issues[:max_shown]]
        if total > len(shown):
            shown.append(f"  ... and {total - len(shown)} more")
        sources = sorted({issue.source for issue in self.issues})
        head = f"invalid training data: {total} problem(s) in {len(sources)} source(s)"
        super().__init__("\n".join([head, *shown]))


@dataclass
class ValidationReport:
    """Result of validating training data.

    ``sources``/``dataset_sizes``/``no_in_batch_neg`` describe every non-empty source read (sizes count
    its valid records). ``errors``/``warnings`` keep at most ``MAX_ISSUES_KEPT`` issues per kind and
    source; the counters are complete. ``fixes`` counts the documented fixes applied.
    """

    sources: List[str] = field(default_factory=list)
    dataset_sizes: List[int] = field(default_factory=list)
    no_in_batch_neg: List[bool] = field(default_factory=list)
    errors: List[Issue] = field(default_factory=list)
    warnings: List[Issue] = field(default_factory=list)
    error_counts: Counter = field(default_factory=Counter)
    warning_counts: Counter = field(default_factory=Counter)
    fixes: Counter = field(default_factory=Counter)
    errors_by_source: Counter = field(default_factory=Counter)
    exact_lengths: bool = False
    _kept: Counter = field(default_factory=Counter, repr=False)

    @property
    def ok(self) -> bool:
        return not self.error_counts

    @property
    def num_records(self) -> int:
        return sum(self.dataset_sizes)

    @property
    def num_errors(self) -> int:
        return sum(self.error_counts.values())

    def add_error(self, issue: Issue) -> None:
        self.error_counts[issue.kind] += 1
        self.errors_by_source[issue.source] += 1
        if self._keep(issue, "error"):
            self.errors.append(issue)

    def add_warning(self, issue: Issue) -> None:
        self.warning_counts[issue.kind] += 1
        if self._keep(issue, "warning"):
            self.warnings.append(issue)

    _COUNTERS = ("error_counts", "warning_counts", "fixes", "errors_by_source", "_kept")

    def to_json(self) -> Dict[str, Any]:
        """The report as JSON-serialisable data (:meth:`from_json` reads it back): a prepared dataset's cache
        keeps it beside its Arrow files, so no pickle is ever loaded."""
        return {
            "sources": self.sources, "dataset_sizes": self.dataset_sizes, "no_in_batch_neg": self.no_in_batch_neg,
            "errors": [asdict(i) for i in self.errors], "warnings": [asdict(i) for i in self.warnings],
            "exact_lengths": self.exact_lengths,
            **{name: [[list(k) if isinstance(k, tuple) else k, v] for k, v in getattr(self, name).items()]
               for name in self._COUNTERS},
        }

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> ValidationReport:
        return cls(
            sources=data["sources"], dataset_sizes=data["dataset_sizes"], no_in_batch_neg=data["no_in_batch_neg"],
            errors=[Issue(**i) for i in data["errors"]], warnings=[Issue(**i) for i in data["warnings"]],
            exact_lengths=data["exact_lengths"],
            **{name: Counter({tuple(k) if isinstance(k, list) else k: v for k, v in data[name]})
               for name in cls._COUNTERS},
        )

    def _keep(self, issue: Issue, level: str) -> bool:
        key = (level, issue.kind, issue.source)
        self._kept[key] += 1
        return self._kept[key] <= MAX_ISSUES_KEPT

    def raise_if_errors(self, max_shown: int = MAX_ISSUES_SHOWN) -> None:
        """Raise one :class:`DataValidationError` listing the (first ``max_shown``) errors."""
        if not self.ok:
            raise DataValidationError(self.errors, total=self.num_errors, max_shown=max_shown)

    def summary(self, max_shown: int = MAX_ISSUES_SHOWN) -> str:
        """Human-readable summary: records, datasets, issues by kind, fixes applied."""
        lines = [f"training data: {self.num_records} valid record(s) in {len(self.sources)} dataset(s)"]
        for name, size, flag in zip(self.sources, self.dataset_sizes, self.no_in_batch_neg):
            notes = [" [no in-batch negatives]"] if flag else []
            if self.errors_by_source[name]:
                notes.append(f" [{self.errors_by_source[name]} error(s)]")
            lines.append(f"  {name}: {size} valid record(s)" + "".join(notes))
        lines.append(f"errors: {self.num_errors}" + _format_counts(self.error_counts))
        lines.extend(f"  {issue}" for issue in self.errors[:max_shown])
        if self.num_errors > max_shown:
            lines.append(f"  ... and {self.num_errors - max_shown} more")
        how = "tokenizer" if self.exact_lengths else "estimated, no tokenizer"
        lines.append(f"warnings: {sum(self.warning_counts.values())}" + _format_counts(self.warning_counts))
        if self.warning_counts[TRUNCATED_QUERY] or self.warning_counts[TRUNCATED_PASSAGE]:
            lines.append(f"  texts that will be truncated (lengths {how})")
        lines.append(f"fixes applied: {sum(self.fixes.values())}" + _format_counts(self.fixes))
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)


def _format_counts(counts: Counter) -> str:
    items = [f"{kind}: {n}" for kind, n in sorted(counts.items()) if n]
    return f" ({', '.join(items)})" if items else ""


# ----------------------------------------------------------------------------------------------------
# Lengths


_NO_SPACE_SCRIPT = re.compile("[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\u3040-\u30ff]")


def approx_num_tokens(text: str) -> int:
    """Token count estimate without a tokenizer: 1.3 per whitespace word, 1 per CJK/kana/hangul character,
    plus 2 special tokens (about right for WordPiece/SentencePiece on English: 1.2 tokens/word measured)."""
    n_cjk = len(_NO_SPACE_SCRIPT.findall(text))
    words = len(_NO_SPACE_SCRIPT.sub(" ", text).split()) if n_cjk else len(text.split())
    return math.ceil(1.3 * words) + n_cjk + 2


def _token_lengths(texts: Iterable[str], tokenizer: Any, chunk: int = 1024) -> Dict[str, int]:
    """Exact token counts (special tokens included) of the distinct ``texts``."""
    unique = list(dict.fromkeys(texts))
    lengths: Dict[str, int] = {}
    for start in range(0, len(unique), chunk):
        part = unique[start : start + chunk]
        ids = tokenizer(part, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        lengths.update(zip(part, map(len, ids)))
    return lengths


# ----------------------------------------------------------------------------------------------------
# Reading sources


@dataclass
class _Source:
    name: str
    no_in_batch_neg: bool
    path: Optional[str] = None
    dataset: Any = None


def _expand_inputs(inputs: Union[DataInput, Sequence[DataInput]], report: ValidationReport) -> List[_Source]:
    """Turn paths / directories / ``datasets.Dataset`` objects into a flat list of sources."""
    if isinstance(inputs, (str, os.PathLike)) or not isinstance(inputs, (list, tuple)):
        inputs = [inputs]
    sources: List[_Source] = []
    for k, item in enumerate(inputs):
        if isinstance(item, (str, os.PathLike)):
            path = os.fspath(item)
            if os.path.isdir(path):
                dir_flag = NO_IN_BATCH_NEG_MARK in os.path.basename(os.path.normpath(path))
                names = sorted(n for n in os.listdir(path) if n.endswith(DATA_FILE_SUFFIXES))
                if not names:
                    msg = "directory has no .json/.jsonl files"
                    report.add_error(Issue(NO_DATA_FILES, path, None, None, msg))
                for n in names:
                    flag = dir_flag or NO_IN_BATCH_NEG_MARK in n
                    sources.append(_Source(os.path.join(path, n), flag, path=os.path.join(path, n)))
            elif os.path.isfile(path):
                sources.append(_Source(path, NO_IN_BATCH_NEG_MARK in os.path.basename(path), path=path))
            elif hub_dataset_id(path) is not None:
                source = _hub_source(path, report)
                if source is not None:
                    sources.append(source)
            else:
                report.add_error(Issue(FILE_NOT_FOUND, path, None, None, "no such file or directory"))
        elif _is_iterable_dataset(item):  # datasets.IterableDataset: read once, in one pass
            sources.append(_Source(f"<datasets.IterableDataset #{k}>", False, dataset=item))
        elif hasattr(item, "column_names") and hasattr(item, "__getitem__"):  # datasets.Dataset
            name = f"<datasets.Dataset #{k}>"
            sources.append(_Source(name, False, dataset=item))
        else:
            what = f"training data input #{k}"
            raise TypeError(f"{what} must be a path or a datasets.Dataset, got {type(item)!r}")
    return sources


HUB_PREFIX = "hf:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_dataset_id(name: str) -> Optional[str]:
    """The dataset id ``name`` names when it is no local path: ``hf:ID`` (ID may also be a local directory that
    ``datasets.load_dataset`` reads, e.g. of parquet files), or a bare ``owner/name`` without a .json/.jsonl suffix."""
    if name.startswith(HUB_PREFIX):
        return name[len(HUB_PREFIX):]
    if _HUB_ID.match(name) and not name.endswith(DATA_FILE_SUFFIXES):
        return name
    return None


def _hub_source(name: str, report: ValidationReport) -> Optional[_Source]:
    """A hub (or ``load_dataset``-readable) dataset's train split, streamed: read once, never held in memory."""
    dataset_id = hub_dataset_id(name)
    try:
        import datasets

        stream = datasets.load_dataset(dataset_id, split="train", streaming=True)
    except Exception as err:  # noqa: BLE001 - any loader failure is the user's input problem, reported as such
        msg = f"no such file or directory, and not a loadable datasets id ({type(err).__name__}: {err})"
        report.add_error(Issue(FILE_NOT_FOUND, name, None, None, msg.splitlines()[0]))
        return None
    return _Source(name, NO_IN_BATCH_NEG_MARK in dataset_id, dataset=stream)


def _is_iterable_dataset(item: Any) -> bool:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(item, datasets.IterableDataset)


def _iter_jsonl(path: str) -> Iterator[Tuple[int, Any, Optional[Issue]]]:
    """Yield ``(line, object, None)`` or ``(line, None, issue)``; blank lines yield ``(line, BLANK, None)``
    (:func:`flagm3.texts.iter_jsonl`, the one JSONL reader: encoding, JSON arrays, malformed lines, duplicate
    keys)."""
    for lineno, value, problem in iter_jsonl(path):
        if problem is None:
            yield lineno, value, None
        else:
            yield lineno, None, Issue(problem.kind, path, lineno, problem.field, problem.message)


def _iter_dataset_rows(dataset: Any) -> Iterator[Tuple[int, Any, Optional[Issue]]]:
    for row, obj in enumerate(dataset, 1):
        # columns missing from some rows come back as None: treat them as absent
        yield row, {k: v for k, v in obj.items() if v is not None}, None


# ----------------------------------------------------------------------------------------------------
# Checking records


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


@dataclass
class _Options:
    sample_negatives_from_corpus: bool = True
    knowledge_distillation: bool = False
    train_group_size: Optional[int] = None


_STR_ONLY = {str}


def _check_array(obj: dict, name: str, issue: Any, element: str, item_problem: Any = None) -> Optional[list]:
    """``obj[name]`` must be an array of JSON ``element`` values (``"string"``, ``"number"``) for which
    ``item_problem(item)`` (optional) gives no ``(kind, message)``. Every problem is reported through
    ``issue(kind, field, msg)``; returns the list, or None when there was one."""
    value = obj[name]
    if not isinstance(value, (list, tuple)):
        issue(WRONG_TYPE, name, f"expected an array of {element}s, got {_json_type(value)}")
        return None
    if element == "string" and item_problem is None and set(map(type, value)) <= _STR_ONLY:
        return list(value)  # the common case, without the per-item checks below
    good = True
    for j, item in enumerate(value):
        if _json_type(item) != element:
            problem = (WRONG_TYPE, f"expected a {element}, got {_json_type(item)}")
        else:
            problem = item_problem(item) if item_problem is not None else None
        if problem is not None:
            issue(problem[0], f"{name}[{j}]", problem[1])
            good = False
    return list(value) if good else None


def _check_texts(obj: dict, name: str, issue: Any) -> Optional[List[str]]:
    """``obj[name]`` must be a list of strings; report problems through ``issue(kind, field, msg)``."""
    return _check_array(obj, name, issue, "string")


def _keep_where(
    texts: List[str], scores: Optional[List[float]], keep: Any
) -> Tuple[List[str], Optional[List[float]], int]:
    """Texts (and their scores) for which ``keep(text)`` holds, and how many were dropped."""
    if all(map(keep, texts)):  # the common case: nothing to drop
        return texts, scores, 0
    kept = [j for j, text in enumerate(texts) if keep(text)]
    kept_scores = None if scores is None else [scores[j] for j in kept]
    return [texts[j] for j in kept], kept_scores, len(texts) - len(kept)


def _check_scores(
    obj: dict, name: str, n: Optional[int], texts_field: str, issue: Any
) -> Optional[List[float]]:
    """``obj[name]`` must be a list of ``n`` finite numbers."""
    value = _check_array(obj, name, issue, "number",
                         lambda s: None if math.isfinite(s) else (BAD_SCORE, f"score is {s}"))
    if isinstance(obj[name], (list, tuple)) and n is not None and len(obj[name]) != n:
        issue(LENGTH_MISMATCH, name, f"has {len(obj[name])} score(s) but '{texts_field}' has {n} text(s)")
        return None
    return None if value is None else [float(s) for s in value]


def _check_record(
    obj: Any, source: str, line: int, opts: _Options, report: ValidationReport
) -> Optional[Record]:
    """Validate one record; report every problem; return the fixed record or None if it has errors."""
    errors: List[Issue] = []

    def issue(kind: str, fld: Optional[str], msg: str) -> None:
        errors.append(Issue(kind, source, line, fld, msg))

    if not isinstance(obj, dict):
        issue(NOT_AN_OBJECT, None, f"expected a JSON object, got {_json_type(obj)}")
        report.add_error(errors[0])
        return None

    query = obj.get("query")
    if "query" not in obj:
        issue(MISSING_FIELD, "query", "missing (a non-empty string is required)")
    elif not isinstance(query, str):
        issue(WRONG_TYPE, "query", f"expected a non-empty string, got {_json_type(query)}")
    elif not query.strip():
        issue(EMPTY_QUERY, "query", "empty query")

    pos: Optional[List[str]] = None
    if "pos" not in obj:
        issue(MISSING_FIELD, "pos", "missing (a non-empty array of strings is required)")
    else:
        pos = _check_texts(obj, "pos", issue)
        if pos is not None and not pos:
            issue(EMPTY_POS, "pos", "no positive passages")
            pos = None

    neg: Optional[List[str]] = []
    if "neg" in obj:
        neg = _check_texts(obj, "neg", issue)

    pos_scores = neg_scores = None
    if "pos_scores" in obj:
        pos_scores = _check_scores(obj, "pos_scores", len(pos) if pos is not None else None, "pos", issue)
    elif opts.knowledge_distillation:
        issue(MISSING_FIELD, "pos_scores", "missing (required with knowledge_distillation=True)")
    if "neg_scores" in obj:
        neg_scores = _check_scores(obj, "neg_scores", len(neg) if neg is not None else None, "neg", issue)
    elif opts.knowledge_distillation and neg:
        issue(MISSING_FIELD, "neg_scores", "missing (required with knowledge_distillation=True)")

    prompt = obj.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        issue(WRONG_TYPE, "prompt", f"expected a string, got {_json_type(prompt)}")

    if errors or pos is None or neg is None:
        for e in errors:
            report.add_error(e)
        return None

    # fixes: drop empty passages; a negative equal to a positive would be a false negative
    pos, pos_scores, n_empty_pos = _keep_where(pos, pos_scores, str.strip)
    neg, neg_scores, n_empty_neg = _keep_where(neg, neg_scores, str.strip)
    n_neg_equals_pos = n_from_corpus = 0
    if not pos:
        report.add_error(Issue(EMPTY_POS, source, line, "pos", "every positive passage is empty"))
        return None
    positives = set(pos)
    if not positives.isdisjoint(neg):
        neg, neg_scores, n_neg_equals_pos = _keep_where(
            neg, neg_scores, lambda t: t not in positives
        )

    needs_negatives = opts.train_group_size is None or opts.train_group_size > 1
    if not neg and needs_negatives:
        if not opts.sample_negatives_from_corpus:
            msg = "no negatives (set sample_negatives_from_corpus=True to draw them from other records)"
            report.add_error(Issue(NO_NEGATIVES, source, line, "neg", msg))
            return None
        n_from_corpus = 1
        if opts.knowledge_distillation:
            msg = "negatives drawn from the corpus have no teacher scores: this record's group gets none"
            report.add_warning(Issue(NO_TEACHER_SCORES, source, line, "neg", msg))
    if n_empty_pos or n_empty_neg or n_neg_equals_pos or n_from_corpus:  # (in this order, as counted before)
        report.fixes.update(+Counter({EMPTY_TEXT_DROPPED: n_empty_pos + n_empty_neg,
                                      NEG_EQUALS_POS_DROPPED: n_neg_equals_pos, NEGATIVES_FROM_CORPUS: n_from_corpus}))
    if not opts.knowledge_distillation:
        pos_scores = neg_scores = None
    return Record(query, pos, neg, pos_scores, neg_scores, prompt if prompt else None, line)


class _CorpusPoolCheck:
    """A record without negatives needs some other text in its dataset to draw them from; checked in one streaming
    pass. Distinct texts (their hashes) are counted up to ``cap``: past it, every record with at most ``cap``
    distinct positives has another text to draw from (a record with more positives than that is not checked)."""

    def __init__(self, opts: _Options, cap: int = 10_000):
        self.active = opts.sample_negatives_from_corpus and opts.train_group_size != 1
        self.cap = cap
        self.distinct: Optional[set] = set()
        self.needy: List[Tuple[int, int]] = []  # (line, distinct positives) of records without negatives

    def add(self, record: Record) -> None:
        if not self.active or self.distinct is None:
            return
        self.distinct.update(map(hash, record.pos))
        self.distinct.update(map(hash, record.neg))
        if not record.neg:
            self.needy.append((record.line, len(set(record.pos))))
        if len(self.distinct) > self.cap:  # enough texts for everyone: stop counting
            self.distinct, self.needy = None, []

    def report_errors(self, source: str, report: ValidationReport) -> None:
        if self.distinct is None:
            return
        for line, n_pos in self.needy:
            if len(self.distinct) <= n_pos:  # every text of the dataset is one of its positives
                msg = "no negatives, and no other text in this dataset to draw negatives from"
                report.add_error(Issue(NO_CORPUS_NEGATIVES, source, line, "neg", msg))


def _length_function(records: Sequence[Record], tokenizer: Any, queries: bool = True) -> Any:
    """``text -> tokens`` for the texts of ``records``: exact (one batched tokenizer call) or estimated."""
    if tokenizer is None:
        return approx_num_tokens
    texts = (t for r in records for t in ((r.query,) if queries else ()) + (*r.pos, *r.neg))
    return _token_lengths(texts, tokenizer).__getitem__


def mean_passage_lengths(records: Sequence[Record], tokenizer: Any = None) -> List[int]:
    """Each record's mean passage (positives and negatives) length in tokens; exact with a tokenizer."""
    length = _length_function(records, tokenizer, queries=False)
    return [round(sum(map(length, (*r.pos, *r.neg))) / (len(r.pos) + len(r.neg))) for r in records]


def _check_lengths(
    records: List[Record],
    source: str,
    report: ValidationReport,
    tokenizer: Any,
    query_max_len: Optional[int],
    passage_max_len: Optional[int],
) -> List[int]:
    """Count texts that will be truncated; return each record's mean passage length in tokens."""
    length = _length_function(records, tokenizer)
    means: List[int] = []
    for r in records:
        if query_max_len is not None and length(r.query) > query_max_len:
            msg = f"{length(r.query)} tokens > query_max_len={query_max_len}: will be truncated"
            report.add_warning(Issue(TRUNCATED_QUERY, source, r.line, "query", msg))
        lens = []
        for name, texts in (("pos", r.pos), ("neg", r.neg)):
            for j, text in enumerate(texts):
                n = length(text)
                lens.append(n)
                if passage_max_len is not None and n > passage_max_len:
                    msg = f"{n} tokens > passage_max_len={passage_max_len}: will be truncated"
                    report.add_warning(Issue(TRUNCATED_PASSAGE, source, r.line, f"{name}[{j}]", msg))
        means.append(round(sum(lens) / len(lens)))
    return means


@dataclass
class LengthCheck:
    """Which lengths a streaming pass checks: texts over these maximum lengths are counted as truncated
    (exact with ``tokenizer``, else :func:`approx_num_tokens`)."""

    tokenizer: Any = None
    query_max_len: Optional[int] = 32
    passage_max_len: Optional[int] = 128


# Records whose lengths are checked together (one tokenizer call): bounds the memory of a streaming pass.
STREAM_CHUNK = 1024


def stream_source(
    src: _Source,
    report: ValidationReport,
    opts: _Options,
    lengths: Optional[LengthCheck] = None,
    sink: Any = None,
) -> Tuple[int, bool]:
    """Validate one source in one streaming pass: every problem goes into ``report``; each valid (fixed) record
    is handed to ``sink(record, mean_passage_length or None)`` in order (``None`` without ``lengths``). Holds
    at most :data:`STREAM_CHUNK` records at a time. Returns ``(valid records, source had no error)``; a source
    without records gets an ``empty_file`` warning and is not added to the report's sources."""
    rows = _iter_jsonl(src.path) if src.path is not None else _iter_dataset_rows(src.dataset)
    errors_before = report.num_errors
    pool = _CorpusPoolCheck(opts)
    chunk: List[Record] = []
    count = 0

    def flush() -> None:
        means: List[Optional[int]] = [None] * len(chunk)
        if lengths is not None:
            means = _check_lengths(chunk, src.name, report, lengths.tokenizer, lengths.query_max_len,
                                   lengths.passage_max_len)
        if sink is not None:
            for record, mean in zip(chunk, means):
                sink(record, mean)
        chunk.clear()

    for line, obj, problem in rows:
        if problem is not None:
            report.add_error(problem)
        elif obj is BLANK:
            report.fixes[BLANK_LINE_SKIPPED] += 1
        else:
            record = _check_record(obj, src.name, line, opts, report)
            if record is not None:
                count += 1
                pool.add(record)
                chunk.append(record)
                if len(chunk) >= STREAM_CHUNK:
                    flush()
    flush()
    if report.num_errors == errors_before and not count:
        report.add_warning(Issue(EMPTY_FILE, src.name, None, None, "no records: skipped"))
        return 0, True
    pool.report_errors(src.name, report)
    report.sources.append(src.name)
    report.dataset_sizes.append(count)
    report.no_in_batch_neg.append(src.no_in_batch_neg)
    return count, report.num_errors == errors_before


def stream_validate(
    inputs: Union[DataInput, Sequence[DataInput]],
    *,
    tokenizer: Any = None,
    query_max_len: Optional[int] = 32,
    passage_max_len: Optional[int] = 128,
    sample_negatives_from_corpus: bool = True,
    knowledge_distillation: bool = False,
    train_group_size: Optional[int] = None,
    check_lengths: bool = True,
    sink: Any = None,
) -> ValidationReport:
    """One streaming pass over every source (nothing kept but the report), in memory bounded by
    :data:`STREAM_CHUNK` records: the training data's checks, by file/line/field. ``sink(source_index, source, record, mean_length)``
    receives each valid record; ``check_lengths=False`` skips the truncation counts (no text is tokenised)."""
    report = ValidationReport(exact_lengths=tokenizer is not None)
    opts = _Options(sample_negatives_from_corpus, knowledge_distillation, train_group_size)
    lengths = LengthCheck(tokenizer, query_max_len, passage_max_len) if check_lengths else None
    total = 0
    for k, src in enumerate(_expand_inputs(inputs, report)):
        to_sink = None if sink is None else (lambda record, mean, k=k, src=src: sink(k, src, record, mean))
        total += stream_source(src, report, opts, lengths, to_sink)[0]
    if report.ok and not total:
        report.add_error(Issue(NO_RECORDS, str(inputs), None, None, "no training records found"))
    return report


def validate_data(
    paths: Union[DataInput, Sequence[DataInput]], raise_on_error: bool = False, **options: Any
) -> ValidationReport:
    """Validate training data (files, directories, ``datasets.Dataset``s); see the module docstring.

    ``options`` are :func:`stream_validate`'s (``tokenizer``, ``query_max_len``, ``passage_max_len``,
    ``sample_negatives_from_corpus``, ``knowledge_distillation``, ``train_group_size``). Returns the report
    (``.ok``, ``.summary()``, ``.errors``, ``.warnings``, ``.fixes``); with ``raise_on_error=True`` raises one
    :class:`DataValidationError` listing the problems instead.
    """
    report = stream_validate(paths, **options)
    if raise_on_error:
        report.raise_if_errors()
    return report


def read_training_records(
    path: Union[str, os.PathLike], sample_negatives_from_corpus: bool = True
) -> List[Tuple[Any, Record]]:
    """The records of one training JSONL file, each as ``(the line's JSON object, its checked Record)``, checked as
    ``flagm3 validate`` and ``flagm3 train`` check them (fixes applied to the Record; the object is as read, for
    callers that keep its other fields: ``flagm3 mine``). Raises one :class:`DataValidationError` listing every
    problem."""
    source = os.fspath(path)
    report = ValidationReport(exact_lengths=False)
    opts = _Options(sample_negatives_from_corpus)
    records: List[Tuple[Any, Record]] = []
    for line, obj, problem in _iter_jsonl(source):
        if problem is not None:
            report.add_error(problem)
        elif obj is not BLANK:
            record = _check_record(obj, source, line, opts, report)
            if record is not None:
                records.append((obj, record))
    if report.ok and not records:
        report.add_error(Issue(NO_RECORDS, source, None, None, "no training records found"))
    report.raise_if_errors()
    return records


def validate_file(path: Union[str, os.PathLike], **kwargs: Any) -> ValidationReport:
    """Validate one JSONL file; keyword arguments as :func:`validate_data`."""
    return validate_data([path], **kwargs)
