"""KVzap threshold sweep vs L2 norm and HeadKV at the compression KVzap really reached.

    python -m benchmarks.kvzap_accuracy --model qwen2.5-coder-0.5b --kind mlp --thresholds -6,-5,-4 --out DIR

KVzap's compression depends on the text: each threshold's run logs, per finished
request, the fraction of (layer, KV head) rows it kept (the worker's own count,
window included; ``kvzap_kept_fractions``). Its mean removed fraction R, rounded to
0.01, then sets ``compression_ratio`` = R for L2 norm (``knorm-rR``) and HeadKV
(``headkv-rR``), which run in the same sweep. Cells: the harness's retrieval tasks
(NIAH, passkey, RULER multi-key) and continuation perplexity, bf16 full cache as the
baseline. Writes results.json (results.partial.json while running), results.md and
kvzap_sweep.png.
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
from vllm_kvcompress.models import MODELS, ensure_model

LABELS = {"kvzap": "KVzap (threshold)", "knorm": "L2 norm", "headkv": "HeadKV (R2 scores)"}


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
    for tau, name in report["kvzap_configs"].items():
        r = results.get(name, {})
        removed = removed_fraction(r)
        row = {"threshold": tau, "removed": removed, "methods": {}}
        names = {"kvzap": name, **{m: report["matched"].get(name, {}).get(m) for m in report["compare"]}}
        for method, config in names.items():
            res = results.get(config) if config else None
            if res is None or "error" in res:
                row["methods"][method] = {"config": config, "error": (res or {}).get("error", "not run")}
                continue
            row["methods"][method] = {"config": config, "accuracy": mean_accuracy(res, retrieval),
                                      "perplexity": perplexity(res)}
        out.append(row)
    return out


def markdown(report: dict) -> str:
    acc_report = report["accuracy"]
    results, kept = acc_report["results"], acc_report["kept_cells"]
    retrieval = [c for c in kept if not c.startswith("perplexity")]
    base = results[BASELINE]
    lines = [f"# KVzap threshold sweep ({report['date']})", "",
             f"- command: `{report['command']}`",
             f"- model: {report['model']}; predictor: KVzap-{report['kind']} (shipped); hardware: {report['hardware']}; "
             f"vLLM {report['vllm']}",
             f"- retrieval cells (baseline >= {acc_report['min_baseline']}): {', '.join(retrieval)}; perplexity: "
             f"{', '.join(c for c in kept if c.startswith('perplexity')) or 'none'}",
             f"- bf16 full cache: retrieval {mean_accuracy(base, retrieval):.2f}, perplexity "
             f"{perplexity(base) or float('nan'):.3f}", "",
             "Removed = KVzap's measured mean fraction of (layer, KV head) rows evicted per request (window "
             "included); L2 and HeadKV run with compression_ratio = that fraction.", "",
             "| threshold | removed | compression | " + " | ".join(f"{LABELS[m]} acc / ppl" for m in
                                                              ["kvzap", *report["compare"]]) + " |",
             "|---|---|---|" + "---|" * (1 + len(report["compare"]))]
    for row in rows(report):
        removed = row["removed"]
        cells = []
        for method in ["kvzap", *report["compare"]]:
            m = row["methods"][method]
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
    lines += ["", "![KVzap sweep](kvzap_sweep.png)", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results, kept = report["accuracy"]["results"], report["accuracy"]["kept_cells"]
    retrieval = [c for c in kept if not c.startswith("perplexity")]
    table = rows(report)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in ["kvzap", *report["compare"]]:
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
    axes[0].set(xlabel="removed fraction (KVzap measured)", ylabel="mean retrieval accuracy", ylim=(-0.05, 1.05))
    axes[1].set(xlabel="removed fraction (KVzap measured)", ylabel="continuation perplexity")
    for ax in axes:
        ax.legend()
    fig.suptitle(f"{report['model']}: KVzap-{report['kind']} thresholds vs L2 / HeadKV at equal compression")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="qwen2.5-coder-0.5b")
    parser.add_argument("--kind", choices=("linear", "mlp"), default="mlp")
    parser.add_argument("--thresholds", default="-6,-5,-4")
    parser.add_argument("--compare", default="knorm,headkv")
    parser.add_argument("--suite", choices=sorted(acc.SUITES), default="kvzap")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    compare = [m for m in args.compare.split(",") if m]
    for m in compare:
        if m not in ("knorm", "snapkv", "headkv"):
            parser.error(f"--compare: unknown method {m!r}; allowed: knorm, snapkv, headkv")
    kvzap = {t: f"kvzap-{args.kind}-t{t}" for t in args.thresholds.split(",") if t}
    configs = {BASELINE: CONFIGS[BASELINE], **{name: resolve(name, args.model) for name in kvzap.values()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = str(ensure_model(args.model))
    report = {**environment(), "command": "python -m benchmarks.kvzap_accuracy " + " ".join(argv or sys.argv[1:]),
              "model": args.model, "kind": args.kind, "kvzap_configs": kvzap, "compare": compare, "matched": {}}
    partial = {}

    def on_result(name, result):
        partial[name] = result
        removed = removed_fraction(result) if name in kvzap.values() else None
        if removed is not None and round(removed, 2) > 0:  # same compression for the others, in this run
            report["matched"][name] = {m: f"{m}-r{round(removed, 2):.2f}" for m in compare}
            for config in report["matched"][name].values():
                configs.setdefault(config, resolve(config, args.model))
        (out / "results.partial.json").write_text(json.dumps({**report, "results": partial}, indent=1))

    acc.sweep(report, model_dir, args.suite, configs, on_result=on_result)
    report["configs"] = configs
    acc.write_report(out, report, markdown, plot, "kvzap_sweep.png")
    return report


if __name__ == "__main__":
    main()
