"""LOOKAT rows: ``m`` PQ key codes + 16/8/4-bit values per (token, KV head), in the
layout of :class:`~vllm_kvcompress.kernels.ops.LookatLayout`; attention through
the kernels' ops (ADC lookup tables)."""

from __future__ import annotations

import torch

from vllm_kvcompress.kernels import ops

_LOADED: dict[str, tuple] = {}


def _codebooks(path: str, hf_config) -> tuple:
    """Loaded once per process (every layer's impl shares them); checked against the model."""
    if path not in _LOADED:
        from vllm_kvcompress.methods.lookat.codebooks import load_codebooks

        _LOADED[path] = load_codebooks(path, hf_config)
    return _LOADED[path]


def codebook_metadata(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}


class LookatFormat:
    """Keys as ``m`` PQ codes (``lookat_ref`` layout). ``exact_current``: the step's own
    tokens are attended with their exact keys/values instead of being read back."""

    def __init__(self, codebooks: list[torch.Tensor], dims: torch.Tensor | None, layout: ops.LookatLayout,
                 exact_current: bool):
        self.codebooks, self.dims, self.layout, self.exact_current = codebooks, dims, layout, exact_current
        self.codebooks_bf16: list[torch.Tensor] | None = None

    @staticmethod
    def layout_for(settings, head_dim: int, dtype: torch.dtype) -> ops.LookatLayout:
        m = int(codebook_metadata(settings.codebooks)["m"])
        value_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        return ops.LookatLayout(head_dim=head_dim, m=m, value_bits=settings.value_bits, value_dtype=value_dtype)

    @classmethod
    def from_settings(cls, settings, hf_config, head_dim: int, dtype: torch.dtype,
                      heads: list[int] | None = None) -> "LookatFormat":
        """``heads``: the KV heads this rank holds (tensor parallelism); None = all."""
        codebooks, _, dims = _codebooks(settings.codebooks, hf_config)
        if heads is not None:
            codebooks = [layer[heads] for layer in codebooks]
        return cls(codebooks, dims, cls.layout_for(settings, head_dim, dtype), settings.current_tokens == "exact")

    def to(self, device: torch.device) -> None:
        """Codebooks load on the CPU; they move to the cache's device once, before any
        step (a host-to-device copy cannot sit inside a captured CUDA graph). The kernels
        score with a bf16 copy, made here once rather than per layer and step."""
        if self.codebooks[0].device != device:
            self.codebooks = [c.to(device) for c in self.codebooks]
            self.dims = None if self.dims is None else self.dims.to(device)
        if self.codebooks_bf16 is None or self.codebooks_bf16[0].device != device:
            self.codebooks_bf16 = [c.to(torch.bfloat16).contiguous() for c in self.codebooks]

    def keys(self, layer: int, cache, blocks, length: int):
        """Keys ``[H, length, D]`` rebuilt from the codes (what attention scores against)."""
        self.to(cache.device)
        return ops.lookat_keys(cache, blocks, length, self.codebooks[layer], self.dims, self.layout)

    def write(self, layer: int, cache, key, value, slots, positions=None) -> None:
        self.to(cache.device)
        rows = ops.lookat_encode_rows(key, value, self.codebooks[layer], self.dims, self.layout)
        ops.lookat_write_rows(cache, rows, slots)

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
