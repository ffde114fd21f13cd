"""Greedy offline generation through vLLM, one engine per call, results as JSON.

    python -m vllm_kvcompress.harness.generate SPEC.json OUT.json

SPEC: {"llm": {LLM(...) kwargs}, "prompts": [[token ids], ...], "max_tokens": 32,
       "logprobs": 2, "repeat": 1, "forced": [[token ids] or null per prompt] (optional)}
OUT:  {"outputs": [{"token_ids", "text", "top_logprobs": [[[id, logprob], ...] per step],
                    "token_logprobs": [logprob of each emitted token], "num_cached_tokens"}]
       (prompts in order, ``repeat`` rounds one after another),
       "kv_cache_tokens": int, "attention_impls": [class names used by the workers],
       "kept": [{"request", "rank", "tokens", "kept_fraction", "pages", "native_pages"} per finished
                ring-layout request and rank (KVzap threshold, DMS)]}

Used by the tests and the demo so that every engine runs in a fresh process (vLLM's
CPU engine spawns its own processes and keeps global state).
"""

from __future__ import annotations


def worker_model(worker):
    """The model a vLLM worker runs (V1 and V2 runners)."""
    runner = worker.model_runner
    return runner.get_model() if hasattr(runner, "get_model") else runner.model


def attention_impls(worker) -> list[str]:
    """The attention implementations the worker's model runs."""
    from vllm.model_executor.layers.attention import Attention

    return sorted({type(m.impl).__name__ for m in worker_model(worker).modules() if isinstance(m, Attention)})


def decode_modes(worker) -> dict[str, int]:
    """Decode steps by the CUDA graph mode they ran in (FULL = a replay), per rank."""
    state = getattr(worker.model_runner, "kvc", None)
    return {} if state is None else dict(state.decode_modes)


def _kept_records(worker) -> list[dict]:
    """Ring layouts (KVzap threshold, DMS): what each finished request kept, per rank."""
    state = getattr(worker.model_runner, "kvc", None)
    return [] if state is None else list(state.finished)


def kept_records(llm) -> list[dict]:
    """Every rank's records of finished requests' kept rows (empty without a ring layout)."""
    return [record for records in llm.collective_rpc(_kept_records) for record in records]


def sampling_params(spec: dict, forced: list[int] | None = None, extra_args: dict | None = None):
    """Greedy params; ``forced`` tokens are emitted one per step (teacher forcing through
    ``harness.forcing``), so two engines can be compared on the same continuation."""
    from vllm import SamplingParams

    from vllm_kvcompress.harness.forcing import FORCED_IDS_KEY

    extra_args = dict(extra_args or {})
    max_tokens = spec.get("max_tokens", 32)
    if forced:
        extra_args[FORCED_IDS_KEY] = forced
        max_tokens = len(forced)
    return SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens if forced else 0, temperature=0.0,
                          logprobs=spec.get("logprobs", 2), ignore_eos=bool(forced) or spec.get("ignore_eos", False),
                          extra_args=extra_args or None)


def llm_kwargs(spec: dict) -> dict:
    from vllm_kvcompress.harness.forcing import ForcedContinuation

    kwargs = dict(spec["llm"])
    if any(spec.get("forced") or []):
        kwargs.setdefault("logits_processors", [ForcedContinuation])
    return kwargs


def token_logprobs(completion) -> list[float]:
    return [step[tok].logprob for tok, step in zip(completion.token_ids, completion.logprobs or [])]


def run(spec: dict) -> dict:
    from vllm import LLM

    llm = LLM(**llm_kwargs(spec))
    forced = spec.get("forced") or [None] * len(spec["prompts"])
    params = [sampling_params(spec, f) for f in forced]
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
                        "token_logprobs": token_logprobs(completion), "num_cached_tokens": int(result.num_cached_tokens or 0)})
    cache = llm.llm_engine.vllm_config.cache_config
    return {
        "outputs": outputs,
        "kv_cache_tokens": int(cache.num_gpu_blocks or 0) * int(cache.block_size),
        "attention_impls": sorted({name for names in llm.collective_rpc(attention_impls) for name in names}),
        "kept": kept_records(llm),
    }


def run_in_subprocess(llm_kwargs: dict, prompts: list[list[int]], max_tokens: int = 32, timeout: int = 900,
                      repeat: int = 1, forced: list[list[int]] | None = None, ignore_eos: bool = False,
                      logprobs: int = 2) -> dict:
    """:func:`run` in a fresh Python process; adds the engine's log (``log``) and the
    wall time of the whole process (``wall_s``)."""
    from vllm_kvcompress.harness.subprocess_run import run_module

    spec = {"llm": llm_kwargs, "prompts": prompts, "max_tokens": max_tokens, "logprobs": logprobs, "repeat": repeat,
            "forced": forced, "ignore_eos": ignore_eos}
    return run_module("vllm_kvcompress.harness.generate", spec, timeout)


if __name__ == "__main__":
    from vllm_kvcompress.harness.subprocess_run import tool_main

    tool_main(run)
