"""Step-by-step trace of the scheduler's block pool while vLLM generates, as JSON.

    python -m vllm_kvcompress.harness.step_trace SPEC.json OUT.json

SPEC: {"llm": {LLM(...) kwargs}, "prompts": [[token ids], ...], "max_tokens": 16,
       "extra_args": [per-prompt SamplingParams.extra_args or null] (optional),
       "forced": [per-prompt forced continuation or null] (optional, see tools.generate),
       "abort": {request index: step after which it is aborted} (optional)}
OUT:  {"steps": [{"free_blocks", "blocks": {req: blocks held}, "computed": {req: tokens},
                  "waiting", "running", "pages_next": {req: pages} (kvzap threshold)}] (after each step),
       "outputs": [{"token_ids", "token_logprobs"}] (aborted requests: null), "preemptions": {req: count},
       "num_blocks": usable blocks in the pool, "block_size"}

The engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so the
scheduler's own block manager is read directly; the workers still run apart.
"""

from __future__ import annotations

import os


def _name(request_id: str) -> str:
    return request_id.rsplit("-", 1)[0]  # LLMEngine appends a random suffix to our ids


def _held(scheduler) -> dict[str, int]:
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    return {_name(req): sum(b is not manager._null_block for b in blocks) for req, blocks in manager.req_to_blocks.items()}


def run(spec: dict) -> dict:
    from vllm import LLM

    from vllm_kvcompress.harness.generate import llm_kwargs, sampling_params, token_logprobs

    llm = LLM(**llm_kwargs(spec))
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    extra = spec.get("extra_args") or [None] * len(spec["prompts"])
    forced = spec.get("forced") or [None] * len(spec["prompts"])
    requests = {}
    for i, ids in enumerate(spec["prompts"]):
        params = sampling_params({**spec, "ignore_eos": True}, forced[i], extra[i])
        engine.add_request(str(i), {"prompt_token_ids": ids}, params)
        requests[str(i)] = None
    preemptions: dict[str, int] = {}
    steps, outputs = [], {}
    aborts = {int(step): req for req, step in (spec.get("abort") or {}).items()}
    while engine.has_unfinished_requests():
        if len(steps) in aborts:
            engine.abort_request([aborts[len(steps)]])
        for out in engine.step():
            if out.finished:
                outputs[_name(out.request_id)] = out
        for req in scheduler.requests.values():
            preemptions[_name(req.request_id)] = req.num_preemptions
        steps.append({
            "free_blocks": scheduler.kv_cache_manager.block_pool.get_num_free_blocks(),
            "blocks": _held(scheduler),
            "computed": {_name(r.request_id): r.num_computed_tokens for r in scheduler.requests.values()},
            "waiting": len(scheduler.waiting), "running": len(scheduler.running),
            # KVzap threshold mode: stream pages the worker reported for each request's next step
            "pages_next": {_name(req): getattr(s, "pages_next", None) for req, s in getattr(scheduler, "schedules", {}).items()
                           if getattr(s, "pages_next", None) is not None},
        })
    result_outputs = []
    for req_id in requests:
        if req_id not in outputs:  # aborted
            result_outputs.append(None)
            continue
        completion = outputs[req_id].outputs[0]
        result_outputs.append({"token_ids": list(completion.token_ids), "token_logprobs": token_logprobs(completion)})
    return {
        "steps": steps, "outputs": result_outputs, "preemptions": preemptions,
        "num_blocks": scheduler.kv_cache_manager.block_pool.num_gpu_blocks - 1,
        "block_size": scheduler.cache_config.block_size,
    }


def run_traced(llm: dict, prompts: list[list[int]], max_tokens: int = 16, extra_args=None, forced=None, abort=None,
               timeout: int = 900) -> dict:
    from vllm_kvcompress.harness.subprocess_run import run_module

    spec = {"llm": llm, "prompts": prompts, "max_tokens": max_tokens, "extra_args": extra_args, "forced": forced,
            "abort": abort}
    return run_module("vllm_kvcompress.harness.step_trace", spec, timeout)


if __name__ == "__main__":
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm_kvcompress.harness.subprocess_run import tool_main

    tool_main(run)
