"""BEIR-layout collections: ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv``; seeded subsets."""

from __future__ import annotations

import logging
import os
import random
from collections import defaultdict
from typing import Any, Iterator, Mapping, Optional, Union

from ..texts import read_jsonl

logger = logging.getLogger(__name__)

Qrels = dict[str, dict[str, int]]  # query id -> document id -> graded relevance


def _field(path: Any, lineno: int, record: Any, name: str, required: bool = True) -> str:
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object, found {type(record).__name__}")
    value = record.get(name)
    if value is None:
        if required:
            raise ValueError(f"{path}:{lineno}: missing field {name!r}")
        return ""
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise ValueError(f"{path}:{lineno}: field {name!r} must be a string, found {type(value).__name__}")
    return str(value)


def load_qrels(path: Union[str, os.PathLike]) -> Qrels:
    """``query-id<TAB>corpus-id<TAB>score`` lines (an optional header line) -> ``{qid: {did: score}}``."""
    qrels: Qrels = defaultdict(dict)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            cols = line.rstrip("\n\r").split("\t")
            if len(cols) != 3:
                raise ValueError(
                    f"{path}:{lineno}: expected 3 tab-separated columns (query-id, corpus-id, score), "
                    f"found {len(cols)}"
                )
            try:
                score = int(float(cols[2]))
            except ValueError as err:
                if lineno == 1:  # header
                    continue
                raise ValueError(f"{path}:{lineno}: relevance score {cols[2]!r} is not a number") from err
            qrels[cols[0].strip()][cols[1].strip()] = score
    return dict(qrels)


def read_corpus(path: Union[str, os.PathLike]) -> Iterator[tuple[str, str]]:
    """``(doc_id, text)`` per line of a BEIR ``corpus.jsonl`` (``_id``, optional ``title``, ``text``), streamed;
    the text is ``(title + " " + text).strip()``."""
    for lineno, record in read_jsonl(path):
        title = _field(path, lineno, record, "title", required=False)
        text = _field(path, lineno, record, "text", required=False)
        yield _field(path, lineno, record, "_id"), (title + " " + text).strip()


def load_beir(
    data_dir: Union[str, os.PathLike], split: str = "test", corpus_dir: Optional[Union[str, os.PathLike]] = None,
) -> tuple[Mapping[str, str], dict[str, str], Qrels]:
    """Read a BEIR-layout collection: ``(corpus, queries, qrels)``.

    Passage text is ``(title + " " + text).strip()``; only the queries judged in ``qrels/<split>.tsv`` are
    returned. A judged query missing from ``queries.jsonl`` is an error; judged documents missing from the
    corpus are kept in the qrels (they count as relevant and unretrievable, as in trec_eval) with a warning.
    ``corpus_dir``: stream the corpus into a :class:`flagm3.disk_index.DiskCorpus` there instead of a dict.
    """
    data_dir = os.fspath(data_dir)
    files = {name: os.path.join(data_dir, name) for name in ("corpus.jsonl", "queries.jsonl")}
    files["qrels"] = os.path.join(data_dir, "qrels", f"{split}.tsv")
    for path in files.values():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: {data_dir} is not a BEIR-layout collection with a "
                                    f"{split!r} split (corpus.jsonl, queries.jsonl, qrels/{split}.tsv)")
    if corpus_dir is not None:
        from ..disk_index import DiskCorpus

        corpus: Mapping[str, str] = DiskCorpus(read_corpus(files["corpus.jsonl"]), corpus_dir, files["corpus.jsonl"])
    else:
        corpus = dict(read_corpus(files["corpus.jsonl"]))
    qrels = load_qrels(files["qrels"])
    all_queries = {
        _field(files["queries.jsonl"], n, r, "_id"): _field(files["queries.jsonl"], n, r, "text")
        for n, r in read_jsonl(files["queries.jsonl"])
    }
    missing = [qid for qid in qrels if qid not in all_queries]
    if missing:
        raise ValueError(
            f"{files['qrels']}: {len(missing)} judged queries are not in {files['queries.jsonl']} "
            f"(first: {missing[:5]})"
        )
    unknown_docs = {did for judged in qrels.values() for did in judged if did not in corpus}
    if unknown_docs:
        logger.warning("%s: %d judged documents are not in the corpus", files["qrels"], len(unknown_docs))
    queries = {qid: all_queries[qid] for qid in all_queries if qid in qrels}
    return corpus, queries, qrels



def subsample(
    corpus: Mapping[str, str],
    queries: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    max_corpus_size: Optional[int] = None,
    max_queries: Optional[int] = None,
    seed: int = 0,
) -> tuple[dict[str, str], dict[str, str], Qrels]:
    """A smaller collection for quick evaluations: ``max_queries`` judged queries drawn at random, and a
    corpus of every document judged for them plus random others up to ``max_corpus_size`` (order kept)."""
    rng = random.Random(seed)
    qids = [qid for qid in queries if qid in qrels]
    if max_queries is not None and len(qids) > max_queries:
        chosen = set(rng.sample(qids, max_queries))
        qids = [qid for qid in qids if qid in chosen]
    qrels = {qid: dict(qrels[qid]) for qid in qids}
    if max_corpus_size is not None and len(corpus) > max_corpus_size:
        judged = {did for judged in qrels.values() for did in judged if did in corpus}
        if len(judged) > max_corpus_size:
            logger.warning("max_corpus_size=%d is below the %d judged documents: keeping them all",
                           max_corpus_size, len(judged))
        others = [did for did in corpus if did not in judged]
        fill = set(rng.sample(others, max(0, max_corpus_size - len(judged))))
        corpus = {did: text for did, text in corpus.items() if did in judged or did in fill}
    corpus = corpus if getattr(corpus, "stays_on_disk", False) else dict(corpus)  # a DiskCorpus is not copied
    return corpus, {qid: queries[qid] for qid in qids}, qrels

