"""HeadKV vs uniform per-head budgets (SnapKV-style) vs L2 norm at equal total KV.

    python -m benchmarks.headkv_budgets --model qwen2.5-coder-0.5b --budgets 64,128,256,512 --out DIR

Every method keeps the same number of rows in all: ``TOKENS`` per KV head on average
(HeadKV spreads them over (layer, KV head) streams by the model's shipped R2 scores;
SnapKV and knorm give every head ``TOKENS``). Retrieval cells of the harness (NIAH,
passkey, RULER multi-key NIAH), bf16 full cache as the baseline in the same run.
Writes results.json (after every config, so a long run can be inspected or resumed by
hand), results.md and accuracy_vs_budget.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from benchmarks import accuracy as acc
from benchmarks.capacity import environment
from benchmarks.configs import BASELINE, CONFIGS, resolve
from vllm_kvcompress.offline.models import MODELS, ensure_model

METHOD_LABELS = {"headkv": "HeadKV (R2 scores)", "snapkv": "uniform per head (SnapKV-style)", "knorm": "L2 norm"}


def mean_accuracy(result: dict, kept: list[str]) -> float | None:
    scores = [result["cells"][c]["score"] for c in kept if c in result.get("cells", {})]
    return statistics.fmean(scores) if scores else None


def markdown(report: dict) -> str:
    acc_report, methods, budgets = report["accuracy"], report["methods"], report["budgets"]
    kept = acc_report["kept_cells"]
    results = acc_report["results"]
    lines = [f"# HeadKV budget sweep ({report['date']})", "",
             f"- command: `{report['command']}`",
             f"- model: {report['model']}; hardware: {report['hardware']}; vLLM {report['vllm']}",
             f"- cells (baseline >= {acc_report['min_baseline']}): {', '.join(kept)}", "",
             "Mean retrieval accuracy (fraction of cells' answers found), equal total KV per column:", "",
             "| method | " + " | ".join(f"{b} tokens/head" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    base = mean_accuracy(results[BASELINE], kept)
    lines.append("| bf16 full cache | " + " | ".join(f"{base:.2f}" for _ in budgets) + " |")
    for method in methods:
        row = []
        for b in budgets:
            r = results.get(f"{method}-b{b}")
            value = None if r is None or "error" in r else mean_accuracy(r, kept)
            row.append("–" if value is None else f"{value:.2f}")
        lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(row) + " |")
    lines += ["", "Per cell:", "", "| config | " + " | ".join(kept) + " |", "|---|" + "---|" * len(kept)]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} |")
            continue
        lines.append(f"| {name} | " + " | ".join(f"{r['cells'][c]['score']:.2f}" if c in r["cells"] else "–"
                                                 for c in kept) + " |")
    lines += ["", "![accuracy vs budget](accuracy_vs_budget.png)", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc_report = report["accuracy"]
    kept, results = acc_report["kept_cells"], acc_report["results"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in report["methods"]:
        points = [(b, mean_accuracy(results[f"{method}-b{b}"], kept)) for b in report["budgets"]
                  if f"{method}-b{b}" in results and "error" not in results[f"{method}-b{b}"]]
        if points:
            ax.plot(*zip(*points), marker="o", label=METHOD_LABELS[method])
    ax.axhline(mean_accuracy(results[BASELINE], kept), color="gray", linestyle="--", label="bf16 full cache")
    ax.set_xscale("log", base=2)
    ax.set_xticks(report["budgets"], [str(b) for b in report["budgets"]])
    ax.set_xlabel("KV budget (tokens per KV head, average)")
    ax.set_ylabel("mean retrieval accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"{report['model']}: equal total KV, prompts 2K-4K tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="qwen2.5-coder-0.5b")
    parser.add_argument("--budgets", default="64,128,256,512")
    parser.add_argument("--methods", default="headkv,snapkv,knorm")
    parser.add_argument("--suite", choices=sorted(acc.SUITES), default="retrieval")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    budgets = [int(b) for b in args.budgets.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHOD_LABELS:
            parser.error(f"--methods: unknown method {m!r}; allowed: {', '.join(METHOD_LABELS)}")
    configs = {BASELINE: CONFIGS[BASELINE]}
    for b in budgets:  # smallest budgets first: where the methods differ most
        for m in methods:
            configs[f"{m}-b{b}"] = resolve(f"{m}-b{b}", args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = str(ensure_model(args.model))
    report = {**environment(), "command": "python -m benchmarks.headkv_budgets " + " ".join(argv or sys.argv[1:]),
              "model": args.model, "budgets": budgets, "methods": methods, "configs": configs}
    partial = {}

    def save(name, result):
        partial[name] = result
        (out / "results.partial.json").write_text(json.dumps({**report, "results": partial}, indent=1))

    acc.sweep(report, model_dir, args.suite, configs, on_result=save)
    acc.write_report(out, report, markdown, plot, "accuracy_vs_budget.png")
    return report


if __name__ == "__main__":
    main()
