"""Triton decode over per-(request, KV head) page lists (HeadKV streams).

A stream is exactly a one-head paged sequence: viewing each (request, KV head) as its
own "request" with one KV head and its GQA group of queries, the pool as pages of one
head (``[pages, 1, page, 2D]``) and the stream page lists as block tables, the dense
paged decode kernel (:mod:`dense_triton`: online softmax, flash-decoding split) runs
unchanged. So a head with a small budget costs only its own pages, read and computed.
Reference: :func:`stream_attention_ref.decode_attention`.
"""

from __future__ import annotations

import torch

from vllm_kvcompress.kernels.dense_triton import DEFAULTS, dense_decode, tile_tokens
from vllm_kvcompress.kernels.triton_common import partition


def stream_decode(query: torch.Tensor, pool: torch.Tensor, pages: torch.Tensor, lengths: torch.Tensor, page: int,
                  scale: float, *, max_kv_len: int | None = None, out_dtype: torch.dtype = torch.float32,
                  **tune) -> torch.Tensor:
    """``query[B, Hq, D]``, ``pool[rows, 2D]``, ``pages[B, Hkv, P]``, ``lengths[B, Hkv]`` -> ``[B, Hq, D]``."""
    batch, num_q_heads, head_dim = query.shape
    num_kv_heads = pages.shape[1]
    group = num_q_heads // num_kv_heads
    flat_query = query.reshape(batch * num_kv_heads, group, head_dim)
    one_head_pages = pool.view(-1, 1, page, pool.shape[-1])
    out = dense_decode(flat_query, one_head_pages, pages.reshape(batch * num_kv_heads, -1),
                       lengths.reshape(-1).to(torch.int32), scale, max_kv_len=max_kv_len, out_dtype=out_dtype, **tune)
    return out.view(batch, num_q_heads, head_dim)


def warm_up(query: torch.Tensor, pool: torch.Tensor, num_kv_heads: int, page: int, max_len: int) -> None:
    """Every variant serving can compile, for ``query[1, Hq, D]``: each split count the launch
    plan picks up to ``max_len`` (powers of two; each its own combine block), for each page
    list width Triton specialises the table's row stride on (1, a multiple of 16, other), in
    int64 (a step's plan) and int32 (the CUDA graph buffers, a multiple of 16 wide)."""
    # One (request, head): the most splits.
    most = partition(1, 1, max_len, tile_tokens(query.shape[-1]), query.device, DEFAULTS)
    lengths = torch.ones(1, num_kv_heads, dtype=torch.long, device=query.device)
    for width, dtype in ((1, torch.long), (2, torch.long), (16, torch.long), (16, torch.int32)):
        pages = torch.zeros(1, num_kv_heads, width, dtype=dtype, device=query.device)
        splits = 1
        while splits <= most:
            stream_decode(query, pool, pages, lengths, page, 1.0, max_kv_len=max_len, num_splits=splits)
            splits *= 2
