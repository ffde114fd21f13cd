"""The ``KVCOMPRESS`` attention backend: vLLM's V1 interfaces around the plugin's ops.

Thin glue only. The metadata builder plans each step once (FlashInfer's plan/run
split): it classifies the batch into decode and prefill rows, and turns vLLM's
``CommonAttentionMetadata`` plus the worker's step plan into the metadata of one layout:

* :class:`KVCompressMetadata`: vLLM's own block layout (methods ``none`` and ``lookat``,
  and whole-row eviction, whose physical lengths :mod:`.dense_layout` computes);
* :class:`~vllm_kvcompress.vllm.stream_layout.StreamMetadata`: per-(layer, KV head)
  streams (HeadKV, KVzap, DMS; native, packed-budget and ring requests).

The impl dispatches on that type: it writes K/V in the method's row format and runs the
kernels' ops (:mod:`vllm_kvcompress.kernels.ops`, Triton on CUDA, PyTorch elsewhere).
"""

from __future__ import annotations

import time

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from vllm.config import VllmConfig, get_current_vllm_config_or_none
from vllm.logger import init_logger
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from vllm_kvcompress import BACKEND_NAME
from vllm_kvcompress.config import KVCompressConfig
from vllm_kvcompress.kernels import ops
from vllm_kvcompress.methods.base import PagedSettings
from vllm_kvcompress.vllm.dense_layout import DecodeBuffers, EvictionPlan, Evictor, physical_layout
from vllm_kvcompress.vllm.stream_layout import StreamMetadata, StreamRunner, pool_rows

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


def _worker_device() -> torch.device:
    from vllm.platforms import current_platform

    if current_platform.is_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _settings() -> KVCompressConfig:
    return KVCompressConfig.from_additional_config(_vllm_config().additional_config)


class KVCompressBackend(AttentionBackend):
    # We write K/V ourselves inside forward(): the page layout is ours, and eviction
    # writes to physical slots that differ from vLLM's logical slot mapping.
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
        # tokens; None: the dense cache, whose size vLLM's own page size states exactly.
        row_bytes = _settings().build().row_bytes(spec.head_size, spec.dtype)
        if row_bytes is None:
            return spec
        return replace(spec, dtype=torch.uint8, state_content_bytes=row_bytes)


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
    slot_mapping: torch.Tensor  # [T] cache slot of each new token (physical when evicting)
    decode_token_index: torch.Tensor | None  # [D] token of each single-token request; None: tokens 0..D-1
    decode_block_table: torch.Tensor  # [D, max_blocks]
    decode_kv_lens: torch.Tensor  # [D]
    prefills: list[PrefillSpan]
    max_decode_len: int = 0  # host bound on decode_kv_lens: sizes the decode launch (no read-back)
    eviction: EvictionPlan | None = None  # whole-row eviction: this step's compactions and masks
    positions: torch.Tensor | None = None  # [T] logical (RoPE) position of each new token


def classify(m: CommonAttentionMetadata) -> tuple[list[int], list[int]]:
    """(decode rows, prefill rows) of the batch, once per step. The batch keeps vLLM's
    order (no reordering: the step plan follows ``input_batch``), so rows are sorted here."""
    starts = m.query_start_loc_cpu[: m.num_reqs + 1].tolist()
    q_lens = [starts[r + 1] - starts[r] for r in range(m.num_reqs)]
    return [r for r, q in enumerate(q_lens) if q == 1], [r for r, q in enumerate(q_lens) if q > 1]


def host_seq_lens(m: CommonAttentionMetadata) -> torch.Tensor:
    """Each request's length on the host without a device read-back: vLLM's CPU bound
    (exact without speculative decoding, which start-up refuses) where the runner gives
    one (the CUDA runner's lengths live on the GPU), else ``seq_lens`` (the CPU runner's)."""
    bound = m.seq_lens_cpu_upper_bound
    if bound is not None:
        return bound[: m.num_reqs]
    return m.seq_lens[: m.num_reqs].to("cpu")


def token_positions(m: CommonAttentionMetadata, seq_lens: torch.Tensor) -> torch.Tensor:
    """The logical position of each of the step's tokens: a request's new tokens are the last
    of its ``seq_lens`` (host lengths)."""
    starts = m.query_start_loc_cpu[: m.num_reqs + 1].long()
    q_lens = starts[1:] - starts[:-1]
    offsets = torch.arange(m.num_actual_tokens) - torch.repeat_interleave(starts[:-1], q_lens, output_size=m.num_actual_tokens)
    return torch.repeat_interleave(seq_lens.long() - q_lens, q_lens, output_size=m.num_actual_tokens) + offsets


def _uniform_decode(m: CommonAttentionMetadata) -> bool:
    """A batch vLLM may run as a FULL decode graph: one token per request."""
    return m.max_query_len == 1 and m.num_actual_tokens == m.num_reqs


class KVCompressMetadataBuilder(AttentionMetadataBuilder):
    """``worker_state``: the eviction runner's :class:`~vllm_kvcompress.vllm.state.WorkerState`,
    handed over when the runner allocates the KV cache (None without eviction).

    CUDA graphs: a batch of single-token decodes (vLLM's FULL decode graphs) reads only
    persistent buffers (vLLM's block table, lengths, slot mapping; with whole-row eviction
    the builder's :class:`DecodeBuffers` of physical lengths and slots, refilled every
    step) and is sized by ``max_seq_len``, which vLLM sets to ``max_model_len`` when it
    captures, so one graph per batch size replays for any lengths. Compactions run after
    the forward (the runner), outside any graph. Per-(layer, KV head) streams (HeadKV)
    replay from :class:`~vllm_kvcompress.vllm.stream_layout.StreamDecodeBuffers`; a step
    that compresses runs eagerly (the runner forces it: the compression scores inside the
    layers). Ring layouts (KVzap threshold, DMS adapters) replay their victims and decisions
    from the same buffers, with the learned scores the compiled op leaves in its buffers; a DMS
    prompt still in vLLM's layout runs eagerly (its prompt mask is Python). Not captured
    (PIECEWISE): eviction's mask mode, and single-neuron DMS (eager hooks)."""

    worker_state = None

    @classmethod
    def get_cudagraph_support(cls, vllm_config: VllmConfig, kv_cache_spec) -> AttentionCGSupport:
        config = KVCompressConfig.from_additional_config(vllm_config.additional_config)
        method = config.build()
        # Streams replay from StreamDecodeBuffers, ring layouts' victims and decisions too; learned
        # scores must come through the compiled op's buffers (eager hooks run only outside graphs).
        paged = isinstance(config.settings, PagedSettings)
        capturable = not method.evicts or not (method.masks or (paged and method.learned and not method.compiled_scores))
        # A graph is sized for max_model_len: the PyTorch decode ops would gather that many
        # rows per request at every replay, so only the Triton kernels are captured.
        capturable = capturable and ops.current_kind() != "reference" and (
            kv_cache_spec is None or ops.decode_kernel_fits(kv_cache_spec.head_size, vllm_config.model_config.dtype))
        return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE if capturable else AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config: VllmConfig,
                 device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        config = KVCompressConfig.from_additional_config(vllm_config.additional_config)
        method = config.spec
        self.evicts = method.evicts
        self.positions = method.needs_positions
        self.compact = not config.build().masks
        self.paged = isinstance(config.settings, PagedSettings)  # per-(layer, KV head) streams
        self.page_tokens = getattr(config.settings, "page_tokens", None)
        self.num_layers = vllm_config.model_config.hf_text_config.num_hidden_layers
        max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        self.decode_buffers = (DecodeBuffers(max_tokens, device)
                               if self.evicts and self.compact and not self.paged else None)
        # Decode positions in a persistent buffer too: a replayed graph reads the captured address.
        self.decode_positions = torch.zeros(max_tokens, dtype=torch.long, device=device) if self.positions else None
        self.stream_buffers = None
        compilation = vllm_config.compilation_config
        graphs = compilation.cudagraph_mode
        if self.paged and torch.device(device).type == "cuda" and graphs is not None and graphs.has_full_cudagraphs() and \
                self.get_cudagraph_support(vllm_config, kv_cache_spec) != AttentionCGSupport.NEVER:
            from vllm_kvcompress.vllm.stream_layout import StreamDecodeBuffers

            # Rows for the largest captured batch only: a larger one runs eagerly on its own plan.
            rows = compilation.max_cudagraph_capture_size or vllm_config.scheduler_config.max_num_seqs
            rule = config.build().rule()  # ring layouts (KVzap threshold, DMS): their fields replay too
            self.stream_buffers = StreamDecodeBuffers(self.num_layers, kv_cache_spec.num_kv_heads, rows,
                                                      vllm_config.model_config.max_model_len, self.page_tokens, device,
                                                      ring=rule is not None, delayed=rule is not None and rule.delayed)
        logger.info("kvcompress attention active: method=%s, %d layers, block_size=%d, page %d bytes, "
                    "CUDA graphs for decode: %s", config.method, len(layer_names), kv_cache_spec.block_size,
                    kv_cache_spec.page_size_bytes,
                    "n/a (CPU)" if torch.device(device).type == "cpu" else
                    "no" if self.get_cudagraph_support(vllm_config, kv_cache_spec) == AttentionCGSupport.NEVER else "yes")

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False):
        m = common_attn_metadata
        num_reqs = m.num_reqs
        state = self.worker_state
        step = None if state is None else state.step
        if self.paged and state is not None:
            from vllm_kvcompress.vllm import stream_layout

            geometry = self._geometry()
            buffers = self.stream_buffers
            if buffers is not None and not (_uniform_decode(m) and num_reqs <= buffers.max_reqs):
                buffers = None
            # A graph's batch: rows past the step's requests are padding.
            real = num_reqs if buffers is None or step is None else min(num_reqs, len(step.req_ids))
            seq_lens = host_seq_lens(m)
            planned = stream_layout.build(m, real, geometry, step, state.pool, seq_lens)
            if planned is not None and self.positions:  # encoded rows (kvquant) store each token's position
                planned.positions = ops.to_device(token_positions(m, seq_lens), m.block_table_tensor.device)
            if planned is not None and buffers is not None:
                if not planned.python_only:
                    return buffers.fill(planned, num_reqs, geometry, step, state.pool, planned.max_decode_len)
                if not step.forced_eager:  # a replay would read the previous step's buffers
                    raise RuntimeError("kvcompress: a decode batch with stream work outside the CUDA graph buffers "
                                       "was not kept off the graphs (the runner forces only compressions eager)")
            if planned is not None:
                return planned
        if m.max_query_len == 1 and (not self.evicts or self.decode_buffers is not None):
            return self._decodes(m, step)
        kv_lens, slots, plan = host_seq_lens(m), m.slot_mapping[: m.num_actual_tokens], None
        positions = token_positions(m, kv_lens) if self.positions else None
        if self.evicts:  # rows are physical: fewer than the logical lengths once compacted
            physical = physical_layout(m, num_reqs, kv_lens, self.kv_cache_spec.block_size, self.compact, step)
            if physical is not None:
                kv_lens, slots, plan = physical
                step.eviction = plan
        block_table = m.block_table_tensor[:num_reqs]
        starts = m.query_start_loc_cpu
        decode_rows, prefill_rows = classify(m)
        prefills = [PrefillSpan(int(starts[r]), int(starts[r + 1]), int(kv_lens[r]), block_table[r])
                    for r in prefill_rows]
        rows = torch.tensor(decode_rows, dtype=torch.long)
        decode_lens = kv_lens[rows]
        device = block_table.device
        return KVCompressMetadata(
            num_actual_tokens=m.num_actual_tokens,
            slot_mapping=slots,
            decode_token_index=ops.to_device(starts[rows].long(), device),
            decode_block_table=block_table[ops.to_device(rows, device)],
            decode_kv_lens=ops.to_device(decode_lens.int(), device),  # the kernels read it on the device
            prefills=prefills,
            max_decode_len=int(decode_lens.max()) if decode_rows else 0,
            eviction=plan,
            positions=None if positions is None else ops.to_device(positions, device),
        )

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata):
        """Streams: the capture reads the persistent buffers, every row padding, with launches
        sized for ``max_seq_len`` (``max_model_len`` when vLLM captures)."""
        m = common_attn_metadata
        if self.stream_buffers is None or self.worker_state is None:
            return super().build_for_cudagraph_capture(m)
        return self.stream_buffers.fill(None, m.num_reqs, self._geometry(), None, self.worker_state.pool,
                                        int(m.max_seq_len))

    def _geometry(self):
        from vllm_kvcompress.eviction.streams import PoolGeometry

        return PoolGeometry(self.num_layers, self.worker_state.pool.num_blocks, self.kv_cache_spec.num_kv_heads,
                            self.kv_cache_spec.block_size, self.page_tokens)

    def _decodes(self, m: CommonAttentionMetadata, step) -> KVCompressMetadata:
        """Every request decodes one token: token ``r`` is request ``r``'s. Views of
        persistent buffers only (vLLM's; with whole-row eviction, :class:`DecodeBuffers`
        refilled here), so the step can replay from a captured graph (padding rows, if any,
        have length 0 and slot -1)."""
        kv_lens, slots, plan = m.seq_lens[: m.num_reqs], m.slot_mapping[: m.num_actual_tokens], None
        longest = int(m.max_seq_len)  # a captured graph is sized for max_model_len
        if self.decode_buffers is not None:
            plan, longest = self.decode_buffers.fill(m, m.num_reqs, host_seq_lens(m), self.kv_cache_spec.block_size,
                                                     step)
            if plan is not None:
                step.eviction = plan
            kv_lens, slots = self.decode_buffers.kv_lens[: m.num_reqs], self.decode_buffers.slots[: m.num_actual_tokens]
        return KVCompressMetadata(
            num_actual_tokens=m.num_actual_tokens,
            slot_mapping=slots,
            decode_token_index=None,
            decode_block_table=m.block_table_tensor[: m.num_reqs],
            decode_kv_lens=kv_lens,
            prefills=[],
            max_decode_len=longest,
            eviction=plan,
            positions=self._decode_positions(m),
        )

    def _decode_positions(self, m: CommonAttentionMetadata) -> torch.Tensor | None:
        if self.decode_positions is None:
            return None
        positions = self.decode_positions[: m.num_reqs]
        positions.copy_(m.seq_lens[: m.num_reqs] - 1)  # padding rows: -1, with slot -1 (nothing stored)
        return positions


class KVCompressImpl(AttentionImpl):
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
        from vllm_kvcompress.vllm.parallel import local_kv_heads

        self.method = KVCompressConfig.from_additional_config(_worker_config.additional_config).build()
        model = _worker_config.model_config
        heads = local_kv_heads(model.get_total_num_kv_heads())
        self.format = self.method.cache_format(model.hf_config, head_size, model.dtype, heads)
        # What the format holds moves to the worker's device now, not inside the first
        # (possibly captured) step.
        self.format.to(_worker_device())
        whole_rows = self.method.evicts and not isinstance(self.method.settings, PagedSettings)
        self.evictor = Evictor(self.method) if whole_rows else None
        self.stream_runner: StreamRunner | None = None  # made in forward(), once the layer index is known
        self.layer_index: int | None = None

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata,
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
        n = attn_metadata.num_actual_tokens
        query = query[:n].view(n, self.num_heads, self.head_size)
        key = key[:n].view(n, self.num_kv_heads, self.head_size)
        value = value[:n].view(n, self.num_kv_heads, -1)
        out = output[:n].view(n, self.num_heads, self.head_size)
        if isinstance(attn_metadata, StreamMetadata):
            if self.stream_runner is None:
                self.stream_runner = StreamRunner(self.method, self.layer_index, attn_metadata.geometry.num_layers,
                                                  self.format)
            self.stream_runner.forward(query, key, value, kv_cache, attn_metadata, out, self.scale)
        else:
            self._forward_blocks(query, key, value, kv_cache, attn_metadata, out)
        return output

    def _forward_blocks(self, query, key, value, kv_cache, meta: KVCompressMetadata, out) -> None:
        fmt, index = self.format, self.layer_index
        fmt.write(index, kv_cache, key, value, meta.slot_mapping, positions=meta.positions)
        evictor, plan = self.evictor, meta.eviction
        decodes = meta.decode_block_table.shape[0]
        if decodes:
            idx = slice(0, decodes) if meta.decode_token_index is None else meta.decode_token_index
            visible = None if plan is None else evictor.decode_visible(plan, index, meta.decode_kv_lens,
                                                                      self.num_kv_heads)
            result = fmt.decode(index, query[idx], kv_cache, meta.decode_block_table, meta.decode_kv_lens, self.scale,
                                current=(key[idx], value[idx]), visible=visible, max_kv_len=meta.max_decode_len)
            out[idx] = result.to(out.dtype)
        for i, span in enumerate(meta.prefills):
            rows = slice(span.token_start, span.token_end)
            visible = None if plan is None else evictor.prefill_visible(plan, i, index, span.kv_len, self.num_kv_heads)
            result = fmt.prefill(index, query[rows], kv_cache, span.blocks, span.kv_len, self.scale,
                                 current=(key[rows], value[rows]), visible=visible)
            out[rows] = result.to(out.dtype)
        if plan is not None:  # the runner compacts after the forward (Evictor.run)
            evictor.keep_queries(index, plan, query)

    def evict(self, layers: list, plan: EvictionPlan) -> None:
        """This step's compactions in the caches of ``layers`` (``(layer index, Attention)``;
        every evicting layer of the model, this one among them), after the step's forward
        (the runner): one pass for all layers."""
        self.evictor.run(_layer_caches(layers), plan)

    def warm_up_eviction(self, layers: list) -> None:
        """Compile the kernels :meth:`evict` runs, once the caches exist (the runner)."""
        self.evictor.warm_up(_layer_caches(layers))

    def warm_up_decode(self, kv_cache: torch.Tensor) -> None:
        """Compile the format's decode before serving, where it has a compiled twin (the
        runner, once the caches exist; ``[blocks, Hkv, block_size, row_bytes]``)."""
        warm_up = getattr(self.format, "warm_up", None)
        if warm_up is not None and not isinstance(self.method.settings, PagedSettings):  # streams decode otherwise
            started = time.perf_counter()
            warm_up(kv_cache.device, self.num_heads, kv_cache.shape[2], self.scale)
            logger.info("kvcompress: decode ops warmed up in %.1f s", time.perf_counter() - started)

    def warm_up_streams(self, kv_cache: torch.Tensor, layer: int, num_layers: int, max_len: int) -> bool:
        """Compile the stream decode kernel, once the caches exist (the runner); whether it
        is the Triton kernel (on the CPU, the reference needs none)."""
        if not hasattr(self.format, "dtype"):  # encoded rows: decoded by the reference, nothing to compile
            return False
        pool = pool_rows(kv_cache, layer, num_layers)
        return ops.warm_up_stream_decode(pool, self.method.settings.page_tokens, self.num_heads, self.num_kv_heads,
                                         self.head_size, self.format.dtype, max_len)


def _layer_caches(layers: list) -> list:
    return [(index, layer.kv_cache, layer.impl.format) for index, layer in layers]
