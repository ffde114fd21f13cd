"""Greedy answers and teacher-forced logprobs for accuracy samples, in a fresh process.

    python -m vllm_kvcompress.harness.accuracy SPEC.json OUT.json

SPEC: {"llm": {LLM kwargs}, "samples": [Sample.to_dict(), ...]}
OUT:  {"results": [{"text", "output_tokens", "forced_logprobs"?}, ...] in sample order,
       "kv_cache_tokens": int, "bytes_per_token": float (measured from the cache tensors),
       "kept_fractions": [kept fraction of each finished request, ring layouts only],
       "kept_pages": [[pages it held at the end, pages its tokens fill in vLLM's layout], ...]}

Samples run cell by cell (one batch per (task, length)), with a progress bar on stderr.
"""

from __future__ import annotations

import sys
from itertools import groupby


def sampling_params(sample: dict):
    from vllm import SamplingParams

    from vllm_kvcompress.harness.forcing import FORCED_IDS_KEY

    if sample.get("forced_ids"):
        forced = sample["forced_ids"]
        return SamplingParams(max_tokens=len(forced), min_tokens=len(forced), temperature=0.0, ignore_eos=True,
                              logprobs=0, extra_args={FORCED_IDS_KEY: forced})
    return SamplingParams(max_tokens=sample["max_tokens"], temperature=0.0)


def run(spec: dict) -> dict:
    from tqdm import tqdm
    from vllm import LLM

    from vllm_kvcompress.harness.capacity import kv_pool
    from vllm_kvcompress.harness.forcing import ForcedContinuation
    from vllm_kvcompress.harness.generate import kept_records

    samples = spec["samples"]
    llm_kwargs = dict(spec["llm"])
    if any(s.get("forced_ids") for s in samples):
        llm_kwargs.setdefault("logits_processors", [ForcedContinuation])
    llm = LLM(**llm_kwargs)

    results: list[dict | None] = [None] * len(samples)
    order = sorted(range(len(samples)), key=lambda i: (samples[i]["task"], samples[i]["length"]))
    cells = [(key, list(group)) for key, group in groupby(order, key=lambda i: (samples[i]["task"], samples[i]["length"]))]
    bar = tqdm(total=len(samples), desc=spec.get("label", "samples"), unit="sample", file=sys.stderr)
    for (task, length), indices in cells:
        bar.set_postfix_str(f"{task} @ {length}")
        outputs = llm.generate(
            [{"prompt_token_ids": samples[i]["prompt_ids"]} for i in indices],
            [sampling_params(samples[i]) for i in indices], use_tqdm=False,
        )
        for i, out in zip(indices, outputs):
            completion = out.outputs[0]
            result = {"text": completion.text, "output_tokens": len(completion.token_ids)}
            if samples[i].get("forced_ids"):
                if list(completion.token_ids) != samples[i]["forced_ids"]:
                    raise RuntimeError(f"forced continuation diverged for {task} @ {length}")
                result["forced_logprobs"] = [step[tok].logprob for tok, step in zip(completion.token_ids, completion.logprobs)]
            results[i] = result
        bar.update(len(indices))
    bar.close()
    pool = kv_pool(llm)
    records = kept_records(llm)
    return {"results": results, "kv_cache_tokens": pool["kv_capacity_tokens"], "bytes_per_token": pool["bytes_per_token"],
            "kept_fractions": [r["kept_fraction"] for r in records],
            "kept_pages": [[r["pages"], r["native_pages"]] for r in records]}


if __name__ == "__main__":
    from vllm_kvcompress.harness.subprocess_run import tool_main

    tool_main(run)
