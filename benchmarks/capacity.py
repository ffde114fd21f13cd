"""KV capacity, bytes per token, concurrency and throughput: vLLM's own caches vs kvcompress.

    python -m benchmarks.capacity                       # bf16, fp8, kvcompress(none)
    python -m benchmarks.capacity --quick               # CI smoke: tiny pool and workload
    python -m benchmarks.capacity --config 'my-name={"attention_backend": "kvcompress", ...}'
    python -m benchmarks.capacity --config bf16 --config knorm-r0.75 --conc-prompt 1000 --saturation 24

``--config`` takes NAME=JSON or a name from ``benchmarks.configs``. ``--saturation N``
also queues N concurrency-workload requests at once and reports how many ran at the
same time, preemptions and output tok/s (what an eviction method's freed blocks buy).

Each configuration runs in its own process, one after another in this invocation, on
the same fixed KV pool and workload. Ratios are against the first configuration (bf16).
Writes ``OUT/capacity.json`` and ``OUT/capacity.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

from tqdm import tqdm

from benchmarks.configs import CONFIGS
from vllm_kvcompress.offline.models import MODELS, ensure_model
from vllm_kvcompress.harness.subprocess_run import failure_reason, run_module

FULL = dict(pool_mib=128, requests=8, prompt_tokens=512, output_tokens=64, conc_prompt=200, conc_output=56)
QUICK = dict(pool_mib=64, requests=2, prompt_tokens=256, output_tokens=16, conc_prompt=100, conc_output=20)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def parse_config(text: str) -> tuple[str, dict]:
    name, sep, body = text.partition("=")
    if not sep:
        return name, None  # a named config, resolved for --model in main()
    if not name:
        raise argparse.ArgumentTypeError(f"--config expects NAME=JSON, got {text!r}")
    try:
        kwargs = json.loads(body)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--config {name}: invalid JSON ({exc})") from None
    if not isinstance(kwargs, dict):
        raise argparse.ArgumentTypeError(f"--config {name}: JSON must be an object of LLM kwargs")
    return name, kwargs


def ratio(value, base):
    return None if value is None or not base else value / base


def markdown(report: dict) -> str:
    w = report["workload"]
    lines = [
        f"# KV capacity and throughput ({report['date']})",
        "",
        f"- command: `{report['command']}`",
        f"- model: {report['model']}; hardware: {report['hardware']}; vLLM {report['vllm']}",
        f"- KV pool: {w['pool_mib']} MiB per run; throughput workload: {w['requests']} requests × "
        f"{w['prompt_tokens']} prompt + {w['output_tokens']} output tokens (greedy, ignore_eos); "
        f"concurrency workload: {w['conc_prompt']} + {w['conc_output']} tokens per request",
        f"- ratios are against `{report['baseline']}`, measured in the same invocation",
        "",
        "| config | KV capacity (tokens) | × | bytes/token (measured) | max running, no preemption (predicted) | output tok/s | × | TTFT median (s) | × |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["results"].items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | | | | |")
            continue
        t, c = r["throughput"], r["concurrency"]
        lines.append(
            f"| {name} | {r['kv_capacity_tokens']:,} | {r['capacity_ratio']:.2f} | {r['bytes_per_token']:,.0f} | "
            f"{c['max_running_without_preemption']} ({c['predicted_fit']}) | {t['output_tokens_per_s']:.1f} | "
            f"{r['throughput_ratio']:.2f} | {t['ttft_median_s']:.2f} | {r['ttft_ratio']:.2f} |"
        )
    saturated = {n: r["concurrency"]["saturation"] for n, r in report["results"].items()
                 if "error" not in r and r["concurrency"].get("saturation")}
    if saturated:
        lines += ["", f"Saturation: {w['saturation']} requests of {w['conc_prompt']} + {w['conc_output']} tokens queued "
                  "at once (peak = most requests running at the same time, from vLLM's per-request timestamps).", "",
                  "| config | peak running | × | preemptions | output tok/s | × | TTFT median (s) |", "|---|---|---|---|---|---|---|"]
        for name, sat in saturated.items():
            lines.append(f"| {name} | {sat['peak_running']} | {sat.get('peak_running_ratio') or 1:.2f} | {sat['preemptions']} | "
                         f"{sat['output_tokens_per_s']:.1f} | {sat.get('throughput_ratio') or 1:.2f} | {sat['ttft_median_s']:.2f} |")
    return "\n".join(lines) + "\n"


def measure(model: str, configs: dict[str, dict], quick: bool = False, **overrides) -> dict:
    """Capacity/throughput of each configuration on one pool and workload; ratios against
    the first. Returns the report (``results`` per config) without writing files."""
    workload = {**(QUICK if quick else FULL), **{k: v for k, v in overrides.items() if v is not None}}
    model_dir = str(ensure_model(model))
    base_llm = dict(model=model_dir, dtype="bfloat16", max_model_len=2048, enforce_eager=True,
                    kv_cache_memory_bytes=workload["pool_mib"] << 20, max_num_seqs=256)
    results = {}
    for name, kwargs in tqdm(configs.items(), desc="capacity configs", unit="config", file=sys.stderr):
        spec = {
            "llm": {**base_llm, **kwargs},
            "throughput": {k: workload[k] for k in ("requests", "prompt_tokens", "output_tokens")},
            "concurrency": {"prompt_tokens": workload["conc_prompt"], "output_tokens": workload["conc_output"],
                            "saturation_requests": workload.get("saturation")},
        }
        try:
            result = run_module("vllm_kvcompress.harness.capacity", spec, timeout=1800)
        except RuntimeError as exc:
            results[name] = {"error": failure_reason(str(exc))}
            continue
        result.pop("log")
        results[name] = result

    baseline = next(iter(results))
    base = results[baseline]
    for r in results.values():
        if "error" in r or "error" in base:
            continue
        r["capacity_ratio"] = ratio(r["kv_capacity_tokens"], base["kv_capacity_tokens"])
        r["throughput_ratio"] = ratio(r["throughput"]["output_tokens_per_s"], base["throughput"]["output_tokens_per_s"])
        r["ttft_ratio"] = ratio(r["throughput"]["ttft_median_s"], base["throughput"]["ttft_median_s"])
        sat, base_sat = r["concurrency"].get("saturation"), base["concurrency"].get("saturation")
        if sat and base_sat:
            sat["throughput_ratio"] = ratio(sat["output_tokens_per_s"], base_sat["output_tokens_per_s"])
            sat["peak_running_ratio"] = ratio(sat["peak_running"], base_sat["peak_running"])
    return {"model": model, "workload": workload, "baseline": baseline, "configs": configs, "results": results}


def environment() -> dict:
    import vllm

    return {
        "date": datetime.date.today().isoformat(),
        "hardware": f"{cpu_name()}, {os.cpu_count()} cores, CPU only",
        "vllm": vllm.__version__,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(MODELS))
    parser.add_argument("--config", action="append", type=parse_config, help="NAME=JSON of LLM kwargs (repeatable)")
    parser.add_argument("--quick", action="store_true", help="tiny pool and workload (CI smoke)")
    parser.add_argument("--pool-mib", type=int, help="KV pool per run (MiB)")
    parser.add_argument("--conc-prompt", type=int, help="prompt tokens of the concurrency workload")
    parser.add_argument("--conc-output", type=int, help="output tokens of the concurrency workload")
    parser.add_argument("--saturation", type=int, help="also queue this many concurrency requests at once")
    parser.add_argument("--out", default=f"results/{datetime.date.today().isoformat()}")
    args = parser.parse_args(argv)

    from benchmarks.configs import NAMES_HELP, resolve

    configs = dict(args.config) if args.config else dict(CONFIGS)
    for name, kwargs in configs.items():
        if kwargs is None:
            configs[name] = resolve(name, args.model)
            if configs[name] is None:
                parser.error(f"--config {name}: expected NAME=JSON or one of {NAMES_HELP}")
    report = {
        **environment(),
        "command": "python -m benchmarks.capacity " + " ".join(argv if argv is not None else sys.argv[1:]),
        **measure(args.model, configs, args.quick, pool_mib=args.pool_mib, conc_prompt=args.conc_prompt,
                  conc_output=args.conc_output, saturation=args.saturation),
    }
    write_report(Path(args.out), "capacity", report, markdown(report))
    return report


def write_report(out: Path, stem: str, report: dict, text: str) -> None:
    """OUT/STEM.json and OUT/STEM.md, and the markdown on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
