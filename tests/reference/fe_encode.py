"""Encode and score texts with FlagEmbedding 1.4.2's BGEM3FlagModel (the reference), for parity tests.

Run with the reference venv's python (`.ci/setup_reference_env.sh` prints it):

    $FE_PY tests/reference/fe_encode.py MODEL_DIR IN_JSON OUT.json|OUT.npz

MODEL_DIR: BGE-M3 layout (encoder + tokenizer with an eos_token + colbert_linear.pt + sparse_linear.pt);
see fe_common.py for what is relied on.

IN_JSON (fields other than `queries`/`passages` optional):
    {"queries": [str], "passages": [str],
     "query_max_length": 512, "passage_max_length": 512, "batch_size": 256,
     "normalize_embeddings": true, "pooling_method": "cls",
     "weights_for_different_modes": [0.4, 0.2, 0.4],
     "pairs": [[query_index, passage_index], ...]}       # for compute_score; default: every (q, p)

Output (JSON; with .npz the same content flattened, see `write_npz`):
    queries / passages: {"input_ids": [[int]] (as FlagEmbedding tokenises: truncation at max_length,
        no padding), "dense_vecs": [n, d], "lexical_weights": [{token_id(str): weight}],
        "colbert_vecs": [[len_i - 1, dim]] (token vectors after CLS, SEP included)}
    scores: {"dense": [nq, np] = q_dense @ p_dense.T,
             "lexical_matching": [nq, np] from compute_lexical_matching_score(list, list),
             "colbert": [nq, np] from colbert_score(q_colbert, p_colbert)}
    compute_score: {"pairs", "weights", "dense", "sparse", "colbert", "sparse+dense",
                    "colbert+sparse+dense"} from compute_score(sentence_pairs, weights_for_different_modes=w)
    dropped_special_ids: ids FlagEmbedding removes from the lexical weights.

Reference quirks worth knowing when comparing: compute_score pads every pair batch together, and padded
passage positions give zero ColBERT vectors (mask multiplied, then normalised to 0), so a passage's MaxSim
over its tokens can pick 0 from padding when all its real similarities are negative; `encode` removes
padding before colbert_score, so the two paths can differ in that case. compute_score's weighted modes
divide by the sum of the weights used.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import time

import numpy as np
import torch
from fe_common import check_eos, check_model_dir, dropped_special_ids, fail, read_json, write_json

DEFAULT_WEIGHTS = [0.4, 0.2, 0.4]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("in_json")
    p.add_argument("out", help="output path ending in .json or .npz")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave the default)")
    return p.parse_args()


def encode_side(model, texts: list[str], max_length: int, batch_size: int) -> dict:
    """Encode `texts` with all three outputs; also record FlagEmbedding's own tokenisation."""
    out = model.encode(
        texts,
        batch_size=batch_size,
        max_length=max_length,
        return_dense=True,
        return_sparse=True,
        return_colbert_vecs=True,
    )
    input_ids = model.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return {
        "input_ids": [list(map(int, ids)) for ids in input_ids],
        "dense_vecs": np.asarray(out["dense_vecs"], dtype=np.float32).reshape(len(texts), -1),
        "lexical_weights": [{str(k): float(v) for k, v in lw.items()} for lw in out["lexical_weights"]],
        "colbert_vecs": [np.asarray(v, dtype=np.float32) for v in out["colbert_vecs"]],
    }


def score_matrices(model, q: dict, p: dict) -> dict:
    """Full query x passage score matrices through FlagEmbedding's own scoring helpers."""
    lex = model.compute_lexical_matching_score(q["lexical_weights"], p["lexical_weights"])
    colbert = np.array(
        [[float(model.colbert_score(qv, pv)) for pv in p["colbert_vecs"]] for qv in q["colbert_vecs"]],
        dtype=np.float64,
    )
    return {
        "dense": q["dense_vecs"] @ p["dense_vecs"].T,
        "lexical_matching": np.asarray(lex, dtype=np.float64).reshape(len(q["input_ids"]), -1),
        "colbert": colbert.reshape(len(q["input_ids"]), -1),
    }


def _ragged(prefix: str, arrays: list[np.ndarray], out: dict) -> None:
    out[f"{prefix}"] = np.concatenate(arrays, axis=0) if arrays else np.zeros((0,))
    out[f"{prefix}_lengths"] = np.array([len(a) for a in arrays], dtype=np.int64)


def write_npz(path: str, result: dict) -> None:
    """Flatten `result` into arrays: ragged lists become `<key>` (concatenated) + `<key>_lengths`;
    lexical weights become `<side>_lexical_ids`/`_weights` + `_lengths`; scalars and strings go to `meta`
    (a JSON string)."""
    arrays: dict[str, np.ndarray] = {}
    for side in ("queries", "passages"):
        r = result[side]
        _ragged(f"{side}_input_ids", [np.array(x, dtype=np.int64) for x in r["input_ids"]], arrays)
        arrays[f"{side}_dense_vecs"] = r["dense_vecs"]
        _ragged(f"{side}_colbert_vecs", r["colbert_vecs"], arrays)
        ids = [np.array([int(k) for k in lw], dtype=np.int64) for lw in r["lexical_weights"]]
        ws = [np.array(list(lw.values()), dtype=np.float64) for lw in r["lexical_weights"]]
        _ragged(f"{side}_lexical_ids", ids, arrays)
        arrays[f"{side}_lexical_weights"] = np.concatenate(ws) if ws else np.zeros((0,))
    for k, v in result["scores"].items():
        arrays[f"scores_{k}"] = np.asarray(v)
    for k, v in result["compute_score"].items():
        arrays[f"compute_score_{k}"] = np.asarray(v)
    arrays["dropped_special_ids"] = np.array(result["dropped_special_ids"], dtype=np.int64)
    meta = {k: v for k, v in result.items() if k not in ("queries", "passages", "scores", "compute_score")}
    arrays["meta"] = np.array(json.dumps(meta))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, **arrays)


def main() -> None:
    args = parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if not (args.out.endswith(".json") or args.out.endswith(".npz")):
        fail(f"output path must end in .json or .npz: {args.out}")
    spec = read_json(args.in_json)
    for key in ("queries", "passages"):
        if not isinstance(spec.get(key), list) or not spec[key] or not all(isinstance(t, str) for t in spec[key]):
            fail(f"{args.in_json}: field '{key}' must be a non-empty list of strings")
    check_model_dir(args.model_dir)

    from FlagEmbedding import BGEM3FlagModel

    model = BGEM3FlagModel(
        args.model_dir,
        normalize_embeddings=bool(spec.get("normalize_embeddings", True)),
        use_fp16=False,
        devices="cpu",
        pooling_method=spec.get("pooling_method", "cls"),
    )
    check_eos(model.tokenizer, args.model_dir)
    qlen = int(spec.get("query_max_length", 512))
    plen = int(spec.get("passage_max_length", 512))
    bs = int(spec.get("batch_size", 256))
    queries, passages = spec["queries"], spec["passages"]

    t0 = time.perf_counter()
    q = encode_side(model, queries, qlen, bs)
    p = encode_side(model, passages, plen, bs)
    encode_s = time.perf_counter() - t0

    pairs = spec.get("pairs") or [[i, j] for i in range(len(queries)) for j in range(len(passages))]
    for n, pair in enumerate(pairs):
        if len(pair) != 2 or not (0 <= pair[0] < len(queries)) or not (0 <= pair[1] < len(passages)):
            fail(f"{args.in_json}: pairs[{n}] = {pair} is not a valid [query_index, passage_index]")
    weights = [float(w) for w in spec.get("weights_for_different_modes", DEFAULT_WEIGHTS)]
    cs = model.compute_score(
        [(queries[i], passages[j]) for i, j in pairs],
        batch_size=bs,
        max_query_length=qlen,
        max_passage_length=plen,
        weights_for_different_modes=weights,
    )
    result = {
        "fe_version": importlib.metadata.version("FlagEmbedding"),
        "model_dir": os.path.abspath(args.model_dir),
        "query_max_length": qlen,
        "passage_max_length": plen,
        "eos_token": model.tokenizer.eos_token,
        "dropped_special_ids": dropped_special_ids(model.tokenizer),
        "encode_seconds": encode_s,
        "queries": q,
        "passages": p,
        "scores": score_matrices(model, q, p),
        "compute_score": {"pairs": pairs, "weights": weights, **{k: list(v) for k, v in cs.items()}},
    }
    if args.out.endswith(".npz"):
        write_npz(args.out, result)
    else:
        write_json(args.out, result)
    print(f"wrote {args.out}: {len(queries)} queries, {len(passages)} passages, {len(pairs)} pairs")


if __name__ == "__main__":
    main()
