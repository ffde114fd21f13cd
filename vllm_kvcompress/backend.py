"""The ``KVCOMPRESS`` attention backend: vLLM's V1 interfaces around the plugin's ops.

Thin glue only. The metadata builder plans each step once (FlashInfer's plan/run
split: decode/prefill split, per-request KV lengths and block lists), and the impl
writes K/V into the plugin's own page layout and runs the PyTorch ops from
``vllm_kvcompress.kernels`` for every layer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from vllm.config import VllmConfig, get_current_vllm_config_or_none
from vllm.logger import init_logger
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from vllm_kvcompress import BACKEND_NAME
from vllm_kvcompress.cache_formats import DenseFormat, LookatFormat
from vllm_kvcompress.config import EVICTION_METHODS, STREAM_METHODS, KVCompressConfig


# Under the "vllm" logger tree, so records get vLLM's handlers and process prefixes.
logger = init_logger("vllm.kvcompress.backend")

# The worker's config, remembered when the model's attention layers are built:
# vLLM asks ``customize_spec`` (a classmethod) for page sizes later, sometimes outside
# ``set_current_vllm_config``.
_worker_config: VllmConfig | None = None


def _vllm_config() -> VllmConfig:
    config = get_current_vllm_config_or_none() or _worker_config
    if config is None:
        raise RuntimeError("kvcompress: no vLLM config in this process")
    return config


def _settings() -> KVCompressConfig:
    return KVCompressConfig.from_additional_config(_vllm_config().additional_config)


class KVCompressBackend(AttentionBackend):
    # We write K/V ourselves inside forward(): the page layout is ours, and later
    # methods write to physical slots that differ from vLLM's logical slot mapping.
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.bfloat16, torch.float16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "bfloat16", "float16"]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type["KVCompressImpl"]:
        return KVCompressImpl

    @staticmethod
    def get_builder_cls() -> type["KVCompressMetadataBuilder"]:
        return KVCompressMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # One page per (block, KV head): [block_size, 2 * head_dim] rows of [key | value].
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        # The real bytes per (token, KV head) row, so vLLM's pool holds that many more
        # tokens. Method "none" stores the dense cache: vLLM's own page size is exact.
        config = _settings()
        if config.method != "lookat":
            return spec
        layout = LookatFormat.layout_for(config, spec.head_size, spec.dtype)
        return replace(spec, dtype=torch.uint8, state_content_bytes=layout.row_bytes)


@dataclass
class PrefillSpan:
    """One request with more than one new token (prompt or prompt chunk)."""

    token_start: int
    token_end: int
    kv_len: int
    blocks: torch.Tensor


@dataclass
class KVCompressMetadata:
    num_actual_tokens: int
    slot_mapping: torch.Tensor  # [T] cache slot of each new token (method none: vLLM's own)
    decode_token_index: torch.Tensor  # [D] token position of each single-token request
    decode_block_table: torch.Tensor  # [D, max_blocks]
    decode_kv_lens: torch.Tensor  # [D]
    prefills: list[PrefillSpan]
    eviction: object | None = None  # eviction_attention.EvictionPlan when rows are physical


class KVCompressMetadataBuilder(AttentionMetadataBuilder[KVCompressMetadata]):
    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        config = KVCompressConfig.from_additional_config(vllm_config.additional_config)
        self.evicts = config.method in EVICTION_METHODS
        self.compact = config.eviction_mode == "compact"
        self.streams = config.method in STREAM_METHODS
        self.page_tokens = config.page_tokens
        self.num_layers = vllm_config.model_config.hf_text_config.num_hidden_layers
        logger.info(
            "kvcompress attention active: method=%s, %d layers, block_size=%d, page %d bytes",
            config.method, len(layer_names), kv_cache_spec.block_size, kv_cache_spec.page_size_bytes,
        )

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False) -> KVCompressMetadata:
        m = common_attn_metadata
        num_reqs = m.num_reqs
        if self.streams:  # per-(layer, KV head) page lists (HeadKV, KVzap)
            from vllm_kvcompress import step_plan, stream_attention
            from vllm_kvcompress.eviction.streams import PoolGeometry

            geometry = PoolGeometry(self.num_layers, step_plan.num_blocks or 0, self.kv_cache_spec.num_kv_heads,
                                    self.kv_cache_spec.block_size, self.page_tokens)
            planned = stream_attention.build(m, num_reqs, geometry)
            if planned is not None:
                return planned
        starts = m.query_start_loc_cpu[: num_reqs + 1].tolist()
        kv_lens, slots, plan = m.seq_lens[:num_reqs].to("cpu"), m.slot_mapping[: m.num_actual_tokens], None
        if self.evicts:  # rows are physical: fewer than the logical lengths once compacted
            from vllm_kvcompress.eviction_attention import physical_layout

            physical = physical_layout(m, num_reqs, self.kv_cache_spec.block_size, self.compact)
            if physical is not None:
                kv_lens, slots, plan = physical
        block_table = m.block_table_tensor[:num_reqs]
        decode_rows, prefills = [], []
        for row in range(num_reqs):
            q_len = starts[row + 1] - starts[row]
            if q_len == 1:
                decode_rows.append(row)
            elif q_len > 1:
                prefills.append(PrefillSpan(starts[row], starts[row + 1], int(kv_lens[row]), block_table[row]))
        rows = torch.tensor(decode_rows, dtype=torch.long)
        return KVCompressMetadata(
            num_actual_tokens=m.num_actual_tokens,
            slot_mapping=slots,
            decode_token_index=m.query_start_loc_cpu[rows].to(torch.long),
            decode_block_table=block_table[rows],
            decode_kv_lens=kv_lens[rows],
            prefills=prefills,
            eviction=plan,
        )


class KVCompressImpl(AttentionImpl[KVCompressMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
        **extra,
    ) -> None:
        refused = {
            "ALiBi": alibi_slopes is not None,
            "sliding window": sliding_window is not None,
            "logit soft-capping": bool(logits_soft_cap),
            "attention sinks": sinks is not None,
            "KV sharing across layers": kv_sharing_target_layer_name is not None,
            f"attention type {attn_type}": attn_type != AttentionType.DECODER,
        }
        unsupported = [name for name, present in refused.items() if present]
        if unsupported:
            raise NotImplementedError(f"kvcompress does not support {', '.join(unsupported)} yet")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        global _worker_config
        _worker_config = _vllm_config()
        config = KVCompressConfig.from_additional_config(_worker_config.additional_config)
        model_dtype = _worker_config.model_config.dtype
        if config.method == "lookat":
            from vllm_kvcompress.parallel import local_kv_heads

            hf = _worker_config.model_config.hf_config
            heads = local_kv_heads(_worker_config.model_config.get_total_num_kv_heads())
            self.format = LookatFormat.from_config(config, hf, head_size, model_dtype, heads)
        else:
            self.format = DenseFormat(head_size, model_dtype)
        self.evictor = self.stream_runner = None
        self.settings = config
        # headkv/kvzap get a StreamRunner in forward(), once the layer index is known.
        if config.method in EVICTION_METHODS and config.method not in STREAM_METHODS:
            from vllm_kvcompress.eviction_attention import Evictor

            self.evictor = Evictor(config)
        self.layer_index: int | None = None

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: KVCompressMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("kvcompress does not support fused output quantization")
        if attn_metadata is None:  # profiling / warm-up run
            return output
        if self.layer_index is None:
            from vllm.model_executor.models.utils import extract_layer_index

            self.layer_index = extract_layer_index(layer.layer_name)
        fmt, index, meta = self.format, self.layer_index, attn_metadata
        n = meta.num_actual_tokens
        query = query[:n].view(n, self.num_heads, self.head_size)
        key = key[:n].view(n, self.num_kv_heads, self.head_size)
        value = value[:n].view(n, self.num_kv_heads, -1)
        out = output[:n].view(n, self.num_heads, self.head_size)
        if type(meta).__name__ == "StreamMetadata":
            if self.stream_runner is None:
                from vllm_kvcompress.stream_attention import StreamRunner

                self.stream_runner = StreamRunner(self.settings, index, meta.geometry.num_layers)
            self.stream_runner.forward(query, key, value, kv_cache, meta, out, self.scale)
            return output
        fmt.write(index, kv_cache, key, value, meta.slot_mapping)
        evictor, plan = self.evictor, meta.eviction
        if meta.decode_token_index.numel():
            idx = meta.decode_token_index
            visible = None if plan is None else evictor.decode_visible(plan.decode_req_ids, index, meta.decode_kv_lens,
                                                                      self.num_kv_heads)
            result = fmt.decode(index, query[idx], kv_cache, meta.decode_block_table, meta.decode_kv_lens, self.scale,
                                current=(key[idx], value[idx]), visible=visible)
            out[idx] = result.to(out.dtype)
        for i, span in enumerate(meta.prefills):
            rows = slice(span.token_start, span.token_end)
            visible = None if plan is None else evictor.prefill_visible(plan.prefill_req_ids[i], index, span.kv_len,
                                                                       self.num_kv_heads)
            result = fmt.prefill(index, query[rows], kv_cache, span.blocks, span.kv_len, self.scale,
                                 current=(key[rows], value[rows]), visible=visible)
            out[rows] = result.to(out.dtype)
        if plan is not None and plan.compactions:  # after this step's attention: the new tokens were seen
            evictor.run(index, kv_cache, fmt, plan, query)
        return output
