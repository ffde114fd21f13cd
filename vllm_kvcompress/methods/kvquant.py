"""Method ``kvquant``: keys stored as static per-channel integers taken before RoPE, with one
range per (layer, KV head, channel) calibrated offline, as KVQuant does (Hooper et al.,
2024, without its non-uniform levels and outlier split); values at 16, 8 or 4 bits as
LOOKAT's. Every token is kept; the page is smaller (``kernels/kvquant_ref.py`` has the row
layout and why the keys are quantized before RoPE).

Range files: safetensors with one ``layer.N`` tensor ``[kv_heads, 2, head_dim]`` (minimum,
maximum of the pre-RoPE keys) per layer, and the model's signature in the metadata; made by
``python -m vllm_kvcompress.offline.key_ranges`` (shipped for the project's models in
``artefacts/key_ranges/``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_kvcompress.kernels import ops
from vllm_kvcompress.kernels.kvquant_ref import KEY_BITS, layout as row_layout
from vllm_kvcompress.methods.base import (KVCompressConfigError, Method, Settings, check_choice, check_path, key_name,
                                          setting)
from vllm_kvcompress.methods.lookat import VALUE_BITS
from vllm_kvcompress.methods.artefacts import check_artefact, rope_theta

RANGES_FORMAT = "kvcompress-key-ranges/1"
SHIPPED = Path(__file__).resolve().parent.parent / "artefacts" / "key_ranges"


@dataclass(frozen=True)
class KVQuantSettings(Settings):
    key_ranges: str | None = setting(
        None, "KVQuant: per-channel ranges of the pre-RoPE keys, from `python -m vllm_kvcompress.offline.key_ranges` "
              "(required for `kvquant`; shipped for smollm2-135m and qwen2.5-coder-0.5b in artefacts/key_ranges).")
    key_bits: int = setting(8, "KVQuant: bits per key channel, 8 or 4.")
    value_bits: int = setting(
        8, "KVQuant: value storage, 16 (model's bf16/fp16), 8 (int8) or 4 (int4), per-token per-head scales.")

    def validate(self) -> None:
        check_path("key_ranges", self.key_ranges, "kvquant",
                   "a file made by `python -m vllm_kvcompress.offline.key_ranges --model MODEL --out FILE`")
        check_choice("key_bits", self.key_bits, KEY_BITS)
        check_choice("value_bits", self.value_bits, VALUE_BITS)


def plain_rope_theta(hf_config) -> tuple[float, str | None]:
    """(RoPE base, None), or (0, why not) for a model whose keys are not turned by plain
    full-width RoPE (scaled, partial, or none), which this cache cannot undo."""
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default"))
    partial = float(getattr(hf_config, "partial_rotary_factor", 1.0) or 1.0)
    theta = rope_theta(hf_config)
    if kind != "default" or partial != 1.0 or theta <= 0:
        return 0.0, f"rope_type {kind!r}, partial_rotary_factor {partial}, rope_theta {theta}"
    return theta, None


def check_ranges_file(path: str, hf_config) -> dict:
    return check_artefact(path, hf_config, RANGES_FORMAT, "key-range file", "python -m vllm_kvcompress.offline.key_ranges",
                          lambda message: KVCompressConfigError(f"{key_name('key_ranges')}: {message}"))


class KVQuantFormat:
    """Rows of pre-RoPE integer keys and 16/8/4-bit values; every token kept (no ``visible``)."""

    def __init__(self, ranges: list[torch.Tensor], key_bits: int, theta: float, layout):
        self.ranges, self.key_bits, self.theta, self.layout = ranges, key_bits, theta, layout

    def to(self, device: torch.device) -> None:
        if self.ranges[0].device != device:
            self.ranges = [r.to(device) for r in self.ranges]

    def warm_up(self, device: torch.device, num_q_heads: int, block_size: int, scale: float) -> None:
        ops.warm_up_kvquant(device, num_q_heads, block_size, self.ranges[0], self.key_bits, self.theta, self.layout,
                            scale)

    def write(self, layer: int, cache, key, value, slots, positions=None) -> None:
        rows = ops.kvquant_encode_rows(key, value, positions, self.ranges[layer], self.key_bits, self.theta,
                                       self.layout)
        ops.lookat_write_rows(cache, rows, slots)

    def decode(self, layer: int, query, cache, block_table, kv_lens, scale, current=None, visible=None,
               max_kv_len=None):
        return ops.kvquant_decode(query, cache, block_table, kv_lens, self.ranges[layer], self.key_bits, self.theta,
                                  self.layout, scale, max_kv_len)

    def prefill(self, layer: int, query, cache, blocks, kv_len, scale, current=None, visible=None):
        return ops.kvquant_prefill(query, cache, blocks, kv_len, self.ranges[layer], self.key_bits, self.theta,
                                   self.layout, scale)

    def encode(self, layer: int, key, value, positions):
        """Rows ``[T, Hkv, row_bytes]`` of the step's keys/values at their logical ``positions[T]``
        (the per-(layer, KV head) streams write them where their plan says)."""
        return ops.kvquant_encode_rows(key, value, positions, self.ranges[layer], self.key_bits, self.theta,
                                       self.layout)

    def stream_decoder(self, layer: int):
        """How a stream attention reads this layer's gathered rows: ``[..., Hkv, L, row_bytes]``
        -> ``[..., Hkv, L, 2D]`` ``[key | value]`` (keys at their stored positions)."""
        ranges, key_bits, theta, layout = self.ranges[layer], self.key_bits, self.theta, self.layout
        return lambda data: ops.kvquant_stream_rows(data, ranges, key_bits, theta, layout)

    def keys(self, layer: int, cache, blocks, length: int):
        return ops.kvquant_keys(cache, blocks, length, self.ranges[layer], self.key_bits, self.theta, self.layout)

    def keys_batch(self, layer: int, cache, block_table, length: int):
        """Keys ``[R, H, length, D]`` of ``R`` requests (one reference read each: CPU only)."""
        return torch.stack([self.keys(layer, cache, blocks, length) for blocks in block_table])


class KVQuant(Method):
    name = "kvquant"
    Settings = KVQuantSettings
    needs_positions = True
    # Rows carry their logical position (4 bytes): set when an eviction method compacts them.
    stores_positions = False
    summary = ("stores keys as static per-channel 8/4-bit integers taken before RoPE (KVQuant-style, calibrated "
               "ranges) and values at 16/8/4 bits")

    def cuda_refusal(self) -> str | None:
        return ("method 'kvquant' has not run on a GPU yet (its Triton decode is new and unchecked there); it runs "
                "on the CPU build")

    def check_model(self, shape, hf_config, block_size, tp_size) -> None:
        _, why = plain_rope_theta(hf_config)
        if why:
            raise KVCompressConfigError(f"method 'kvquant' needs plain RoPE to store keys before it; this model has {why}")
        check_ranges_file(self.settings.key_ranges, hf_config)

    def row_bytes(self, head_dim: int, dtype) -> int:
        return self._layout(head_dim, dtype).row_bytes

    def _layout(self, head_dim: int, dtype):
        value_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        return row_layout(head_dim, self.settings.key_bits, self.settings.value_bits, value_dtype,
                          positions=self.stores_positions)

    def cache_format(self, hf_config, head_dim, dtype, heads):
        from safetensors import safe_open

        metadata = check_ranges_file(self.settings.key_ranges, hf_config)
        with safe_open(self.settings.key_ranges, framework="pt") as f:
            ranges = [f.get_tensor(f"layer.{i}").float() for i in range(int(metadata["num_layers"]))]
        if heads is not None:
            ranges = [r[heads] for r in ranges]
        theta, _ = plain_rope_theta(hf_config)
        return KVQuantFormat(ranges, self.settings.key_bits, theta, self._layout(head_dim, dtype))
