"""Triton prefill over one request's per-KV-head page lists (streams), causal, optionally under
DMS's delayed rule: key ``j`` is visible to the query at stream position ``i`` while
``i - j <= window`` or its row's keep score passes the threshold.

The PyTorch reference (:func:`stream_attention_ref.prefill_attention` with
:func:`stream_attention_ref.delayed_visible`) gathers the streams' rows and runs torch SDPA with
a boolean mask, which on CUDA means K/V repeated per query head and a float mask per query
tile (``paged_dense_ref.masked_attend``). Here the rule is two comparisons per score tile, the
rows are read where they lie (page lists, as the decode kernel reads them), and softmax is
online (flash attention's forward). Streams equally long with no rule stay on FlashAttention
(``paged_dense_ref.causal_attend``), which this does not try to beat.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _stream_prefill_kernel(q_ptr, pool_ptr, pages_ptr, lengths_ptr, scores_ptr, out_ptr, q_len,
                           stride_qt, stride_qh, stride_pool, stride_pages, stride_ot, stride_oh,
                           scale, window, threshold,
                           GROUP: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, RULE: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tile, q_head = tl.program_id(0), tl.program_id(1)
    kv_head = q_head // GROUP
    length = tl.load(lengths_ptr + kv_head)
    queries = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = queries < q_len
    position = length - q_len + queries  # each query's row in its stream
    d = tl.arange(0, D)
    q = tl.load(q_ptr + queries[:, None] * stride_qt + q_head * stride_qh + d[None, :], mask=q_ok[:, None], other=0.0)
    best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    end = tl.minimum(length, length - q_len + (tile + 1) * BLOCK_M)  # causal: no key past the tile's last query
    for start in range(0, end, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k_ok = keys < end
        page_id = tl.load(pages_ptr + kv_head * stride_pages + keys // PAGE, mask=k_ok, other=0)
        rows = page_id.to(tl.int64) * PAGE + keys % PAGE
        k = tl.load(pool_ptr + rows[:, None] * stride_pool + d[None, :], mask=k_ok[:, None], other=0.0)
        v = tl.load(pool_ptr + rows[:, None] * stride_pool + D + d[None, :], mask=k_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale  # [M, N]
        visible = k_ok[None, :] & (keys[None, :] <= position[:, None])
        if RULE:
            kept = tl.load(scores_ptr + rows, mask=k_ok, other=0.0) >= threshold
            visible = visible & ((position[:, None] - keys[None, :] <= window) | kept[None, :])
        s = tl.where(visible, s, float("-inf"))
        new_best = tl.maximum(best, tl.max(s, axis=1))
        # A query may see nothing in a tile yet (the rule hides it all): keep its max finite.
        safe = tl.where(new_best == float("-inf"), 0.0, new_best)
        p = tl.exp(s - safe[:, None])
        rescale = tl.exp(best - safe)
        total = total * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        best = new_best
    out = acc / total[:, None]  # every query sees at least itself
    tl.store(out_ptr + queries[:, None] * stride_ot + q_head * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=q_ok[:, None])


def prefill_attention(query: torch.Tensor, pool: torch.Tensor, pages: torch.Tensor, lengths: torch.Tensor, page: int,
                      scale: float, row_scores: torch.Tensor | None = None, window: int = 0,
                      threshold: float = 0.0, block_m: int = 64, block_n: int = 64) -> torch.Tensor:
    """Causal attention of one request's ``q_len`` new queries ``query[q_len, Hq, D]``, the last
    ``q_len`` rows of each stream ``pages[Hkv, P]`` (``lengths[Hkv]`` rows after the step), in
    ``pool[rows, 2D]``. ``row_scores[rows]``: DMS's keep score of every pool row (None: causal
    only). Returns ``[q_len, Hq, D]`` in the query's dtype."""
    query = query.contiguous()
    q_len, num_q_heads, head_dim = query.shape
    num_kv_heads = pages.shape[0]
    out = torch.empty_like(query)
    pages = pages if pages.stride(-1) == 1 else pages.contiguous()
    rule = row_scores is not None
    grid = (triton.cdiv(q_len, block_m), num_q_heads)
    _stream_prefill_kernel[grid](query, pool, pages, lengths.to(torch.int32), row_scores if rule else pool, out, q_len,
                                 query.stride(0), query.stride(1), pool.stride(0), pages.stride(0), out.stride(0),
                                 out.stride(1), float(scale), int(window), float(threshold),
                                 GROUP=num_q_heads // num_kv_heads, D=head_dim, PAGE=page, RULE=rule,
                                 BLOCK_M=block_m, BLOCK_N=block_n)
    return out
