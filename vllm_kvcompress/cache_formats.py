"""What one cache row holds and how attention reads it: one small class per format,
over plain tensors (no vLLM imports), so the backend only dispatches.

* :class:`DenseFormat`: bf16/fp16 ``[key | value]`` rows (method ``none``).
* :class:`LookatFormat`: PQ key codes + 16/8/4-bit values (method ``lookat``).
"""

from __future__ import annotations

import torch

from vllm_kvcompress.config import KVCompressConfig
from vllm_kvcompress.kernels import lookat_ref
from vllm_kvcompress.kernels import paged_dense_ref as dense


class DenseFormat:
    def __init__(self, head_dim: int, dtype: torch.dtype):
        self.head_dim, self.dtype = head_dim, dtype

    def row_bytes(self) -> int | None:
        return None  # vLLM's own page size is exact

    def write(self, layer: int, cache, key, value, slots) -> None:
        dense.write_kv(cache, key, value, slots)

    def decode(self, layer: int, query, cache, block_table, kv_lens, scale, current=None, visible=None):
        return dense.decode_attention(query, cache, block_table, kv_lens, scale, visible)

    def prefill(self, layer: int, query, cache, blocks, kv_len, scale, current=None, visible=None):
        return dense.prefill_attention(query, cache, blocks, kv_len, scale, visible)

    def keys(self, layer: int, cache, blocks, length: int):
        """Cached keys ``[H, length, D]`` of one request, for eviction scores."""
        return dense.gather_kv(cache, blocks, length)[0]


_LOADED: dict[str, tuple] = {}


def _codebooks(path: str, hf_config) -> tuple:
    """Loaded once per process (every layer's impl shares them); checked against the model."""
    if path not in _LOADED:
        from vllm_kvcompress.calibrate import load_codebooks

        _LOADED[path] = load_codebooks(path, hf_config)
    return _LOADED[path]


def codebook_metadata(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}


class LookatFormat:
    """Keys as ``m`` PQ codes (``lookat_ref`` layout). ``exact_current``: the step's own
    tokens are attended with their exact keys/values instead of being read back."""

    def __init__(self, codebooks: list[torch.Tensor], dims: torch.Tensor | None, layout: lookat_ref.LookatLayout,
                 exact_current: bool):
        self.codebooks, self.dims, self.layout, self.exact_current = codebooks, dims, layout, exact_current

    @staticmethod
    def layout_for(config: KVCompressConfig, head_dim: int, dtype: torch.dtype) -> lookat_ref.LookatLayout:
        m = int(codebook_metadata(config.codebooks)["m"])
        value_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        return lookat_ref.LookatLayout(head_dim=head_dim, m=m, value_bits=config.value_bits, value_dtype=value_dtype)

    @classmethod
    def from_config(cls, config: KVCompressConfig, hf_config, head_dim: int, dtype: torch.dtype,
                    heads: list[int] | None = None) -> "LookatFormat":
        """``heads``: the KV heads this rank holds (tensor parallelism); None = all."""
        codebooks, _, dims = _codebooks(config.codebooks, hf_config)
        if heads is not None:
            codebooks = [layer[heads] for layer in codebooks]
        return cls(codebooks, dims, cls.layout_for(config, head_dim, dtype), config.current_tokens == "exact")

    def row_bytes(self) -> int:
        return self.layout.row_bytes

    def keys(self, layer: int, cache, blocks, length: int):
        """Keys ``[H, length, D]`` rebuilt from the codes (what attention scores against)."""
        codes, _ = lookat_ref.split_rows(lookat_ref.gather_rows(cache, blocks[None], length)[0], self.layout)
        return lookat_ref.rebuilt_keys(codes, self.codebooks[layer], self.dims)

    def write(self, layer: int, cache, key, value, slots) -> None:
        rows = lookat_ref.encode_rows(key, value, self.codebooks[layer], self.dims, self.layout)
        lookat_ref.write_rows(cache, rows, slots)

    def decode(self, layer: int, query, cache, block_table, kv_lens, scale, current=None, visible=None):
        if visible is not None:
            raise NotImplementedError("LOOKAT rows with masked eviction")
        return lookat_ref.decode_attention(query, cache, block_table, kv_lens, self.codebooks[layer], self.dims,
                                           self.layout, scale, current if self.exact_current else None)

    def prefill(self, layer: int, query, cache, blocks, kv_len, scale, current=None, visible=None):
        if visible is not None:
            raise NotImplementedError("LOOKAT rows with masked eviction")
        return lookat_ref.prefill_attention(query, cache, blocks, kv_len, self.codebooks[layer], self.dims,
                                            self.layout, scale, current if self.exact_current else None)
