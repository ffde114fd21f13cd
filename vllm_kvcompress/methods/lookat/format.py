"""LOOKAT rows: ``m`` PQ key codes + 16/8/4-bit values per (token, KV head), in the
layout of :class:`~vllm_kvcompress.kernels.ops.LookatLayout`; attention through
the kernels' ops (ADC lookup tables)."""

from __future__ import annotations

import torch

from vllm_kvcompress.kernels import ops

_LOADED: dict[str, tuple] = {}
# Every layer's attention impl builds a format over all layers' codebooks: one copy per
# (file, KV heads, device) in the process, not one per layer (32 MiB x 32 layers at 8B, m=16).
_SHARED: dict[tuple, tuple] = {}


def _codebooks(path: str, hf_config) -> tuple:
    """Loaded once per process (every layer's impl shares them); checked against the model."""
    if path not in _LOADED:
        from vllm_kvcompress.methods.lookat.codebooks import load_codebooks

        _LOADED[path] = load_codebooks(path, hf_config)
    return _LOADED[path]


def _bf16_values(codebooks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Centroids hold bf16 values on every device and path: the Triton kernel rebuilds keys
    on tensor cores in bf16, and the PyTorch ops must score the same centroids for the GPU
    oracle (Triton against PyTorch) to test the kernel rather than a rounding."""
    return [c.to(torch.bfloat16).float() for c in codebooks]


def codebook_metadata(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}


class LookatFormat:
    """Keys as ``m`` PQ codes (``lookat_ref`` layout). ``exact_current``: the step's own
    tokens are attended with their exact keys/values instead of being read back.
    ``share_key``: codebooks already rounded, shared by every layer's format in the process."""

    def __init__(self, codebooks: list[torch.Tensor], dims: torch.Tensor | None, layout: ops.LookatLayout,
                 exact_current: bool, share_key: tuple | None = None):
        self.codebooks = codebooks if share_key else _bf16_values(codebooks)
        self.dims, self.layout, self.exact_current, self.share_key = dims, layout, exact_current, share_key
        self.codebooks_bf16: list[torch.Tensor] | None = None
        self.centroid_norms: list[torch.Tensor] | None = None  # per layer [H, m, K], squared

    @staticmethod
    def layout_for(settings, head_dim: int, dtype: torch.dtype) -> ops.LookatLayout:
        m = int(codebook_metadata(settings.codebooks)["m"])
        value_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        return ops.LookatLayout(head_dim=head_dim, m=m, value_bits=settings.value_bits, value_dtype=value_dtype)

    @classmethod
    def from_settings(cls, settings, hf_config, head_dim: int, dtype: torch.dtype,
                      heads: list[int] | None = None) -> "LookatFormat":
        """``heads``: the KV heads this rank holds (tensor parallelism); None = all."""
        key = (settings.codebooks, None if heads is None else tuple(heads))
        if key not in _SHARED:
            codebooks, _, dims = _codebooks(settings.codebooks, hf_config)
            if heads is not None:
                codebooks = [layer[heads] for layer in codebooks]
            _SHARED[key] = (_bf16_values(codebooks), dims)
        codebooks, dims = _SHARED[key]
        return cls(codebooks, dims, cls.layout_for(settings, head_dim, dtype), settings.current_tokens == "exact",
                   share_key=key)

    def to(self, device: torch.device) -> None:
        """Codebooks load on the CPU; they move to the cache's device once, before any
        step (a host-to-device copy cannot sit inside a captured CUDA graph). The kernels
        score with a bf16 copy, made here once rather than per layer and step."""
        if self.codebooks_bf16 is not None and self.codebooks_bf16[0].device == device:
            return

        def moved():
            codebooks = [c.to(device) for c in self.codebooks]
            dims = None if self.dims is None else self.dims.to(device)
            return (codebooks, dims, [c.to(torch.bfloat16).contiguous() for c in codebooks],
                    [ops.lookat_centroid_square_norms(c) for c in codebooks])

        if self.share_key is None:
            self.codebooks, self.dims, self.codebooks_bf16, self.centroid_norms = moved()
            return
        key = (*self.share_key, str(torch.device(device)))
        if key not in _SHARED:
            _SHARED[key] = moved()
        self.codebooks, self.dims, self.codebooks_bf16, self.centroid_norms = _SHARED[key]

    def keys(self, layer: int, cache, blocks, length: int):
        """Keys ``[H, length, D]`` rebuilt from the codes (what attention scores against)."""
        self.to(cache.device)
        return ops.lookat_keys(cache, blocks, length, self.codebooks[layer], self.dims, self.layout)

    def keys_batch(self, layer: int, cache, block_table, length: int):
        """Keys ``[R, H, length, D]`` of ``R`` requests, rebuilt from the codes."""
        self.to(cache.device)
        return ops.lookat_keys_batch(cache, block_table, length, self.codebooks[layer], self.dims, self.layout)

    def key_norms(self, caches: list, block_table, length: int, layers: list[int]):
        """Norms ``[L, R, H, length]`` of the coded keys in the caches of ``layers``: read
        from the codes and each centroid's norm, equal to those of :meth:`keys_batch`."""
        self.to(caches[0].device)
        return ops.lookat_key_norms(caches, block_table, length, [self.centroid_norms[i] for i in layers],
                                    self.layout)

    def write(self, layer: int, cache, key, value, slots, positions=None) -> None:
        self.to(cache.device)
        ops.lookat_write(cache, key, value, slots, self.codebooks[layer], self.dims, self.layout)

    def decode(self, layer: int, query, cache, block_table, kv_lens, scale, current=None, visible=None,
               max_kv_len=None):
        if visible is not None:
            raise NotImplementedError("LOOKAT rows with masked eviction")
        self.to(cache.device)
        return ops.lookat_decode(query, cache, block_table, kv_lens, self.codebooks[layer], self.dims, self.layout,
                                 scale, current if self.exact_current else None, max_kv_len,
                                 self.codebooks_bf16[layer])

    def prefill(self, layer: int, query, cache, blocks, kv_len, scale, current=None, visible=None):
        if visible is not None:
            raise NotImplementedError("LOOKAT rows with masked eviction")
        self.to(cache.device)
        return ops.lookat_prefill(query, cache, blocks, kv_len, self.codebooks[layer], self.dims,
                                  self.layout, scale, current if self.exact_current else None)
