"""PyTorch reference for in-place compaction of a paged cache, and for the key norms
knorm scores rows with.

``cache[num_blocks, num_kv_heads, block_size, C]`` (any row format: dense ``[k | v]``
or LOOKAT's coded rows; a row is moved whole). For one request with block list
``blocks`` and per-head kept row indices ``keep[H, B]`` (ascending), row ``j`` of head
``h`` receives old row ``keep[h, j]``. Rows past ``B`` are left as they were: the
caller frees or overwrites them.
"""

from __future__ import annotations

import torch

from vllm_kvcompress.kernels.paged_dense_ref import gather_rows


def row_slots(blocks: torch.Tensor, rows: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(block id, offset) of logical-row indices ``rows`` (any shape) in a block list."""
    return blocks[torch.div(rows, block_size, rounding_mode="floor")], rows % block_size


def compact(cache: torch.Tensor, blocks: torch.Tensor, keep: torch.Tensor) -> None:
    heads, budget = keep.shape
    block_size = cache.shape[2]
    head = torch.arange(heads).unsqueeze(1).expand(heads, budget)
    src_block, src_off = row_slots(blocks, keep, block_size)
    rows = cache[src_block, head, src_off].clone()  # read everything before writing
    dst_block, dst_off = row_slots(blocks, torch.arange(budget).expand(heads, budget), block_size)
    cache[dst_block, head, dst_off] = rows


def compact_batch(cache: torch.Tensor, block_table: torch.Tensor, keep: torch.Tensor, keep_lens: torch.Tensor) -> None:
    """Several requests: ``block_table[R, max_blocks]``, ``keep[R, H, max_keep]`` padded,
    ``keep_lens[R]`` rows kept per request."""
    for r in range(block_table.shape[0]):
        n = int(keep_lens[r])
        compact(cache, block_table[r], keep[r, :, :n])


def same_layers(caches: list[torch.Tensor]) -> bool:
    """Whether one launch can address every layer from the first one's cache: contiguous
    caches of one shape, dtype and device."""
    first = caches[0]
    return all(c.shape == first.shape and c.dtype == first.dtype and c.device == first.device
               and c.is_contiguous() for c in caches)


def compact_layers(caches: list[torch.Tensor], block_table: torch.Tensor, keep: torch.Tensor,
                   keep_lens: torch.Tensor) -> None:
    """:func:`compact_batch` in every layer: ``keep[L, R, H, max_keep]``, one block table."""
    for cache, layer_keep in zip(caches, keep, strict=True):
        compact_batch(cache, block_table, layer_keep, keep_lens)


def key_norms(caches: list[torch.Tensor], block_table: torch.Tensor, length: int) -> torch.Tensor:
    """L2 norms ``[L, R, H, length]`` (fp32) of the keys of dense ``[key | value]`` rows:
    the first ``length`` rows of each request of ``block_table[R, max_blocks]`` in each layer."""
    head_dim = caches[0].shape[-1] // 2
    return torch.stack([torch.linalg.vector_norm(gather_rows(cache, block_table, length)[..., :head_dim].float(), dim=-1)
                        for cache in caches])
