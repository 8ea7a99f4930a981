"""``flagm3 merge``: linear merging of whole M3 models (encoder and heads), LM-Cocktail's method.

``merged = sum_i w_i * model_i`` for every floating-point parameter and buffer, with weights summing to 1
(:func:`merge_models`). Models are flagm3 checkpoints, BGE-M3-layout directories or plain encoders; a plain
encoder has no trained heads, so its weight goes to the encoder only and the heads are the weighted sum over the
models that have them (their weights renormalised). The result is a flagm3 checkpoint (:func:`save_merged`),
which loads wherever a flagm3 model loads (``M3Model.from_pretrained``, ``M3Embedder``, ``flagm3 eval``, the
exports, ``--model_name_or_path`` of ``flagm3 train``).

:func:`auto_merge` picks the weights of a (base, fine-tuned) pair on dev splits: on a grid of fine-tuned weights
it keeps the one with the best in-domain metric among those whose general-domain metric stays within
``tolerance`` of the base model's on every general collection (docs/diagnosing.md).
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any, Mapping, Optional, Sequence

import torch

from .convert_bge_m3 import checkpoint_layout, resolve_checkpoint
from .modeling_m3 import M3Model

logger = logging.getLogger(__name__)

HEAD_PREFIXES = ("sparse_linear.", "colbert_linear.")
DEFAULT_GRID = tuple(i / 10 for i in range(11))
MIN_SELECTION_QUERIES = 30  # below this, a few points of nDCG@10 between grid points are one query's swing


def load_for_merge(name_or_path: str) -> tuple[M3Model, bool]:
    """``(model, has_trained_heads)`` of a flagm3 checkpoint, a BGE-M3-layout directory or a plain encoder."""
    path = resolve_checkpoint(name_or_path, {})
    layout = checkpoint_layout(path)
    if layout == "encoder":
        return M3Model.from_encoder(path), False
    return M3Model.from_pretrained(path), True


def check_weights(weights: Optional[Sequence[float]], count: int) -> list[float]:
    """The merge weights: one per model, summing to 1 (default: equal)."""
    if weights is None:
        return [1.0 / count] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise ValueError(f"--weights: {len(weights)} weights for {count} models")
    if abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"--weights must sum to 1, got {weights} (sum {sum(weights):.6g})")
    return weights


def merge_state_dicts(
    state_dicts: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], has_heads: Sequence[bool]
) -> dict[str, torch.Tensor]:
    """``sum_i w_i * sd_i[key]`` per floating-point entry (in float64, cast back); head entries over the models
    with trained heads only, their weights renormalised; other entries (integer buffers) from the first model,
    which must agree with every other."""
    if not any(has_heads):
        raise ValueError("no model with trained heads: merge at least one flagm3 or BGE-M3 checkpoint")
    reference = state_dicts[has_heads.index(True)]
    for i, sd in enumerate(state_dicts):
        for key, value in reference.items():
            if not has_heads[i] and key.startswith(HEAD_PREFIXES):
                continue  # a plain encoder's fresh heads take no part
            if key not in sd:
                raise ValueError(f"model {i + 1} has no parameter {key}: the models differ in architecture")
            if sd[key].shape != value.shape:
                raise ValueError(f"model {i + 1}: {key} has shape {tuple(sd[key].shape)}, model with heads "
                                 f"{tuple(value.shape)}: the models differ in architecture")
    merged = {}
    for key, value in reference.items():
        if not value.is_floating_point():
            if any(not torch.equal(sd[key], value) for sd in state_dicts):
                raise ValueError(f"{key} (an integer buffer) differs between the models")
            merged[key] = value.clone()
            continue
        members = [i for i in range(len(state_dicts)) if has_heads[i] or not key.startswith(HEAD_PREFIXES)]
        total = sum(weights[i] for i in members)
        if abs(total) < 1e-12:
            raise ValueError(f"{key}: the models that have it have weights summing to 0")
        acc = torch.zeros(value.shape, dtype=torch.float64)
        for i in members:
            acc += (weights[i] / total) * state_dicts[i][key].double()
        merged[key] = acc.to(value.dtype)
    return merged


class Merger:
    """The models of a merge, loaded once; :meth:`merged` builds the merged model for any weights."""

    def __init__(self, paths: Sequence[str]) -> None:
        if len(paths) < 2:
            raise ValueError(f"--models: give at least two models to merge, got {len(paths)}")
        self.paths = list(paths)
        loaded = [load_for_merge(p) for p in paths]
        self.has_heads = [h for _, h in loaded]
        self.state_dicts = [m.state_dict() for m, _ in loaded]
        template_index = self.has_heads.index(True) if any(self.has_heads) else 0
        self.template = loaded[template_index][0]
        self.template_path = self.paths[template_index]
        pooling = {m.config.pooling for m, h in loaded if h}
        if len(pooling) > 1:
            raise ValueError(f"the models pool their dense vectors differently ({sorted(pooling)}): not mergeable")

    def merged(self, weights: Optional[Sequence[float]] = None) -> M3Model:
        weights = check_weights(weights, len(self.paths))
        model = copy.deepcopy(self.template)
        model.load_state_dict(merge_state_dicts(self.state_dicts, weights, self.has_heads))
        return model.eval()


def merge_models(paths: Sequence[str], weights: Optional[Sequence[float]] = None) -> M3Model:
    """The linear merge ``sum_i weights[i] * model_i`` of ``paths`` (weights sum to 1; default equal)."""
    return Merger(paths).merged(weights)


def save_merged(model: M3Model, output: str, tokenizer_source: str, info: Optional[dict] = None) -> str:
    """Write ``model`` as a flagm3 checkpoint with the tokenizer of ``tokenizer_source``; ``info`` (models,
    weights) goes into ``merge.json``."""
    import json

    from transformers import AutoTokenizer

    os.makedirs(output, exist_ok=True)
    model.save_pretrained(output)
    AutoTokenizer.from_pretrained(resolve_checkpoint(tokenizer_source, {})).save_pretrained(output)
    if info is not None:
        with open(os.path.join(output, "merge.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)
    return output


def choose_weight(rows: Sequence[Mapping[str, Any]], tolerance: float) -> Mapping[str, Any]:
    """The row (``weight``, ``in_domain``, ``general``: ``{collection: value}``) with the best in-domain value
    among those whose every general value is at least the base's (the row with ``weight`` 0) minus
    ``tolerance``; ties go to the smaller weight (closer to the base)."""
    base = next((r for r in rows if r["weight"] == 0), None)
    if base is None:
        raise ValueError("the grid must contain 0 (the base model) to measure the general collections against")
    feasible = [r for r in rows
                if all(r["general"][c] >= base["general"][c] - tolerance for c in base["general"])]
    return max(feasible, key=lambda r: (r["in_domain"], -r["weight"]))


def auto_merge(
    paths: Sequence[str],
    in_domain: str,
    general: Sequence[str],
    split: str = "dev",
    tolerance: float = 0.005,
    grid: Sequence[float] = DEFAULT_GRID,
    evaluator_options: Optional[Mapping[str, Any]] = None,
) -> tuple[M3Model, dict[str, Any]]:
    """Merge ``paths = (base, fine-tuned)`` as ``(1 - w) * base + w * fine-tuned`` with the ``w`` of ``grid``
    that :func:`choose_weight` picks from the evaluators' main metric (``all_ndcg@10`` with every head) on the
    ``split`` of ``in_domain`` and of each ``general`` collection. Returns the merged model and a report
    (``weights``, ``rows``: every grid point's values)."""
    from transformers import AutoTokenizer

    from .evaluation.evaluator import M3RetrievalEvaluator

    if len(paths) != 2:
        raise ValueError(f"--auto merges a base and a fine-tuned model: give exactly two --models (base first), "
                         f"got {len(paths)}")
    if not general:
        raise ValueError("--auto needs the general collections (--general-data) to keep the base model's quality on")
    grid = sorted({float(w) for w in grid} | {0.0})
    if any(not 0 <= w <= 1 for w in grid):
        raise ValueError(f"--grid: weights of the fine-tuned model must be in [0, 1], got {grid}")
    options = dict(evaluator_options or {})
    in_eval = M3RetrievalEvaluator.from_beir(in_domain, split=split, **options)
    general_evals = {os.path.basename(os.path.normpath(g)) or g: M3RetrievalEvaluator.from_beir(g, split=split,
                                                                                                 **options)
                     for g in general}
    queries = {f"{os.path.basename(os.path.normpath(in_domain)) or in_domain} {split}": len(in_eval.queries)}
    queries |= {f"{name} {split}": len(e.queries) for name, e in general_evals.items()}
    few = {name: n for name, n in queries.items() if n < MIN_SELECTION_QUERIES}
    if few:
        logger.warning("flagm3 merge --auto chooses on few queries (%s): differences of a few points of nDCG@10 "
                       "are noise at that size, so the chosen weight may not hold on other queries; choose on a "
                       "split of at least %d queries (--split), or check the choice on a held-out split",
                       ", ".join(f"{k}: {v}" for k, v in few.items()), MIN_SELECTION_QUERIES)
    merger = Merger(paths)
    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(merger.template_path, {}))
    rows = []
    for w in grid:
        model = merger.merged([1.0 - w, w])
        row = {"weight": w, "in_domain": in_eval(model, tokenizer)[in_eval.primary_metric],
               "general": {name: e(model, tokenizer)[e.primary_metric] for name, e in general_evals.items()}}
        logger.info("merge weight %.2f: in-domain %.4f, general %s", w, row["in_domain"], row["general"])
        rows.append(row)
    best = choose_weight(rows, tolerance)
    weights = [1.0 - best["weight"], best["weight"]]
    report = {"models": list(paths), "weights": weights, "metric": in_eval.main_metric, "split": split,
              "tolerance": tolerance, "queries": queries, "rows": rows, "chosen": best}
    return merger.merged(weights), report
