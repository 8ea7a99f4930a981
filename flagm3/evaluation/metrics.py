"""trec_eval metrics of rankings (nDCG@k, Recall@k, MRR@k, MAP@k) and how results are shown.

The numbers are those of ``pytrec_eval``'s ``ndcg_cut``, ``recall``, ``recip_rank`` on the top k and ``map_cut``.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

METRICS = ("ndcg", "recall", "mrr", "map")

Run = dict[str, dict[str, float]]  # query id -> document id -> score


def rank_documents(scores: Mapping[str, float]) -> list[str]:
    """Document ids by decreasing score, ties by decreasing id (trec_eval's order)."""
    return [doc for doc, _ in sorted(scores.items(), key=lambda item: (item[1], item[0]), reverse=True)]


def query_metrics(
    ranked: Sequence[str], judged: Mapping[str, int], k_values: Iterable[int]
) -> dict[str, float]:
    """trec_eval metrics of one ranking against graded judgements (relevant: grade >= 1; nDCG gain: grade)."""
    grades = [judged.get(doc, 0) for doc in ranked]
    num_relevant = sum(1 for g in judged.values() if g >= 1)
    ideal = sorted((g for g in judged.values() if g > 0), reverse=True)
    discounts = [1.0 / math.log2(i + 2) for i in range(max(len(grades), len(ideal)))]
    out = {}
    for k in k_values:
        top = grades[:k]
        dcg = sum(g * discounts[i] for i, g in enumerate(top) if g > 0)
        idcg = sum(g * discounts[i] for i, g in enumerate(ideal[:k]))
        hits = [i for i, g in enumerate(top) if g >= 1]
        out[f"ndcg@{k}"] = dcg / idcg if idcg > 0 else 0.0
        out[f"recall@{k}"] = len(hits) / num_relevant if num_relevant else 0.0
        out[f"mrr@{k}"] = 1.0 / (hits[0] + 1) if hits else 0.0
        precision_sum = sum((n + 1) / (i + 1) for n, i in enumerate(hits))
        out[f"map@{k}"] = precision_sum / num_relevant if num_relevant else 0.0
    return out


def evaluate_run(
    run: Mapping[str, Mapping[str, float]],
    qrels: Mapping[str, Mapping[str, int]],
    k_values: Iterable[int] = (1, 10, 100),
    metrics: Iterable[str] = METRICS,
) -> dict[str, float]:
    """Mean of each ``metric@k`` over every query in ``qrels`` (a query absent from ``run`` scores 0)."""
    k_values, metrics = sorted(set(k_values)), list(metrics)
    unknown = set(metrics) - set(METRICS)
    if unknown or not k_values or min(k_values) < 1:
        raise ValueError(
            f"metrics must be among {METRICS} (got {metrics}) and k_values positive (got {k_values})"
        )
    names = [f"{m}@{k}" for m in metrics for k in k_values]
    totals = dict.fromkeys(names, 0.0)
    for qid, judged in qrels.items():
        per_query = query_metrics(rank_documents(run.get(qid, {})), judged, k_values)
        for name in names:
            totals[name] += per_query[name]
    return {name: total / max(len(qrels), 1) for name, total in totals.items()}



def format_results_table(results: Mapping[str, Mapping[str, float]], digits: int = 4) -> str:
    """A plain-text table: one row per ranking, one column per metric (ordered by metric, then k)."""
    metrics: list[str] = []
    for values in results.values():
        metrics += [m for m in values if m not in metrics]

    def order(name: str) -> tuple:
        base, _, k = name.partition("@")
        return (METRICS.index(base) if base in METRICS else len(METRICS), base, int(k) if k.isdigit() else 0)

    metrics.sort(key=order)
    header = ["ranking"] + metrics
    rows = [[name] + [f"{values[m]:.{digits}f}" if m in values else "-" for m in metrics]
            for name, values in results.items()]
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in [header] + rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def flatten_results(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """``{"dense": {"ndcg@10": x}}`` -> ``{"dense_ndcg@10": x}``."""
    return {f"{name}_{metric}": value for name, values in results.items() for metric, value in values.items()}

