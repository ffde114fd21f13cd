"""Bad configurations fail in the front-end process, before any engine process starts."""

import types
from pathlib import Path

import psutil
import pytest
import torch

from vllm_kvcompress.vllm import startup, version
from vllm_kvcompress.config import KVCompressConfig, KVCompressConfigError
from vllm_kvcompress.vllm.plugin import register
from vllm_kvcompress.vllm.startup import UnsupportedModelError, check_model


@pytest.fixture(scope="module", autouse=True)
def registered():
    register()


def engine_config(model_dir, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(**{"model": model_dir, "max_model_len": 2048, "enforce_eager": True, **kwargs}).create_engine_config()


def test_valid_config_is_normalised(smollm2_dir):
    config = engine_config(smollm2_dir, attention_backend="kvcompress")
    assert config.attention_config.backend.name == "KVCOMPRESS"
    # The method's own settings, every default filled in (method none has none).
    assert config.additional_config["kvcompress"] == {"method": "none"}
    knorm = engine_config(smollm2_dir, attention_backend="kvcompress",
                          additional_config={"kvcompress": {"method": "knorm", "compression_ratio": 0.5}})
    assert knorm.additional_config["kvcompress"] == {"method": "knorm", "max_kv_tokens": None, "compression_ratio": 0.5, "min_kv_tokens": 0,
                                                     "sink_tokens": 0, "recent_tokens": 0, "buffer_blocks": 1,
                                                     "eviction_mode": "compact"}


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"method": "bogus"}, r"kvcompress\.method: unknown method 'bogus'; allowed: none"),
        ({"method": "none", "max_kv_tokens": -64}, r"kvcompress\.max_kv_tokens must be an integer >= 1.*-64"),
        ({"method": "none", "sparsity": 0.5}, r"unknown key\(s\) additional_config\.kvcompress\.sparsity; allowed keys"),
    ],
)
def test_bad_settings_rejected_at_config_time(smollm2_dir, settings, message):
    with pytest.raises(KVCompressConfigError, match=message):
        engine_config(smollm2_dir, attention_backend="kvcompress", additional_config={"kvcompress": settings})


def test_lookat_codebooks_checked_at_config_time(smollm2_dir, tmp_path):
    from safetensors.torch import save_file

    from vllm_kvcompress.methods.lookat.codebooks import FORMAT

    lookat = {"method": "lookat", "codebooks": str(tmp_path / "missing.safetensors")}
    with pytest.raises(KVCompressConfigError, match=r"kvcompress\.codebooks: codebook file .* does not exist"):
        engine_config(smollm2_dir, attention_backend="kvcompress", additional_config={"kvcompress": lookat})
    other = tmp_path / "other.safetensors"  # made for a model with another head layout
    save_file({"layer.0": torch.zeros(2, 8, 4, 8)}, str(other), metadata={
        "format": FORMAT, "m": "8", "architecture": "Qwen2ForCausalLM", "num_layers": "24",
        "num_kv_heads": "2", "head_dim": "64", "rope_theta": "1000000.0"})
    lookat["codebooks"] = str(other)
    with pytest.raises(KVCompressConfigError, match=r"made for another model \(architecture: file has Qwen2ForCausalLM"):
        engine_config(smollm2_dir, attention_backend="kvcompress", additional_config={"kvcompress": lookat})


def test_unsupported_vllm_version_is_refused(smollm2_dir, monkeypatch):
    monkeypatch.setattr(version, "installed_vllm_version", lambda: "0.33.0")
    with pytest.raises(version.UnsupportedVLLMVersion, match=r"supports vLLM 0\.32\.x only, but vLLM 0\.33\.0"):
        engine_config(smollm2_dir, attention_backend="kvcompress")
    engine_config(smollm2_dir)  # users who do not select kvcompress are not affected


def test_settings_without_the_backend_are_refused(smollm2_dir):
    with pytest.raises(KVCompressConfigError, match="attention backend is not kvcompress"):
        engine_config(smollm2_dir, additional_config={"kvcompress": {"method": "none"}})


def test_fp8_cache_dtype_is_refused(smollm2_dir):
    with pytest.raises(KVCompressConfigError, match=r"--kv-cache-dtype fp8 cannot be combined.*allowed: auto"):
        engine_config(smollm2_dir, attention_backend="kvcompress", kv_cache_dtype="fp8")


def test_llm_does_not_start_half_configured(smollm2_dir):
    from vllm import LLM

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(KVCompressConfigError, match="unknown method 'bogus'"):
        LLM(model=smollm2_dir, attention_backend="kvcompress", enforce_eager=True, additional_config={"kvcompress": {"method": "bogus"}})
    after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert after == before, "an engine process was spawned for a refused configuration"


def test_cuda_needs_ampere_and_refuses_stream_eviction_for_now(smollm2_dir, monkeypatch):
    from vllm.platforms import current_platform
    from vllm.platforms.interface import DeviceCapability

    config = engine_config(smollm2_dir, attention_backend="kvcompress")
    platform = type(current_platform)
    monkeypatch.setattr(platform, "is_cpu", lambda self: False)
    monkeypatch.setattr(platform, "is_cuda", lambda self: True)
    monkeypatch.setattr(platform, "get_device_capability", classmethod(lambda cls, device_id=0: DeviceCapability(7, 5)))
    with pytest.raises(KVCompressConfigError, match=r"compute capability >= 8\.0 \(Ampere or newer\); this one has 7\.5"):
        startup.check_platform(KVCompressConfig.from_dict({}))
    monkeypatch.setattr(platform, "get_device_capability", classmethod(lambda cls, device_id=0: DeviceCapability(9, 0)))
    startup.check_platform(KVCompressConfig.from_dict({}))
    startup.check_platform(KVCompressConfig.from_dict({"method": "lookat", "codebooks": "c.safetensors"}))
    with pytest.raises(KVCompressConfigError, match=r"method 'lookat' on CUDA: additional_config\.kvcompress\.current_tokens: 'exact' "
                                                    r"has no GPU decode kernel yet; on CUDA use 'coded'"):
        startup.check_platform(KVCompressConfig.from_dict({"method": "lookat", "codebooks": "c.safetensors",
                                                            "current_tokens": "exact"}))
    startup.check_platform(KVCompressConfig.from_dict({"method": "knorm", "compression_ratio": 0.5}))
    startup.check_platform(KVCompressConfig.from_dict({"method": "snapkv", "max_kv_tokens": 256}))
    with pytest.raises(KVCompressConfigError, match=r"eviction_mode: 'mask' .* CPU engine only; on CUDA use 'compact'"):
        startup.check_platform(KVCompressConfig.from_dict({"method": "knorm", "compression_ratio": 0.5,
                                                            "eviction_mode": "mask"}))
    headkv = KVCompressConfig.from_dict({"method": "headkv", "max_kv_tokens": 256, "head_scores": "s.json"})
    with pytest.raises(KVCompressConfigError, match=r"method 'headkv' runs on the CPU engine only .* per-\(layer, KV "
                                                    r"head\) streams .* use method none, lookat, knorm, snapkv"):
        startup.check_platform(headkv)
    kvzap = KVCompressConfig.from_dict({"method": "kvzap", "max_kv_tokens": 256, "kvzap_predictor": "p.safetensors"})
    with pytest.raises(KVCompressConfigError, match=r"method 'kvzap' runs on the CPU engine only"):
        startup.check_platform(kvzap)
    # The stream methods start on CUDA for their GPU checks only (KVCOMPRESS_CUDA_STREAMS=experimental).
    monkeypatch.setenv(startup.CUDA_STREAMS_ENV, "experimental")
    startup.check_platform(headkv)
    startup.check_platform(kvzap)
    startup.check_platform(KVCompressConfig.from_dict({"method": "dms", "dms_adapters": "a.safetensors"}))
    with pytest.raises(KVCompressConfigError, match=r"KVCOMPRESS_CUDA_STREAMS=experimental runs the streams of "
                                                    r"methods headkv, kvzap, dms on CUDA; method 'knorm' stays on "
                                                    r"the CPU engine"):
        startup.experimental_cuda_streams(KVCompressConfig.from_dict({"method": "knorm", "compression_ratio": 0.5}))
    monkeypatch.setenv(startup.CUDA_STREAMS_ENV, "1")
    with pytest.raises(KVCompressConfigError, match=r"KVCOMPRESS_CUDA_STREAMS='1': the only allowed value is "
                                                    r"'experimental'"):
        startup.check_platform(headkv)
    monkeypatch.delenv(startup.CUDA_STREAMS_ENV)
    # kvquant rows start on CUDA for their GPU checks only (KVCOMPRESS_CUDA_KVQUANT=experimental).
    kvquant = KVCompressConfig.from_dict({"method": "kvquant+snapkv", "key_ranges": "r.safetensors",
                                          "max_kv_tokens": 256})
    with pytest.raises(KVCompressConfigError, match=r"method 'kvquant\+snapkv' on CUDA: method 'kvquant' has not "
                                                    r"run on a GPU yet"):
        startup.check_platform(kvquant)
    monkeypatch.setenv(startup.CUDA_KVQUANT_ENV, "experimental")
    startup.check_platform(kvquant)
    with pytest.raises(KVCompressConfigError, match=r"KVCOMPRESS_CUDA_KVQUANT=experimental runs kvquant rows on "
                                                    r"CUDA; method 'knorm' has none"):
        startup.experimental_cuda_kvquant(KVCompressConfig.from_dict({"method": "knorm", "compression_ratio": 0.5}))
    long_context = engine_config(smollm2_dir, attention_backend="kvcompress")
    long_context.model_config.max_model_len = 200_000
    with pytest.raises(KVCompressConfigError,
                       match=r"'kvquant\+snapkv' holds positions up to 131072: --max-model-len 200000"):
        startup.check_positions(long_context, kvquant)
    startup.check_positions(long_context, KVCompressConfig.from_dict({"method": "knorm", "compression_ratio": 0.5}))
    monkeypatch.setenv(startup.CUDA_KVQUANT_ENV, "yes")
    with pytest.raises(KVCompressConfigError, match=r"KVCOMPRESS_CUDA_KVQUANT='yes': the only allowed value"):
        startup.check_platform(kvquant)
    monkeypatch.delenv(startup.CUDA_KVQUANT_ENV)
    monkeypatch.setattr(platform, "is_cuda", lambda self: False)
    with pytest.raises(KVCompressConfigError, match="runs on CPU and on NVIDIA GPUs only"):
        startup.validate_vllm_config(config)


def fake_model(**overrides):
    model = dict(
        model="fake", use_mla=False, is_encoder_decoder=False, runner_type="generate",
        is_attention_free=False, is_hybrid=False, hf_text_config=types.SimpleNamespace(),
    )
    window = overrides.pop("window", None)
    model.update(overrides)
    ns = types.SimpleNamespace(**model, get_sliding_window=lambda: window)
    return types.SimpleNamespace(model_config=ns)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"use_mla": True}, "uses MLA"),
        ({"window": 4096}, "sliding-window attention"),
        ({"hf_text_config": types.SimpleNamespace(layer_types=["full_attention", "sliding_attention"])}, "sliding-window"),
        ({"is_encoder_decoder": True}, "encoder-decoder"),
        ({"runner_type": "pooling"}, "only 'generate'"),
        ({"is_hybrid": True}, "attention-free or hybrid"),
    ],
)
def test_unsupported_models_refused(overrides, message):
    with pytest.raises(UnsupportedModelError, match=message):
        check_model(fake_model(**overrides))


def test_supported_model_passes():
    check_model(fake_model())


def _knorm(**settings):
    return {"kvcompress": {"method": "knorm", "compression_ratio": 0.5, **settings}}


def test_eviction_wires_scheduler_and_worker_and_turns_prefix_caching_off(smollm2_dir):
    config = engine_config(smollm2_dir, attention_backend="kvcompress", additional_config=_knorm(),
                           enable_prefix_caching=True)
    assert config.scheduler_config.scheduler_cls == "vllm_kvcompress.vllm.scheduler.KVCompressScheduler"
    assert config.parallel_config.worker_cls == "vllm_kvcompress.vllm.worker.KVCompressCPUWorker"
    assert config.cache_config.enable_prefix_caching is False
    plain = engine_config(smollm2_dir, attention_backend="kvcompress", enable_prefix_caching=True)
    assert plain.cache_config.enable_prefix_caching is True and plain.scheduler_config.scheduler_cls is None


def test_eviction_on_cuda_wires_the_gpu_worker_on_vllms_v1_runner(smollm2_dir, monkeypatch):
    from vllm.platforms import current_platform

    config = KVCompressConfig.from_dict({"method": "knorm", "compression_ratio": 0.5})
    monkeypatch.setattr(type(current_platform), "is_cuda", lambda self: True)
    monkeypatch.delenv(startup.V2_RUNNER_ENV, raising=False)
    vllm_config = engine_config(smollm2_dir)
    monkeypatch.setenv(startup.V2_RUNNER_ENV, "")  # unset in effect; removed again after the test
    vllm_config.scheduler_config.async_scheduling = True  # vLLM's default on CUDA
    startup.wire_eviction(vllm_config, config)
    assert vllm_config.parallel_config.worker_cls == "vllm_kvcompress.vllm.gpu_worker.KVCompressGPUWorker"
    # Whole-row eviction keeps vLLM's async scheduling, on a scheduler that cuts block lists
    # on schedule-time lengths.
    assert vllm_config.scheduler_config.async_scheduling is True
    assert vllm_config.scheduler_config.scheduler_cls == startup.ASYNC_SCHEDULER_CLS
    import os

    assert os.environ[startup.V2_RUNNER_ENV] == "0"  # inherited by the engine processes
    from vllm_kvcompress.vllm.scheduler import KVCompressAsyncScheduler, KVCompressScheduler
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    assert vllm_config.scheduler_config.get_scheduler_cls() is KVCompressAsyncScheduler
    assert issubclass(KVCompressAsyncScheduler, KVCompressScheduler) and issubclass(KVCompressAsyncScheduler,
                                                                                   AsyncScheduler)
    # --no-async-scheduling: the synchronous scheduler.
    sync = engine_config(smollm2_dir)
    sync.scheduler_config.async_scheduling = False
    startup.wire_eviction(sync, config, async_requested=False)
    assert sync.scheduler_config.async_scheduling is False
    assert sync.scheduler_config.scheduler_cls == startup.SCHEDULER_CLS
    # HeadKV's budget streams: rows a function of the logical length, as whole-row eviction's.
    budgets = KVCompressConfig.from_dict({"method": "headkv", "max_kv_tokens": 256, "head_scores": "s.json"})
    kept = engine_config(smollm2_dir)
    kept.scheduler_config.async_scheduling = True
    startup.wire_eviction(kept, budgets, async_requested=True)
    assert kept.scheduler_config.async_scheduling is True
    assert kept.scheduler_config.scheduler_cls == startup.ASYNC_SCHEDULER_CLS
    # Ring layouts report each step's pages to the scheduler: synchronous only.
    rings = KVCompressConfig.from_dict({"method": "dms", "dms_adapters": "a.safetensors"})
    asked = engine_config(smollm2_dir)
    asked.scheduler_config.async_scheduling = True
    with pytest.raises(KVCompressConfigError, match=r"async scheduling cannot be combined with kvcompress method "
                                                    r"'dms' yet \(on CUDA it takes whole-row eviction.*drop --async"):
        startup.wire_eviction(asked, rings, async_requested=True)
    left = engine_config(smollm2_dir)  # vLLM's default, not asked for: turned off for the rings
    left.scheduler_config.async_scheduling = True
    startup.wire_eviction(left, rings)
    assert left.scheduler_config.async_scheduling is False
    assert left.scheduler_config.scheduler_cls == startup.SCHEDULER_CLS
    v2 = engine_config(smollm2_dir)
    monkeypatch.setenv(startup.V2_RUNNER_ENV, "1")
    with pytest.raises(KVCompressConfigError, match=r"VLLM_USE_V2_MODEL_RUNNER=1 cannot be combined with kvcompress "
                                                    r"method 'knorm'.*V1 model runner"):
        startup.wire_eviction(v2, config)


def test_eviction_refuses_micro_batching(smollm2_dir):
    """Each micro-batch would build its own plan, with its own row numbers, for one step's
    compaction after the forward."""
    config = KVCompressConfig.from_dict({"method": "knorm", "compression_ratio": 0.5})
    vllm_config = engine_config(smollm2_dir)
    vllm_config.parallel_config.ubatch_size = 2
    with pytest.raises(KVCompressConfigError, match=r"micro-batching \(--enable-dbo / --ubatch-size\) cannot be "
                                                    r"combined with kvcompress eviction"):
        startup.wire_eviction(vllm_config, config)


def test_eviction_refuses_kv_connectors(smollm2_dir):
    """A connector ships blocks by their token hashes (and defers frees as a consumer);
    compaction rewrites and frees blocks in place."""
    from vllm.config import KVTransferConfig

    config = KVCompressConfig.from_dict({"method": "knorm", "compression_ratio": 0.5})
    vllm_config = engine_config(smollm2_dir)
    vllm_config.kv_transfer_config = KVTransferConfig(kv_connector="ExampleConnector", kv_role="kv_both")
    with pytest.raises(KVCompressConfigError, match=r"--kv-transfer-config \(a KV connector\) cannot be combined "
                                                    r"with kvcompress method 'knorm'"):
        startup.wire_eviction(vllm_config, config)


def test_eviction_refuses_a_foreign_scheduler(smollm2_dir):
    with pytest.raises(ValueError, match=r"--scheduler-cls my.Scheduler cannot be combined with kvcompress method 'knorm'"):
        engine_config(smollm2_dir, attention_backend="kvcompress", additional_config=_knorm(),
                      scheduler_cls="my.Scheduler")


def test_per_request_settings_are_checked_in_the_front_end(smollm2_dir):
    from vllm_kvcompress.vllm.plugin import register
    from vllm_kvcompress.vllm.startup import check_request_settings

    register()
    from vllm.v1.engine.input_processor import InputProcessor

    assert InputProcessor._validate_params._kvcompress_checked
    knorm = engine_config(smollm2_dir, attention_backend="kvcompress", additional_config=_knorm())
    check_request_settings(knorm, {"kvcompress": {"max_kv_tokens": 64}})
    with pytest.raises(ValueError, match=r"keys from compression_ratio, max_kv_tokens"):
        check_request_settings(knorm, {"kvcompress": {"budget": 64}})
    plain = engine_config(smollm2_dir, attention_backend="kvcompress")
    with pytest.raises(ValueError, match=r"engine runs kvcompress method 'none'"):
        check_request_settings(plain, {"kvcompress": {"max_kv_tokens": 64}})


def test_headkv_scores_checked_at_config_time(smollm2_dir, tmp_path):
    import json

    headkv = {"method": "headkv", "max_kv_tokens": 128}
    with pytest.raises(KVCompressConfigError, match=r"kvcompress\.head_scores is required for method 'headkv'"):
        engine_config(smollm2_dir, attention_backend="kvcompress", additional_config={"kvcompress": headkv})
    qwen = tmp_path / "qwen.json"  # the published format, for a 24-layer, 14-head model
    qwen.write_text(json.dumps({f"{l}-{h}": [1.0] for l in range(24) for h in range(14)}))
    with pytest.raises(KVCompressConfigError, match=rf"head_scores: head scores {qwen}: key '0-9' is not"):
        engine_config(smollm2_dir, attention_backend="kvcompress",
                      additional_config={"kvcompress": {**headkv, "head_scores": str(qwen)}})
    with pytest.raises(KVCompressConfigError, match=r"page_tokens=24 must divide the KV block size 128"):
        engine_config(smollm2_dir, attention_backend="kvcompress",
                      additional_config={"kvcompress": {**headkv, "head_scores": "uniform", "page_tokens": 24}})
    config = engine_config(smollm2_dir, attention_backend="kvcompress",
                           additional_config={"kvcompress": {**headkv, "head_scores": "uniform"}})
    assert config.scheduler_config.scheduler_cls.endswith("KVCompressScheduler")
    assert not config.cache_config.enable_prefix_caching  # compaction rewrites blocks: no prefix cache


def test_headkv_with_tensor_parallelism_is_accepted(smollm2_dir, monkeypatch):
    from vllm_kvcompress.config import KVCompressConfig

    vllm_config = engine_config(smollm2_dir)
    monkeypatch.setattr(vllm_config.parallel_config, "tensor_parallel_size", 3)
    startup.check_method(vllm_config, KVCompressConfig.from_dict({"method": "headkv", "head_scores": "uniform",
                                                                  "max_kv_tokens": 128}))


def test_kvzap_predictors_checked_at_config_time_and_compiled_mode_accepted(smollm2_dir, tmp_path):
    from pathlib import Path

    shipped = Path(__file__).parents[1] / "vllm_kvcompress" / "artefacts" / "kvzap" / "smollm2-135m"
    kvzap = {"method": "kvzap", "kvzap_threshold": -4.0}
    with pytest.raises(KVCompressConfigError, match=r"kvcompress\.kvzap_predictor is required for method 'kvzap'"):
        engine_config(smollm2_dir, attention_backend="kvcompress",
                      additional_config={"kvcompress": kvzap})
    corrupt = tmp_path / "bad.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(KVCompressConfigError, match=rf"kvzap_predictor: KVzap predictors {corrupt}: cannot read"):
        engine_config(smollm2_dir, attention_backend="kvcompress",
                      additional_config={"kvcompress": {**kvzap, "kvzap_predictor": str(corrupt)}})
    with pytest.raises(KVCompressConfigError, match=r"kvzap_predictor: KVzap predictors .*missing: no such file"):
        engine_config(smollm2_dir, attention_backend="kvcompress",
                      additional_config={"kvcompress": {**kvzap, "kvzap_predictor": str(tmp_path / "missing")}})
    good = {**kvzap, "kvzap_predictor": str(shipped / "kvzap-linear.safetensors")}
    # Its scores come through a custom op into persistent buffers: compiled graphs keep them.
    engine_config(smollm2_dir, attention_backend="kvcompress", enforce_eager=False,
                  additional_config={"kvcompress": good})
    vllm_config = engine_config(smollm2_dir, enforce_eager=False)
    vllm_config.compilation_config.use_inductor_graph_partition = True  # one graph: nothing orders buffer and attention
    with pytest.raises(KVCompressConfigError, match=r"use_inductor_graph_partition=True is not supported"):
        startup.check_method(vllm_config, KVCompressConfig.from_dict(good))
    with pytest.raises(KVCompressConfigError, match=r"needs exactly one of .*kvzap_threshold"):
        engine_config(smollm2_dir, attention_backend="kvcompress",
                      additional_config={"kvcompress": {**good, "compression_ratio": 0.5}})
    config = engine_config(smollm2_dir, attention_backend="kvcompress",
                           additional_config={"kvcompress": good})
    assert config.parallel_config.worker_cls.endswith("KVCompressCPUWorker")


def test_single_neuron_per_layer_dms_with_tensor_parallelism_is_refused(smollm2_dir, monkeypatch):
    """Every head follows query head 0's channel, which only rank 0 holds: refused, not
    silently decided from each rank's own first head."""
    from vllm_kvcompress.config import KVCompressConfig
    from vllm_kvcompress.methods.dms import checkpoint as dms_checkpoint

    vllm_config = engine_config(smollm2_dir, enforce_eager=True)
    monkeypatch.setattr(vllm_config.parallel_config, "tensor_parallel_size", 3)
    settings = KVCompressConfig.from_dict({"method": "dms", "dms_adapters": "official-folder", "dms_window": 128})
    decisions = dms_checkpoint.DMSDecisions([], 128, per_layer=True, source="official-folder", single_neuron=True)
    monkeypatch.setattr(dms_checkpoint, "load_decisions", lambda *args, **kwargs: decisions)
    with pytest.raises(KVCompressConfigError, match=r"dms_adapters: official-folder decides every head from query "
                                                    r"head 0's channel .* use tensor_parallel_size=1"):
        startup.check_method(vllm_config, settings)
    decisions.per_layer = False
    startup.check_method(vllm_config, settings)




def test_method_none_hands_attention_to_flash_attention_on_cuda(smollm2_dir, monkeypatch):
    """On CUDA, method none keeps every token at full precision: vLLM's FLASH_ATTN serves it
    unchanged, unless KVCOMPRESS_NONE_CUDA_BACKEND=plugin; LOOKAT keeps the plugin."""
    from vllm.platforms import current_platform

    platform = type(current_platform)
    config = engine_config(smollm2_dir, attention_backend="kvcompress", dtype="bfloat16")
    none = KVCompressConfig.from_dict({})
    monkeypatch.delenv(startup.NONE_CUDA_BACKEND_ENV, raising=False)
    assert not startup.delegate_passthrough(config, none)  # CPU: the plugin's own layout
    monkeypatch.setattr(platform, "is_cuda", lambda self: True)
    monkeypatch.setenv(startup.NONE_CUDA_BACKEND_ENV, "plugin")
    assert not startup.delegate_passthrough(config, none) and config.attention_config.backend.name == "KVCOMPRESS"
    monkeypatch.setenv(startup.NONE_CUDA_BACKEND_ENV, "triton")
    with pytest.raises(KVCompressConfigError, match=r"KVCOMPRESS_NONE_CUDA_BACKEND='triton': allowed values are "
                                                    r"flash_attn, plugin"):
        startup.delegate_passthrough(config, none)
    lookat = KVCompressConfig.from_dict({"method": "lookat", "codebooks": "c.safetensors"})
    assert not startup.delegate_passthrough(config, lookat)
    monkeypatch.delenv(startup.NONE_CUDA_BACKEND_ENV)
    assert startup.delegate_passthrough(config, none)
    assert config.attention_config.backend.name == "FLASH_ATTN"


def test_decode_graphs_declared_except_for_eager_scores_and_masks(monkeypatch):
    from vllm.v1.attention.backend import AttentionCGSupport

    from vllm_kvcompress.methods.dms import DMS

    from vllm_kvcompress.vllm.backend import KVCompressMetadataBuilder

    def support(settings):
        config = types.SimpleNamespace(additional_config={"kvcompress": settings})
        return KVCompressMetadataBuilder.get_cudagraph_support(config, None)

    graphs, never = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE, AttentionCGSupport.NEVER
    assert support({"method": "none"}) == graphs
    # Whole-row eviction compacts after the forward: its decode steps replay graphs.
    assert support({"method": "knorm", "compression_ratio": 0.5}) == graphs
    assert support({"method": "knorm", "compression_ratio": 0.5, "eviction_mode": "mask"}) == never
    # Streams replay from the stream buffers (HeadKV; the learned methods with their scores in the
    # buffers the compiled op fills, ring victims and decisions too).
    assert support({"method": "headkv", "compression_ratio": 0.5, "head_scores": "uniform"}) == graphs
    assert support({"method": "kvzap", "kvzap_predictor": "p.safetensors", "compression_ratio": 0.5}) == graphs
    assert support({"method": "kvzap", "kvzap_predictor": "p.safetensors", "kvzap_threshold": 0.0}) == graphs
    assert support({"method": "dms", "dms_adapters": "a.safetensors"}) == graphs
    # Single-neuron DMS changes the query in eager hooks, which a replay skips.
    monkeypatch.setattr(DMS, "compiled_scores", property(lambda self: False))
    assert support({"method": "dms", "dms_adapters": "a.safetensors"}) == never
    # Only the Triton kernels are captured (a graph is sized for max_model_len).
    from vllm_kvcompress.kernels import ops

    with ops.use("reference"):
        assert support({"method": "none"}) == never
    spec = types.SimpleNamespace(head_size=80)
    model = types.SimpleNamespace(dtype=torch.bfloat16)
    config = types.SimpleNamespace(additional_config={"kvcompress": {"method": "none"}}, model_config=model)
    assert KVCompressMetadataBuilder.get_cudagraph_support(config, spec) == never
    assert KVCompressMetadataBuilder.get_cudagraph_support(config, types.SimpleNamespace(head_size=128)) == graphs


def test_dms_single_neuron_without_eager_mode_is_refused_naming_the_flag(smollm2_dir, tmp_path):
    """A single-neuron DMS checkpoint changes the query inside the attention through Python
    hooks, which a compiled graph would skip; adapter checkpoints score through the custom op
    into buffers (as KVzap does) and start compiled."""
    import json

    from vllm_kvcompress.config import KVCompressConfig

    folder = tmp_path / "single-neuron"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"dms_separate_alpha": False, "dms_window_size": 256}))
    single_neuron = KVCompressConfig.from_dict({"method": "dms", "dms_adapters": str(folder)})
    with pytest.raises(KVCompressConfigError, match=r"'dms' with these settings needs eager mode.*--enforce-eager"):
        startup.check_method(engine_config(smollm2_dir, enforce_eager=False), single_neuron)
    startup.check_method(engine_config(smollm2_dir, enforce_eager=True), single_neuron)
    adapters = Path(__file__).parents[1] / "vllm_kvcompress" / "artefacts" / "dms" / "smollm2-135m" / "dms-cr4.safetensors"
    compiled = KVCompressConfig.from_dict({"method": "dms", "dms_adapters": str(adapters)})
    assert compiled.build().compiled_scores and not single_neuron.build().compiled_scores
    startup.check_method(engine_config(smollm2_dir, enforce_eager=False), compiled)
    # A folder that is no checkpoint: the key and the reason, eager or not.
    empty = KVCompressConfig.from_dict({"method": "dms", "dms_adapters": str(tmp_path)})
    for eager in (False, True):
        with pytest.raises(KVCompressConfigError, match=r"dms_adapters: .*needs config.json with the dms_\* keys"):
            startup.check_method(engine_config(smollm2_dir, enforce_eager=eager), empty)
