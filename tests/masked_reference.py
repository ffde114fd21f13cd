"""Shared by the stream tests: a masked reference of attention, and a driver that runs one
request through the stream plan + runners over a small pool."""

import torch


def masked_attention(q, k, v, pos, mask):
    """``q[L, T, Hq, D]``, ``k/v[L, T, H, D]``: the query at ``pos`` over positions
    ``0..pos`` where ``mask[L, H, pos + 1]`` -> ``[L, Hq, D]``."""
    layers, _, q_heads, dim = q.shape
    heads = k.shape[2]
    outs = []
    for layer in range(layers):
        kk, vv = k[layer, : pos + 1].transpose(0, 1), v[layer, : pos + 1].transpose(0, 1)
        logits = (q[layer, pos].view(heads, q_heads // heads, dim) @ kk.transpose(1, 2)) * dim ** -0.5
        logits = logits.masked_fill(~mask[layer][:, None, :], float("-inf"))
        outs.append((torch.softmax(logits, -1) @ vv).reshape(q_heads, dim))
    return torch.stack(outs)


def drive(settings, schedule, q, k, v, scores, steps, check, blocks: int, block: int, page: int):
    """Run one request through the stream plan + runners over a small pool, ``steps`` new
    tokens at a time (``scores[L, T, H]`` are what the hooks would give each token), and
    call ``check(out[L, new, Hq, D], first position, computed)`` after every step."""
    from types import SimpleNamespace

    from vllm_kvcompress import step_plan, stream_attention
    from vllm_kvcompress.eviction.streams import PoolGeometry

    layers, _, q_heads, dim = q.shape
    heads = k.shape[2]
    buffer = torch.zeros(layers, blocks, heads, block, 2 * dim)
    geometry = PoolGeometry(layers, blocks, heads, block, page)
    runners = [stream_attention.StreamRunner(settings, layer, layers) for layer in range(layers)]
    step_plan.score_store = torch.zeros(layers * blocks * heads * block)
    step_plan.rows, step_plan.req_ids = [schedule], ["r"]
    try:
        computed = 0
        for new in steps:
            span = slice(computed, computed + new)
            m = SimpleNamespace(query_start_loc_cpu=torch.tensor([0, new]), seq_lens=torch.tensor([computed + new]),
                                block_table_tensor=torch.arange(blocks)[None], num_actual_tokens=new)
            meta = stream_attention.build(m, 1, geometry)
            out = torch.zeros(layers, new, q_heads, dim)
            for layer in range(layers):
                step_plan.token_scores[layer] = scores[layer, span]
                runners[layer].forward(q[layer, span], k[layer, span], v[layer, span], buffer[layer], meta, out[layer],
                                       dim ** -0.5)
            check(out, computed, computed + new)
            computed += new
    finally:
        step_plan.rows, step_plan.req_ids = None, []
        step_plan.score_store = None
        step_plan.kept.clear()
        step_plan.stream_tables.clear()
        step_plan.token_scores.clear()
