"""flagm3 merge: every parameter is the weighted sum, the result loads as any flagm3 model, --auto's choice."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import SENTENCES
from test_diagnose import write_beir

from flagm3 import M3Embedder, M3Model
from flagm3.cli import main as cli_main
from flagm3.merge import auto_merge, choose_weight, merge_models

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_encoder_dir, tiny_tokenizer):
    """Three flagm3 checkpoints of one architecture with different weights (heads included)."""
    root = tmp_path_factory.mktemp("merge")
    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = M3Model.from_encoder(str(tiny_encoder_dir), colbert_dim=16)
        generator = torch.Generator().manual_seed(100 + seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
        path = root / f"m{seed}"
        model.save_pretrained(str(path))
        tiny_tokenizer.save_pretrained(str(path))
        paths.append(str(path))
    return paths


def state(path):
    return M3Model.from_pretrained(path).state_dict()


@pytest.mark.parametrize("weights", [[0.3, 0.7], [0.2, 0.5, 0.3], [1.5, -0.5]])
def test_every_parameter_is_the_weighted_sum(checkpoints, weights):
    paths = checkpoints[: len(weights)]
    merged = merge_models(paths, weights).state_dict()
    sources = [state(p) for p in paths]
    assert set(merged) == set(sources[0]) and any(k.startswith("colbert_linear.") for k in merged)
    for key, value in merged.items():
        expected = sum(w * sd[key].double() for w, sd in zip(weights, sources))
        assert torch.allclose(value.double(), expected, atol=1e-6, rtol=0), key
    assert not torch.equal(merged["colbert_linear.weight"], sources[0]["colbert_linear.weight"])


def test_cli_merge_loads_everywhere_a_flagm3_model_loads(checkpoints, tmp_path, capsys):
    out = tmp_path / "merged"
    cli_main(["merge", "--models", *checkpoints[:2], "--weights", "0.25", "0.75", "--output", str(out)])
    assert json.loads(capsys.readouterr().out)["weights"] == [0.25, 0.75]
    loaded = M3Model.from_pretrained(str(out)).state_dict()
    expected = merge_models(checkpoints[:2], [0.25, 0.75]).state_dict()
    assert all(torch.allclose(loaded[k], expected[k], atol=1e-6) for k in expected)
    embedder = M3Embedder(str(out), use_fp16=False)
    vectors = embedder.encode(SENTENCES[:2], return_dense=True, return_sparse=True, return_colbert_vecs=True)
    assert vectors["dense_vecs"].shape[0] == 2 and len(vectors["colbert_vecs"]) == 2
    assert json.loads((out / "merge.json").read_text())["models"] == checkpoints[:2]


def test_a_plain_encoder_contributes_to_the_encoder_only(checkpoints, tiny_encoder_dir):
    merged = merge_models([str(tiny_encoder_dir), checkpoints[1]], [0.4, 0.6]).state_dict()
    tuned = state(checkpoints[1])
    encoder = M3Model.from_encoder(str(tiny_encoder_dir)).state_dict()
    for key, value in merged.items():
        if key.startswith(("sparse_linear.", "colbert_linear.")):
            assert torch.equal(value, tuned[key]), key  # the only trained heads, renormalised weight 1
        elif value.is_floating_point():
            assert torch.allclose(value.double(), 0.4 * encoder[key].double() + 0.6 * tuned[key].double(),
                                  atol=1e-6), key


def test_bad_weights_and_architectures_are_one_line_errors(checkpoints, tmp_path, tiny_encoder_dir):
    with pytest.raises(ValueError, match="must sum to 1"):
        merge_models(checkpoints[:2], [0.5, 0.6])
    with pytest.raises(ValueError, match="2 weights for 3 models"):
        merge_models(checkpoints, [0.5, 0.5])
    other = M3Model.from_encoder(str(tiny_encoder_dir), colbert_dim=8)
    other.save_pretrained(str(tmp_path / "other"))
    with pytest.raises(ValueError, match="colbert_linear.weight has shape"):
        merge_models([checkpoints[0], str(tmp_path / "other")], [0.5, 0.5])
    with pytest.raises(SystemExit, match="--weights must sum to 1"):
        cli_main(["merge", "--models", *checkpoints[:2], "--weights", "0.5", "0.6", "--output", str(tmp_path / "x")])


def test_choose_weight_keeps_the_general_collections_within_tolerance():
    rows = [{"weight": 0.0, "in_domain": 0.30, "general": {"a": 0.50, "b": 0.40}},
            {"weight": 0.5, "in_domain": 0.36, "general": {"a": 0.498, "b": 0.397}},
            {"weight": 0.8, "in_domain": 0.38, "general": {"a": 0.499, "b": 0.39}},
            {"weight": 1.0, "in_domain": 0.40, "general": {"a": 0.45, "b": 0.41}}]
    assert choose_weight(rows, 0.005)["weight"] == 0.5  # 0.8 loses 0.01 on b, 1.0 loses 0.05 on a
    assert choose_weight(rows, 0.1)["weight"] == 1.0
    assert choose_weight(rows, 0.0)["weight"] == 0.0
    with pytest.raises(ValueError, match="must contain 0"):
        choose_weight(rows[1:], 0.005)


def test_auto_merge_picks_from_measured_dev_metrics(checkpoints, tmp_path, caplog):
    in_domain = write_beir(tmp_path / "in", SENTENCES, {f"q{i}": (SENTENCES[i][:25], [i]) for i in range(6)})
    general = write_beir(tmp_path / "gen", SENTENCES[::-1], {f"g{i}": (SENTENCES[i][-25:], [9 - i]) for i in range(6)})
    options = {"max_query_length": 16, "max_passage_length": 32, "batch_size": 16}
    with caplog.at_level(logging.WARNING, logger="flagm3.merge"):
        model, report = auto_merge(checkpoints[:2], str(in_domain), [str(general)], tolerance=0.0,
                                   grid=[0.5, 1.0], evaluator_options=options)
    assert report["queries"] == {"in dev": 6, "gen dev": 6}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "few queries (in dev: 6, gen dev: 6)" in warnings[0]
    assert [r["weight"] for r in report["rows"]] == [0.0, 0.5, 1.0]
    assert report["chosen"] == choose_weight(report["rows"], 0.0)
    assert report["weights"] == [1 - report["chosen"]["weight"], report["chosen"]["weight"]]
    expected = merge_models(checkpoints[:2], report["weights"]).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="exactly two"):
        auto_merge(checkpoints, str(in_domain), [str(general)])


def test_the_merged_model_trains_evaluates_and_exports(checkpoints, tmp_path, capsys):
    from conftest import build_cli_trainer, write_train_file

    out = tmp_path / "merged"
    cli_main(["merge", "--models", *checkpoints[:2], "--output", str(out)])
    expected = merge_models(checkpoints[:2], [0.5, 0.5]).state_dict()
    trainer = build_cli_trainer(out, write_train_file(tmp_path / "train.jsonl", 4), tmp_path / "run")
    loaded = trainer.model.state_dict()
    assert all(torch.allclose(loaded[k], v, atol=1e-6) for k, v in expected.items())  # no fresh heads
    data = write_beir(tmp_path / "beir", SENTENCES, {f"q{i}": (SENTENCES[i][:20], [i]) for i in range(4)}, "test")
    cli_main(["eval", "--model", str(out), "--data", str(data), "--max-query-length", "16",
              "--max-passage-length", "32", "--output", str(tmp_path / "metrics.json")])
    assert "all" in json.loads((tmp_path / "metrics.json").read_text())
    cli_main(["export", "--model", str(out), "--output", str(tmp_path / "bge"), "--format", "bge-m3"])
    again = M3Model.from_pretrained(str(tmp_path / "bge")).state_dict()
    assert torch.allclose(again["colbert_linear.weight"], expected["colbert_linear.weight"], atol=1e-6)
