"""Evaluation: BEIR loading, trec_eval metrics against pytrec_eval, chunked retrieval against brute force."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import SENTENCES, spread_embedder
from transformers import AutoTokenizer

from flagm3 import M3Model
from flagm3.evaluation import (
    RANKINGS,
    M3RetrievalEvaluator,
    RunningTopK,
    evaluate_retrieval,
    evaluate_run,
    flatten_results,
    format_results_table,
    load_beir,
    retrieve,
    run_eval,
    subsample,
)
from flagm3.inference import M3Embedder
from flagm3.scoring import colbert_scores, dense_scores, sparse_scores

pytrec_eval = pytest.importorskip("pytrec_eval")

# ------------------------------------------------------------------------------------------------ metrics
K_VALUES = (1, 3, 5, 10, 20)


def random_collection(seed: int, num_queries: int = 30, num_docs: int = 60, ties: bool = False):
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(num_docs)]
    qrels, run = {}, {}
    for q in range(num_queries):
        qid = f"q{q}"
        qrels[qid] = {d: rng.choice([0, 1, 1, 2, 3]) for d in rng.sample(docs, rng.randint(1, 8))}
        retrieved = rng.sample(docs, rng.randint(0, 40))
        scores = [round(rng.random(), 1) if ties else rng.random() for _ in retrieved]
        run[qid] = dict(zip(retrieved, scores))
    return qrels, run


def trec_means(qrels, run, measures):
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    assert set(per_query) == set(qrels)  # every judged query is in the run (possibly empty)
    names = next(iter(per_query.values())).keys()
    return {name: sum(v[name] for v in per_query.values()) / len(per_query) for name in names}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_pytrec_eval(seed):
    qrels, run = random_collection(seed)
    ours = evaluate_run(run, qrels, K_VALUES)
    cut = ",".join(map(str, K_VALUES))
    ref = trec_means(qrels, run, {f"ndcg_cut.{cut}", f"recall.{cut}", f"map_cut.{cut}"})
    for k in K_VALUES:
        assert ours[f"ndcg@{k}"] == pytest.approx(ref[f"ndcg_cut_{k}"], abs=1e-6)
        assert ours[f"recall@{k}"] == pytest.approx(ref[f"recall_{k}"], abs=1e-6)
        assert ours[f"map@{k}"] == pytest.approx(ref[f"map_cut_{k}"], abs=1e-6)
        # MRR@k is trec_eval's recip_rank of the run cut to its top k (no ties here)
        top_k = {q: dict(sorted(r.items(), key=lambda x: -x[1])[:k]) for q, r in run.items()}
        recip_rank = trec_means(qrels, top_k, {"recip_rank"})["recip_rank"]
        assert ours[f"mrr@{k}"] == pytest.approx(recip_rank, abs=1e-6)


def test_metrics_follow_trec_eval_tie_order():
    qrels, run = random_collection(5, ties=True)
    ours = evaluate_run(run, qrels, (1, 3, 10, 100))
    ref = trec_means(qrels, run, {"ndcg_cut.1,3,10,100", "map_cut.1,3,10,100", "recip_rank"})
    for k in (1, 3, 10, 100):
        assert ours[f"ndcg@{k}"] == pytest.approx(ref[f"ndcg_cut_{k}"], abs=1e-6)
        assert ours[f"map@{k}"] == pytest.approx(ref[f"map_cut_{k}"], abs=1e-6)
    assert ours["mrr@100"] == pytest.approx(ref["recip_rank"], abs=1e-6)


def test_metrics_average_over_judged_queries_missing_runs_score_zero():
    qrels = {"a": {"x": 2, "y": 1}, "b": {"z": 1}}
    run = {"a": {"y": 0.9, "x": 0.5, "w": 0.1}, "extra": {"x": 1.0}}
    ours = evaluate_run(run, qrels, (2,))
    dcg, idcg = 1 + 2 / 1.5849625007211562, 2 + 1 / 1.5849625007211562
    assert ours["ndcg@2"] == pytest.approx(dcg / idcg / 2)
    assert ours["recall@2"] == pytest.approx(0.5) and ours["mrr@2"] == pytest.approx(0.5)
    assert ours["map@2"] == pytest.approx((1 + 1) / 2 / 2)


# ------------------------------------------------------------------------------------------------ loading
def write_beir(root, corpus, queries, qrels_rows, split="test", header=True):
    root.mkdir(parents=True, exist_ok=True)
    (root / "qrels").mkdir(exist_ok=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    lines = (["query-id\tcorpus-id\tscore"] if header else []) + ["\t".join(map(str, r)) for r in qrels_rows]
    (root / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def test_load_beir_title_text_and_judged_queries(tmp_path):
    corpus = [{"_id": "1", "title": "Wing", "text": "lift at high angles "}, {"_id": 2, "text": "drag"},
              {"_id": "3", "title": "Shells", "text": ""}]
    queries = [{"_id": "q1", "text": "lift"}, {"_id": "q2", "text": "unjudged"},
               {"_id": "q3", "text": "drag"}]
    root = write_beir(tmp_path / "c", corpus, queries, [("q1", "1", 2), ("q3", "2", 1), ("q3", "3", 0)])
    c, q, r = load_beir(root, "test")
    assert c == {"1": "Wing lift at high angles", "2": "drag", "3": "Shells"}
    assert q == {"q1": "lift", "q3": "drag"}
    assert r == {"q1": {"1": 2}, "q3": {"2": 1, "3": 0}}
    root2 = write_beir(tmp_path / "noheader", corpus, queries, [("q1", "1", 2)], split="dev", header=False)
    assert load_beir(root2, "dev")[2] == {"q1": {"1": 2}}


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda root: (root / "corpus.jsonl").write_text('{"_id": "1", "text": "a"}\n{"_id": "2", "text":\n'),
         r"corpus\.jsonl:2: malformed JSON"),
        (lambda root: (root / "queries.jsonl").write_text('{"_id": "q1", "text": "a"}\n\n{"text": "b"}\n'),
         r"queries\.jsonl:3: missing field '_id'"),
        (lambda root: (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\t1\n"),
         r"test\.tsv:2: expected 3 tab-separated columns"),
        (lambda root: (root / "qrels" / "test.tsv").write_text("q1\t1\t1\nq1\t2\thigh\n"),
         r"test\.tsv:2: relevance score 'high'"),
        (lambda root: (root / "qrels" / "test.tsv").write_text("q1\t1\t1\nq9\t2\t1\n"),
         r"1 judged queries are not in .*queries\.jsonl"),
        (lambda root: (root / "qrels" / "test.tsv").unlink(), r"test\.tsv is missing"),
    ],
)
def test_load_beir_errors_name_file_and_line(tmp_path, corrupt, message):
    root = write_beir(tmp_path / "c", [{"_id": "1", "text": "a"}], [{"_id": "q1", "text": "a"}],
                      [("q1", "1", 1)])
    corrupt(root)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_beir(root, "test")


# --------------------------------------------------------------------------------------------- retrieval
@pytest.mark.parametrize("seed", range(4))
def test_running_top_k_equals_stable_sort_over_chunks(seed):
    """Many ties (integer scores): the merged top-k is the stable sort of the whole row, however chunked."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = 6, 80
    scores = torch.randint(0, 6, (rows, cols), generator=g).float()
    for k, chunk in ((1, 7), (10, 13), (30, 80), (100, 1)):
        expected = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
        shared = RunningTopK(rows, k, extras=("neg",))  # contiguous chunks, columns shuffled within each
        per_row = RunningTopK(rows, k)  # any columns per row
        perm = torch.randperm(cols, generator=g)
        for start in range(0, cols, chunk):
            idx = torch.arange(start, min(cols, start + chunk))
            idx = idx[torch.randperm(idx.numel(), generator=g)]
            shared.update(scores[:, idx], idx, extras={"neg": -scores[:, idx]})
            mixed = perm[start : start + chunk].expand(rows, -1)
            per_row.update(scores.gather(1, mixed), mixed)
        for keeper in (shared, per_row):
            assert torch.equal(keeper.indices, expected)
            assert torch.equal(keeper.scores, scores.gather(1, expected))
        assert torch.equal(shared.extras["neg"], -shared.scores)


DOCS = SENTENCES + [" ".join(reversed(s.split()[:6])) for s in SENTENCES] + [
    "wing flutter at supersonic speed", "heat and pressure on thin shells", "turbulence in a slipstream"
]
QUERIES = ["similarity laws for models", "wing in a slipstream", "supersonic boundary layer", "heat transfer",
           "buckling of shells", "flutter of wings", "drag of a cone", "shock waves"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(scope="module")
def embedder(tiny_encoder_dir, tiny_tokenizer):
    return spread_embedder(tiny_encoder_dir, tiny_tokenizer, 1, batch_size=3)


@pytest.fixture(scope="module")
def collection():
    rng = random.Random(0)
    corpus = {f"doc{i}": text for i, text in enumerate(DOCS)}
    queries = {f"q{i}": text for i, text in enumerate(QUERIES)}
    qrels = {qid: {d: rng.choice([1, 2, 3]) for d in rng.sample(list(corpus), 3)} for qid in queries}
    return corpus, queries, qrels


def encode_all(embedder, texts, max_length=64):
    """Every output of ``texts`` in one padded batch, rows in input order."""
    [(indices, out)] = embedder.iter_outputs(texts, max_length, batch_size=len(texts), show_progress=False)
    order = torch.argsort(torch.tensor(indices))
    return {key: value[order] for key, value in out.items()}


def brute_force_scores(embedder, queries, corpus, weights=(1.0, 0.3, 1.0)):
    q, p = encode_all(embedder, list(queries.values())), encode_all(embedder, list(corpus.values()))
    s = {
        "dense": dense_scores(q["dense"], p["dense"]),
        "sparse": sparse_scores(q["sparse_ids"], q["sparse_weights"], p["sparse_ids"], p["sparse_weights"]),
        "colbert": colbert_scores(q["colbert"], q["colbert_mask"], p["colbert"], p["colbert_mask"]),
    }
    s["dense+sparse"] = weights[0] * s["dense"] + weights[1] * s["sparse"]
    s["all"] = s["dense+sparse"] + weights[2] * s["colbert"]
    return s


def assert_run_matches(run, scores, qids, doc_ids, k):
    """``run`` holds, per query, the top ``k`` of ``scores`` [Q, N] in trec_eval's order (ties: larger id first)."""
    by_id = sorted(range(len(doc_ids)), key=lambda i: doc_ids[i], reverse=True)
    order = torch.tensor(by_id)[torch.argsort(scores[:, by_id], dim=1, descending=True, stable=True)[:, :k]]
    for row, qid in enumerate(qids):
        assert list(run[qid]) == [doc_ids[i] for i in order[row].tolist()], qid
        expected = scores[row, order[row]]
        assert torch.allclose(torch.tensor(list(run[qid].values())), expected, atol=1e-5), qid


@pytest.mark.parametrize("chunk, k", [(8192, 100), (4, 5)])
def test_retrieve_equals_brute_force(embedder, collection, chunk, k):
    corpus, queries, _ = collection
    runs = retrieve(embedder, corpus, queries, top_k=k, max_query_length=64, max_passage_length=64,
                    corpus_chunk_size=chunk, show_progress=False)
    assert list(runs) == list(RANKINGS)
    brute = brute_force_scores(embedder, queries, corpus)
    for name in RANKINGS:
        assert_run_matches(runs[name], brute[name], list(queries), list(corpus), k)


@pytest.mark.parametrize("chunk", [8192, 4])
def test_truncated_runs_score_as_trec_eval_scores_the_full_ranking(embedder, collection, chunk):
    """Many documents tie (sparse scores of 0): the top-k cut keeps the documents trec_eval ranks first."""
    corpus, queries, qrels = collection
    k = 4
    runs = retrieve(embedder, corpus, queries, top_k=k, max_query_length=64, max_passage_length=64,
                    corpus_chunk_size=chunk, show_progress=False)
    brute = brute_force_scores(embedder, queries, corpus)
    zero_ties = (brute["sparse"] == 0).sum(1)
    assert (zero_ties > k).any()  # the cut goes through tied scores
    for name in ("sparse", "dense"):
        full_run = {qid: {d: float(brute[name][q, i]) for i, d in enumerate(corpus)} for q, qid in enumerate(queries)}
        measures = {f"ndcg_cut_{k}", f"recall_{k}"}
        expected = trec_means(qrels, full_run, measures)
        got = evaluate_run(runs[name], qrels, k_values=(k,), metrics=("ndcg", "recall"))
        assert got[f"ndcg@{k}"] == pytest.approx(expected[f"ndcg_cut_{k}"], abs=1e-9), name
        assert got[f"recall@{k}"] == pytest.approx(expected[f"recall_{k}"], abs=1e-9), name


def test_chunked_and_unchunked_metrics_agree(embedder, collection):
    args = dict(k_values=(1, 5, 10), max_query_length=64, max_passage_length=64, show_progress=False)
    whole = evaluate_retrieval(embedder, *collection, **args)
    chunked = evaluate_retrieval(embedder, *collection, corpus_chunk_size=5, batch_size=2, **args)
    assert set(whole) == set(RANKINGS) and set(whole["all"]) == {
        f"{m}@{k}" for m in ("ndcg", "recall", "mrr", "map") for k in (1, 5, 10)
    }
    for name in RANKINGS:
        assert chunked[name] == pytest.approx(whole[name], abs=1e-9)


def test_rerank_equals_full_when_depth_covers_corpus(embedder, collection):
    corpus, queries, qrels = collection
    args = dict(k_values=(1, 10, 30), max_query_length=64, max_passage_length=64, show_progress=False,
                return_runs=True)
    full, full_runs = evaluate_retrieval(embedder, corpus, queries, qrels, **args)
    rerank, rerank_runs = evaluate_retrieval(embedder, corpus, queries, qrels, colbert_mode="rerank",
                                             rerank_depth=len(corpus), corpus_chunk_size=7, **args)
    for name in RANKINGS:
        assert rerank[name] == pytest.approx(full[name], abs=1e-9)
        for qid in queries:
            assert list(rerank_runs[name][qid]) == list(full_runs[name][qid])


def test_rerank_scores_only_the_source_candidates(embedder, collection):
    corpus, queries, _ = collection
    depth = 6
    runs = retrieve(embedder, corpus, queries, top_k=10, max_query_length=64, max_passage_length=64,
                    colbert_mode="rerank", rerank_depth=depth, show_progress=False)
    brute = brute_force_scores(embedder, queries, corpus)
    doc_ids = list(corpus)
    for row, qid in enumerate(queries):
        candidates = list(runs["dense+sparse"][qid])[:depth]
        idx = torch.tensor([doc_ids.index(d) for d in candidates])
        for name in ("colbert", "all"):
            assert set(runs[name][qid]) == set(candidates)
            expected = [candidates[i] for i in torch.argsort(brute[name][row, idx], descending=True).tolist()]
            assert list(runs[name][qid]) == expected


def test_hybrid_weights_and_head_subsets(embedder, collection):
    corpus, queries, _ = collection
    runs = retrieve(embedder, corpus, queries, heads=("dense", "sparse"), hybrid_weights=(0.5, 2.0, 0.0),
                    top_k=len(corpus), max_query_length=64, max_passage_length=64, show_progress=False)
    assert list(runs) == ["dense", "sparse", "dense+sparse"]
    brute = brute_force_scores(embedder, queries, corpus, weights=(0.5, 2.0, 0.0))
    assert_run_matches(runs["dense+sparse"], brute["dense+sparse"], list(queries), list(corpus), len(corpus))
    with pytest.raises(ValueError, match="needs the heads"):
        retrieve(embedder, corpus, queries, heads=("dense",), hybrids=("all",))
    with pytest.raises(ValueError, match="subset"):
        retrieve(embedder, corpus, queries, heads=("bm25",))


# --------------------------------------------------------------------------------------------- evaluator
def test_evaluator_flat_keys_values_and_train_mode(embedder, collection, tiny_tokenizer):
    corpus, queries, qrels = collection
    evaluator = M3RetrievalEvaluator(corpus=corpus, queries=queries, qrels=qrels, k_values=(1, 10),
                                     max_query_length=64, max_passage_length=64, batch_size=4,
                                     main_metric="all_ndcg@10")
    model = embedder.model
    try:
        model.train()
        flat = evaluator(model, tiny_tokenizer)
        assert model.training and all(m.training for m in model.modules())
        model.eval()
        assert evaluator(model, tiny_tokenizer) == pytest.approx(flat, abs=1e-9)
        assert not model.training
    finally:
        model.eval()
    assert set(flat) == set(evaluator.keys) and evaluator.main_metric in flat
    assert "dense_ndcg@10" in flat and "dense+sparse_recall@1" in flat and "all_map@10" in flat
    direct = evaluate_retrieval(embedder, corpus, queries, qrels, k_values=(1, 10), max_query_length=64,
                                max_passage_length=64, show_progress=False)
    assert flat == pytest.approx(flatten_results(direct), abs=1e-9)
    with pytest.raises(ValueError, match="main_metric"):
        M3RetrievalEvaluator(corpus=corpus, queries=queries, qrels=qrels, heads=("dense",),
                             main_metric="all_ndcg@10")
    dense_only = M3RetrievalEvaluator(corpus=corpus, queries=queries, qrels=qrels, heads=("dense",),
                                      k_values=(5,))
    assert dense_only.main_metric == "dense_ndcg@5" and evaluator.main_metric == "all_ndcg@10"


def test_evaluator_accepts_a_peft_wrapped_model(embedder, collection, tiny_tokenizer, tmp_path):
    import copy

    peft = pytest.importorskip("peft")
    corpus, queries, qrels = collection
    args = dict(k_values=(10,), max_query_length=64, max_passage_length=64)
    root = write_beir(tmp_path / "beir", [{"_id": d, "text": t} for d, t in corpus.items()],
                      [{"_id": q, "text": t} for q, t in queries.items()],
                      [(q, d, g) for q, j in qrels.items() for d, g in j.items()], split="dev")
    evaluator = M3RetrievalEvaluator.from_beir(root, split="dev", **args)
    lora = peft.LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights=True)
    wrapped = peft.get_peft_model(copy.deepcopy(embedder.model), lora)
    wrapped.train()
    flat = evaluator(wrapped, tiny_tokenizer)
    assert wrapped.training
    # fresh LoRA adapters are zero: the scores are the plain model's
    assert flat == pytest.approx(evaluator(embedder.model, tiny_tokenizer), abs=1e-6)


def test_evaluator_follows_the_sentence_evaluator_contract(embedder, collection, tiny_tokenizer):
    """primary_metric and greater_is_better, and every metric named after the evaluator when it has a name."""
    corpus, queries, qrels = collection
    args = dict(corpus=corpus, queries=queries, qrels=qrels, k_values=(10,), max_query_length=64,
                max_passage_length=64)
    plain, named = M3RetrievalEvaluator(**args), M3RetrievalEvaluator(name="toy", **args)
    assert plain.primary_metric == "all_ndcg@10" and named.primary_metric == "toy_all_ndcg@10"
    assert plain.greater_is_better is True and named.greater_is_better is True
    flat, prefixed = plain(embedder.model, tiny_tokenizer), named(embedder.model, tiny_tokenizer)
    assert prefixed == {f"toy_{k}": v for k, v in flat.items()} and named.primary_metric in prefixed


class ScriptedEvaluator:
    """An evaluator with the SentenceEvaluator contract whose primary metric follows a script, one value per
    call; it keeps a copy of the parameters it was called with."""

    primary_metric = "score"

    def __init__(self, scores, greater_is_better=True):
        self.scores, self.greater_is_better, self.seen = list(scores), greater_is_better, []

    def __call__(self, model, tokenizer):
        self.seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return {"score": self.scores[len(self.seen) - 1]}


@pytest.mark.parametrize("greater, best", [(True, 2), (False, 1)])
def test_load_best_model_at_end_loads_the_best_checkpoint_by_the_primary_metric(
        tiny_encoder_dir, tmp_path, monkeypatch, greater, best):
    """Scores 0.2, 0.9, 0.5 at steps 1-3: the model at the end is the one of step 2 (higher is better) or of
    step 1 (lower is better), as the evaluator's greater_is_better says."""
    from conftest import one_step_trainer_args, write_train_file

    from flagm3 import train

    data = write_train_file(tmp_path / "train.jsonl", 6)
    argv = one_step_trainer_args(tiny_encoder_dir, data, tmp_path / "out") + [
        "--max_steps", "3", "--learning_rate", "1e-2", "--eval_strategy", "steps", "--eval_steps", "1",
        "--save_strategy", "steps", "--save_steps", "1", "--load_best_model_at_end", "True"]
    evaluator = ScriptedEvaluator([0.2, 0.9, 0.5], greater_is_better=greater)
    monkeypatch.setattr(train, "build_evaluator", lambda *args: evaluator)
    trainer = train.build_trainer(*train.parse_args(argv))
    assert trainer.eval_dataset is None
    assert trainer.args.metric_for_best_model == "eval_score" and trainer.args.greater_is_better is greater
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "out" / f"checkpoint-{best}")
    loaded = dict(trainer.model.named_parameters())
    at_best = evaluator.seen[best - 1]
    assert max((loaded[n].detach() - at_best[n]).abs().max().item() for n in at_best) == 0
    last = evaluator.seen[-1]
    assert any(not torch.equal(loaded[n].detach(), last[n]) for n in last)  # not simply the last model


def test_training_with_eval_data_selects_by_the_evaluator_without_an_eval_dataset(tiny_encoder_dir, collection,
                                                                                  tmp_path):
    from conftest import build_cli_trainer, write_train_file

    corpus, queries, qrels = collection
    root = write_beir(tmp_path / "beir", [{"_id": d, "text": t} for d, t in corpus.items()],
                      [{"_id": q, "text": t} for q, t in queries.items()],
                      [(q, d, g) for q, j in qrels.items() for d, g in j.items()], split="dev")
    data = write_train_file(tmp_path / "train.jsonl", 4)
    trainer = build_cli_trainer(tiny_encoder_dir, data, tmp_path / "out", "--eval_data", str(root),
                                "--eval_strategy", "steps", "--eval_steps", "1", "--max_steps", "2",
                                "--save_strategy", "steps", "--save_steps", "1", "--load_best_model_at_end", "True")
    assert trainer.eval_dataset is None
    assert trainer.args.metric_for_best_model == "eval_all_ndcg@10" and trainer.args.greater_is_better
    trainer.train()
    evals = [e for e in trainer.state.log_history if "eval_all_ndcg@10" in e]
    assert [e["step"] for e in evals] == [1, 2]
    best = max(evals, key=lambda e: (e["eval_all_ndcg@10"], -e["step"]))
    assert trainer.state.best_metric == best["eval_all_ndcg@10"]
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best['step']}")
    assert trainer.model_card_data.eval_metrics["eval_all_ndcg@10"] == evals[-1]["eval_all_ndcg@10"]


def test_subsample_keeps_judged_documents(collection):
    corpus, queries, qrels = collection
    small = subsample(corpus, queries, qrels, max_corpus_size=12, max_queries=3)
    small_corpus, small_queries, small_qrels = small
    assert len(small_queries) == 3 and set(small_qrels) == set(small_queries)
    judged = {d for j in small_qrels.values() for d in j}
    assert judged <= set(small_corpus) and len(small_corpus) == 12
    assert list(small_corpus) == [d for d in corpus if d in small_corpus]  # corpus order kept
    assert subsample(corpus, queries, qrels, 12, 3) == (small_corpus, small_queries, small_qrels)  # seeded


def test_run_eval_prints_table_and_writes_json(tmp_path, embedder, tiny_tokenizer, collection, capsys):
    corpus, queries, qrels = collection
    model_dir = tmp_path / "model"
    embedder.model.save_pretrained(str(model_dir))
    tiny_tokenizer.save_pretrained(str(model_dir))
    root = write_beir(tmp_path / "beir", [{"_id": d, "title": "", "text": t} for d, t in corpus.items()],
                      [{"_id": q, "text": t} for q, t in queries.items()],
                      [(q, d, g) for q, j in qrels.items() for d, g in j.items()])
    out = tmp_path / "res" / "eval.json"
    results = run_eval(model_dir, root, output=out, batch_size=4, max_query_length=64, max_passage_length=64,
                       k_values=(1, 10), show_progress=False)
    written = json.loads(out.read_text())
    sizes = written.pop("index_bytes_per_passage")  # beside the metrics: what an index of the corpus stores
    assert written == results and sizes.keys() == {"dense", "sparse", "colbert"}
    expected = evaluate_retrieval(embedder, corpus, queries, qrels, k_values=(1, 10), max_query_length=64,
                                  max_passage_length=64, show_progress=False)
    for name in RANKINGS:
        assert results[name] == pytest.approx(expected[name], abs=1e-9)
    printed = capsys.readouterr().out
    assert printed.splitlines()[-len(RANKINGS):][0].startswith("dense ")
    assert format_results_table(results) in printed
    header = format_results_table(results).splitlines()[0].split()
    assert header == ["ranking", "ndcg@1", "ndcg@10", "recall@1", "recall@10", "mrr@1", "mrr@10", "map@1",
                      "map@10"]


# --------------------------------------------------------------------------------------------- real data
@pytest.mark.slow
def test_cranfield_subset_dense_minilm(cranfield_dir, minilm_dir):
    """200 documents, 20 test queries, an untouched MiniLM: our metrics equal pytrec_eval's on the real run,
    and dense retrieval is far better than a random ranking."""
    corpus, queries, qrels = subsample(*load_beir(cranfield_dir, "test"), max_corpus_size=200, max_queries=20)
    model = M3Model.from_encoder(str(minilm_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir))
    emb = M3Embedder(model, tokenizer=tokenizer, use_fp16=False, batch_size=32)
    results, runs = evaluate_retrieval(emb, corpus, queries, qrels, heads=("dense",), k_values=(10, 100),
                                       max_query_length=32, max_passage_length=64, show_progress=False,
                                       return_runs=True)
    ref = trec_means(qrels, runs["dense"], {"ndcg_cut.10,100", "recall.100", "map_cut.100"})
    assert results["dense"]["ndcg@10"] == pytest.approx(ref["ndcg_cut_10"], abs=1e-6)
    assert results["dense"]["recall@100"] == pytest.approx(ref["recall_100"], abs=1e-6)
    assert results["dense"]["map@100"] == pytest.approx(ref["map_cut_100"], abs=1e-6)
    rng = random.Random(0)
    shuffled = {q: {d: rng.random() for d in corpus} for q in queries}
    assert results["dense"]["ndcg@10"] > 0.3 > 2 * evaluate_run(shuffled, qrels, (10,))["ndcg@10"]
