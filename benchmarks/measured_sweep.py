"""Methods whose compression is decided by learned scores (KVzap thresholds, DMS
checkpoints) vs fixed-ratio methods at the compression they really reached.

    python -m benchmarks.measured_sweep --method kvzap --model qwen2.5-coder-0.5b --kind mlp --thresholds -6,-5,-4 --out DIR
    python -m benchmarks.measured_sweep --method dms --model qwen2.5-coder-0.5b --ratios 2,4,8 \
        --compare knorm,headkv,kvzap-linear --out DIR

Their compression depends on the text: each setting's run logs, per finished request,
the fraction of (layer, KV head) rows it kept (the worker's own count, window included;
``kept_fractions``, from the workers' records). Its mean removed fraction R, rounded to 0.01, then sets
``compression_ratio`` = R for the compared methods (``knorm-rR``, ``headkv-rR``,
``kvzap-linear-rR`` = KVzap top-k), which run in the same sweep: equal measured memory.
Cells: the harness's retrieval tasks (NIAH, passkey, RULER multi-key) and continuation
perplexity, bf16 full cache as the baseline. Writes results.json (results.partial.json
while running), results.md and sweep.png (kvzap_sweep.png for KVzap).
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
from benchmarks.headkv_budgets import mean_accuracy
from vllm_kvcompress.offline.models import MODELS, ensure_model

LABELS = {"kvzap": "KVzap (threshold)", "dms": "DMS (learned)", "knorm": "L2 norm", "snapkv": "SnapKV",
          "headkv": "HeadKV (R2 scores)", "kvzap-linear": "KVzap-Linear (top-k)", "kvzap-mlp": "KVzap-MLP (top-k)"}
COMPARABLE = ("knorm", "snapkv", "headkv", "kvzap-linear", "kvzap-mlp")


def primary(report: dict) -> tuple[str, dict[str, str]]:
    """(the learned method, {setting: config name}); reports before DMS name KVzap's only."""
    return report.get("primary", "kvzap"), report.get("primary_configs") or report["kvzap_configs"]


def removed_fraction(result: dict) -> float | None:
    kept = result.get("kept_fractions")
    return 1 - statistics.fmean(kept) if kept else None


def perplexity(result: dict) -> float | None:
    values = [c["perplexity"] for c in result.get("cells", {}).values() if "perplexity" in c]
    return statistics.fmean(values) if values else None


def rows(report: dict) -> list[dict]:
    """One row per threshold: KVzap and the methods run at its measured removed fraction."""
    results, kept = report["accuracy"]["results"], report["accuracy"]["kept_cells"]
    retrieval = [c for c in kept if not c.startswith("perplexity")]
    out = []
    method, settings = primary(report)
    for tau, name in settings.items():
        r = results.get(name, {})
        removed = removed_fraction(r)
        row = {"threshold": tau, "removed": removed, "methods": {}}
        names = {method: name, **{m: report["matched"].get(name, {}).get(m) for m in report["compare"]}}
        for label, config in names.items():
            res = results.get(config) if config else None
            if res is None or "error" in res:
                row["methods"][label] = {"config": config, "error": (res or {}).get("error", "not run")}
                continue
            row["methods"][label] = {"config": config, "accuracy": mean_accuracy(res, retrieval),
                                      "perplexity": perplexity(res)}
        out.append(row)
    return out


def markdown(report: dict) -> str:
    acc_report = report["accuracy"]
    results, kept = acc_report["results"], acc_report["kept_cells"]
    retrieval = [c for c in kept if not c.startswith("perplexity")]
    base = results[BASELINE]
    method, _ = primary(report)
    what = f"predictor: KVzap-{report['kind']} (shipped)" if method == "kvzap" else "DMS adapters (shipped)"
    lines = [f"# {LABELS[method]} at measured compression vs {', '.join(LABELS[m] for m in report['compare'])} "
             f"({report['date']})", "",
             f"- command: `{report['command']}`",
             f"- model: {report['model']}; {what}; hardware: {report['hardware']}; vLLM {report['vllm']}",
             f"- retrieval cells (baseline >= {acc_report['min_baseline']}): {', '.join(retrieval)}; perplexity: "
             f"{', '.join(c for c in kept if c.startswith('perplexity')) or 'none'}",
             f"- bf16 full cache: retrieval {mean_accuracy(base, retrieval):.2f}, perplexity "
             f"{perplexity(base) or float('nan'):.3f}", "",
             f"Removed = {LABELS[method]}'s measured mean fraction of (layer, KV head) rows evicted per request "
             "(window included); the others run with compression_ratio = that fraction.", "",
             f"| {'threshold' if method == 'kvzap' else 'trained CR'} | removed | compression | "
             + " | ".join(f"{LABELS[m]} acc / ppl" for m in [method, *report["compare"]]) + " |",
             "|---|---|---|" + "---|" * (1 + len(report["compare"]))]
    for row in rows(report):
        removed = row["removed"]
        cells = []
        for name in [method, *report["compare"]]:
            m = row["methods"][name]
            cells.append(f"error: {m['error']}" if "error" in m else
                         f"{m['accuracy']:.2f} / {m['perplexity'] or float('nan'):.3f}")
        ratio = "–" if removed is None else f"{1 / max(1 - removed, 1e-9):.2f}x"
        lines.append(f"| {row['threshold']} | {'–' if removed is None else f'{removed:.3f}'} | {ratio} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Per cell:", "", "| config | " + " | ".join(kept) + " |", "|---|" + "---|" * len(kept)]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} |")
            continue
        lines.append(f"| {name} | " + " | ".join(
            (f"{r['cells'][c]['perplexity']:.3f}" if "perplexity" in r["cells"][c] else f"{r['cells'][c]['score']:.2f}")
            if c in r["cells"] else "–" for c in kept) + " |")
    lines += ["", f"![sweep]({report.get('figure', 'kvzap_sweep.png')})", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results, kept = report["accuracy"]["results"], report["accuracy"]["kept_cells"]
    retrieval = [c for c in kept if not c.startswith("perplexity")]
    table = rows(report)
    first, _ = primary(report)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in [first, *report["compare"]]:
        points = [(r["removed"], r["methods"][method]) for r in table if r["removed"] is not None
                  and "error" not in r["methods"][method]]
        points.sort(key=lambda p: p[0])
        if points:
            axes[0].plot([p[0] for p in points], [p[1]["accuracy"] for p in points], marker="o", label=LABELS[method])
            ppl = [(p[0], p[1]["perplexity"]) for p in points if p[1]["perplexity"] is not None]
            if ppl:
                axes[1].plot(*zip(*ppl), marker="o", label=LABELS[method])
    axes[0].axhline(mean_accuracy(results[BASELINE], retrieval), color="gray", linestyle="--", label="bf16")
    if perplexity(results[BASELINE]) is not None:
        axes[1].axhline(perplexity(results[BASELINE]), color="gray", linestyle="--", label="bf16")
    axes[0].set(xlabel=f"removed fraction ({LABELS[first]}, measured)", ylabel="mean retrieval accuracy",
                ylim=(-0.05, 1.05))
    axes[1].set(xlabel=f"removed fraction ({LABELS[first]}, measured)", ylabel="continuation perplexity")
    for ax in axes:
        ax.legend()
    fig.suptitle(f"{report['model']}: {LABELS[first]} vs\n"
                 f"{' / '.join(LABELS[m] for m in report['compare'])} at equal measured compression", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="qwen2.5-coder-0.5b")
    parser.add_argument("--method", choices=("kvzap", "dms"), default="kvzap")
    parser.add_argument("--kind", choices=("linear", "mlp"), default="mlp", help="kvzap: predictor kind")
    parser.add_argument("--thresholds", default="-6,-5,-4", help="kvzap: thresholds")
    parser.add_argument("--ratios", default="2,4,8", help="dms: the shipped checkpoints' trained compression")
    parser.add_argument("--compare", default="knorm,headkv")
    parser.add_argument("--suite", choices=sorted(acc.SUITES), default="kvzap")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    compare = [m for m in args.compare.split(",") if m]
    for m in compare:
        if m not in COMPARABLE:
            parser.error(f"--compare: unknown method {m!r}; allowed: {', '.join(COMPARABLE)}")
    if args.method == "kvzap":
        settings = {t: f"kvzap-{args.kind}-t{t}" for t in args.thresholds.split(",") if t}
    else:
        settings = {r: f"dms-cr{r}" for r in args.ratios.split(",") if r}
    configs = {BASELINE: CONFIGS[BASELINE], **{name: resolve(name, args.model) for name in settings.values()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = str(ensure_model(args.model))
    figure = "kvzap_sweep.png" if args.method == "kvzap" else "sweep.png"
    report = {**environment(), "command": "python -m benchmarks.measured_sweep " + " ".join(argv or sys.argv[1:]),
              "model": args.model, "kind": args.kind, "primary": args.method, "primary_configs": settings,
              "compare": compare, "matched": {}, "figure": figure}
    partial = {}

    def on_result(name, result):
        partial[name] = result
        removed = removed_fraction(result) if name in settings.values() else None
        if removed is not None and round(removed, 2) > 0:  # same compression for the others, in this run
            report["matched"][name] = {m: f"{m}-r{round(removed, 2):.2f}" for m in compare}
            for config in report["matched"][name].values():
                configs.setdefault(config, resolve(config, args.model))
        (out / "results.partial.json").write_text(json.dumps({**report, "results": partial}, indent=1))

    acc.sweep(report, model_dir, args.suite, configs, on_result=on_result)
    report["configs"] = configs
    acc.write_report(out, report, markdown, plot, figure)
    return report


if __name__ == "__main__":
    main()
