"""The accuracy frontier: capacity against accuracy and perplexity for bf16, vLLM's fp8, each
method alone and the compositions (the presets), in one run on one machine.

    python -m benchmarks.frontier --out results/DATE/frontier/qwen2.5-coder-0.5b     # run, then report
    python -m benchmarks.frontier --report results/DATE/frontier/qwen2.5-coder-0.5b  # report only

The run is ``benchmarks.run`` with the ``frontier`` accuracy suite (RULER-4K NIAH single and
multi-key, variable tracking and QA, passkey at 1K and 3K, teacher-forced perplexity at 4K;
cells where bf16 scores below 0.8 are out of the model's reach and left out for every
config). The report adds ``frontier.md`` (each row against bf16, and each preset against its
targets) and ``frontier.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_CONFIGS = ("preset-balanced,preset-safe,preset-max,snapkv-r0.8,kvquant-k8-v8,snapkv-r0.55,fp8,"
                   "kvquant-k4-v4")
# preset: (capacity at least, accuracy points lost at most, perplexity increase at most in %)
TARGETS = {"preset-safe": (4.0, 0.5, 1.0), "preset-balanced": (8.0, 1.0, 3.0), "preset-max": (16.0, 5.0, None)}


def kind(name: str) -> str:
    if name == "bf16":
        return "bf16"
    if name in ("fp8",):
        return "vLLM's own"
    if name.startswith("preset-") or "+" in name:
        return "composition"
    return "one method"


def rows(report: dict) -> list[dict]:
    accuracy, summary = report["accuracy"], report["summary"]
    base = accuracy["results"][accuracy["baseline"]]
    base_ppl = next((c["perplexity"] for cell, c in base["cells"].items() if cell.startswith("perplexity@")), None)
    out = []
    for name, result in accuracy["results"].items():
        s = summary.get(name, {})
        if "error" in result or s.get("mean_accuracy") is None:
            out.append({"config": name, "error": result.get("error", "no result")})
            continue
        ppl = next((c["perplexity"] for cell, c in result["cells"].items() if cell.startswith("perplexity@")), None)
        row = {"config": name, "kind": kind(name), "capacity": s["capacity_ratio"],
               "accuracy_pts": 100 * s["mean_accuracy"],
               "delta_pts": 100 * (s["mean_accuracy"] - summary[accuracy["baseline"]]["mean_accuracy"]),
               "perplexity": ppl, "perplexity_pct": None if ppl is None or not base_ppl else 100 * (ppl / base_ppl - 1)}
        if name in TARGETS:
            cap, pts, pct = TARGETS[name]
            row["targets"] = (f">= {cap:g}x, <= {pts:g} pt lost" + ("" if pct is None else f", perplexity <= +{pct:g}%"))
            row["met"] = {"capacity": row["capacity"] >= cap, "accuracy": -row["delta_pts"] <= pts + 1e-9,
                          "perplexity": pct is None or (row["perplexity_pct"] is not None
                                                        and row["perplexity_pct"] <= pct + 1e-9)}
        out.append(row)
    return out


def markdown(report: dict, table: list[dict]) -> str:
    accuracy = report["accuracy"]
    kept = [c for c in accuracy["kept_cells"] if not c.startswith("perplexity@")]
    lines = [f"# Accuracy frontier, {report['model']} ({report['date']})", "",
             f"`{report['command']}` on {report.get('hardware', '?')}, vLLM {report.get('vllm', '?')}; bf16 in the "
             "same run. Accuracy: mean score over the cells bf16 reaches (>= "
             f"{accuracy['min_baseline']}): {', '.join(kept)}; out of reach for this model: "
             f"{', '.join(accuracy.get('out_of_reach', [])) or 'none'}. Perplexity: teacher-forced continuation at "
             "4K. Capacity: tokens vLLM's pool holds per byte against bf16, times 1 / (1 - compression ratio) for "
             "eviction at the prompt end (presets: prompts past 2,560 tokens; shorter ones down to 512 keep more).",
             "", "| config | kind | capacity x bf16 | accuracy (pts) | vs bf16 (pts) | perplexity | vs bf16 | "
             "preset targets | met |", "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        if "error" in r:
            lines.append(f"| {r['config']} | error: {r['error'][:120]} | | | | | | | |")
            continue
        pct = "–" if r["perplexity_pct"] is None else f"{r['perplexity_pct']:+.1f}%"
        ppl = "–" if r["perplexity"] is None else f"{r['perplexity']:.2f}"
        met = ""
        if "met" in r:
            met = ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in r["met"].items())
        lines.append(f"| {r['config']} | {r['kind']} | {r['capacity']:.2f} | {r['accuracy_pts']:.1f} | "
                     f"{r['delta_pts']:+.1f} | {ppl} | {pct} | {r.get('targets', '')} | {met} |")
    return "\n".join(lines) + "\n"


def plot(table: list[dict], path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"bf16": "black", "vLLM's own": "tab:gray", "one method": "tab:blue", "composition": "tab:red"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "accuracy_pts", "accuracy (points, kept cells)"),
                           (axes[1], "perplexity_pct", "perplexity at 4K vs bf16 (%)")):
        for r in table:
            if "error" in r or r.get(key) is None:
                continue
            ax.scatter([r["capacity"]], [r[key]], color=colours[r["kind"]], s=45, label=r["kind"])
            ax.annotate(r["config"], (r["capacity"], r[key]), textcoords="offset points", xytext=(5, 4), fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="KV capacity x bf16 (log scale)", ylabel=label)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axes[0].legend(unique.values(), unique.keys(), fontsize=8, loc="lower left")
    fig.suptitle(f"{model}: capacity vs accuracy (up and right is better) and vs perplexity (down and right)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_dir(out: Path) -> None:
    report = json.loads((out / "results.json").read_text())
    table = rows(report)
    (out / "frontier.json").write_text(json.dumps(table, indent=1))
    (out / "frontier.md").write_text(markdown(report, table))
    plot(table, out / "frontier.png", report["model"])
    print((out / "frontier.md").read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="run the frontier into this folder, then report")
    parser.add_argument("--report", help="only write frontier.md/.json/.png from DIR/results.json")
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS)
    args = parser.parse_args(argv)
    if bool(args.out) == bool(args.report):
        parser.error("give one of --out (run and report) or --report DIR")
    if args.out:
        from benchmarks import run

        run.main(["--model", args.model, "--accuracy-suite", "frontier", "--suites", "accuracy",
                  "--configs", args.configs, "--out", args.out])
    report_dir(Path(args.out or args.report))


if __name__ == "__main__":
    main(sys.argv[1:])
