"""One command for capacity, throughput and accuracy of engine configurations, each
against vLLM's own full bf16 cache measured in the same invocation.

    python -m benchmarks.run --model qwen2.5-coder-0.5b --configs bf16,fp8 --out results/DATE/qwen0.5b
    python -m benchmarks.run --config 'kvc={"attention_backend": "kvcompress"}' --suites accuracy
    python -m benchmarks.run --quick --out /tmp/smoke          # CI smoke (SmolLM2-135M)

Named configs: see benchmarks/configs.py; ``--config NAME=JSON`` adds any LLM kwargs.
bf16 is always run first as the baseline. Writes results.json, results.md and PNG plots.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
from pathlib import Path

from benchmarks import accuracy as acc
from benchmarks import capacity as cap
from benchmarks.configs import BASELINE, CONFIGS, NAMES_HELP, evicted_fraction, resolve
from benchmarks.plots import write_plots
from vllm_kvcompress.offline.models import MODELS, ensure_model

SUITE_NAMES = ("accuracy", "capacity")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), help="default: qwen2.5-coder-0.5b (smollm2-135m with --quick)")
    parser.add_argument("--configs", default=None, help=f"comma-separated names: {NAMES_HELP}")
    parser.add_argument("--config", action="append", type=cap.parse_config, default=[], help="NAME=JSON of LLM kwargs (repeatable)")
    parser.add_argument("--suites", default="accuracy,capacity", help=f"comma-separated subset of {SUITE_NAMES}")
    parser.add_argument("--accuracy-suite", choices=sorted(acc.SUITES), help="cells and samples (default: per model)")
    parser.add_argument("--min-baseline", type=float, default=None, help="keep cells where the baseline scores at least this (default 0.8; 0 with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny model, pool and suite: a CI smoke test")
    parser.add_argument("--out", default=f"results/{datetime.date.today().isoformat()}")
    args = parser.parse_args(argv)
    args.model = args.model or ("smollm2-135m" if args.quick else "qwen2.5-coder-0.5b")
    suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    for s in suites:
        if s not in SUITE_NAMES:
            parser.error(f"--suites: unknown suite {s!r}; allowed: {', '.join(SUITE_NAMES)}")
    args.suites = suites
    configs = {}
    names = [n.strip() for n in args.configs.split(",") if n.strip()] if args.configs else []
    for name in names:
        kwargs = resolve(name, args.model)
        if kwargs is None:
            parser.error(f"--configs: unknown config {name!r}; allowed: {NAMES_HELP} (or --config NAME=JSON)")
        configs[name] = kwargs
    configs.update(dict(args.config))
    if not configs:
        configs = dict(CONFIGS)
    args.configs = {BASELINE: CONFIGS[BASELINE], **configs}
    args.accuracy_suite = args.accuracy_suite or ("quick" if args.quick else acc.DEFAULT_SUITE[args.model])
    if args.min_baseline is None:
        args.min_baseline = 0.0 if args.quick else 0.8
    return args


def summarise(configs: dict, accuracy: dict | None, capacity: dict | None) -> dict:
    summary = {}
    base_acc = accuracy["results"][BASELINE] if accuracy else None
    for name, kwargs in configs.items():
        s = {"evicted_fraction": evicted_fraction(kwargs)}
        keep = 1.0 - s["evicted_fraction"]
        if accuracy and name in accuracy["results"] and "error" not in accuracy["results"][name]:
            r = accuracy["results"][name]
            kept = [c for c in accuracy["kept_cells"] if not c.startswith("perplexity@")]
            scores = [r["cells"][c]["score"] for c in kept if c in r["cells"]]
            s["mean_accuracy"] = statistics.fmean(scores) if scores else None
            base_scores = [base_acc["cells"][c]["score"] for c in kept]
            s["accuracy_ratio"] = (s["mean_accuracy"] / statistics.fmean(base_scores)) if scores and base_scores and statistics.fmean(base_scores) else None
            s["bytes_per_token"] = r["bytes_per_token"]
            if r.get("kept_pages"):  # ring layouts (KVzap threshold, DMS): the pages the requests really held
                keep = sum(p for p, _ in r["kept_pages"]) / sum(n for _, n in r["kept_pages"])  # (page rounding
                s["evicted_fraction"] = 1.0 - keep  # and the spare row included; weighted by length)
            elif r.get("kept_fractions"):  # older results: rows kept, unweighted
                keep = statistics.fmean(r["kept_fractions"])
                s["evicted_fraction"] = 1.0 - keep
            s["compression"] = 1.0 - (r["bytes_per_token"] / base_acc["bytes_per_token"]) * keep
            s["capacity_ratio"] = r["kv_cache_tokens"] / base_acc["kv_cache_tokens"] / keep
            s["accuracy_wall_s"] = r["wall_s"]
        if capacity and name in capacity["results"] and "error" not in capacity["results"][name]:
            c = capacity["results"][name]
            s.update(capacity_tokens=c["kv_capacity_tokens"], throughput_ratio=c.get("throughput_ratio"),
                     ttft_ratio=c.get("ttft_ratio"))
            s.setdefault("bytes_per_token", c["bytes_per_token"])
            s.setdefault("capacity_ratio", (c.get("capacity_ratio") or 0) / keep)
            s.setdefault("compression", 1.0 - (c["bytes_per_token"] / capacity["results"][BASELINE]["bytes_per_token"]) * keep)
        summary[name] = s
    return summary


def _fmt(value, spec=".2f", empty="–"):
    return empty if value is None else format(value, spec)


def perplexity_change(base: dict, cell: dict | None) -> str:
    """Each document's perplexity against the baseline's on the same document, in %: mean and
    standard error over the documents (one document's change varies by several %, so a 1%
    target needs this spread next to the mean)."""
    if cell is None or "samples" not in cell or "samples" not in base:
        return "–"
    changes = [100 * math.expm1(mine["score"] - theirs["score"])
               for mine, theirs in zip(cell["samples"], base["samples"], strict=True)]
    return f"{statistics.fmean(changes):+.1f} ± {statistics.stdev(changes) / math.sqrt(len(changes)):.1f}"


def accuracy_markdown(accuracy: dict, summary: dict) -> list[str]:
    base = accuracy["results"][accuracy["baseline"]]
    names = list(accuracy["results"])
    lines = [
        "## Accuracy",
        "",
        f"Baseline `{accuracy['baseline']}` (full cache) runs every cell; cells where it scores below "
        f"{accuracy['min_baseline']} are out of the model's reach and are not run for other configs. "
        "Scores are RULER's string match (fraction of reference strings in the greedy answer); "
        "perplexity is exp(mean NLL) of the teacher-forced continuation (lower is better).",
        "",
        "| cell | samples | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for cell in accuracy["kept_cells"]:
        row = [cell, str(base["cells"][cell]["n"])]
        for name in names:
            c = accuracy["results"][name].get("cells", {}).get(cell)
            row.append("–" if c is None else _fmt(c.get("perplexity", c["score"]), ".3f" if "perplexity" in c else ".2f"))
        lines.append("| " + " | ".join(row) + " |")
    for cell in accuracy["kept_cells"]:
        if "perplexity" in base["cells"][cell] and base["cells"][cell]["n"] > 1:
            lines.append(f"| {cell}: change per document vs `{accuracy['baseline']}`, mean ± s.e. (%) | "
                         f"{base['cells'][cell]['n']} | " + " | ".join(
                             perplexity_change(base["cells"][cell], accuracy["results"][n].get("cells", {}).get(cell))
                             for n in names) + " |")
    lines.append("| **mean accuracy (kept, excl. perplexity)** | | " + " | ".join(_fmt(summary[n].get("mean_accuracy")) for n in names) + " |")
    lines.append("| accuracy ÷ baseline | | " + " | ".join(_fmt(summary[n].get("accuracy_ratio")) for n in names) + " |")
    lines.append("| KV memory saved vs bf16 | | " + " | ".join(_fmt(summary[n].get("compression")) for n in names) + " |")
    lines.append("| wall time (s) | | " + " | ".join(_fmt(summary[n].get("accuracy_wall_s"), ".0f") for n in names) + " |")
    for name, r in accuracy["results"].items():
        if "error" in r:
            lines.append(f"\n`{name}` failed: {r['error']}")
    if accuracy["out_of_reach"]:
        lines += ["", "Out of the model's reach (baseline score below the threshold; samples in brackets):", ""]
        lines += [f"- {cell}: {score:.2f} ({base['cells'][cell]['n']})" for cell, score in accuracy["out_of_reach"].items()]
    return lines


def markdown(report: dict) -> str:
    lines = [
        f"# Benchmark results ({report['date']})",
        "",
        f"- command: `{report['command']}`",
        f"- model: {report['model']}; hardware: {report['hardware']}; vLLM {report['vllm']}",
        "- configs: " + "; ".join(f"`{n}` = `{json.dumps(k)}`" for n, k in report["configs"].items()),
        "",
    ]
    if report.get("capacity"):
        lines += ["## Capacity and throughput", ""] + cap.markdown({**report, **report["capacity"]}).splitlines()[2:] + [""]
    if report.get("accuracy"):
        lines += accuracy_markdown(report["accuracy"], report["summary"]) + [""]
    for plot in report.get("plots", []):
        lines.append(f"![{plot}]({plot})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    model_dir = str(ensure_model(args.model))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        **cap.environment(),
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model,
        "configs": args.configs,
    }
    if "capacity" in args.suites:
        report["capacity"] = cap.measure(args.model, args.configs, quick=args.quick)
    if "accuracy" in args.suites:
        suite = acc.SUITES[args.accuracy_suite]
        base_llm = dict(model=model_dir, dtype="bfloat16", enforce_eager=True)
        report["accuracy"] = {"suite": args.accuracy_suite, "suite_cells": dict(suite),
                              **acc.run_suite(model_dir, suite, args.configs, base_llm, args.min_baseline)}
    report["summary"] = summarise(args.configs, report.get("accuracy"), report.get("capacity"))
    if report.get("accuracy"):
        report["plots"] = write_plots(report["summary"], report["accuracy"], out, args.model)
    cap.write_report(out, "results", report, markdown(report))
    return report


if __name__ == "__main__":
    main()
