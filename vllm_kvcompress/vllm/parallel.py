"""Tensor parallelism: which KV heads a rank holds, and one answer for every rank.

vLLM splits query and KV heads evenly over the TP ranks (rank ``r`` of ``n`` holds KV
heads ``r * H/n .. (r+1) * H/n - 1``) or, with more ranks than KV heads, gives each rank
one KV head replicated on ``n/H`` consecutive ranks (``QKVParallelLinear``). The
plugin's artefacts (codebooks, head scores, KVzap predictors, DMS adapters) cover every
KV head of the model; each rank keeps its own heads' slice.

All ranks share one block table per request (the scheduler's), so a per-request block
count that depends on the heads (HeadKV budgets, KVzap/DMS survivors) must be the
largest any rank needs: :func:`agree_max` settles data-dependent counts each step.
"""

from __future__ import annotations

from vllm_kvcompress.eviction.streams import kv_heads_of_rank


def rank_and_size() -> tuple[int, int]:
    """This process's (TP rank, TP size); (0, 1) outside vLLM's workers (tools, tests)."""
    from vllm.distributed import parallel_state

    if parallel_state._TP is None:
        return 0, 1
    group = parallel_state.get_tp_group()
    return group.rank_in_group, group.world_size


def local_kv_heads(num_kv_heads: int) -> list[int]:
    rank, size = rank_and_size()
    return kv_heads_of_rank(num_kv_heads, size, rank)


def agree_max(values: list[int]) -> list[int]:
    """Element-wise maximum of ``values`` over the TP ranks (every rank must call it with
    a list of the same length, in the same step). One rank: returned as is."""
    _, size = rank_and_size()
    if size == 1 or not values:
        return values
    import torch
    import torch.distributed as dist
    from vllm.distributed import parallel_state

    tensor = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=parallel_state.get_tp_group().cpu_group)
    return tensor.tolist()
