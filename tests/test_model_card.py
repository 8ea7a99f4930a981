"""Model card: front matter, training data and arguments, metrics tables, usage snippets that run."""

from __future__ import annotations

import contextlib
import io
import json
import re

import numpy as np
import pytest
import transformers
import yaml
from conftest import SENTENCES
from transformers import AutoTokenizer

from flagm3 import M3Model
from flagm3.model_card import normalize_metrics, render_model_card, unflatten_metrics, write_model_card
from flagm3.train import build_dataset, load_model
from flagm3.trainer import M3Trainer
from flagm3.training_args import M3DataArguments, M3ModelArguments, M3TrainingArguments

METRICS = {
    "dense": {"ndcg@10": 0.4123456, "recall@10": 0.61, "mrr@10": 0.38765},
    "sparse": {"ndcg@10": 0.1, "recall@10": 0.25, "mrr@10": 0.0912345},
    "colbert": {"ndcg@10": 0.52, "recall@10": 0.7, "mrr@10": 0.5},
    "dense+sparse": {"ndcg@10": 0.43, "recall@10": 0.62, "mrr@10": 0.41},
    "all": {"ndcg@10": 0.555555, "recall@10": 0.75, "mrr@10": 0.53},
}


def flat(results: dict) -> dict[str, float]:
    return {f"{ranking} {metric}": v for ranking, values in results.items() for metric, v in values.items()}


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def tables(card: str) -> dict[str, dict[str, dict[str, float]]]:
    """Every Markdown table whose first column is ``ranking``, keyed by the heading above it."""
    found, heading, lines = {}, "", card.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("| ranking |"):
            columns = [c.strip() for c in line.strip("|").split("|")][1:]
            rows = {}
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                cells = [c.strip() for c in row.strip("|").split("|")]
                rows[cells[0]] = {m: float(v) for m, v in zip(columns, cells[1:]) if v != "-"}
            found[heading] = rows
    return found


def code_blocks(card: str, language: str = "python") -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", card, flags=re.S)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_encoder_dir):
    """A tiny M3 model trained 2 steps by M3Trainer and saved with the BGE-M3 layout."""
    root = tmp_path_factory.mktemp("card")
    data = root / "train.jsonl"
    with data.open("w") as f:
        for i, text in enumerate(SENTENCES):
            f.write(json.dumps({"query": text[:20], "pos": [text], "neg": [SENTENCES[i - 1]]}) + "\n")
    model_args = M3ModelArguments(model_name_or_path=str(tiny_encoder_dir))
    data_args = M3DataArguments(train_data=[str(data)], train_group_size=2, query_max_len=16, passage_max_len=24)
    args = M3TrainingArguments(
        output_dir=str(root / "model"), max_steps=2, per_device_train_batch_size=2, learning_rate=3e-5,
        head_learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        save_bge_m3_layout=True, loss_preset="bge-m3", disable_tqdm=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_encoder_dir))
    model = load_model(model_args, args, tokenizer)
    trainer = M3Trainer(model=model, args=args, data_args=data_args, processing_class=tokenizer,
                        train_dataset=build_dataset(data_args, args, tokenizer))
    trainer.train()
    trainer.save_model()
    return trainer, model_args, data_args


def test_front_matter_parses_and_names_the_base_model(tmp_path, trained):
    trainer, model_args, data_args = trained
    card = render_model_card(str(tmp_path), trainer, model_args, data_args, METRICS, base_model="acme/tiny-bert",
                             datasets=["acme/qa-pairs"], language="en")
    front = front_matter(card)
    assert front["library_name"] == "flagm3"
    assert {"sentence-similarity", "retrieval", "bge-m3", "dense", "sparse", "colbert"} <= set(front["tags"])
    assert front["base_model"] == "acme/tiny-bert"
    assert front["datasets"] == ["acme/qa-pairs"] and front["language"] == ["en"]


def test_a_local_base_model_stays_out_of_the_front_matter(tmp_path, trained):
    trainer, model_args, data_args = trained
    card = render_model_card(str(tmp_path), trainer, model_args, data_args)
    assert "base_model" not in front_matter(card)  # the hub validates it: only hub ids go there
    assert f"`{model_args.model_name_or_path}`" in card
    assert "## Evaluation" not in card  # no metrics given, none logged


def test_card_written_by_the_trainer_lists_data_arguments_and_loss(trained):
    trainer, model_args, data_args = trained
    path = trainer.write_model_card(model_args, data_args, metrics=METRICS)
    assert path == f"{trainer.args.output_dir}/README.md"
    card = open(path, encoding="utf-8").read()
    records = sum(1 for line in open(data_args.train_data[0]) if line.strip())
    assert f"| `{data_args.train_data[0]}` | {records} |" in card
    for line in ("`per_device_train_batch_size`: 2", "`train_group_size`: 2", "`query_max_len`: 16",
                 "`passage_max_len`: 24", "`learning_rate`: 3e-05", "`head_learning_rate`: 0.001",
                 "`max_steps`: 2", "`steps trained`: 2", "`loss_preset`: bge-m3", "`lr_scheduler_type`: linear"):
        assert line in card
    for key, value in trainer.recipe.card().items():  # the recipe, as the trainer ran it
        assert f"- `{key}`: {value}" in card
    assert "`head_learning_rate`: 0.001" in card and "`sparse_learning_rate`: 0.001" in card
    loss_block = re.search(r"```json\n(.*?)```", card, flags=re.S).group(1)
    assert json.loads(loss_block) == json.loads(json.dumps(trainer.m3_loss.get_config_dict()))
    final_loss = [e for e in trainer.state.log_history if "train_loss" in e][-1]["train_loss"]
    assert f"`train_loss`: {final_loss:.4f}" in card
    assert f"- transformers: {transformers.__version__}" in card


def test_metrics_table_values_equal_the_given_metrics(tmp_path):
    card = render_model_card(str(tmp_path), metrics=METRICS)
    (table,) = tables(card).values()
    assert list(table) == list(METRICS)  # heads, then hybrids
    for ranking, values in METRICS.items():
        assert table[ranking] == pytest.approx(values, abs=5e-5)
    assert flat(table) == pytest.approx(flat(METRICS), abs=5e-5)


def test_several_metric_sets_and_flat_trainer_keys(tmp_path):
    before = {r: {m: v / 2 for m, v in values.items()} for r, values in METRICS.items()}
    card = render_model_card(str(tmp_path), metrics={"zero-shot": before, "fine-tuned": METRICS})
    found = tables(card)
    assert flat(found["zero-shot"]) == pytest.approx(flat(before), abs=5e-5)
    assert flat(found["fine-tuned"]) == pytest.approx(flat(METRICS), abs=5e-5)

    flat_keys = {f"eval_{r}_{m}": v for r, values in METRICS.items() for m, v in values.items()}
    flat_keys.update({"eval_loss": 1.5, "epoch": 2.0})
    assert unflatten_metrics(flat_keys) == METRICS  # "dense+sparse_..." is not read as "dense"
    assert normalize_metrics(flat_keys) == {"evaluation": METRICS}
    assert tables(render_model_card(str(tmp_path), metrics=flat_keys)) == tables(render_model_card(str(tmp_path),
                                                                                               metrics=METRICS))
    with pytest.raises(ValueError, match="ranking"):
        normalize_metrics({"dense": [0.1]})


def test_metrics_default_to_the_trainers_last_evaluation(tmp_path, trained):
    trainer, model_args, data_args = trained
    logged = {f"eval_{r}_ndcg@10": v["ndcg@10"] for r, v in METRICS.items()}
    trainer.state.log_history.append({**logged, "step": trainer.state.global_step})
    try:
        card = render_model_card(str(tmp_path), trainer, model_args, data_args)
    finally:
        trainer.state.log_history.pop()
    (table,) = tables(card).values()
    assert flat(table) == pytest.approx({f"{r} ndcg@10": v["ndcg@10"] for r, v in METRICS.items()}, abs=5e-5)


def test_usage_snippets_run_on_the_saved_model(trained):
    trainer, model_args, data_args = trained
    out = trainer.args.output_dir
    example = ("what similarity laws must be obeyed", SENTENCES[0])
    card = open(write_model_card(out, trainer, model_args, data_args, example=example), encoding="utf-8").read()
    flagm3_code, flagembedding_code = code_blocks(card)
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(flagm3_code, "model-card-snippet", "exec"), namespace)
    dense, sparse, colbert = namespace["dense"][0, 0], namespace["sparse"][0, 0], float(namespace["colbert"])
    hybrid = namespace["scores"]["colbert+sparse+dense"][0]
    assert hybrid == pytest.approx((dense + 0.3 * sparse + colbert) / 2.3, abs=1e-5)
    assert np.isfinite([dense, sparse, colbert]).all()

    # FlagEmbedding is not installed here: the snippet must compile and point at a loadable BGE-M3 layout
    compile(flagembedding_code, "model-card-snippet", "exec")
    assert f'BGEM3FlagModel("{out}/bge-m3", use_fp16=False)' in flagembedding_code
    assert isinstance(M3Model.from_pretrained(f"{out}/bge-m3"), M3Model)


def test_without_bge_m3_layout_the_card_says_how_to_export(tmp_path):
    card = render_model_card(str(tmp_path / "plain"), model_id="acme/model")
    assert "flagm3 export --model acme/model --output acme/model-bge-m3" in card
    assert 'BGEM3FlagModel("acme/model-bge-m3"' in card
    assert 'M3Embedder("acme/model"' in card


def test_card_records_the_sparse_health_the_trainer_logged(trained):
    """The health rows are the first and last logged sparse statistics (the trainer logs them every step here)."""
    trainer, model_args, data_args = trained
    card = render_model_card(trainer.args.output_dir, trainer, model_args, data_args)
    logged = [e for e in trainer.state.log_history if "sparse_active_passage" in e]
    assert len(logged) == 2 and {"sparse_zero_query", "sparse_weight_passage"} <= set(logged[0])
    row = next(line for line in card.splitlines() if line.startswith("| active tokens per text |"))
    values = [float(v) for v in row.strip("|").split("|")[1:]]
    expected = [e[f"sparse_active_{side}"] for side in ("query", "passage") for e in (logged[0], logged[-1])]
    assert values == pytest.approx(expected, rel=1e-3)
