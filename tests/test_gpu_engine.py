"""kvcompress inside vLLM's CUDA build (marker ``gpu``; skipped without a CUDA GPU). Run on
the GPU machine with ``python3 -m pytest -m gpu -rP tests/test_gpu_engine.py`` (docs/gpu.md).

Oracles, with dummy weights (vLLM's seeded initialisation, the same in every process):
method ``none`` against vLLM's FLASH_ATTN backend, and the engine on the Triton kernels
against the same engine on the PyTorch reference ops (``KVCOMPRESS_KERNELS=reference``) on
the same CUDA tensors."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SMALL = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 1024,
         "intermediate_size": 2816, "num_hidden_layers": 4, "num_attention_heads": 16, "num_key_value_heads": 4,
         "vocab_size": 32000, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
         "torch_dtype": "bfloat16", "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1,
         "eos_token_id": 2}
LLAMA_8B = {**SMALL, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0}
SHAPES = {"small": SMALL, "llama-8b": LLAMA_8B}


def _prompts(vocab: int, lengths=(300, 41, 777, 129)) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(100, vocab - 1, (n,), generator=generator).tolist() for n in lengths]


def _generate(monkeypatch, shape: str, kernels: str = "auto", codebooks_m=None, none_backend=None,
              prompt_lengths=(300, 41, 777, 129), **llm) -> dict:
    from vllm_kvcompress.harness.subprocess_run import run_module

    monkeypatch.setenv("KVCOMPRESS_KERNELS", kernels)
    if none_backend is None:
        monkeypatch.delenv("KVCOMPRESS_NONE_CUDA_BACKEND", raising=False)
    else:
        monkeypatch.setenv("KVCOMPRESS_NONE_CUDA_BACKEND", none_backend)
    config = SHAPES[shape]
    # FULL decode graphs (the path under test) for the few batch sizes 4 prompts need, without
    # torch.compile (FULL graphs need none): an engine starts in seconds rather than a minute.
    spec = {"model_config": config, "prompts": _prompts(config["vocab_size"], prompt_lengths), "max_tokens": 32,
            "codebooks_m": codebooks_m, "init_std": 0.02,
            "llm": {"dtype": "bfloat16", "max_model_len": 4096, "gpu_memory_utilization": 0.5, "max_num_seqs": 8,
                    "compilation_config": {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY",
                                           "cudagraph_capture_sizes": [1, 2, 4, 8]}, **llm}}
    return run_module("vllm_kvcompress.harness.gpu_generate", spec, timeout=900)


# Two engines on one GPU differ by bf16 rounding (other kernels, other reduction orders): a
# greedy divergence is a pass only at a near tie (harness.equivalence, as on the CPU), and
# agreeing steps must agree closely.
GAP_NATS = 0.25


def _compare(reference: dict, candidate: dict) -> dict:
    from vllm_kvcompress.harness.gpu_generate import compare_greedy

    return compare_greedy(reference, candidate)


def _describe(result: dict) -> str:
    return (f"{result['same']:.1%} same greedy tokens before any divergence, largest logprob gap {result['gap']:.3g}, "
            f"divergences at near ties {result['ties']}, elsewhere {result['splits']}")


@pytest.mark.parametrize("shape", ["small", "llama-8b"])
def test_none_gives_flash_attention_tokens(monkeypatch, shape):
    """By default method none hands attention to FLASH_ATTN; with KVCOMPRESS_NONE_CUDA_BACKEND=plugin
    the plugin's own dense layout and Triton decode (CUDA graphs included) give FLASH_ATTN's tokens."""
    flash = _generate(monkeypatch, shape, attention_backend="FLASH_ATTN")
    delegated = _generate(monkeypatch, shape, attention_backend="kvcompress",
                          additional_config={"kvcompress": {"method": "none"}})
    ours = _generate(monkeypatch, shape, none_backend="plugin", attention_backend="kvcompress",
                     additional_config={"kvcompress": {"method": "none"}})
    result = _compare(flash, ours)
    print(f"{shape}: kvcompress none (plugin layout) vs FLASH_ATTN: {_describe(result)} "
          f"({ours['distinct_tokens']} distinct tokens); impls {ours['attention_impls']} vs "
          f"{flash['attention_impls']}, cudagraph {ours['cudagraph_mode']}, start {ours['start_s']} s "
          f"(FA3 {flash['start_s']} s); default none runs {delegated['attention_impls']}")
    assert delegated["attention_impls"] == flash["attention_impls"] != ["KVCompressImpl"]
    assert [o["token_ids"] for o in delegated["outputs"]] == [o["token_ids"] for o in flash["outputs"]]
    assert ours["attention_impls"] == ["KVCompressImpl"]
    assert not result["splits"] and result["gap"] <= GAP_NATS


def _triton_and_reference(monkeypatch, shape: str, settings: dict, codebooks_m=None, **llm) -> tuple[dict, dict, dict]:
    """The same plugin engine on the Triton kernels and on the PyTorch ops (same CUDA tensors),
    and their comparison; both must run the plugin's attention."""
    runs = [_generate(monkeypatch, shape, kernels=kernels, codebooks_m=codebooks_m, attention_backend="kvcompress",
                      additional_config={"kvcompress": dict(settings)}, **llm) for kernels in ("auto", "reference")]
    triton, reference = runs
    assert triton["attention_impls"] == reference["attention_impls"] == ["KVCompressImpl"]
    return triton, reference, _compare(reference, triton)


@pytest.mark.parametrize("shape", ["small", "llama-8b"])
def test_lookat_triton_path_matches_its_reference_path(monkeypatch, shape):
    triton, reference, result = _triton_and_reference(monkeypatch, shape, {"method": "lookat", "value_bits": 4},
                                                      codebooks_m=16)
    print(f"{shape}: LOOKAT m16 int4 values, Triton vs PyTorch ops on the GPU: {_describe(result)} "
          f"({triton['distinct_tokens']} distinct tokens); pool {triton['kv_cache_tokens']} "
          f"tokens; kernels {triton['kernels']} vs {reference['kernels']}")
    # The bar (>= 95% same greedy tokens) where no near tie intervenes; a divergence
    # at a near tie ends the comparison of that prompt without failing it.
    assert not result["splits"] and result["gap"] <= GAP_NATS
    assert result["same"] >= 0.95 or result["ties"]


EVICTIONS = {"knorm": {"method": "knorm", "max_kv_tokens": 256},
             "snapkv": {"method": "snapkv", "max_kv_tokens": 256},
             "lookat+knorm": {"method": "lookat+knorm", "value_bits": 4, "max_kv_tokens": 256}}


@pytest.mark.parametrize("method", sorted(EVICTIONS))
def test_eviction_triton_path_matches_its_reference_path(monkeypatch, method):
    """Whole-row eviction on CUDA (vLLM's V1 runner, selected by the plugin; decode steps
    replay FULL graphs, compaction runs after the forward): compaction and decode on the
    Triton kernels against the same engine on the PyTorch ops, prompts longer than the budget."""
    triton, _, result = _triton_and_reference(monkeypatch, "small", EVICTIONS[method],
                                              codebooks_m=16 if method.startswith("lookat") else None)
    print(f"small: {method} (256-token budget), Triton vs PyTorch ops on the GPU: {_describe(result)} "
          f"({triton['distinct_tokens']} distinct tokens); cudagraph {triton['cudagraph_mode']}, start "
          f"{triton['start_s']} s")
    assert not result["splits"] and result["gap"] <= GAP_NATS


@pytest.mark.parametrize("graphs", ["eager", "piecewise", "full"])
def test_headkv_triton_path_matches_its_reference_path(monkeypatch, tmp_path, graphs):
    """HeadKV's per-(layer, KV head) streams on CUDA (``KVCOMPRESS_CUDA_STREAMS=experimental``
    until this passes): decode on the Triton stream kernel against the same engine on the
    PyTorch ops (which never capture). Head scores skewed so the streams' budgets differ; a
    256-token step budget so the 777-token prompt is chunked (bottom-right masks) before its
    compression. ``full``: decode batches replay FULL graphs from the stream buffers, and the
    steps that compress run eagerly."""
    from benchmarks.gpu_engine import synthetic_artefact

    path = synthetic_artefact("head_scores", tmp_path, SMALL)  # skewed, seeded
    monkeypatch.setenv("KVCOMPRESS_CUDA_STREAMS", "experimental")
    compilation = {"eager": {"mode": 0},
                   "piecewise": {"mode": 3, "cudagraph_mode": "PIECEWISE", "cudagraph_capture_sizes": [1, 2, 4, 8]},
                   "full": {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY", "cudagraph_capture_sizes": [1, 2, 4, 8]},
                   }[graphs]
    triton, _, result = _triton_and_reference(
        monkeypatch, "small", {"method": "headkv", "head_scores": str(path), "max_kv_tokens": 256},
        max_num_batched_tokens=256, compilation_config=compilation)
    print(f"small: headkv (256-token budget, skewed heads, {graphs}), Triton vs PyTorch ops on the GPU: "
          f"{_describe(result)} ({triton['distinct_tokens']} distinct tokens); cudagraph {triton['cudagraph_mode']}, "
          f"start {triton['start_s']} s")
    assert not result["splits"] and result["gap"] <= GAP_NATS
    if graphs == "full":  # not degraded to eager: the backend supports decode graphs
        assert "FULL" in triton["cudagraph_mode"]


@pytest.mark.parametrize("method", ["kvquant", "kvquant+snapkv"])
def test_kvquant_triton_path_matches_its_reference_path(monkeypatch, tmp_path, method):
    """kvquant rows on CUDA (``KVCOMPRESS_CUDA_KVQUANT=experimental`` until this passes): the
    Triton decode (keys turned to their stored positions in the kernel; FULL decode graphs)
    against the same engine on the PyTorch ops; alone, and under SnapKV at a 256-token budget
    (rows compacted, positions stored). Key ranges synthetic for the re-drawn weights."""
    from benchmarks.gpu_engine import synthetic_artefact

    monkeypatch.setenv("KVCOMPRESS_CUDA_KVQUANT", "experimental")
    path = synthetic_artefact("key_ranges", tmp_path, SMALL, weight_std=0.02)  # _generate's init_std
    settings = {"method": method, "key_ranges": str(path), **({"max_kv_tokens": 256} if "+" in method else {})}
    triton, _, result = _triton_and_reference(monkeypatch, "small", settings)
    print(f"small: {method} (8-bit keys and values), Triton vs PyTorch ops on the GPU: {_describe(result)} "
          f"({triton['distinct_tokens']} distinct tokens); cudagraph {triton['cudagraph_mode']}, start "
          f"{triton['start_s']} s")
    assert not result["splits"] and result["gap"] <= GAP_NATS
    assert "FULL" in triton["cudagraph_mode"]


# KVzap's threshold rule and DMS: ring layouts whose decisions come from learned scores
# (synthetic artefacts for the dummy model, as the benchmark rows use: benchmarks.gpu_engine).
RING_METHODS = {"kvzap": ("kvzap_predictor", {"method": "kvzap", "kvzap_threshold": 0.0, "kvzap_window": 64}),
                "dms": ("dms_adapters", {"method": "dms"})}


@pytest.mark.parametrize("graphs", ["eager", "full"])
@pytest.mark.parametrize("method", sorted(RING_METHODS))
def test_ring_stream_triton_path_matches_its_reference_path(monkeypatch, tmp_path, method, graphs):
    """KVzap (threshold) and DMS on CUDA (``KVCOMPRESS_CUDA_STREAMS=experimental``): decode on the
    Triton stream kernel against the same engine on the PyTorch ops (eager: the reference ops are
    never captured). Both compute the same scores from the same hidden states, so their
    decisions, and so their tokens, agree up to near ties; a chunked 777-token prompt.
    ``full``: the Triton engine's ring decodes replay FULL graphs from the stream buffers (victims,
    survivor counts, decision rows), so a buffer a replay does not refill changes tokens. Two
    prompts are shorter than DMS's window (256): their decodes in vLLM's layout replay too."""
    from benchmarks.gpu_engine import synthetic_artefact

    setting, settings = RING_METHODS[method]
    path = synthetic_artefact(setting, tmp_path, SMALL)
    monkeypatch.setenv("KVCOMPRESS_CUDA_STREAMS", "experimental")
    llm = {"enforce_eager": True, "compilation_config": {"mode": 0}} if graphs == "eager" else {}
    triton, _, result = _triton_and_reference(
        monkeypatch, "small", {**settings, setting: str(path)}, max_num_batched_tokens=256, **llm)
    print(f"small: {method} (ring layout, synthetic artefact, {graphs}), Triton vs PyTorch ops on the GPU: "
          f"{_describe(result)} ({triton['distinct_tokens']} distinct tokens); decode steps by graph mode "
          f"{triton['decode_modes']}; start {triton['start_s']} s")
    assert not result["splits"] and result["gap"] <= GAP_NATS
    if graphs == "full":  # decode steps replay; a step that compresses runs eager
        assert triton["decode_modes"].get("FULL", 0) > triton["decode_modes"].get("NONE", 0)


COMPILED_LEARNED = {"kvzap-threshold": ("kvzap_predictor", {"method": "kvzap", "kvzap_threshold": 0.0, "kvzap_window": 64}),
                    "kvzap-top-k": ("kvzap_predictor", {"method": "kvzap", "max_kv_tokens": 256}),
                    "dms": ("dms_adapters", {"method": "dms"})}


@pytest.mark.parametrize("mode", sorted(COMPILED_LEARNED))
def test_compiled_learned_scores_with_piecewise_graphs_give_the_eager_tokens(monkeypatch, tmp_path, mode):
    """KVzap's predictor and DMS's adapters run as a custom op into persistent buffers
    (``kvcompress::score_into``), so vLLM compiles the model and replays PIECEWISE CUDA graphs
    around the stream attention: a replay must fill the buffers the attention reads as the
    eager hook does. Compiled + PIECEWISE against ``--enforce-eager``, same engine otherwise:
    tokens up to near ties."""
    from benchmarks.gpu_engine import synthetic_artefact

    monkeypatch.setenv("KVCOMPRESS_CUDA_STREAMS", "experimental")
    setting, settings = COMPILED_LEARNED[mode]
    settings = {**settings, setting: str(synthetic_artefact(setting, tmp_path, SMALL))}
    runs = [_generate(monkeypatch, "small", attention_backend="kvcompress", max_num_batched_tokens=256,
                      additional_config={"kvcompress": settings}, **llm)
            for llm in ({"enforce_eager": True, "compilation_config": {"mode": 0}},
                        {"compilation_config": {"cudagraph_mode": "PIECEWISE", "cudagraph_capture_sizes": [1, 2, 4, 8]}})]
    result = _compare(*runs)
    print(f"small: {mode} (synthetic artefact), compiled + PIECEWISE vs eager: {_describe(result)}; "
          f"cudagraph {runs[1]['cudagraph_mode']}")
    assert runs[1]["cudagraph_mode"] != "NONE"
    assert not result["splits"] and result["gap"] <= GAP_NATS


@pytest.mark.parametrize("method", ["knorm", "headkv"])
def test_async_scheduling_gives_the_sync_tokens(monkeypatch, tmp_path, method):
    """Whole-row eviction and HeadKV's budget streams with vLLM's async scheduling
    (``--async-scheduling``): step N+1 is scheduled while step N runs and compacts (HeadKV:
    repacks its prompt). In a pool of 64 blocks that 12 requests share (each prompt needs up to
    57 blocks before its compression), freed blocks go to the next request at once, so a block
    freed while the worker still reads it would change tokens. The tokens are those of
    synchronous scheduling (``--no-async-scheduling``), up to near ties."""
    settings = dict(EVICTIONS["knorm"])
    if method == "headkv":
        from benchmarks.gpu_engine import synthetic_artefact

        monkeypatch.setenv("KVCOMPRESS_CUDA_STREAMS", "experimental")
        settings = {"method": "headkv", "max_kv_tokens": 256,
                    "head_scores": str(synthetic_artefact("head_scores", tmp_path, SMALL))}
    lengths = (300, 41, 777, 129, 640, 513, 255, 900, 64, 700, 333, 480)
    runs = [_generate(monkeypatch, "small", attention_backend="kvcompress", async_scheduling=asynchronous,
                      prompt_lengths=lengths, num_gpu_blocks_override=64, max_model_len=1000,
                      additional_config={"kvcompress": settings}) for asynchronous in (False, True)]
    result = _compare(*runs)
    print(f"small: {method} (256-token budget), 12 requests in 64 blocks, async vs sync scheduling: "
          f"{_describe(result)}; cudagraph {runs[1]['cudagraph_mode']}")
    assert [run["async_scheduling"] for run in runs] == [False, True]
    assert runs[1]["attention_impls"] == ["KVCompressImpl"]
    assert not result["splits"] and result["gap"] <= GAP_NATS


def test_knorm_frees_blocks_on_cuda(monkeypatch):
    """Blocks really return to vLLM's pool on CUDA: a 640-token prompt holds 40 blocks of 16,
    then ceil((256 + 1) / 16) = 17 once compacted to its 256-token budget; every block is
    free again when the requests finish."""
    from vllm_kvcompress.harness.gpu_generate import model_folder
    from vllm_kvcompress.harness.step_trace import run_traced

    folder, _ = model_folder(SMALL)
    llm = {"model": str(folder), "load_format": "dummy", "skip_tokenizer_init": True, "seed": 0,
           "dtype": "bfloat16", "max_model_len": 4096, "gpu_memory_utilization": 0.3, "max_num_seqs": 8,
           "block_size": 16, "compilation_config": {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"},
           "attention_backend": "kvcompress", "additional_config": {"kvcompress": dict(EVICTIONS["knorm"])}}
    traced = run_traced(llm, _prompts(SMALL["vocab_size"], lengths=(640, 640)), max_tokens=24)
    held = [step["blocks"].get("0") for step in traced["steps"]]
    first = next(i for i, step in enumerate(traced["steps"]) if step["computed"].get("0") == 640)
    print(f"knorm on CUDA: request 0 holds {held[first]} -> {held[first + 1]} blocks after compaction; "
          f"free blocks at the end {traced['steps'][-1]['free_blocks']} of {traced['num_blocks']}")
    assert held[first] == 40 and held[first + 1] == 17
    assert all(h <= 18 for h in held[first + 1:] if h is not None)
    assert traced["steps"][-1]["free_blocks"] == traced["num_blocks"]


@pytest.mark.parametrize("q_len,kv_len", [(300, 300), (128, 777)])
def test_prefill_on_flash_attention_matches_torch(q_len, kv_len):
    """On CUDA the prefill ops attend with vLLM's FlashAttention (varlen, bottom-right causal):
    the same result as torch SDPA with the explicit mask, a whole prompt and a chunk after
    cached context, GQA 4:1."""
    from vllm_kvcompress.kernels import paged_dense_ref

    assert paged_dense_ref._flash_varlen() is not None, "vLLM's FlashAttention build is not importable"
    generator = torch.Generator(device="cuda").manual_seed(0)
    query = torch.randn(q_len, 16, 128, device="cuda", generator=generator).bfloat16()
    k, v = (torch.randn(4, kv_len, 128, device="cuda", generator=generator).bfloat16() for _ in range(2))
    flash = paged_dense_ref.causal_attend(query, k, v, 128 ** -0.5).float()
    q_pos = torch.arange(kv_len - q_len, kv_len, device="cuda").unsqueeze(1)
    mask = (torch.arange(kv_len, device="cuda").unsqueeze(0) <= q_pos)[None, None]
    torch_out = paged_dense_ref.attend(query.transpose(0, 1)[None], k[None], v[None], mask, 128 ** -0.5)
    torch_out = torch_out[0].transpose(0, 1).float()
    error = float((flash - torch_out).norm() / torch_out.norm())
    print(f"FlashAttention prefill vs torch SDPA, {q_len} queries over {kv_len}: relative error {error:.2e}")
    assert error < 1e-2
