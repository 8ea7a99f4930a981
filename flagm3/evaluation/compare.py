"""Before and after: per-query metrics of two evaluations, a paired significance test, a verdict per ranking.

A run helped a ranking when its per-query metric (nDCG@10 by default) rose on the same queries by more than
chance: :func:`paired_test` is a two-sided paired t-test over queries (``scipy.stats.ttest_rel``), and
:func:`verdict` calls the change ``improved`` / ``worse`` when its p-value is below ``alpha`` and ``unchanged``
otherwise. :func:`compare_evaluations` builds the rows of the before -> after table; :func:`comparison_table`
renders them as Markdown (the model card and the final log show it).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Optional, Sequence

from .metrics import query_metrics, rank_documents

PerQuery = dict[str, dict[str, float]]  # ranking -> query id -> metric value
DEFAULT_ALPHA = 0.05
BEFORE_AFTER_FILE = "before_after.json"  # written next to a trained model (flagm3.before_after)
VERDICTS = ("improved", "unchanged", "worse")


def per_query_metric(
    runs: Mapping[str, Mapping[str, Mapping[str, float]]],
    qrels: Mapping[str, Mapping[str, int]],
    metric: str = "ndcg@10",
) -> PerQuery:
    """``{ranking: {qid: value}}`` of one trec_eval ``metric`` (``"ndcg@10"``, ``"recall@100"``, ...) for every
    judged query of ``qrels`` (a query absent from a run scores 0), from :func:`~.retrieval.retrieve`'s runs.
    The mean over queries is :func:`~.metrics.evaluate_run`'s value."""
    name, _, k = metric.partition("@")
    if not k.isdigit():
        raise ValueError(f"metric must look like 'ndcg@10', got {metric!r}")
    return {
        ranking: {qid: query_metrics(rank_documents(run.get(qid, {})), judged, [int(k)])[metric]
                  for qid, judged in qrels.items()}
        for ranking, run in runs.items()
    }


def paired_test(before: Sequence[float], after: Sequence[float]) -> float:
    """Two-sided p-value of a paired t-test on ``after - before`` (one value per query, same order).

    No change on any query gives 1.0; a constant non-zero change (zero variance) gives 0.0."""
    if len(before) != len(after):
        raise ValueError(f"paired values differ in length: {len(before)} before, {len(after)} after")
    diffs = [a - b for a, b in zip(after, before)]
    if len(diffs) < 2 or all(abs(d) < 1e-12 for d in diffs):
        return 1.0
    mean = sum(diffs) / len(diffs)
    if all(abs(d - mean) < 1e-12 for d in diffs):
        return 0.0
    from scipy.stats import ttest_rel

    p = float(ttest_rel(after, before).pvalue)
    return 1.0 if math.isnan(p) else p


def verdict(delta: float, p_value: float, alpha: float = DEFAULT_ALPHA) -> str:
    """``improved`` / ``worse`` when the change is significant at ``alpha``, else ``unchanged``."""
    if p_value >= alpha or delta == 0:
        return "unchanged"
    return "improved" if delta > 0 else "worse"


def compare_per_query(
    before: PerQuery, after: PerQuery, alpha: float = DEFAULT_ALPHA, collection: str = "in-domain",
    metric: str = "ndcg@10",
) -> list[dict[str, Any]]:
    """One row per ranking present in both: ``collection``, ``ranking``, ``metric``, ``before``, ``after``
    (means over the queries), ``delta``, ``p_value``, ``verdict``, ``queries``."""
    rows = []
    for ranking in before:
        if ranking not in after:
            continue
        qids = sorted(before[ranking])
        missing = [q for q in qids if q not in after[ranking]]
        if missing:
            raise ValueError(f"{collection}/{ranking}: {len(missing)} queries evaluated before but not after")
        b = [before[ranking][q] for q in qids]
        a = [after[ranking][q] for q in qids]
        mean_b, mean_a = sum(b) / max(len(b), 1), sum(a) / max(len(a), 1)
        p = paired_test(b, a)
        rows.append(dict(collection=collection, ranking=ranking, metric=metric, before=mean_b, after=mean_a,
                         delta=mean_a - mean_b, p_value=p, verdict=verdict(mean_a - mean_b, p, alpha),
                         queries=len(qids)))
    return rows


def comparison_table(rows: Sequence[Mapping[str, Any]], digits: int = 4) -> str:
    """Markdown: ``| collection | ranking | metric | before | after | change | p | verdict |``."""
    lines = ["| collection | ranking | metric | before | after | change | p (paired t) | verdict |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['collection']} | {r['ranking']} | {r['metric']} | {r['before']:.{digits}f} | "
                     f"{r['after']:.{digits}f} | {r['delta']:+.{digits}f} | {_p(r['p_value'])} | {r['verdict']} |")
    return "\n".join(lines)


def _p(p: float) -> str:
    return "<0.001" if p < 1e-3 else f"{p:.3f}"


def summary_line(rows: Sequence[Mapping[str, Any]], collection: Optional[str] = None) -> str:
    """One line: how many rankings improved, stayed or got worse (of ``collection``, default all rows)."""
    chosen = [r for r in rows if collection is None or r["collection"] == collection]
    counts = {v: [r["ranking"] for r in chosen if r["verdict"] == v] for v in VERDICTS}
    return "; ".join(f"{v}: {', '.join(names)}" for v, names in counts.items() if names) or "nothing compared"


def load_before_after(model_dir: str) -> Optional[dict]:
    """The ``before_after.json`` of a model directory (``rows``, ``steps``, ``before``, ``after``), or ``None``."""
    path = os.path.join(model_dir, BEFORE_AFTER_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)
