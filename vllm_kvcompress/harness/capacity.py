"""Capacity and throughput of one engine configuration, measured in a fresh process.

    python -m vllm_kvcompress.harness.capacity SPEC.json OUT.json

SPEC: {"llm": {LLM kwargs}, "throughput": {"requests", "prompt_tokens", "output_tokens"},
       "concurrency": {"prompt_tokens", "output_tokens"}}

Reports the engine's own KV capacity, the bytes per token actually allocated in the
workers' cache tensors, offline throughput and time to first token for a fixed
workload, and the largest number of requests that ran at once without preemption.
"""

from __future__ import annotations

import statistics
import time


def cache_bytes(worker) -> dict:
    caches = worker.model_runner.kv_caches
    return {"layers": len(caches), "bytes": sum(t.numel() * t.element_size() for t in caches)}


def kv_pool(llm) -> dict:
    """The engine's KV pool: blocks, capacity in tokens, and bytes the workers' cache
    tensors really hold (per token too)."""
    cache = llm.llm_engine.vllm_config.cache_config
    num_blocks, block_size = int(cache.num_gpu_blocks or 0), int(cache.block_size)
    tokens = num_blocks * block_size
    stored = sum(w["bytes"] for w in llm.collective_rpc(cache_bytes))
    return {"kv_capacity_tokens": tokens, "num_blocks": num_blocks, "block_size": block_size,
            "cache_bytes": stored, "bytes_per_token": stored / tokens if tokens else None}


def peak_overlap(intervals: list[tuple[float, float]]) -> int:
    """Most intervals open at one instant (an interval ending when another starts does not overlap)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals], key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def _run_batch(llm, prompts: list[list[int]], output_tokens: int) -> dict:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=output_tokens, min_tokens=output_tokens, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    results = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    wall = time.perf_counter() - started
    stats = [r.metrics for r in results]
    generated = sum(len(r.outputs[0].token_ids) for r in results)
    return {
        "requests": len(prompts),
        "wall_s": wall,
        "output_tokens": generated,
        "output_tokens_per_s": generated / wall,
        "ttft_s": [s.first_token_latency for s in stats],
        "preemptions": sum(s.num_preemptions for s in stats),
        "peak_running": peak_overlap([(s.scheduled_ts, s.last_token_ts) for s in stats]),
    }


def run(spec: dict) -> dict:
    from transformers import AutoTokenizer
    from vllm import LLM

    from vllm_kvcompress.offline.prompts import long_document_ids

    llm = LLM(**{"disable_log_stats": False, **spec["llm"]})
    pool = kv_pool(llm)
    num_blocks, block_size = pool["num_blocks"], pool["block_size"]
    tokenizer = AutoTokenizer.from_pretrained(spec["llm"]["model"])

    tp = spec["throughput"]
    prompts = [long_document_ids(tokenizer, tp["prompt_tokens"], offset=700 * i) for i in range(tp["requests"])]
    throughput = _run_batch(llm, prompts, tp["output_tokens"])
    throughput["ttft_median_s"] = statistics.median(throughput.pop("ttft_s"))

    cc = spec["concurrency"]
    blocks_per_request = -(-(cc["prompt_tokens"] + cc["output_tokens"]) // block_size)
    # One block is vLLM's reserved null block.
    fits = (num_blocks - 1) // blocks_per_request
    trials = {}
    for n in (fits, fits + 1):
        batch = [long_document_ids(tokenizer, cc["prompt_tokens"], offset=97 * i) for i in range(n)]
        trial = _run_batch(llm, batch, cc["output_tokens"])
        trial.pop("ttft_s")
        trials[n] = trial
    no_preemption = [t["peak_running"] for t in trials.values() if t["preemptions"] == 0]
    # Saturation: many more requests than bf16 fits, all queued at once. How many run at
    # the same time, and the output rate, show what eviction's freed blocks buy.
    saturation = None
    if cc.get("saturation_requests"):
        batch = [long_document_ids(tokenizer, cc["prompt_tokens"], offset=97 * i) for i in range(cc["saturation_requests"])]
        saturation = _run_batch(llm, batch, cc["output_tokens"])
        saturation["ttft_median_s"] = statistics.median(saturation.pop("ttft_s"))
    return {
        **pool,
        "throughput": throughput,
        "concurrency": {
            "blocks_per_request": blocks_per_request,
            "predicted_fit": fits,
            "trials": {str(n): t for n, t in trials.items()},
            "max_running_without_preemption": max(no_preemption) if no_preemption else 0,
            "saturation": saturation,
        },
    }


if __name__ == "__main__":
    from vllm_kvcompress.harness.subprocess_run import tool_main

    tool_main(run)
