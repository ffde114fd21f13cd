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
    drive_many(settings, [Request("r", schedule, q, k, v, scores, steps, check)], blocks, block, page, state, device,
               dtype, no_sync)


class Request:
    """One request of :func:`drive_many`: its schedule, its tokens' ``q/k/v[L, T, heads, D]`` and
    hook scores ``[L, T, H]``, the tokens it takes at each of its steps, the first batch step it
    joins (``start``), and ``check(out, first position, computed)`` after each of its steps."""

    def __init__(self, req_id, schedule, q, k, v, scores, steps, check, start: int = 0):
        self.req_id, self.schedule, self.q, self.k, self.v, self.scores = req_id, schedule, q, k, v, scores
        self.steps, self.check, self.start = list(steps), check, start


def drive_many(settings, requests: list, blocks: int, block: int, page: int, state=None, device="cpu",
               dtype=torch.float32, no_sync: bool = False):
    """:func:`drive` for several requests batched as the runner batches them: each has its own
    ``blocks`` blocks of one pool and joins at its ``start`` step; a step holds every request
    that still has tokens (prompt chunks and decodes of other layouts mixed)."""
    from types import SimpleNamespace

    from vllm_kvcompress.eviction.streams import PoolGeometry
    from vllm_kvcompress.eviction.threshold import ThresholdSchedule
    from vllm_kvcompress.vllm import stream_layout
    from vllm_kvcompress.vllm.state import RequestCache, WorkerState

    layers, _, q_heads, dim = requests[0].q.shape
    heads = requests[0].k.shape[2]
    total_blocks = blocks * len(requests)
    buffer = torch.zeros(layers, total_blocks, heads, block, 2 * dim, dtype=dtype, device=device)
    geometry = PoolGeometry(layers, total_blocks, heads, block, page)
    method = settings.build()
    runners = [stream_layout.StreamRunner(method, layer, layers) for layer in range(layers)]
    state = WorkerState() if state is None else state
    state.pool.num_blocks = total_blocks
    state.pool.row_scores = torch.zeros(layers * total_blocks * heads * block, device=device)
    table = torch.arange(total_blocks).view(len(requests), blocks)  # request i: blocks i*blocks ..
    for request in requests:
        state.requests[request.req_id] = RequestCache(request.schedule)
    computed = {request.req_id: 0 for request in requests}
    step_index = 0
    while True:
        batch = [(i, r) for i, r in enumerate(requests)
                 if r.start <= step_index and step_index - r.start < len(r.steps)]
        if not batch and step_index > max(r.start for r in requests):
            break
        step_index += 1
        if not batch:
            continue
        news = [r.steps[step_index - 1 - r.start] for _, r in batch]
        step = state.begin_step([r.req_id for _, r in batch])
        rows = torch.tensor([i for i, _ in batch])
        starts = torch.tensor([0] + news).cumsum(0)
        seq_lens = torch.tensor([computed[r.req_id] + new for (_, r), new in zip(batch, news)])
        m = SimpleNamespace(query_start_loc_cpu=starts, seq_lens=seq_lens, block_table_tensor=table[rows].to(device),
                            num_actual_tokens=int(starts[-1]))
        step.host_block_table = table[rows]
        meta = stream_layout.build(m, len(batch), geometry, step, state.pool, seq_lens)
        spans = [slice(computed[r.req_id], computed[r.req_id] + new) for (_, r), new in zip(batch, news)]
        inputs = [torch.cat([getattr(r, name)[:, span] for (_, r), span in zip(batch, spans)], 1).to(device, dtype)
                  for name in ("q", "k", "v")]
        step_scores = torch.cat([r.scores[:, span] for (_, r), span in zip(batch, spans)], 1).to(device)
        out = torch.zeros(layers, int(starts[-1]), q_heads, dim, dtype=dtype, device=device)
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
        for t, ((_, r), new) in enumerate(zip(batch, news)):
            r.check(out[:, int(starts[t]):int(starts[t + 1])], computed[r.req_id], computed[r.req_id] + new)
            computed[r.req_id] += new
