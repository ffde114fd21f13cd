"""Time per decoded token on the CPU path: each config against bf16 (vLLM's own backend) in
the same run, at batch 1 and batch 8 over a long prompt.

    python -m benchmarks.decode_speed --model qwen2.5-coder-0.5b \
        --configs preset-safe,preset-balanced,preset-max --out results/DATE/decode-speed

Decode time per token = (last token - first token) / (tokens - 1) of each request, from
vLLM's own request timestamps, so prefill is left out. Writes ``decode_speed.json`` and
``decode_speed.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

from tqdm import tqdm

from benchmarks.configs import BASELINE, NAMES_HELP, resolve
from vllm_kvcompress.offline.models import MODELS, ensure_model


def run(spec: dict) -> dict:
    """In a subprocess: one engine, each batch size, per-token decode time per request."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from vllm_kvcompress.offline.prompts import long_document_ids

    llm = LLM(**{"disable_log_stats": False, **spec["llm"]})
    tokenizer = AutoTokenizer.from_pretrained(spec["llm"]["model"])
    params = SamplingParams(max_tokens=spec["output_tokens"], min_tokens=spec["output_tokens"], temperature=0.0,
                            ignore_eos=True)
    warm = [{"prompt_token_ids": long_document_ids(tokenizer, 256)}]
    llm.generate(warm, SamplingParams(max_tokens=4), use_tqdm=False)
    result = {}
    for batch in spec["batches"]:
        prompts = [{"prompt_token_ids": long_document_ids(tokenizer, spec["prompt_tokens"], offset=500 * i)}
                   for i in range(batch)]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        per_token = [(o.metrics.last_token_ts - o.metrics.first_token_ts) / (len(o.outputs[0].token_ids) - 1)
                     for o in outputs]
        result[str(batch)] = {"decode_ms_per_token": 1000 * statistics.median(per_token)}
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b", choices=sorted(MODELS))
    parser.add_argument("--configs", required=True, help=f"comma-separated names: {NAMES_HELP}")
    parser.add_argument("--prompt-tokens", type=int, default=3072)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from vllm_kvcompress.harness.subprocess_run import run_module

    model_dir = str(ensure_model(args.model))
    names = [BASELINE, *[n for n in args.configs.split(",") if n != BASELINE]]
    configs = {name: resolve(name, args.model) for name in names}
    unknown = [name for name, kwargs in configs.items() if kwargs is None]
    if unknown:
        parser.error(f"unknown config(s) {', '.join(unknown)}; allowed: {NAMES_HELP}")
    batches = [int(b) for b in args.batches.split(",")]
    results = {}
    for name, kwargs in tqdm(configs.items(), desc="configs", unit="config", file=sys.stderr):
        llm = {"model": model_dir, "dtype": "bfloat16", "max_model_len": args.prompt_tokens + args.output_tokens + 64,
               "enforce_eager": True, "kv_cache_memory_bytes": 2 << 30, **kwargs}
        spec = {"llm": llm, "batches": batches, "prompt_tokens": args.prompt_tokens,
                "output_tokens": args.output_tokens}
        try:
            results[name] = run_module("benchmarks.decode_speed", spec, timeout=1800)
            results[name].pop("log"), results[name].pop("wall_s")
        except Exception as exc:  # one failed config keeps the others
            results[name] = {"error": str(exc)[-2000:]}
    base = results[BASELINE]
    for name, r in results.items():
        for batch, cell in r.items() if "error" not in r else ():
            cell["ratio"] = cell["decode_ms_per_token"] / base[batch]["decode_ms_per_token"]
    report = {"date": datetime.date.today().isoformat(), "model": args.model, "cpu_count": os.cpu_count(),
              "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens, "batches": batches,
              "command": "python -m benchmarks.decode_speed " + " ".join(argv if argv is not None else sys.argv[1:]),
              "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_speed.json").write_text(json.dumps(report, indent=1))
    lines = [f"# Decode time per token on the CPU path ({report['date']})", "",
             f"{args.model}, {os.cpu_count()} CPU cores, bf16, prompts of {args.prompt_tokens} tokens, "
             f"{args.output_tokens} decoded; median over the batch's requests; ratio = config / {BASELINE} "
             f"(lower is faster). `{report['command']}`", "",
             "| config | " + " | ".join(f"B={b} ms/token | x {BASELINE}" for b in batches) + " |",
             "|---|" + "---|---|" * len(batches)]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][-120:]} |")
            continue
        cells = " | ".join(f"{r[str(b)]['decode_ms_per_token']:.1f} | {r[str(b)]['ratio']:.2f}" for b in batches)
        lines.append(f"| {name} | {cells} |")
    (out / "decode_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1].endswith(".json"):  # run_module's tool protocol
        from vllm_kvcompress.harness.subprocess_run import tool_main

        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        tool_main(run)
    else:
        main()
