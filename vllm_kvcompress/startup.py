"""Start-up checks that run in the front-end process, on the finished ``VllmConfig``,
before any engine process is spawned: a refused configuration never half-starts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm_kvcompress import BACKEND_NAME
from vllm_kvcompress.config import (CONFIG_KEY, EVICTION_METHODS, PREDICTED_METHODS, KVCompressConfig,
                                    KVCompressConfigError)
from vllm_kvcompress.version import check_vllm_version

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


def check_platform() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise KVCompressConfigError(
            f"--attention-backend kvcompress runs on CPU only in this release (platform: "
            f"{current_platform.device_name}); its CUDA kernels are not available yet"
        )


def check_engine_options(vllm_config: "VllmConfig") -> None:
    cache_dtype = vllm_config.cache_config.cache_dtype
    if cache_dtype not in SUPPORTED_KV_CACHE_DTYPES:
        raise KVCompressConfigError(
            f"--kv-cache-dtype {cache_dtype} cannot be combined with --attention-backend kvcompress; "
            f"allowed: {', '.join(SUPPORTED_KV_CACHE_DTYPES)} (kvcompress chooses its own cache format)"
        )
    if vllm_config.speculative_config is not None:
        raise KVCompressConfigError("speculative decoding is not supported with --attention-backend kvcompress yet")


def check_lookat(vllm_config: "VllmConfig", config: KVCompressConfig) -> None:
    """A codebook file for this very model, whose m fits the cache layout."""
    if config.method != "lookat" or vllm_config.model_config is None:
        return
    from vllm_kvcompress.calibrate import CodebookMismatch, check_codebook_file

    try:
        metadata = check_codebook_file(config.codebooks, vllm_config.model_config.hf_config)
    except CodebookMismatch as exc:
        raise KVCompressConfigError(f"additional_config.{CONFIG_KEY}.codebooks: {exc}") from None
    m, head_dim = int(metadata["m"]), int(metadata["head_dim"])
    if m % 2 or head_dim % m:
        raise KVCompressConfigError(
            f"additional_config.{CONFIG_KEY}.codebooks: m={m} must be even and divide head_dim {head_dim}"
        )


SCHEDULER_CLS = "vllm_kvcompress.scheduler.KVCompressScheduler"
WORKER_CLS = "vllm_kvcompress.worker.KVCompressCPUWorker"
PLATFORM_WORKER_CLS = ("auto", "vllm.v1.worker.cpu_worker.CPUWorker")


def wire_eviction(vllm_config: "VllmConfig", config: KVCompressConfig) -> None:
    """Eviction needs the plugin's scheduler and worker (physical block accounting);
    one flag turns them on. Refuse what they cannot honour instead of ignoring it."""
    if config.method not in EVICTION_METHODS:
        return
    from vllm.logger import init_logger

    logger = init_logger("vllm.kvcompress.startup")
    scheduler = vllm_config.scheduler_config
    if scheduler.scheduler_cls not in (None, SCHEDULER_CLS):
        raise KVCompressConfigError(
            f"--scheduler-cls {scheduler.scheduler_cls} cannot be combined with kvcompress method {config.method!r}: "
            "eviction brings its own scheduler (leave --scheduler-cls unset)"
        )
    if scheduler.async_scheduling:
        raise KVCompressConfigError(
            f"async scheduling cannot be combined with kvcompress method {config.method!r} yet; "
            "add --no-async-scheduling"
        )
    parallel = vllm_config.parallel_config
    if parallel.worker_cls not in (*PLATFORM_WORKER_CLS, WORKER_CLS):
        raise KVCompressConfigError(
            f"--worker-cls {parallel.worker_cls} cannot be combined with kvcompress method {config.method!r}: "
            "eviction brings its own worker"
        )
    if parallel.pipeline_parallel_size > 1:
        raise KVCompressConfigError("pipeline parallelism cannot be combined with kvcompress eviction yet")
    scheduler.scheduler_cls = SCHEDULER_CLS
    parallel.worker_cls = WORKER_CLS
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
    if config.method not in EVICTION_METHODS:
        raise KVCompressConfigError(
            f"SamplingParams.extra_args[{CONFIG_KEY!r}] sets a per-request eviction budget, but the engine runs "
            f"kvcompress method {config.method!r}; start it with an eviction method ({', '.join(EVICTION_METHODS)})"
        )
    from vllm_kvcompress.eviction.policy import validate_overrides

    # Settings only: no policy (HeadKV's would re-read its scores file for every request).
    validate_overrides(config, extra_args)


def check_headkv(vllm_config: "VllmConfig", config: KVCompressConfig) -> None:
    """A head-scores file for this very model, and a page size that divides the block."""
    if config.method != "headkv" or vllm_config.model_config is None:
        return
    from vllm_kvcompress.eviction.headkv import HeadScoresError
    from vllm_kvcompress.eviction.policy import EvictionPolicy, model_shape

    try:
        EvictionPolicy(config, vllm_config.cache_config.block_size, model_shape(vllm_config))
    except HeadScoresError as exc:
        raise KVCompressConfigError(f"additional_config.{CONFIG_KEY}.head_scores: {exc}") from None


def check_learned_eviction(vllm_config: "VllmConfig", config: KVCompressConfig) -> None:
    """KVzap and DMS: weights for this very model, eager mode (they run as forward
    pre-hooks, which a compiled graph would skip), and a page size that divides the block."""
    if config.method not in PREDICTED_METHODS or vllm_config.model_config is None:
        return
    from vllm_kvcompress.eviction.dms_checkpoint import DMSCheckpointError, load_decisions
    from vllm_kvcompress.eviction.kvzap import PredictorFileError, load_any_predictors
    from vllm_kvcompress.eviction.policy import EvictionPolicy, model_shape

    method = config.method
    if not vllm_config.model_config.enforce_eager:
        raise KVCompressConfigError(f"kvcompress method {method!r} needs eager mode (its scores come from forward "
                                    "pre-hooks on the decoder layers, which a compiled graph would skip): add "
                                    "--enforce-eager (enforce_eager=True)")
    hf = vllm_config.model_config.hf_text_config
    shape = (hf.num_hidden_layers, hf.hidden_size, hf.num_key_value_heads)
    try:
        if method == "kvzap":
            load_any_predictors(config.kvzap_predictor, *shape)
        else:
            decisions = load_decisions(config.dms_adapters, *shape)
            if decisions.single_neuron and decisions.per_layer and vllm_config.parallel_config.tensor_parallel_size > 1:
                raise KVCompressConfigError(
                    f"additional_config.{CONFIG_KEY}.dms_adapters: {config.dms_adapters} decides every head from "
                    "query head 0's channel (single-neuron, dms_alpha_per=layer), which only rank 0 holds under "
                    "tensor parallelism; use tensor_parallel_size=1")
    except (PredictorFileError, DMSCheckpointError) as exc:
        key = "kvzap_predictor" if method == "kvzap" else "dms_adapters"
        raise KVCompressConfigError(f"additional_config.{CONFIG_KEY}.{key}: {exc}") from None
    EvictionPolicy(config, vllm_config.cache_config.block_size, model_shape(vllm_config))


def validate_vllm_config(vllm_config: "VllmConfig") -> KVCompressConfig | None:
    """Return the parsed plugin config when kvcompress is selected, else None.

    Also stores the normalised settings back into ``additional_config`` so that every
    process (scheduler, workers) parses exactly the same values.
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
    config = KVCompressConfig.from_additional_config(additional)
    check_platform()
    check_model(vllm_config)
    check_engine_options(vllm_config)
    check_lookat(vllm_config, config)
    check_headkv(vllm_config, config)
    check_learned_eviction(vllm_config, config)
    wire_eviction(vllm_config, config)
    if isinstance(additional, dict):
        additional[CONFIG_KEY] = config.as_dict()
    return config
