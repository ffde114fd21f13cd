"""The eviction scheduler's block lists against the worker's rows, step by step, when the
next step is scheduled while the previous one is still in flight (vLLM's async scheduling,
which whole-row eviction keeps on CUDA). No model runs: the scheduler is vLLM's own, fed no
outputs between two steps, as the async engine core does; the worker's side is the same
schedule's ``physical_length``, which the worker's metadata builder evaluates."""

from __future__ import annotations

import pytest
import torch

from tests.test_startup import engine_config

BLOCK = 16
PROMPT = 640  # 40 blocks; compacted to its 256-token budget at the prompt's end


def _scheduler(model_dir, cls_name: str, num_blocks: int = 200):
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    from vllm_kvcompress.vllm import scheduler as module

    config = engine_config(model_dir, attention_backend="kvcompress", block_size=BLOCK,
                           additional_config={"kvcompress": {"method": "knorm", "max_kv_tokens": 256}})
    config.cache_config.num_gpu_blocks = num_blocks
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=3, head_size=64, dtype=torch.bfloat16)
    kv_cache_config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                                    kv_cache_groups=[KVCacheGroupSpec(["model.layers.0.self_attn.attn"], spec)])
    return getattr(module, cls_name)(vllm_config=config, kv_cache_config=kv_cache_config,
                                     structured_output_manager=StructuredOutputManager(config), block_size=BLOCK)


def _request(request_id: str, prompt: int = PROMPT):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    return Request(request_id, list(range(100, 100 + prompt)), SamplingParams(max_tokens=64, ignore_eos=True), None)


def _worker_blocks(scheduler, request_id: str) -> int:
    """Blocks the worker's step uses: rows held before the step's tokens, plus those tokens."""
    request = scheduler.requests[request_id]
    schedule = scheduler.schedules[request_id]
    scheduled = scheduler.last_output.num_scheduled_tokens[request_id]
    before = request.num_computed_tokens - scheduled
    return -(-(schedule.physical_length(before) + scheduled) // BLOCK)


@pytest.mark.parametrize("cls_name", ["KVCompressScheduler", "KVCompressAsyncScheduler"])
def test_blocks_follow_the_workers_rows_with_a_step_in_flight(smollm2_dir, cls_name):
    """Step 1 holds the whole prompt and compacts it at its end; step 2 is scheduled before
    step 1's output comes back (async) or after it (sync). Either way the request keeps the
    first blocks it had, as many as the worker's rows need: freeing on vLLM's processed length
    (which leaves out step 1 while it is in flight) would free all 40 of them while the worker
    still reads the first 17."""
    scheduler = _scheduler(smollm2_dir, cls_name)
    blocks = scheduler.managers[0].req_to_blocks
    scheduler.add_request(_request("a"))
    first = scheduler.schedule()
    scheduler.last_output = first
    assert first.num_scheduled_tokens["a"] == PROMPT
    allocated = [b.block_id for b in blocks["a"]]
    assert len(allocated) == PROMPT // BLOCK == _worker_blocks(scheduler, "a")
    if cls_name == "KVCompressScheduler":  # sync: the step's output comes back first
        from vllm.v1.outputs import ModelRunnerOutput

        scheduler.update_from_output(first, ModelRunnerOutput(req_ids=["a"], req_id_to_index={"a": 0},
                                                              sampled_token_ids=[[7]]))
    second = scheduler.schedule()
    scheduler.last_output = second
    assert second.num_scheduled_tokens.get("a") == 1
    held = [b.block_id for b in blocks["a"]]
    assert len(held) == _worker_blocks(scheduler, "a") == -(-(256 + 1) // BLOCK)
    compacted = -(-scheduler.schedules["a"].physical_length(PROMPT) // BLOCK)  # the rows step 1 kept
    assert held[:compacted] == allocated[:compacted]  # the blocks the worker compacted into, in order
    assert scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == 200 - 1 - len(held)  # -1: the null block


def _sampled(output) -> "object":
    from vllm.v1.outputs import ModelRunnerOutput

    ids = list(output.num_scheduled_tokens)
    return ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                             sampled_token_ids=[[7] for _ in ids])


def test_async_pipeline_keeps_every_block_the_worker_reads(smollm2_dir):
    """Two requests through their prompts and 40 decode steps each (decode compactions every
    16 tokens), scheduled as vLLM's async engine core does: step N+1 before step N's output.
    At every step each request holds exactly the blocks the worker's step writes into, and the
    first of them are the ones it held before (the rows the previous step's compaction kept),
    in order: nothing the worker still reads was freed and handed out."""
    scheduler = _scheduler(smollm2_dir, "KVCompressAsyncScheduler", num_blocks=120)
    blocks = scheduler.managers[0].req_to_blocks
    scheduler.add_request(_request("a", 640))
    scheduler.add_request(_request("b", 400))
    in_flight, before, compactions, steps = None, {}, 0, 0
    while steps < 45:
        output = scheduler.schedule()
        scheduler.last_output = output
        steps += 1
        for rid in output.num_scheduled_tokens:
            schedule = scheduler.schedules[rid]
            held = [b.block_id for b in blocks[rid]]
            assert len(held) == _worker_blocks(scheduler, rid), (rid, steps)
            scheduled = output.num_scheduled_tokens[rid]
            start = scheduler.requests[rid].num_computed_tokens - scheduled
            kept = -(-schedule.physical_length(start) // BLOCK)
            assert held[:kept] == before.get(rid, [])[:kept], (rid, steps)
            compactions += schedule.compacts_at(start + scheduled)
            before[rid] = held
        if in_flight is not None:
            scheduler.update_from_output(in_flight, _sampled(in_flight))
        in_flight = output
    assert compactions >= 4  # the prompts' ends and decode points of both requests
