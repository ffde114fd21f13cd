"""Greedy offline generation through vLLM, one engine per call, results as JSON.

    python -m vllm_kvcompress.tools.generate SPEC.json OUT.json

SPEC: {"llm": {LLM(...) kwargs}, "prompts": [[token ids], ...], "max_tokens": 32,
       "logprobs": 2, "repeat": 1}
OUT:  {"outputs": [{"token_ids", "text", "top_logprobs": [[[id, logprob], ...] per step],
                    "num_cached_tokens"}] (prompts in order, ``repeat`` rounds one after another),
       "kv_cache_tokens": int, "attention_impls": [class names used by the workers]}

Used by the tests and the demo so that every engine runs in a fresh process (vLLM's
CPU engine spawns its own processes and keeps global state).
"""

from __future__ import annotations


def _attention_impls(worker) -> list[str]:
    from vllm.model_executor.layers.attention import Attention

    model = worker.model_runner.model
    return sorted({type(m.impl).__name__ for m in model.modules() if isinstance(m, Attention)})


def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(**spec["llm"])
    params = SamplingParams(
        max_tokens=spec.get("max_tokens", 32), temperature=0.0, logprobs=spec.get("logprobs", 2), ignore_eos=spec.get("ignore_eos", False)
    )
    results = []
    for _ in range(spec.get("repeat", 1)):  # later rounds can hit the prefix cache
        results += llm.generate([{"prompt_token_ids": ids} for ids in spec["prompts"]], params, use_tqdm=False)
    outputs = []
    for result in results:
        completion = result.outputs[0]
        top = [
            sorted(([tok, lp.logprob] for tok, lp in step.items()), key=lambda t: -t[1])
            for step in (completion.logprobs or [])
        ]
        outputs.append({"token_ids": list(completion.token_ids), "text": completion.text, "top_logprobs": top,
                        "num_cached_tokens": int(result.num_cached_tokens or 0)})
    cache = llm.llm_engine.vllm_config.cache_config
    return {
        "outputs": outputs,
        "kv_cache_tokens": int(cache.num_gpu_blocks or 0) * int(cache.block_size),
        "attention_impls": sorted({name for names in llm.collective_rpc(_attention_impls) for name in names}),
    }


def run_in_subprocess(llm_kwargs: dict, prompts: list[list[int]], max_tokens: int = 32, timeout: int = 900,
                      repeat: int = 1) -> dict:
    """:func:`run` in a fresh Python process; adds the engine's log (``log``) and the
    wall time of the whole process (``wall_s``)."""
    from vllm_kvcompress.tools.subprocess_run import run_module

    spec = {"llm": llm_kwargs, "prompts": prompts, "max_tokens": max_tokens, "logprobs": 2, "repeat": repeat}
    return run_module("vllm_kvcompress.tools.generate", spec, timeout)


if __name__ == "__main__":
    from vllm_kvcompress.tools.subprocess_run import tool_main

    tool_main(run)
