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


def drive(settings, schedule, q, k, v, scores, steps, check, blocks: int, block: int, page: int, state=None,
          device="cpu", dtype=torch.float32, no_sync: bool = False):
    """Run one request ``"r"`` through the stream plan + runners over a small pool, ``steps``
    new tokens at a time (``scores[L, T, H]`` are what the hooks would give each token), and
    call ``check(out[L, new, Hq, D], first position, computed)`` after every step (``out``
    on the host). The worker's state (``state``, a WorkerState) is handled as the runner
    does: one step plan per step, the pages reports handed to the schedule after it. On a
    CUDA ``device`` the pool and the block table live there (the plan reads the host copy,
    as from the runner); ``no_sync``: the layers' forwards run under CUDA's sync debug mode
    "error" (any read-back raises), except the last layer of the step that packs a threshold
    rule's prompt (its survivor counts lay out the packed pages: one read-back, there)."""
    from types import SimpleNamespace

    from vllm_kvcompress.eviction.streams import PoolGeometry
    from vllm_kvcompress.eviction.threshold import ThresholdSchedule
    from vllm_kvcompress.vllm import stream_layout
    from vllm_kvcompress.vllm.state import RequestCache, WorkerState

    layers, _, q_heads, dim = q.shape
    heads = k.shape[2]
    buffer = torch.zeros(layers, blocks, heads, block, 2 * dim, dtype=dtype, device=device)
    geometry = PoolGeometry(layers, blocks, heads, block, page)
    method = settings.build()
    runners = [stream_layout.StreamRunner(method, layer, layers) for layer in range(layers)]
    state = WorkerState() if state is None else state
    state.pool.num_blocks = blocks
    state.pool.row_scores = torch.zeros(layers * blocks * heads * block, device=device)
    state.requests["r"] = RequestCache(schedule)
    computed = 0
    for new in steps:
        span = slice(computed, computed + new)
        step = state.begin_step(["r"])
        m = SimpleNamespace(query_start_loc_cpu=torch.tensor([0, new]), seq_lens=torch.tensor([computed + new]),
                            block_table_tensor=torch.arange(blocks, device=device)[None], num_actual_tokens=new)
        step.host_block_table = torch.arange(blocks)[None]
        meta = stream_layout.build(m, 1, geometry, step, state.pool, m.seq_lens)
        out = torch.zeros(layers, new, q_heads, dim, dtype=dtype, device=device)
        inputs = [t[:, span].to(device, dtype) for t in (q, k, v)]
        step_scores = scores[:, span].to(device)  # copies to the device before the trap
        packs = any(isinstance(c.schedule, ThresholdSchedule) for c in meta.compressions)
        try:
            for layer in range(layers):
                # The packing step's last layer reads its survivor counts back (the repack).
                trap = device != "cpu" and no_sync and not (packs and layer == layers - 1)
                if device != "cpu":
                    torch.cuda.set_sync_debug_mode("error" if trap else "default")
                state.record_scores(layer, step_scores[layer], 0.0)
                runners[layer].forward(*(t[layer] for t in inputs), buffer[layer], meta, out[layer], dim ** -0.5)
        finally:
            if device != "cpu":
                torch.cuda.set_sync_debug_mode("default")
        out = out.float().cpu()
        for req_id, pages in step.settle_reports().items():
            state.requests[req_id].schedule.pages_next = pages
        state.end_step()
        check(out, computed, computed + new)
        computed += new
