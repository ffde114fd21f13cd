"""The CPU twins of :func:`kvquant_ref.decode_attention` and :func:`kvquant_ref.encode_rows`:
the same arithmetic, compiled by ``torch.compile`` (Inductor's C++ backend, the compiler
vLLM's CPU build already uses). The ops seam (``kernels/ops.py``) runs them on CPU tensors.

Why: eager, the decode makes about eight passes over every kept key per layer and step
(unpack, dequantize, look up cos/sin, four products, concatenate), each writing an fp32
temporary, and the one-token cache write is some eighty tiny operations; the presets decoded
at ~1.4x bf16's time per token on 2 cores. Compiled, a key is rebuilt and turned in one loop,
values are read as stored (their scales applied to the attention weights, not to ``D``
values each), and the write is two small loops; the two products stay library GEMMs.

Sizes: the model's (heads, head_dim, row bytes, block size) are constants in the generated
code; the batch, blocks per request and tokens written are symbolic. Sizes of 1 are
specialised by Dynamo, so the decode has four graphs and the write two, all compiled by
:func:`warm_up` at start-up. Rows may carry positions up to :data:`rope_ref.MAX_TABLE`
(the start-up check bounds ``max_model_len`` by it)."""

from __future__ import annotations

import functools
import types

import torch

from vllm_kvcompress.kernels import kvquant_ref, rope_ref
from vllm_kvcompress.kernels.kvquant_ref import POSITION_BYTES, _key_bytes, key_base, key_codes
from vllm_kvcompress.kernels.lookat_ref import LookatLayout, quantize_values


def _core(query: torch.Tensor, pages: torch.Tensor, table: torch.Tensor, ranges: torch.Tensor, lens: torch.Tensor,
          key_bits: int, rows: LookatLayout) -> torch.Tensor:
    """``query [B, Hq, D]`` fp32 (scaled) against each request's gathered pages ``[B * blocks, Hkv,
    block_size, row_bytes]``, the first ``lens [B]`` rows valid -> ``[B, Hq, D]``. Positions
    index ``table`` (``[P, D]``) clamped to it. Every gathered row is read and the padding
    masked: a slice to the longest length would tie the graph to whether it is a whole number
    of blocks (a guard, so a second compilation)."""
    batch, num_q_heads, head_dim = query.shape
    num_blocks, num_kv_heads, block_size, width = pages.shape[1:]
    half, key_bytes = head_dim // 2, _key_bytes(head_dim, key_bits)
    data = pages.permute(0, 2, 1, 3, 4).reshape(batch, num_kv_heads, num_blocks * block_size, width)  # [B, Hkv, L, row]
    valid = (torch.arange(data.shape[2], device=pages.device) < lens[:, None])[:, None, :, None]  # [B, 1, L, 1]
    if rows.m > key_bytes:  # a stored int32 (little-endian, never negative); padding rows hold anything
        stored = data[..., key_bytes : key_bytes + POSITION_BYTES].long()
        positions = stored[..., 0] | stored[..., 1] << 8 | stored[..., 2] << 16 | stored[..., 3] << 24
        positions = positions.clamp(0, table.shape[0] - 1)
    else:
        positions = torch.arange(data.shape[2], device=pages.device).clamp(max=table.shape[0] - 1)
    base = key_base(data[..., :key_bytes], ranges, key_bits)  # the pre-RoPE keys
    cos_sin = table[positions]
    cos, sin = cos_sin[..., :half], cos_sin[..., half:]
    x1, x2 = base[..., :half], base[..., half:]
    keys = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
    q = query.view(batch, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    logits = (q @ keys.transpose(-1, -2)).masked_fill(~valid.transpose(-1, -2), float("-inf"))  # [B, Hkv, g, L]
    weights = torch.softmax(logits, -1)
    return _weighted_values(weights, data[..., rows.m :], valid[..., 0], rows).reshape(batch, num_q_heads, head_dim)


def _weighted_values(weights: torch.Tensor, data: torch.Tensor, valid: torch.Tensor, rows: LookatLayout) -> torch.Tensor:
    """``weights [B, Hkv, g, L]`` times the values stored in ``data [B, Hkv, L, value bytes]``,
    each row's scale (and offset) applied to its weight instead of to its ``D`` values. Padding
    rows (``valid [B, 1, L]`` false) may hold any bytes, NaN scales among them: masked."""
    payload, params = data[..., : rows.value_bytes], data[..., rows.value_bytes : rows.value_bytes + rows.param_bytes]
    if rows.value_bits == 16:
        values = payload.contiguous().view(rows.value_dtype).float()
        return weights @ torch.where(valid[..., None], values, 0.0)
    params = params.contiguous().view(torch.float16).float()  # [B, Hkv, L, 1 or 2]
    scale = torch.where(valid, params[..., 0], 0.0)[:, :, None, :]  # [B, Hkv, 1, L]
    if rows.value_bits == 8:
        return (weights * scale) @ payload.contiguous().view(torch.int8).float()
    codes = torch.stack([payload & 15, payload >> 4], -1).flatten(-2).float()
    low = torch.where(valid, params[..., 1], 0.0)[:, :, None, :]
    return (weights * scale) @ codes + (weights * low).sum(-1, keepdim=True)


@functools.cache
def _compiled(function, key_bits: int, rows: LookatLayout):
    """``function`` compiled for one row format. Dynamo keeps its compilations (and its limit
    of eight per function) on the code object: a copy of the code per format keeps one
    format's compilations from evicting another's (tests run many; a server one)."""
    code = function.__code__.replace(co_name=f"{function.__name__}_k{key_bits}_{rows.row_bytes}b")
    core = types.FunctionType(code, function.__globals__, code.co_name, function.__defaults__, function.__closure__)
    # emulate_precision_casts: fp16 scales rounded where the reference rounds them (same bytes).
    return torch.compile(core, dynamic=False, fullgraph=True, options={"emulate_precision_casts": True})


def fits(query: torch.Tensor, cache: torch.Tensor, max_len: int) -> bool:
    """Whether the compiled core takes the call: CPU tensors and at least two rows (a length
    of 1 would be specialised into a second compilation; the reference serves it)."""
    return query.device.type == "cpu" and cache.device.type == "cpu" and max_len >= 2


def decode_attention(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, kv_lens: torch.Tensor,
                     ranges: torch.Tensor, key_bits: int, theta: float, rows: LookatLayout, scale: float,
                     max_kv_len: int | None = None) -> torch.Tensor:
    """Same as :func:`kvquant_ref.decode_attention`: ``[B, Hq, D]`` fp32, for positions below
    :data:`rope_ref.MAX_TABLE` (start-up bounds ``max_model_len`` by it; rows without stored
    positions past it are left to the reference)."""
    batch, _, head_dim = query.shape
    max_len = int(kv_lens.max()) if max_kv_len is None else int(max_kv_len)
    stores_positions = rows.m > _key_bytes(head_dim, key_bits)
    if not stores_positions and max_len > rope_ref.MAX_TABLE:
        return kvquant_ref.decode_attention(query, cache, block_table, kv_lens, ranges, key_bits, theta, rows, scale,
                                            max_len)
    num_blocks = -(-max_len // cache.shape[2])
    # The whole table whatever the rows hold: one table tensor for every graph (a table grown
    # later would be another input shape, so another compilation).
    table = rope_ref.table(theta, head_dim, cache.device, rope_ref.MAX_TABLE)
    # Fresh tensors in (no views): the compiled graph's guards then hold for every length and batch.
    pages = cache.index_select(0, block_table[:batch, :num_blocks].flatten()).view(batch, num_blocks, *cache.shape[1:])
    lens = kv_lens[:batch].to(torch.long, copy=True)
    query = query.float() * scale
    # Batch and blocks are the only symbolic sizes (the model's stay constants Inductor folds into
    # the index arithmetic); a size of 1 is specialised, so four graphs in all (:func:`warm_up`).
    for tensor, dim in ((query, 0), (pages, 0), (pages, 1), (lens, 0)):
        if tensor.shape[dim] > 1:
            torch._dynamo.mark_dynamic(tensor, dim)
    return _compiled(_core, key_bits, rows)(query, pages, table, ranges, lens, key_bits, rows)


def _encode(key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor, table: torch.Tensor,
            ranges: torch.Tensor, key_bits: int, rows: LookatLayout) -> torch.Tensor:
    """:func:`kvquant_ref.encode_rows` with the cos/sin rows looked up in ``table`` (the
    same rows :func:`rope_ref.cos_sin` gives): the same bytes."""
    half = key.shape[-1] // 2
    cos_sin = table[positions][:, None, :]  # [T, 1, D]
    cos, sin = cos_sin[..., :half], cos_sin[..., half:]
    x1, x2 = key[..., :half], key[..., half:]
    base = torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], -1)  # turned back to position 0
    parts = [key_codes(base, ranges, key_bits)]
    if rows.m > _key_bytes(key.shape[-1], key_bits):
        stored = torch.stack([(positions >> shift) & 255 for shift in (0, 8, 16, 24)], -1).to(torch.uint8)
        parts.append(stored[:, None, :].expand(-1, key.shape[1], -1))
    return torch.cat([*parts, quantize_values(value, rows)], -1)


def encode_rows(key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor, ranges: torch.Tensor,
                key_bits: int, theta: float, rows: LookatLayout) -> torch.Tensor:
    """Same as :func:`kvquant_ref.encode_rows` (same bytes): rows ``[T, Hkv, row_bytes]``."""
    positions = positions.to(torch.long, copy=True)
    if positions.numel() == 0 or int(positions.max()) >= rope_ref.MAX_TABLE or int(positions.min()) < 0:
        return kvquant_ref.encode_rows(key, value, positions, ranges, key_bits, theta, rows)
    table = rope_ref.table(theta, key.shape[-1], key.device, rope_ref.MAX_TABLE)
    # Fresh fp32 copies (the reference computes in fp32 too): one graph whatever the model's dtype
    # and whichever view the engine passes.
    key, value = key.to(torch.float32, copy=True), value.to(torch.float32, copy=True)
    if key.shape[0] > 1:  # tokens: symbolic (one token, the decode step, has its own graph)
        for tensor in (key, value, positions):
            torch._dynamo.mark_dynamic(tensor, 0)
    return _compiled(_encode, key_bits, rows)(key, value, positions, table, ranges, key_bits, rows)


def warm_up(num_q_heads: int, block_size: int, ranges: torch.Tensor, key_bits: int, theta: float, rows: LookatLayout,
            scale: float) -> None:
    """Compile for this model's shape at start-up: the decode's four graphs (one request or
    several, one block per request or several), on scratch caches, and the cache write's two.
    The graphs are guarded on how their inputs were made: ``ranges`` is one the format holds
    (``[Hkv, 2, D]``), and the calls run under inference mode, as vLLM's steps do."""
    num_kv_heads, _, head_dim = ranges.shape
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for batch, blocks in ((1, 1), (1, 3), (3, 1), (3, 5)):
            total = batch * blocks
            key, value = (torch.randn(total * block_size, num_kv_heads, head_dim, generator=generator) * 2
                          for _ in range(2))
            encoded = kvquant_ref.encode_rows(key, value, torch.arange(total * block_size), ranges, key_bits, theta,
                                              rows)
            cache = encoded.view(total, block_size, num_kv_heads, -1).permute(0, 2, 1, 3).contiguous()
            query = torch.randn(batch, num_q_heads, head_dim, generator=generator)
            length = block_size * (blocks - 1) + min(3, block_size)
            lens = torch.tensor([length] + [max(1, length - r) for r in range(1, batch)])
            decode_attention(query, cache, torch.arange(total).view(batch, blocks), lens, ranges, key_bits, theta,
                             rows, scale)
        for tokens in (1, 3):  # the cache write: a decode step's token, a prompt's chunk
            key = torch.randn(tokens, num_kv_heads, head_dim, generator=generator)
            encode_rows(key, key, torch.arange(tokens), ranges, key_bits, theta, rows)
