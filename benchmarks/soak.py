"""Soak test: ``vllm serve`` under mixed streaming traffic for a fixed time, per config.

    python -m benchmarks.soak --model smollm2-135m --config bf16 --config knorm-r0.5 \\
        --config dms-cr4 --duration 600 --out results/DATE/soak

Each config gets its own server (same pool, same seeded job list, same concurrency),
one after the other on this machine; bf16 (vLLM's own attention) is the baseline the
latencies are divided by. A config passes when no request failed, the control request
is unchanged, every block came back (``kv_cache_usage_perc`` 0 after the load) and each
hostile request got a 400. Writes ``results.json`` and ``report.md``; exits 1 on a failed check.
See :mod:`vllm_kvcompress.harness.soak`.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.configs import BASELINE, NAMES_HELP, resolve
from vllm_kvcompress.config import KVCompressConfig
from vllm_kvcompress.harness.soak import SoakSpec, checks, serve_flags, served, soak


def prompts_for(model_dir: str, lengths: tuple[int, ...], control_tokens: int = 700):
    from transformers import AutoTokenizer

    from vllm_kvcompress.offline.prompts import long_document_ids

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = {n: long_document_ids(tokenizer, n, offset=97 * i) for i, n in enumerate(lengths)}
    return prompts, long_document_ids(tokenizer, control_tokens, offset=5000)


def takes_budgets(llm_kwargs: dict) -> bool:
    """Whether the server accepts per-request budgets: an eviction method with a budget
    (DMS and KVzap's threshold mode decide by score and refuse one)."""
    config = KVCompressConfig.from_dict(llm_kwargs.get("additional_config", {}).get("kvcompress", {}))
    return config.takes_request_budget


def run(args, argv: list[str]) -> dict:
    from tqdm import tqdm

    from vllm_kvcompress.offline.models import ensure_model

    model_dir = str(ensure_model(args.model))
    spec = SoakSpec(duration_s=args.duration, concurrency=args.concurrency, seed=args.seed)
    prompts, control_prompt = prompts_for(model_dir, spec.prompt_tokens)
    common = ["--enforce-eager", "--max-model-len", str(args.max_model_len), "--kv-cache-memory-bytes",
              str(args.pool_mib << 20), "--max-num-seqs", str(args.max_num_seqs), "--disable-uvicorn-access-log"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.config:
        kwargs = resolve(name, args.model)
        if kwargs is None:
            raise SystemExit(f"unknown config {name!r}; allowed: {NAMES_HELP}")
        with tqdm(desc=f"soak {name}", unit="req", file=sys.stderr) as bar:
            with served(model_dir, common + serve_flags(kwargs), out / f"server-{name}.log") as (base, _):
                summary = soak(base, model_dir, spec, prompts, control_prompt,
                               progress=lambda n: bar.update(n - bar.n), per_request_settings=takes_budgets(kwargs))
        summary["problems"] = checks(summary)
        results[name] = summary
        print(f"{name}: {summary['served']} served, p50 {summary['latency_p50_s']:.2f} s, "
              f"p99 {summary['latency_p99_s']:.2f} s, problems: {summary['problems'] or 'none'}", file=sys.stderr)
    meta = {"model": args.model, "duration_s": args.duration, "concurrency": args.concurrency,
            "pool_mib": args.pool_mib, "max_num_seqs": args.max_num_seqs, "prompt_tokens": list(spec.prompt_tokens),
            "max_tokens": list(spec.max_tokens), "mix": spec.mix, "seed": args.seed,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python -m benchmarks.soak " + " ".join(argv)}
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (out / "report.md").write_text(report(meta, results))
    return results


def _ratio(value, base):
    return f"{value / base:.2f}x" if value is not None and base else "n/a"


def report(meta: dict, results: dict) -> str:
    base = results.get(BASELINE, {})
    lines = [f"# Soak: {meta['model']}, {meta['duration_s']:.0f} s per config, {meta['concurrency']} clients",
             "", f"{meta['date']}; `{meta['command']}`. Pool {meta['pool_mib']} MiB, max {meta['max_num_seqs']} "
             f"running; prompts {meta['prompt_tokens']} tokens, outputs {meta['max_tokens']}; mix {meta['mix']}.",
             "Latency = end-to-end of a streamed completion that ran to its last token; ratios vs "
             f"{BASELINE} under the same job list.", "",
             "| config | requests | served | p50 s | p99 s | p50 vs bf16 | p99 vs bf16 | TTFT p50 s | preemptions "
             "| hostile 400 | control same | KV usage after | tokens evicted | blocks reclaimed | checks |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        plugin = r["plugin_metrics"]
        lines.append(
            f"| {name} | {r['requests']} | {r['served']} | {r['latency_p50_s']:.2f} | {r['latency_p99_s']:.2f} | "
            f"{_ratio(r['latency_p50_s'], base.get('latency_p50_s'))} | "
            f"{_ratio(r['latency_p99_s'], base.get('latency_p99_s'))} | {r['ttft_p50_s']:.2f} | "
            f"{r['preemptions']:.0f} | {r['hostile_400']}/{r['by_kind']['hostile']} | {r['control_unchanged']} | "
            f"{r['kv_cache_usage_after']} | {plugin.get('kvcompress:tokens_evicted_total', 0):.0f} | "
            f"{plugin.get('kvcompress:blocks_reclaimed_total', 0):.0f} | {'pass' if not r['problems'] else 'FAIL'} |")
    lines += ["", "Peak compression ratio seen on /metrics during the load: " + ", ".join(
        f"{name} {r['peak'].get('kvcompress:compression_ratio', 0):.2f}x" for name, r in results.items()
        if "kvcompress:compression_ratio" in r["peak"]) or "n/a"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--config", action="append", help=f"repeatable; {NAMES_HELP}")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load per config")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--pool-mib", type=int, default=48, help="KV pool; small enough to preempt under load")
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.config = args.config or [BASELINE, "knorm-r0.5"]
    results = run(args, argv)
    if any(r["problems"] for r in results.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
