"""Figures for benchmarks.run: accuracy vs KV compression, capacity vs accuracy, and
accuracy / perplexity by context length."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

from benchmarks.accuracy import parse_cell

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _scatter(points: dict[str, tuple[float, float]], xlabel: str, ylabel: str, title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, (x, y) in points.items():
        ax.scatter([x], [y], s=40)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.set_ylim(-0.05, 1.05)
    ax.margins(x=0.2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(summary: dict[str, dict], accuracy: dict, out: Path, model: str) -> list[str]:
    """``summary``: per config {"mean_accuracy", "compression", "capacity_ratio"}."""
    written = []
    ok = {n: s for n, s in summary.items() if s.get("mean_accuracy") is not None}
    if ok:
        _scatter({n: (s["compression"], s["mean_accuracy"]) for n, s in ok.items()},
                 "KV memory saved vs bf16 (fraction)", "mean accuracy (kept cells)",
                 f"{model}: accuracy vs compression", out / "accuracy_vs_compression.png")
        _scatter({n: (s["capacity_ratio"], s["mean_accuracy"]) for n, s in ok.items()},
                 "KV capacity vs bf16 (×, same pool)", "mean accuracy (kept cells)",
                 f"{model}: capacity vs accuracy", out / "capacity_vs_accuracy.png")
        written += ["accuracy_vs_compression.png", "capacity_vs_accuracy.png"]

    by_task = defaultdict(dict)  # task -> config -> {length: score}
    for name, result in accuracy["results"].items():
        for cell, c in result.get("cells", {}).items():
            task, length = parse_cell(cell)
            by_task[task].setdefault(name, {})[length] = c.get("perplexity", c["score"])
    tasks = [t for t in sorted(by_task) if len({n for cfg in by_task[t].values() for n in cfg}) > 1]
    if tasks:
        fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.4), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            for name, series in by_task[task].items():
                lengths = sorted(series)
                ax.plot(lengths, [series[n] for n in lengths], marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set(title=task, xlabel="context tokens", ylabel="perplexity" if task == "perplexity" else "score")
            if task != "perplexity":
                ax.set_ylim(-0.05, 1.05)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"{model}: by context length")
        fig.tight_layout()
        fig.savefig(out / "accuracy_by_length.png", dpi=120)
        plt.close(fig)
        written.append("accuracy_by_length.png")
    return written


def main(argv: list[str] | None = None) -> None:
    """Redraw the figures of a finished run: ``python -m benchmarks.plots OUT/results.json``."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("results", type=Path)
    args = parser.parse_args(argv)
    report = json.loads(args.results.read_text())
    print(write_plots(report["summary"], report["accuracy"], args.results.parent, report["model"]))


if __name__ == "__main__":
    main()
