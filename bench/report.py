"""Render the benchmark results: the table of ratios with ✓/✗ per target, a Markdown report and a plot.

    python bench/report.py [--results bench/results] [--default-name flagm3_default]

Reads from --results (whatever exists): train_reference.json, train_flagm3_bge-m3.json,
train_flagm3_default.json (bench/reference_train.py, bench/flagm3_train.py), memory_250k.json,
inference_speed.json, quality.json, quality_seeds.json (bench/quality_seeds.py), eval_agreement.json. Writes summary.json (every target: measured value,
threshold, met), report.md and report.png there, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT  # noqa: E402

HEADS = ("dense", "sparse", "colbert")
RANKINGS = HEADS + ("dense+sparse", "all")
TRAIN_RUNS = {"flagm3_default": "train_flagm3_default.json", "flagm3_bge-m3": "train_flagm3_bge-m3.json",
              # the default recipe with --gradient_checkpointing (bench/run.sh --stages train_lowmem)
              "flagm3_default+gradient_checkpointing": "train_flagm3_lowmem.json"}


def load(results: Path, name: str) -> Optional[dict]:
    path = results / name
    return json.loads(path.read_text()) if path.is_file() else None


def target(name: str, value: Optional[float], threshold: float, higher: bool, unit: str = "x",
           note: str = "") -> dict:
    met = None if value is None else (value >= threshold if higher else value <= threshold)
    return {"target": name, "value": value, "threshold": threshold, "higher_is_better": higher, "unit": unit,
            "met": met, "note": note}


def training_targets(results: Path) -> tuple[list[dict], list[list[str]]]:
    ref = load(results, "train_reference.json")
    rows, targets = [], []
    if ref is None:
        return targets, rows
    rows.append(["reference (FlagEmbedding)", ref])
    for name, file in TRAIN_RUNS.items():
        run = load(results, file)
        if run is None:
            continue
        rows.append([name, run])
        qps = run["queries_per_second"] / ref["queries_per_second"]
        cpu = ref["cpu_seconds_per_step"] / run["cpu_seconds_per_step"]
        mem = run["peak_rss_mb"] / ref["peak_rss_mb"]
        targets.append(target(f"W1 training throughput, {name} / reference", qps, 1.5, True,
                              note=f"wall time; {run['seconds_per_step']:.2f} vs {ref['seconds_per_step']:.2f} s/step"))
        targets.append(target(f"W1 training throughput (CPU time), {name} / reference", cpu, 1.5, True,
                              note=f"{run['cpu_seconds_per_step']:.2f} vs {ref['cpu_seconds_per_step']:.2f} "
                                   "CPU s/step (less sensitive to machine load)"))
        targets.append(target(f"W1 peak RSS, {name} / reference", mem, 0.5, False))
    table = [["run", "s/step", "queries/s", "CPU s/step", "peak RSS MB", "padding q/p", "encoder fwd+bwd s",
              "heads+loss s"]]
    for name, r in rows:
        b = r["step_breakdown"]
        table.append([name, f"{r['seconds_per_step']:.2f}", f"{r['queries_per_second']:.3f}",
                      f"{r['cpu_seconds_per_step']:.2f}", f"{r['peak_rss_mb']:.0f}",
                      f"{r['padding_fraction']['queries']:.2f}/{r['padding_fraction']['passages']:.2f}"
                      + (f" (encoded {r['encoded_padding_fraction']['queries']:.2f}/"
                         f"{r['encoded_padding_fraction']['passages']:.2f})" if "encoded_padding_fraction" in r else ""),
                      f"{b['encoder_forward_backward_s']:.2f}", f"{b['heads_and_loss_s']:.2f}"])
    return targets, table


def memory_targets(results: Path) -> tuple[list[dict], list[list[str]]]:
    mem = load(results, "memory_250k.json")
    if mem is None or "flagm3" not in mem or "reference" not in mem:
        return [], []
    f, r = mem["flagm3"], mem["reference"]
    cap = f"cap {mem['cap_gib_min']:.1f} GiB" + (" (lowered: machine memory)" if mem["cap_reduced"] else "")
    capped = " (search capped: at least)" if f.get("search_capped") else ""
    ref_capped = " (search capped: at least)" if r.get("search_capped") else ""
    ratio = mem.get("max_batch_ratio")
    targets = [
        target(f"W2 250k vocab: max batch ratio ({cap})", ratio, 4.0, True,
               note=f"flagm3 {f['max_batch']}{capped} vs reference {r['max_batch']}{ref_capped}; projected to "
                    f"{mem['budget_gib']:.0f} GiB: {f.get('projected_max_batch_in_budget')} vs "
                    f"{r.get('projected_max_batch_in_budget')}"),
        target(f"W2 250k vocab: peak RSS at batch {mem['compare_batch']}, flagm3 / reference",
               mem.get("peak_rss_ratio_at_compare_batch"), 0.5, False, note="no set target; shown for context"),
    ]
    targets[-1]["met"] = None  # informational
    batches = sorted({int(b) for s in (f, r) for b in s["peak_rss_mb_by_batch"]})
    table = [["batch (queries)"] + [str(b) for b in batches]]
    for name, s in (("flagm3 peak RSS MB", f), ("reference peak RSS MB", r)):
        by = {int(b): v for b, v in s["peak_rss_mb_by_batch"].items()}
        table.append([name] + [f"{by[b]:.0f}" if b in by else "-" for b in batches])
    return targets, table


def inference_targets(results: Path) -> list[dict]:
    inf = load(results, "inference_speed.json")
    if inf is None:
        return []
    agree = inf["agreement"]
    return [
        target("W3 encode throughput, flagm3 / reference", inf["encode_throughput_ratio"], 1.0, True,
               note=f"{inf['flagm3']['encode_texts_per_second']:.1f} vs "
                    f"{inf['reference']['encode_texts_per_second']:.1f} texts/s; CPU-time ratio "
                    f"{inf['encode_cpu_ratio']:.2f}x"),
        target("W3 sparse scoring speed-up (all test queries x corpus)", inf["sparse_scoring_speedup"], 50.0, True,
               note=f"{inf['reference']['sparse_scoring_seconds'] * 1e3:.1f} ms vs "
                    f"{inf['flagm3']['sparse_scoring_seconds'] * 1e3:.2f} ms from each library's encode() dicts; from "
                    f"prebuilt lexical matrices {inf['flagm3']['sparse_matrix_product_seconds'] * 1e3:.2f} ms "
                    f"({inf['reference']['sparse_scoring_seconds'] / inf['flagm3']['sparse_matrix_product_seconds']:.0f}x)"),
        target("W3 sparse scores agree (max relative difference, same inputs)",
               agree["sparse_scoring_same_inputs"]["relative"], 1e-5, False, unit="",
               note=f"end to end {agree['sparse_end_to_end']['relative']:.1e}, dense "
                    f"{agree['dense_end_to_end']['max_abs_diff']:.1e}"),
    ]


def quality_targets(results: Path, default: str) -> tuple[list[dict], list[list[str]]]:
    q = load(results, "quality.json")
    if q is None:
        return [], []
    res, bm25 = q["results"], q["bm25"]["ndcg@10"]
    targets = []
    ref = res.get("reference")
    for name in (default, "flagm3_bge-m3"):
        mine = res.get(name)
        if mine is None:
            continue
        if ref is not None:
            for head in HEADS:
                d = mine[head]["ndcg@10"] - ref[head]["ndcg@10"]
                targets.append(target(f"W4 {name} {head} nDCG@10 - reference's", d, 0.0, True, unit="",
                                      note=f"{mine[head]['ndcg@10']:.3f} vs {ref[head]['ndcg@10']:.3f}"))
        targets.append(target(f"W4 {name} sparse nDCG@10 - BM25", mine["sparse"]["ndcg@10"] - bm25, 0.0, True,
                              unit="", note=f"{mine['sparse']['ndcg@10']:.3f} vs BM25 {bm25:.3f}"))
        best = max(mine[h]["ndcg@10"] for h in HEADS)
        for hybrid in ("dense+sparse", "all"):
            targets.append(target(f"W4 {name} {hybrid} nDCG@10 - best single head", mine[hybrid]["ndcg@10"] - best,
                                  0.0, True, unit="", note=f"{mine[hybrid]['ndcg@10']:.3f} vs {best:.3f}"))
    for t in targets:  # "at least as good" (>=) for heads vs reference/BM25; hybrids must be strictly above
        if "best single head" in t["target"] and t["value"] is not None:
            t["met"] = t["value"] > 0
    table = [["model"] + [f"{r} nDCG@10 / R@100" for r in RANKINGS]]
    for name, m in res.items():
        table.append([name] + [f"{m[r]['ndcg@10']:.3f} / {m[r]['recall@100']:.3f}" for r in RANKINGS])
    table.append(["BM25", f"{bm25:.3f} / {q['bm25']['recall@100']:.3f}"] + [""] * (len(RANKINGS) - 1))
    return targets, table


def seeds_targets(results: Path, default: str) -> tuple[list[dict], list[str]]:
    """Targets and Markdown of the seeds stage (quality_seeds.json): per collection, mean ± std of nDCG@10 over
    seeds for every implementation, with the untouched model and BM25."""
    q = load(results, "quality_seeds.json")
    if q is None:
        return [], []
    st = q["settings"]
    lines = [f"## Quality over seeds (nDCG@10, mean ± std over seeds {', '.join(map(str, st['seeds']))})", "",
             f"`bench/run.sh --stages quality_seeds`: every implementation trained {st['steps']} steps, batch 4 x "
             f"group 4, queries {st['query_max_len']} / passages {st['passage_max_len']} tokens, lr 2e-5, one torch "
             f"thread per run, {st['jobs']} runs at a time; evaluated on the {st['split']} split at "
             f"{st['eval_max_length']} tokens by flagm3's evaluator. The {len(q['cells'])} finished runs took "
             f"{q.get('cell_seconds', 0) / 60:.0f} min of training + evaluation in all "
             f"({q.get('cell_seconds', 0) / 60 / max(len(q['cells']), 1):.0f} min each, wall clock)."]
    if q.get("note"):
        lines += ["", q["note"]]
    if q.get("failed"):
        lines += ["", "Not finished: " + "; ".join(" ".join(map(str, f["cell"])) for f in q["failed"]) + "."]
    targets = []
    for coll, data in q["collections"].items():
        summ = data["summary"]
        rows = [["model"] + list(RANKINGS)]
        for impl, s in summ.items():
            n = max((v["ndcg@10"]["n"] for v in s.values()), default=0)
            rows.append([f"{impl} (n={n})"] + [
                (f"{s[r]['ndcg@10']['mean']:.3f} ± {s[r]['ndcg@10']['std']:.3f}" if n > 1
                 else f"{s[r]['ndcg@10']['mean']:.3f}") if r in s else "" for r in RANKINGS])
        if "untouched" in data:
            rows.append(["untouched model"] + [f"{data['untouched'][r]['ndcg@10']:.3f}" for r in RANKINGS])
        if "bm25" in data:
            rows.append(["BM25"] + [f"{data['bm25']['ndcg@10']:.3f}" if r == "sparse" else "" for r in RANKINGS])
        lines += ["", f"### {coll}", "", markdown_table(rows)]
        mine, ref = summ.get(default), summ.get("reference")
        if mine is None:
            continue
        mean = {r: v["ndcg@10"]["mean"] for r, v in mine.items()}
        for head in HEADS:
            if ref is not None and head in ref:
                other = ref[head]["ndcg@10"]["mean"]
                targets.append(target(f"W4 {coll} (seeds) {default} {head} - reference's mean", mean[head] - other,
                                      0.0, True, unit="", note=f"{mean[head]:.3f} vs {other:.3f}"))
            if "untouched" in data:
                other = data["untouched"][head]["ndcg@10"]
                targets.append(target(f"W4 {coll} (seeds) {default} {head} - untouched model", mean[head] - other,
                                      0.0, True, unit="", note=f"{mean[head]:.3f} vs {other:.3f}"))
        if "bm25" in data:
            bm25 = data["bm25"]["ndcg@10"]
            targets.append(target(f"W4 {coll} (seeds) {default} sparse - BM25", mean["sparse"] - bm25, 0.0, True,
                                  unit="", note=f"{mean['sparse']:.3f} vs {bm25:.3f}"))
        best = max(mean[h] for h in HEADS)
        t = target(f"W4 {coll} (seeds) {default} all - best single head", mean["all"] - best, 0.0, True, unit="",
                   note=f"{mean['all']:.3f} vs {best:.3f}")
        t["met"] = t["value"] > 0
        targets.append(t)
    return targets, lines + [""]


def sparse_gap_lines(results: Path) -> list[str]:
    """Markdown of bench/sparse_gap.py's results (sparse_gap_<collection>.json): one column per collection."""
    gaps = [g for g in (load(results, f"sparse_gap_{c}.json") for c in ("cranfield", "cacm")) if g]
    if not gaps:
        return []
    labels = list(dict.fromkeys(label for g in gaps for label in g["rows"]))
    rows = [["scorer (nDCG@10; vs BM25)"] + [f"{g['collection']} {g['split']} ({g['queries']} queries)" for g in gaps]]
    for label in labels:
        cells = []
        for g in gaps:
            m = g["rows"].get(label)
            base = g["rows"]["bm25_words"]["ndcg@10"]
            cells.append("" if m is None else f"{m['ndcg@10']:.3f} ({m['ndcg@10'] - base:+.3f})")
        rows.append([label] + cells)
    return ["## The sparse head's gap to BM25, one cause at a time (bench/sparse_gap.py)", "",
            f"Passages cut at {gaps[0]['max_length']} tokens where the row says so; no training.", "",
            markdown_table(rows), ""]


def plot_seeds(results: Path) -> Optional[Path]:
    """Bars of mean nDCG@10 with the seeds' standard deviation, one panel per collection."""
    q = load(results, "quality_seeds.json")
    if q is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colls = list(q["collections"])
    fig, axes = plt.subplots(1, len(colls), figsize=(7 * len(colls), 4.5), squeeze=False)
    for ax, coll in zip(axes[0], colls):
        data = q["collections"][coll]
        impls = list(data["summary"])
        width = 0.8 / max(len(impls) + ("untouched" in data), 1)
        for i, impl in enumerate(impls):
            s = data["summary"][impl]
            ax.bar([x + i * width for x in range(len(RANKINGS))],
                   [s[r]["ndcg@10"]["mean"] if r in s else 0 for r in RANKINGS], width,
                   yerr=[s[r]["ndcg@10"]["std"] if r in s else 0 for r in RANKINGS], capsize=2, label=impl)
        if "untouched" in data:
            ax.bar([x + len(impls) * width for x in range(len(RANKINGS))],
                   [data["untouched"][r]["ndcg@10"] for r in RANKINGS], width, color="lightgray", label="untouched")
        if "bm25" in data:
            ax.axhline(data["bm25"]["ndcg@10"], color="k", ls="--", label="BM25")
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(RANKINGS))], RANKINGS)
        ax.set_ylabel(f"nDCG@10 ({coll} {q['settings']['split']})")
        ax.set_title(f"{coll}: mean ± std over seeds")
        ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    out = results / "report_seeds.png"
    fig.savefig(out, dpi=110)
    return out


def agreement_targets(results: Path) -> list[dict]:
    a = load(results, "eval_agreement.json")
    if a is None:
        return []
    out = []
    for name, pair in a["pairs"].items():
        worst = max(abs(pair["difference"][h]["ndcg@10"]) for h in ("dense", "sparse"))
        out.append(target(f"W4 evaluator agreement on {name} (max |nDCG@10 diff|, dense & sparse)", worst, 0.005,
                          False, unit=""))
    return out


def fmt(value: Any, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:+.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def plot(results: Path, targets: list[dict], memory: list[list[str]], quality: list[list[str]]) -> Optional[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = [t for t in targets if t["unit"] == "x" and t["value"] is not None and t["met"] is not None]
    q = load(results, "quality.json")
    mem = load(results, "memory_250k.json")
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    ax = axes[0]
    if ratios:
        short = {"training throughput": "train speed", "(CPU time)": "CPU", "250k vocab: max batch ratio": "250k max batch",
                 " (all test queries x corpus)": "", "encode throughput": "encode speed", " / reference": ""}
        names = []
        for t in ratios:
            name = t["target"]
            for long, brief in short.items():
                name = name.replace(long, brief)
            names.append(name[:44])
        values = [t["value"] for t in ratios]
        colors = ["tab:green" if t["met"] else "tab:red" for t in ratios]
        ax.barh(range(len(ratios)), values, color=colors)
        for i, t in enumerate(ratios):
            ax.plot([t["threshold"]] * 2, [i - 0.4, i + 0.4], "k--")
        ax.set_yticks(range(len(ratios)), names, fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("flagm3 / reference (dashed: target)")
        ax.set_title("Ratios vs targets (green: met)")
    ax = axes[1]
    if q:
        models = list(q["results"])
        width = 0.8 / max(len(models), 1)
        for i, name in enumerate(models):
            vals = [q["results"][name][r]["ndcg@10"] for r in RANKINGS]
            ax.bar([x + i * width for x in range(len(RANKINGS))], vals, width, label=name)
        ax.axhline(q["bm25"]["ndcg@10"], color="k", ls="--", label="BM25")
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(RANKINGS))], RANKINGS)
        ax.set_ylabel("nDCG@10 (Cranfield test)")
        ax.set_title("Quality after workload 1")
        ax.set_ylim(0, 1.25 * max(max(v[r]["ndcg@10"] for r in RANKINGS) for v in q["results"].values()))
        ax.legend(fontsize=7, ncol=3, loc="upper center")
    ax = axes[2]
    if mem:
        for name in ("flagm3", "reference"):
            if name in mem:
                by = sorted((int(b), v / 1024) for b, v in mem[name]["peak_rss_mb_by_batch"].items())
                if by:
                    ax.plot(*zip(*by), "o-", label=f"{name} (max {mem[name]['max_batch']})")
        ax.axhline(mem["cap_gib_min"], color="r", ls=":", label=f"cap {mem['cap_gib_min']:.1f} GiB")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("queries per step (group 4)")
        ax.set_ylabel("peak RSS (GiB)")
        ax.set_title("250k vocabulary: training memory")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = results / "report.png"
    fig.savefig(out, dpi=110)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(REPO_ROOT / "bench" / "results"))
    p.add_argument("--default-name", default="flagm3_default")
    args = p.parse_args()
    results = Path(args.results)
    train_t, train_table = training_targets(results)
    mem_t, mem_table = memory_targets(results)
    quality_t, quality_table = quality_targets(results, args.default_name)
    seeds_t, seeds_lines = seeds_targets(results, args.default_name)
    targets = train_t + mem_t + inference_targets(results) + quality_t + seeds_t + agreement_targets(results)
    rows = [["", "target", "measured", "threshold", "note"]]
    for t in targets:
        mark = {True: "✓", False: "✗", None: "·"}[t["met"]]
        op = ">=" if t["higher_is_better"] else "<="
        rows.append([mark, t["target"], fmt(t["value"], t["unit"]), f"{op} {fmt(t['threshold'], t['unit'])}",
                     t["note"]])
    width = max(len(r[1]) for r in rows)
    for r in rows:
        print(f"{r[0]:1} {r[1]:<{width}}  {r[2]:>9}  {r[3]:>11}  {r[4]}")
    meta = load(results, "run_info.json") or {}
    sections = ["# flagm3 vs FlagEmbedding 1.4.2: benchmark results", "",
                f"Run: `{meta.get('command', 'bench/run.sh')}` on {meta.get('machine', 'this machine')}, "
                f"{meta.get('date', '')}. {meta.get('mode_note', '')}", "",
                "## Targets", "", markdown_table(rows), ""]
    if train_table:
        sections += ["## Workload 1: training (Cranfield, all-MiniLM-L6-v2, batch 4 x 4, CPU)", "",
                     markdown_table(train_table), ""]
    if mem_table:
        sections += ["## Workload 2: 250k vocabulary, peak RSS by batch", "", markdown_table(mem_table), ""]
    if quality_table:
        sections += ["## Workload 4: quality (Cranfield test, flagm3 evaluator)", "", markdown_table(quality_table), ""]
    sections += seeds_lines
    seeds_png = plot_seeds(results)
    if seeds_png:
        sections += [f"![quality over seeds]({seeds_png.name})", ""]
    sections += sparse_gap_lines(results)
    png = plot(results, targets, mem_table, quality_table)
    if png:
        sections += [f"![results]({png.name})", ""]
    (results / "report.md").write_text("\n".join(sections), encoding="utf-8")
    (results / "summary.json").write_text(json.dumps({"targets": targets}, indent=2) + "\n", encoding="utf-8")
    met = sum(1 for t in targets if t["met"])
    judged = sum(1 for t in targets if t["met"] is not None)
    print(f"\n{met}/{judged} targets met; wrote {results / 'report.md'}, {png}, {results / 'summary.json'}")


if __name__ == "__main__":
    main()
