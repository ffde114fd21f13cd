"""Accuracy of engine configurations on long-context tasks, against the full-cache baseline.

Suites say which cells (task, length) run and how many samples each has; sizes are
chosen for a 2-core CPU (see README). The first configuration is the baseline: it runs
every cell, and the others run only the cells where the baseline scores at least
``min_baseline`` (perplexity cells always run). Cells below it are reported as out of
the model's reach.
"""

from __future__ import annotations

import sys
from collections import defaultdict

from tqdm import tqdm

from vllm_kvcompress.harness.scoring import cell_summary, score
from vllm_kvcompress.harness.subprocess_run import failure_reason, run_module

# niah / passkey: {length: [depths in %]}; ruler: {task: samples} at ruler_length;
# perplexity: {context length: documents}, each scored on `continuation` forced tokens.
SUITES = {
    "full": dict(
        niah={1024: [10, 50, 90], 2048: [10, 50, 90], 4096: [10, 50, 90], 8192: [10, 50, 90], 16384: [50]},
        passkey={1024: [25, 75], 4096: [25, 75], 8192: [25, 75]},
        ruler_length=4096, ruler={"niah_multikey_1": 4, "vt": 4, "cwe": 4, "qa_1": 4, "qa_2": 4},
        perplexity={2048: 1, 4096: 1, 8192: 1}, continuation=128, pool_gib=2,
    ),
    # The 1.5B model (head_dim 128) prefills about 3x slower: fewer cells, same tasks.
    "small": dict(
        niah={2048: [50], 4096: [10, 90], 8192: [50]},
        passkey={4096: [50]},
        ruler_length=4096, ruler={"niah_multikey_1": 1, "vt": 1, "cwe": 1, "qa_1": 1, "qa_2": 1},
        perplexity={4096: 1}, continuation=128, pool_gib=2,
    ),
    # The accuracy frontier (issue 24): RULER-4K subset (NIAH single and multi-key, variable
    # tracking, QA), passkey at 1K and 3K, teacher-forced perplexity at 4K.
    "frontier": dict(
        niah={4096: [10, 50, 90]}, passkey={1024: [25, 75], 3072: [25, 75]},
        ruler_length=4096, ruler={"niah_multikey_1": 2, "vt": 2, "qa_1": 2},
        perplexity={4096: 1}, continuation=128, pool_gib=2,
    ),
    # The frontier's QA cell alone: which half of a composition (rows or eviction) loses a QA answer.
    "frontier-qa": dict(niah={}, passkey={}, ruler_length=4096, ruler={"qa_1": 2}, perplexity={}, continuation=128,
                        pool_gib=2),
    # HeadKV budget sweep: retrieval only, up to 4K (many configs on a 2-core CPU).
    "retrieval": dict(
        niah={2048: [25, 75], 4096: [25, 75]}, passkey={4096: [50]},
        ruler_length=4096, ruler={"niah_multikey_1": 2}, perplexity={}, continuation=128, pool_gib=2,
    ),
    # KVzap sweep: the retrieval cells plus continuation perplexity at 4K.
    "kvzap": dict(
        niah={2048: [25, 75], 4096: [25, 75]}, passkey={4096: [50]},
        ruler_length=4096, ruler={"niah_multikey_1": 2}, perplexity={4096: 1}, continuation=128, pool_gib=2,
    ),
    # Perplexity alone, on several documents (one 128-token continuation is a noisy measure
    # of a 1% target): for choosing eviction settings, then checked on held-out documents.
    "perplexity": dict(niah={}, passkey={}, ruler_length=4096, ruler={}, perplexity={4096: 6}, continuation=128,
                       pool_gib=2),
    # CI smoke: every code path once, on SmolLM2-135M (scores are not meaningful there).
    "quick": dict(
        niah={512: [50]}, passkey={512: [50]},
        ruler_length=1024, ruler={"vt": 1},
        perplexity={256: 1}, continuation=16, pool_gib=0.25,
    ),
}
SUITES["perplexity-heldout"] = {**SUITES["perplexity"], "perplexity_seed": 1}  # other documents, same shape
# Three times more held-out documents again (seed 2): six documents left standard errors larger than the targets.
SUITES["perplexity-heldout-18"] = {**SUITES["perplexity"], "perplexity": {4096: 18}, "perplexity_seed": 2}
DEFAULT_SUITE = {"qwen2.5-coder-0.5b": "full", "qwen2.5-coder-1.5b": "small", "smollm2-135m": "quick"}


def build_samples(model_dir: str, suite: dict) -> list[dict]:
    from transformers import AutoTokenizer

    from vllm_kvcompress.harness.ruler import ruler_samples
    from vllm_kvcompress.harness.tasks import niah_samples, passkey_samples, perplexity_samples

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = passkey_samples(tokenizer, suite["passkey"]) + niah_samples(tokenizer, suite["niah"])
    samples += ruler_samples(tokenizer, model_dir, suite["ruler"], suite["ruler_length"])
    samples += perplexity_samples(tokenizer, suite["perplexity"], suite["continuation"], suite.get("perplexity_seed", 0))
    return [s.to_dict() for s in samples]


def cell_name(sample: dict) -> str:
    return f"{sample['task']}@{sample['length']}"


def max_sequence(samples: list[dict]) -> int:
    return max(len(s["prompt_ids"]) + (len(s["forced_ids"]) if s.get("forced_ids") else s["max_tokens"]) for s in samples)


def run_config(name: str, llm: dict, samples: list[dict]) -> dict:
    out = run_module("vllm_kvcompress.harness.accuracy", {"llm": llm, "samples": samples, "label": name},
                     timeout=6 * 3600, show_progress=True)
    by_cell = defaultdict(list)
    for sample, result in zip(samples, out["results"]):
        result["score"] = score(sample, result)
        by_cell[cell_name(sample)].append((sample, result))
    cells = {}
    for cell, pairs in by_cell.items():
        cells[cell] = cell_summary([s for s, _ in pairs], [r["score"] for _, r in pairs])
        cells[cell]["samples"] = [
            {"depth": s["depth"], "prompt_tokens": len(s["prompt_ids"]), "answers": s["answers"],
             "output": r["text"][:200], "score": r["score"]} for s, r in pairs
        ]
    result = {"cells": cells, "kv_cache_tokens": out["kv_cache_tokens"], "bytes_per_token": out["bytes_per_token"],
              "wall_s": out["wall_s"]}
    if out.get("kept_fractions"):  # ring layouts: what the requests really kept (the workers' records)
        result["kept_fractions"] = out["kept_fractions"]
        result["kept_pages"] = out.get("kept_pages")
    return result


def run_suite(model_dir: str, suite: dict, configs: dict[str, dict], base_llm: dict, min_baseline: float,
              on_result=None) -> dict:
    """Baseline (first config) on every cell, the rest on the cells the baseline can do.
    ``on_result(name, result)`` is called after each config (to save partial results);
    it may add configs to ``configs``, which then run too."""
    samples = build_samples(model_dir, suite)
    llm = {**base_llm, "max_model_len": max_sequence(samples) + 16,
           "kv_cache_memory_bytes": int(suite["pool_gib"] * (1 << 30))}
    results, kept = {}, None
    bar = tqdm(total=len(configs), desc="accuracy configs", unit="config", file=sys.stderr)
    while len(results) < len(configs):  # on_result may add configs (e.g. at a measured compression)
        name = list(configs)[len(results)]
        chosen = samples if kept is None else [s for s in samples if cell_name(s) in kept]
        try:
            results[name] = run_config(name, {**llm, **configs[name]}, chosen)
        except RuntimeError as exc:
            results[name] = {"error": failure_reason(str(exc))}
            if kept is None:
                raise
        else:
            if kept is None:
                kept = {cell for cell, c in results[name]["cells"].items()
                        if "perplexity" in c or c["score"] >= min_baseline}
            if on_result is not None:
                on_result(name, results[name])
        bar.total = len(configs)
        bar.update()
    bar.close()
    first = next(iter(configs))
    baseline = results[first]
    return {
        "baseline": first,
        "min_baseline": min_baseline,
        "kept_cells": sorted(kept, key=parse_cell),
        "out_of_reach": {cell: c["score"] for cell, c in sorted(baseline["cells"].items(), key=lambda kv: parse_cell(kv[0]))
                         if cell not in kept},
        "results": results,
    }


def parse_cell(cell: str) -> tuple[str, int]:
    """``"ruler/vt@4096"`` -> ``("ruler/vt", 4096)``; sorts cells by task, then length."""
    task, _, length = cell.rpartition("@")
    return (task, int(length))


def sweep(report: dict, model_dir: str, suite_name: str, configs: dict[str, dict], on_result=None) -> dict:
    """A method sweep's accuracy block (bf16 engine, eager, baseline filter 0.8) into ``report``."""
    suite = SUITES[suite_name]
    base_llm = dict(model=model_dir, dtype="bfloat16", enforce_eager=True)
    report["accuracy"] = {"suite": suite_name, "suite_cells": dict(suite),
                          **run_suite(model_dir, suite, configs, base_llm, 0.8, on_result=on_result)}
    return report


def write_report(out, report: dict, markdown, plot, figure: str) -> None:
    """results.json, results.md and the sweep's figure; the table is printed too."""
    import json

    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "results.md").write_text(markdown(report))
    plot(report, out / figure)
    print(markdown(report))
