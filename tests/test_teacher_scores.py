"""Teacher scores that teach: ``flagm3 mine --teacher-scores`` writes logits (score / 0.02) that training turns
into a sharp target with ``teacher_temperature`` 1, and a model distilled from its own mined scores is no worse
on held-out Cranfield queries than the same run without them."""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_train_cranfield import held_out_loss, lexical_groups

from flagm3.train import build_trainer, parse_args

pytestmark = pytest.mark.slow  # real data, a real encoder: two 12-step runs and one mining pass

STEPS, BATCH, GROUP, QUERIES = 12, 4, 4, 24


def train(train_file, out_dir, minilm_dir, *extra: str):
    argv = ["--model_name_or_path", str(minilm_dir), "--train_data", str(train_file), "--output_dir", str(out_dir),
            "--train_group_size", str(GROUP), "--query_max_len", "32", "--passage_max_len", "96",
            "--per_device_train_batch_size", str(BATCH), "--max_steps", str(STEPS), "--learning_rate", "5e-5",
            "--logging_steps", "4", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "True",
            "--seed", os.environ.get("FLAGM3_TEST_SEED", "0"), "--dataloader_num_workers", "0",
            "--heads", "dense", *extra]
    trainer = build_trainer(*parse_args(argv))
    trainer.train()
    return trainer


def test_self_mined_teacher_scores_do_not_hurt(cranfield_dir, minilm_dir, tmp_path):
    from flagm3 import M3Model
    from flagm3.inference import M3Embedder
    from flagm3.mining import mine_hard_negatives

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        records = lexical_groups(cranfield_dir, "train", negatives=6)[:QUERIES]
        plain = tmp_path / "plain.jsonl"
        plain.write_text("".join(json.dumps(r) + "\n" for r in records))
        # the untouched model mines its own negatives and scores (dense, written as logits: score / 0.02)
        base = tmp_path / "base"
        M3Model.from_encoder(str(minilm_dir)).save_pretrained(str(base))
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(minilm_dir)).save_pretrained(str(base))
        embedder = M3Embedder(str(base), batch_size=16, query_max_length=32, passage_max_length=96, devices="cpu")
        mined = tmp_path / "mined.jsonl"
        mine_hard_negatives(embedder, plain, mined, range_for_sampling=(2, 40), negative_number=GROUP - 1,
                            teacher_scores=True, show_progress=False)
        lines = [json.loads(x) for x in mined.read_text().splitlines()]
        groups = torch.tensor([line["pos_scores"][:1] + line["neg_scores"][: GROUP - 1] for line in lines])
        sharp = torch.softmax(groups, -1).max(-1).values.mean()
        flat = torch.softmax(groups * 0.02, -1).max(-1).values.mean()  # raw cosines, as mine wrote them before
        assert flat < 1 / GROUP + 0.02 < sharp - 0.1, (float(flat), float(sharp))

        without = train(mined, tmp_path / "without", minilm_dir)
        with_kd = train(mined, tmp_path / "with", minilm_dir, "--knowledge_distillation", "True")
        dev = [{"query": r["query"], "passages": [r["pos"][0], *r["neg"][: GROUP - 1]]}
               for r in lexical_groups(cranfield_dir, "dev", negatives=GROUP - 1)[:8]]
        held_out = [without.data_collator(dev[i : i + BATCH]) for i in range(0, len(dev), BATCH)]
        a, b = held_out_loss(without, held_out), held_out_loss(with_kd, held_out)
    finally:
        torch.set_num_threads(threads)
    print(f"held-out dense InfoNCE: without teacher scores {a['loss_dense']:.4f}, with {b['loss_dense']:.4f}")
    assert b["loss_dense"] <= a["loss_dense"] * 1.02, (a, b)
