"""kvcompress inside vLLM 0.32's CUDA build against vLLM's own KV caches, one machine, one run.

    python -m benchmarks.gpu_engine --out results/DATE/h200-engine [--configs vllm-bf16,kvc-none,...]
        [--workload quick|full]

Model: a Llama-3-8B-shaped config (32 layers, 32 query / 8 KV heads, head_dim 128) with dummy
weights (``load_format="dummy"``, no weights reach the GPU machine), bf16, fixed
``gpu_memory_utilization``. LOOKAT codebooks are synthetic (seeded normal centroids in the
codebook file format), since there are no real keys to calibrate on: speed and capacity are
measured here; accuracy is measured on the CPU path. Each config runs in its own process and
its row is written as soon as it finishes (``rows.jsonl``), so a sweep can be split over
several device runs; ``summary.json`` and ``summary.md`` are rewritten from all rows each time.

Columns: capacity (tokens vLLM's KV pool holds) and its ratio to vllm-bf16; output tokens/s on
a capacity-bound decode-heavy workload, ratio to vllm-bf16; decode time per output token at
batch 1 and 32 after a ``context``-token prompt; engine start time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "bfloat16", "hidden_act": "silu",
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}

# name -> (LLM kwargs, kvcompress settings or None, LOOKAT m)
CONFIGS = {
    "vllm-bf16": ({}, None, None),
    "vllm-fp8": ({"kv_cache_dtype": "fp8"}, None, None),
    "vllm-int4_per_token_head": ({"kv_cache_dtype": "int4_per_token_head", "attention_backend": "TRITON_ATTN"},
                                 None, None),
    "kvc-none": ({}, {"method": "none"}, None),
    "lookat-m16-v4": ({}, {"method": "lookat", "value_bits": 4}, 16),
    "lookat-m32-v16": ({}, {"method": "lookat", "value_bits": 16}, 32),
}

WORKLOADS = {  # decode-heavy: requests x (prompt + output); tpot: prompt tokens, output tokens
    "quick": {"decode_heavy": (160, 2048, 512), "tpot_context": 4096, "tpot_tokens": 64, "max_model_len": 8192},
    "full": {"decode_heavy": (320, 2048, 2048), "tpot_context": 32768, "tpot_tokens": 128, "max_model_len": 34816},
}


def _prompts(count: int, length: int, seed: int):
    import torch
    from vllm.inputs import TokensPrompt

    generator = torch.Generator().manual_seed(seed)
    return [TokensPrompt(prompt_token_ids=torch.randint(100, 120000, (length,), generator=generator).tolist())
            for _ in range(count)]


def _timed(llm, prompts, max_tokens: int) -> tuple[float, int]:
    import torch
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0, detokenize=False)
    torch.cuda.synchronize()
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    return time.perf_counter() - started, sum(len(o.outputs[0].token_ids) for o in outputs)


def run_one(name: str, workload: dict, utilization: float) -> dict:
    """One config in this process: start, capacity, TPOT at B=1 and 32, decode-heavy throughput."""
    from vllm import LLM

    from vllm_kvcompress.harness.gpu_generate import engine_facts, model_folder

    kwargs, settings, m = CONFIGS[name]
    folder, codebooks = model_folder(LLAMA_8B, m)
    kwargs = dict(kwargs)
    if settings is not None:
        settings = dict(settings, **({"codebooks": str(codebooks)} if codebooks else {}))
        kwargs.update(attention_backend="kvcompress", additional_config={"kvcompress": settings})
    started = time.perf_counter()
    llm = LLM(model=str(folder), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", seed=0,
              max_model_len=workload["max_model_len"], gpu_memory_utilization=utilization, max_num_seqs=512, **kwargs)
    row = {"config": name, "start_s": round(time.perf_counter() - started, 1)}
    facts = engine_facts(llm)
    row.update(capacity_tokens=facts["kv_cache_tokens"], cudagraph_mode=facts["cudagraph_mode"],
               attention=",".join(facts["attention_impls"]))
    _timed(llm, _prompts(2, 256, 1), 8)  # warm-up
    context, tokens = workload["tpot_context"], workload["tpot_tokens"]
    for batch in (1, 32):
        # Other prompts for each run (same lengths): the prefix cache must not skip the second prefill.
        prefill_s, _ = _timed(llm, _prompts(batch, context, 10 + batch), 1)
        total_s, out = _timed(llm, _prompts(batch, context, 20 + batch), tokens + 1)
        row[f"tpot_ms_b{batch}"] = round(1000 * (total_s - prefill_s) / tokens, 2)
    count, prompt, output = workload["decode_heavy"]
    seconds, out = _timed(llm, _prompts(count, prompt, 3), output)
    row.update(throughput_tok_s=round(out / seconds, 1), throughput_s=round(seconds, 1))
    return row


def summarise(rows: list[dict], meta: dict) -> tuple[dict, str]:
    base = next((r for r in rows if r["config"] == "vllm-bf16" and "error" not in r), None)
    for r in rows:
        if base is not None and "error" not in r:
            r["capacity_ratio"] = round(r["capacity_tokens"] / base["capacity_tokens"], 2)
            r["throughput_ratio"] = round(r["throughput_tok_s"] / base["throughput_tok_s"], 2)
    summary = {**meta, "rows": rows}
    cols = ["config", "capacity_tokens", "capacity_ratio", "throughput_tok_s", "throughput_ratio", "tpot_ms_b1",
            "tpot_ms_b32", "start_s", "attention", "cudagraph_mode"]
    lines = [f"# kvcompress on {meta['device']}, {meta['date']}", "",
             f"`{meta['command']}`; workload {meta['workload']}: {json.dumps(WORKLOADS[meta['workload']])}.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, r.get("error", "")[:80] if c == "capacity_tokens" else ""))
                                       for c in cols) + " |")
    return summary, "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="quick")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.one:
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc(function): a local tool
        row = run_one(args.one, WORKLOADS[args.workload], args.gpu_memory_utilization)
        print("ROW " + json.dumps(row), flush=True)
        return
    import torch

    meta = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"), "workload": args.workload,
            "model": "Llama-3-8B shape, dummy weights, bf16",
            "command": "python -m benchmarks.gpu_engine " + " ".join(sys.argv[1:] if argv is None else argv)}
    rows_file = out / "rows.jsonl"
    for name in args.configs.split(","):
        if name not in CONFIGS:
            raise SystemExit(f"--configs: unknown {name!r}; allowed: {', '.join(CONFIGS)}")
        print(f"[gpu_engine] {name} ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_engine", "--one", name, "--out", str(out),
                               "--workload", args.workload, "--gpu-memory-utilization", str(args.gpu_memory_utilization)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
        found = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        row = json.loads(found[-1]) if found else {"config": name, "error": (proc.stderr or proc.stdout)[-3000:]}
        (out / f"{name}.log").write_text(proc.stderr[-200_000:])
        with rows_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
        summary, table = summarise(rows, meta)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        (out / "summary.md").write_text(table)
        print(table, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
