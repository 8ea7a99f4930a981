"""Model card (``README.md`` with Hugging Face YAML front matter) for a model trained with flagm3.

:func:`write_model_card` gathers what a reader needs from the trainer and the arguments: the base model, the
training data (files, record counts), the training arguments that matter, the loss configuration, retrieval
metrics per head and hybrid, a usage snippet (flagm3's ``M3Embedder`` and FlagEmbedding's ``BGEM3FlagModel``
on the BGE-M3 layout) and the framework versions. :func:`render_model_card` returns the text without writing.
"""

from __future__ import annotations

import json
import os
import platform
import re
from importlib import metadata
from typing import Any, Mapping, Optional, Sequence

import yaml

from .scoring import BGE_M3_ENSEMBLE_WEIGHTS, HEADS
from .version import __version__

TAGS = ("sentence-similarity", "retrieval", "bge-m3", "dense", "sparse", "colbert")
RANKING_ORDER = ("dense", "sparse", "colbert", "dense+sparse", "all")
METRIC_ORDER = ("ndcg", "recall", "mrr", "map")
VERSION_PACKAGES = ("torch", "transformers", "datasets", "accelerate", "tokenizers", "peft", "deepspeed")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

Results = Mapping[str, Mapping[str, float]]  # ranking -> metric -> value


# ---------------------------------------------------------------------------------------------- metrics
def normalize_metrics(metrics: Optional[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Metrics in any of three shapes as ``{set name: {ranking: {metric: value}}}``.

    Accepted: one result set ``{"dense": {"ndcg@10": x}, ...}`` (named ``"evaluation"``); several named sets
    ``{"zero-shot": {...}, "fine-tuned": {...}}``; or flat trainer keys ``{"eval_dense_ndcg@10": x}`` /
    ``{"dense_ndcg@10": x}`` (keys that name no known ranking, such as ``eval_loss``, are left out).
    """
    if not metrics:
        return {}
    values = list(metrics.values())
    if all(_is_number(v) for v in values):
        return {"evaluation": unflatten_metrics(metrics)} if unflatten_metrics(metrics) else {}
    if all(isinstance(v, Mapping) and all(_is_number(x) for x in v.values()) for v in values):
        return {"evaluation": {k: dict(v) for k, v in metrics.items()}}
    if all(isinstance(v, Mapping) for v in values):
        sets = {name: normalize_metrics(v).get("evaluation", {}) for name, v in metrics.items()}
        return {name: results for name, results in sets.items() if results}
    raise ValueError("metrics must be {ranking: {metric: value}}, {set name: {ranking: {metric: value}}} "
                     "or flat {'eval_<ranking>_<metric>': value}")


def unflatten_metrics(flat: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``{"eval_dense_ndcg@10": x, "eval_all_mrr@10": y}`` -> ``{"dense": {"ndcg@10": x}, "all": {...}}``."""
    out: dict[str, dict[str, float]] = {}
    for key, value in flat.items():
        name = key[len("eval_"):] if key.startswith("eval_") else key
        for ranking in sorted(RANKING_ORDER, key=len, reverse=True):  # "dense+sparse" before "dense"
            if name.startswith(ranking + "_") and _is_number(value):
                out.setdefault(ranking, {})[name[len(ranking) + 1:]] = float(value)
                break
    return {r: out[r] for r in _ordered(out, RANKING_ORDER)}


def metrics_table(results: Results, digits: int = 4) -> str:
    """A Markdown table: one row per ranking (heads, then hybrids), one column per metric."""
    columns: list[str] = []
    for values in results.values():
        columns += [m for m in values if m not in columns]
    columns.sort(key=_metric_key)
    lines = ["| ranking | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for ranking in _ordered(results, RANKING_ORDER):
        cells = [f"{results[ranking][m]:.{digits}f}" if m in results[ranking] else "-" for m in columns]
        lines.append(f"| {ranking} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _metric_key(name: str) -> tuple:
    base, _, k = name.partition("@")
    rank = METRIC_ORDER.index(base) if base in METRIC_ORDER else len(METRIC_ORDER)
    return rank, base, int(k) if k.isdigit() else 0


def _ordered(names: Sequence[str] | Mapping[str, Any], order: Sequence[str]) -> list[str]:
    names = list(names)
    return [n for n in order if n in names] + [n for n in names if n not in order]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------- information
def _base_model(base_model: Optional[str], model_args: Any, trainer: Any) -> Optional[str]:
    if base_model:
        return str(base_model)
    if model_args is not None and getattr(model_args, "model_name_or_path", None):
        return str(model_args.model_name_or_path)
    model = getattr(trainer, "model", None)
    backbone = getattr(getattr(model, "config", None), "backbone_config", None)
    return getattr(backbone, "_name_or_path", None) or None


def _is_hub_id(name: Optional[str]) -> bool:
    return bool(name) and not os.path.exists(name) and bool(_HUB_ID.match(name))


def _count_records(path: str) -> Optional[int]:
    """Non-blank lines of a JSONL file, or of every ``.json``/``.jsonl`` file of a directory."""
    files = [path]
    if os.path.isdir(path):
        files = [os.path.join(path, n) for n in sorted(os.listdir(path)) if n.endswith((".jsonl", ".json"))]
    if not all(os.path.isfile(f) for f in files):
        return None
    count = 0
    for file in files:
        with open(file, encoding="utf-8", errors="replace") as f:
            count += sum(1 for line in f if line.strip())
    return count


def training_data(trainer: Any, data_args: Any) -> list[tuple[str, Optional[int]]]:
    """``(file or dataset name, number of records)`` for each training dataset."""
    dataset = getattr(trainer, "train_dataset", None)
    if dataset is not None and hasattr(dataset, "dataset_names") and hasattr(dataset, "dataset_sizes"):
        return list(zip(map(str, dataset.dataset_names), dataset.dataset_sizes))
    files = list(getattr(data_args, "train_data", None) or [])
    return [(str(f), _count_records(str(f)) if isinstance(f, (str, os.PathLike)) else None) for f in files]


def training_arguments(trainer: Any, data_args: Any) -> dict[str, Any]:
    """The arguments that define a run (only those known), in reading order."""
    args = getattr(trainer, "args", None)
    out: dict[str, Any] = {}
    if args is not None:
        world = getattr(args, "world_size", 1) or 1
        accumulation = getattr(args, "gradient_accumulation_steps", 1) or 1
        out["per_device_train_batch_size"] = args.per_device_train_batch_size
        out["effective batch size (queries)"] = args.per_device_train_batch_size * world * accumulation
    if data_args is not None:
        for name in ("train_group_size", "query_max_len", "passage_max_len"):
            out[name] = getattr(data_args, name, None)
    if args is not None:
        for name in ("learning_rate", "head_learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay",
                     "max_steps", "num_train_epochs"):
            out[name] = getattr(args, name, None)
        if getattr(args, "max_steps", -1) and args.max_steps > 0:
            out.pop("num_train_epochs")
        state = getattr(trainer, "state", None)
        if state is not None and getattr(state, "global_step", 0):
            out["steps trained"] = state.global_step
        for name in ("loss_preset", "temperature", "negatives_cross_device", "sub_batch_size", "bf16", "fp16",
                     "sentence_pooling_method", "seed"):
            out[name] = getattr(args, name, None)
    return {k: getattr(v, "value", v) for k, v in out.items() if v is not None}  # enums by their value


def training_results(trainer: Any) -> dict[str, float]:
    """Final training loss and runtime, and the last logged per-head losses, from the trainer's log history."""
    history = getattr(getattr(trainer, "state", None), "log_history", None) or []
    out: dict[str, float] = {}
    for entry in history:
        for key, value in entry.items():
            if (key.startswith(("loss_", "self_distill_")) or key in ("train_loss", "train_runtime")) \
                    and _is_number(value):
                out[key] = float(value)
    return out


SPARSE_HEALTH = (("sparse_active", "active tokens per text"), ("sparse_zero", "share of all-zero lexical vectors"),
                 ("sparse_weight", "mean weight of the active tokens"))


def sparse_health_table(trainer: Any) -> list[str]:
    """Markdown rows of the sparse head's health (queries and passages) at the first and last logged step (from
    the trainer's model-card data, :class:`flagm3.callbacks.ModelCardCallback`, else its log history)."""
    logged = list(getattr(getattr(trainer, "model_card_data", None), "sparse_health", None) or [])
    if not logged:
        history = getattr(getattr(trainer, "state", None), "log_history", None) or []
        logged = [e for e in history if _is_number(e.get("sparse_active_passage"))]
    if not logged:
        return []
    first, last = logged[0], logged[-1]
    rows = ["| statistic | queries, step {0} | queries, step {1} | passages, step {0} | passages, step {1} |"
            .format(first.get("step", "?"), last.get("step", "?")), "|---|---:|---:|---:|---:|"]
    for key, label in SPARSE_HEALTH:
        values = [e.get(f"{key}_{side}") for side in ("query", "passage") for e in (first, last)]
        rows.append(f"| {label} | " + " | ".join(f"{v:.4g}" if _is_number(v) else "-" for v in values) + " |")
    return rows


def framework_versions() -> dict[str, str]:
    versions = {"Python": platform.python_version(), "flagm3": __version__}
    for name in VERSION_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


# ------------------------------------------------------------------------------------------------ usage
def usage_snippets(model_id: str, bge_m3_path: str, pooling: str = "cls",
                   example: tuple[str, str] = ("What is BGE M3?", "BGE M3 is an embedding model.")) -> str:
    """Markdown with two code blocks: flagm3's ``M3Embedder`` and FlagEmbedding's ``BGEM3FlagModel``."""
    query, passage = (json.dumps(t, ensure_ascii=False) for t in example)
    pooling_arg = "" if pooling == "cls" else f', pooling_method="{pooling}"'
    weights = [BGE_M3_ENSEMBLE_WEIGHTS[h] for h in HEADS]
    return f'''With flagm3 (loads this directory; its config keeps the pooling and normalisation):

```python
from flagm3.inference import M3Embedder

model = M3Embedder("{model_id}", use_fp16=False)
queries = [{query}]
passages = [{passage}]
q = model.encode_queries(queries, return_dense=True, return_sparse=True, return_colbert_vecs=True)
p = model.encode_corpus(passages, return_dense=True, return_sparse=True, return_colbert_vecs=True)
dense = q["dense_vecs"] @ p["dense_vecs"].T
sparse = model.compute_lexical_matching_score(q["lexical_weights"], p["lexical_weights"])
colbert = model.colbert_score(q["colbert_vecs"][0], p["colbert_vecs"][0])
scores = model.compute_score(list(zip(queries, passages)), weights_for_different_modes={weights})
print(dense, sparse, float(colbert), scores["colbert+sparse+dense"])
```

With FlagEmbedding, on the BGE-M3 layout (`{bge_m3_path}`):

```python
from FlagEmbedding import BGEM3FlagModel

model = BGEM3FlagModel("{bge_m3_path}", use_fp16=False{pooling_arg})
out = model.encode([{passage}], return_dense=True, return_sparse=True, return_colbert_vecs=True)
print(model.compute_score([({query}, {passage})], weights_for_different_modes={weights}))
```'''


# -------------------------------------------------------------------------------------------------- card
def render_model_card(
    output_dir: str,
    trainer: Any = None,
    model_args: Any = None,
    data_args: Any = None,
    metrics: Optional[Mapping[str, Any]] = None,
    base_model: Optional[str] = None,
    *,
    model_id: Optional[str] = None,
    datasets: Optional[Sequence[str]] = None,
    language: Optional[str | Sequence[str]] = None,
    description: Optional[str] = None,
    example: Optional[tuple[str, str]] = None,
) -> str:
    """The model card's text (Markdown with YAML front matter) of the model in ``output_dir``.

    Args:
        output_dir: the model directory (the card's usage snippet loads it, unless ``model_id`` is given).
        trainer: an :class:`~flagm3.trainer.M3Trainer` (arguments, loss config, training data, log history).
        model_args, data_args: ``M3ModelArguments`` / ``M3DataArguments`` (base model; group size, lengths).
        metrics: ``{ranking: {metric: value}}``, ``{set name: {ranking: {metric: value}}}`` or flat
            ``eval_<ranking>_<metric>`` keys; default: the trainer's last evaluation, if any.
        base_model: overrides the base model named by ``model_args`` (a hub id goes into the front matter).
        model_id: name used in the usage snippet; datasets: hub dataset ids; language; description: a
            paragraph under the title; example: ``(query, passage)`` for the usage snippet.
    """
    base = _base_model(base_model, model_args, trainer)
    data_args = data_args if data_args is not None else getattr(trainer, "data_args", None)
    model_id = model_id or output_dir
    model = getattr(trainer, "model", None)
    config = getattr(model, "config", None)
    pooling = getattr(config, "pooling", None) or getattr(getattr(trainer, "args", None),
                                                         "sentence_pooling_method", None) or "cls"
    card_data = getattr(trainer, "model_card_data", None)
    if metrics is None and getattr(card_data, "eval_metrics", None):
        metrics = card_data.eval_metrics
    if metrics is None and trainer is not None:
        history = getattr(getattr(trainer, "state", None), "log_history", None) or []
        evals = [e for e in history if any(k.startswith("eval_") for k in e)]
        metrics = evals[-1] if evals else None
    result_sets = normalize_metrics(metrics)

    front: dict[str, Any] = {"library_name": "flagm3", "pipeline_tag": "sentence-similarity", "tags": list(TAGS)}
    if _is_hub_id(base):
        front["base_model"] = base
    if datasets:
        front["datasets"] = list(datasets)
    if language:
        front["language"] = [language] if isinstance(language, str) else list(language)
    parts = ["---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---", ""]

    title = os.path.basename(os.path.normpath(model_id)) or "flagm3 model"
    parts += [f"# {title}", ""]
    intro = (f"A BGE-M3-style retriever trained with flagm3 from `{base}`" if base
             else "A BGE-M3-style retriever trained with flagm3")
    parts += [intro + f": one encoder with three retrieval heads trained jointly: dense ({pooling}-pooled "
              "vector, inner product), sparse (per-token lexical weights, scored on shared tokens) and ColBERT "
              "(per-token vectors, MaxSim).", ""]
    if description:
        parts += [description, ""]
    details = [("Base model", f"`{base}`" if base else "unknown")]
    if config is not None:
        backbone = getattr(config, "backbone_config", None)
        details += [
            ("Encoder", f"{getattr(backbone, 'model_type', '?')}, hidden size {getattr(config, 'encoder_hidden_size', '?')}"),
            ("Dense pooling", f"{pooling}, {'normalised' if getattr(config, 'normalize_embeddings', True) else 'not normalised'}"),
            ("ColBERT dimension", str(getattr(config, "colbert_output_dim", "?"))),
        ]
    parts += ["## Model", "", *[f"- **{k}**: {v}" for k, v in details], ""]

    data = training_data(trainer, data_args)
    if data:
        parts += ["## Training data", "", "| file | records |", "|---|---:|"]
        parts += [f"| `{name}` | {'?' if n is None else n} |" for name, n in data]
        if len(data) > 1:
            parts.append(f"| **total** | {sum(n or 0 for _, n in data)} |")
        parts.append("")

    arguments = training_arguments(trainer, data_args)
    loss = getattr(card_data, "loss", None) or (trainer.m3_loss.get_config_dict()
                                                 if hasattr(getattr(trainer, "m3_loss", None), "get_config_dict") else None)
    recipe = getattr(card_data, "recipe", None) or (trainer.recipe.card() if hasattr(trainer, "recipe") else None)
    if arguments or loss:
        parts += ["## Training", ""]
        parts += [f"- `{k}`: {v}" for k, v in arguments.items()]
        if recipe:
            parts += ["", "Recipe (`flagm3.recipe.Recipe`: learning rates per parameter group, attention, sparse "
                      "head):", "", *[f"- `{k}`: {v}" for k, v in recipe.items()]]
        if loss is not None:
            parts += ["", "Loss configuration (`M3Loss.get_config_dict()`):", "", "```json",
                      json.dumps(loss, indent=2, default=str), "```"]
        differences = getattr(getattr(trainer, "args", None), "differences_from_flagembedding", None)
        if callable(differences) and differences():
            parts += ["", "Differences from the objective FlagEmbedding trains with the same arguments "
                      "(`--loss_preset bge-m3` restores it):", ""]
            parts += [f"- {line}" for line in differences()]
        results = training_results(trainer)
        if results:
            parts += ["", "Training results (last logged values):", ""]
            parts += [f"- `{k}`: {v:.4f}" for k, v in results.items()]
        health = sparse_health_table(trainer)
        if health:
            parts += ["", "Sparse head health while training (averaged over the first and the last logging "
                      "interval; a head that collapses loses active tokens and gains all-zero vectors):", "",
                      *health]
        parts.append("")

    if result_sets:
        parts += ["## Evaluation", "", "Retrieval metrics of each head and of the hybrids "
                  "(`dense+sparse`, `all` = dense + sparse + ColBERT, weighted sums of scores).", ""]
        for name, results in result_sets.items():
            if len(result_sets) > 1:
                parts += [f"### {name}", ""]
            parts += [metrics_table(results), ""]

    has_bge = os.path.isdir(os.path.join(output_dir, "bge-m3")) or bool(
        getattr(getattr(trainer, "args", None), "save_bge_m3_layout", False))
    bge_path = f"{model_id}/bge-m3" if has_bge else f"{model_id}-bge-m3"
    parts += ["## Usage", ""]
    if not has_bge:
        parts += [f"Export the BGE-M3 layout first: `flagm3 export --model {model_id} --output {bge_path}`.", ""]
    parts += [usage_snippets(model_id, bge_path, pooling, example or ("What is BGE M3?",
                                                                      "BGE M3 is an embedding model.")), ""]

    parts += ["## Framework versions", "", *[f"- {k}: {v}" for k, v in framework_versions().items()], ""]
    return "\n".join(parts)


def write_model_card(output_dir: str, *args: Any, **kwargs: Any) -> str:
    """Write :func:`render_model_card`'s text (same arguments) to ``<output_dir>/README.md``; return its path."""
    text = render_model_card(output_dir, *args, **kwargs)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "README.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path
