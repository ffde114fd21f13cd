"""PyTorch reference for attention over per-(request, KV head) page lists ("streams").

The pool is one flat array of rows ``pool[num_rows, 2 * head_dim]`` (``[key | value]``
per row, as in :mod:`paged_dense_ref`). A stream is a list of page ids; page ``g``
holds rows ``g * page .. g * page + page - 1``. Each (request, KV head) has its own page
list and length, so heads of one request may hold different numbers of rows (HeadKV).

* ``pages[..., P]``: page ids, padded with any valid id past the stream's length.
* ``lengths[...]``: rows each stream attends to (the step's new rows included).
* ``decoder``: for a pool of encoded rows (kvquant bytes), turns gathered rows
  ``[..., Hkv, L, row_bytes]`` into ``[..., Hkv, L, 2D]`` ``[key | value]`` (keys at their
  logical positions); None: the pool holds ``[key | value]`` already.
Softmax and accumulation run in fp32.
"""

from __future__ import annotations

import torch

from vllm_kvcompress.kernels import paged_dense_ref


def page_rows(pages: torch.Tensor, page: int) -> torch.Tensor:
    """Row ids ``[..., P * page]`` of the pages ``[..., P]``, in order."""
    return (pages.unsqueeze(-1) * page + torch.arange(page, device=pages.device)).flatten(-2)


def write_rows(pool: torch.Tensor, rows: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """Store ``key``/``value`` ``[T, H, D]`` at row ids ``rows[T, H]``."""
    pool[rows] = torch.cat([key, value], dim=-1).to(pool.dtype)


def gather(pool: torch.Tensor, pages: torch.Tensor, page: int, length: int, decoder=None) -> torch.Tensor:
    """Rows ``[..., length, 2D]`` of streams ``pages[..., P]`` (first ``length`` rows)."""
    rows = page_rows(pages, page)[..., :length]
    data = pool.index_select(0, rows.flatten()).view(*rows.shape, *pool.shape[1:])  # pool[rows], faster on the CPU
    return data if decoder is None else decoder(data)


def decode_attention(query: torch.Tensor, pool: torch.Tensor, pages: torch.Tensor, lengths: torch.Tensor,
                     page: int, scale: float, max_kv_len: int | None = None, decoder=None) -> torch.Tensor:
    """One query per request ``[B, Hq, D]``; ``pages[B, Hkv, P]``, ``lengths[B, Hkv]``.
    ``max_kv_len``: a host bound on ``lengths`` (else read back from their device)."""
    batch, num_q_heads, head_dim = query.shape
    num_kv_heads = pages.shape[1]
    max_len = int(lengths.max()) if max_kv_len is None else int(max_kv_len)
    rows = gather(pool, pages, page, max_len, decoder)  # [B, Hkv, L, 2D]
    k, v = rows[..., :head_dim].float(), rows[..., head_dim:].float()
    q = query.view(batch, num_kv_heads, num_q_heads // num_kv_heads, head_dim).float()
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, Hkv, group, L]
    valid = torch.arange(max_len, device=scores.device) < lengths.to(scores.device).unsqueeze(-1)  # [B, Hkv, L]
    scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    return out.reshape(batch, num_q_heads, head_dim)


def prefill_attention(query: torch.Tensor, pool: torch.Tensor, pages: torch.Tensor, lengths: torch.Tensor,
                      page: int, scale: float, visible: torch.Tensor | None = None, max_len: int | None = None,
                      uniform: bool | None = None, decoder=None) -> torch.Tensor:
    """Causal attention of one request's ``q_len`` new queries ``[q_len, Hq, D]``; each
    stream's last ``q_len`` rows are those tokens (``pages[Hkv, P]``, ``lengths[Hkv]``).
    ``visible[Hkv, q_len, max(lengths)]`` restricts it further (DMS's mask), or a function
    ``(start, end) -> visible[:, start:end]`` that makes one query tile's part of it. ``max_len``
    and ``uniform`` (every stream ``max_len`` long): host facts of ``lengths``, else read
    back from their device."""
    q_len, num_q_heads, head_dim = query.shape
    num_kv_heads = pages.shape[0]
    group = num_q_heads // num_kv_heads
    max_len = int(lengths.max()) if max_len is None else int(max_len)
    if uniform is None:
        uniform = bool((lengths == max_len).all())
    device = pool.device
    rows = gather(pool, pages, page, max_len, decoder)  # [Hkv, L, 2D]
    if decoder is not None:
        rows = rows.to(query.dtype)  # as a dense pool holds them
    if visible is None and uniform:
        # Equally long streams (a prompt before compression) are a dense prefill: vLLM's
        # FlashAttention on CUDA (bottom-right causal, GQA native), as the dense layout prefills.
        return paged_dense_ref.causal_attend(query, rows[..., :head_dim], rows[..., head_dim:], scale)
    k, v = rows[None, ..., :head_dim], rows[None, ..., head_dim:]
    q = query.transpose(0, 1)[None].to(k.dtype)  # [1, Hq, q_len, D]
    lengths = lengths.to(device)
    q_pos = lengths[:, None] - q_len + torch.arange(q_len, device=device)  # [Hkv, q_len]
    columns = torch.arange(max_len, device=device)[None, None, :]

    def mask_rows(start: int, end: int) -> torch.Tensor:  # [1, Hq, end - start, L]
        mask = columns <= q_pos[:, start:end, None]
        if visible is not None:
            mask = mask & (visible(start, end) if callable(visible) else visible[:, start:end])
        return mask.repeat_interleave(group, 0)[None]

    return paged_dense_ref.masked_attend(q, k, v, mask_rows, scale)[0].transpose(0, 1)


def delayed_visible(scores: torch.Tensor, lengths: torch.Tensor, q_len: int, window: int,
                    threshold: float = 0.0):
    """Prompt queries' DMS mask (causality is the attention's): key ``j`` is visible to query
    ``i`` while ``i - j <= window`` or when its score ``scores[Hkv, L]`` passes ``threshold``. A
    function of a span of queries, ``(start, end) -> [Hkv, end - start, L]``, which
    :func:`prefill_attention` calls a query tile at a time: the whole mask of an 8K-token chunk
    over 32K rows asked torch for 32 GiB on the H200 (h200-eviction-13)."""
    keep = (scores >= threshold)[:, None, :]  # [H, 1, L]
    window_start = lengths[:, None] - q_len - window  # [H, 1]: query i sees every row from window_start + i
    columns = torch.arange(scores.shape[-1], device=lengths.device)

    def tile(start: int, end: int) -> torch.Tensor:
        first = window_start + torch.arange(start, end, device=lengths.device)  # [H, n]
        return (columns >= first[:, :, None]) | keep

    return tile


def move_rows(pool: torch.Tensor, source: torch.Tensor, dest: torch.Tensor) -> None:
    """``pool[dest] = pool[source]`` as if all reads came first (sources and destinations
    may overlap: a repack of a request inside its own blocks)."""
    pool[dest] = pool[source].clone()
