"""kvcompress inside vLLM 0.32's CUDA build against vLLM's own KV caches, one machine, one run.

    python -m benchmarks.gpu_engine --out results/DATE/h200-engine [--configs vllm-bf16,kvc-none,...]
        [--workload quick|full] [--gpu-memory-utilization U] [--config-timeout 330] [--deadline-s S]
        [--cudagraph-mode MODE] [--profile]
    python -m benchmarks.gpu_engine --plot results/DATE/h200-engine     # summary.png, no GPU needed

Model: a Llama-3-8B-shaped config (32 layers, 32 query / 8 KV heads, head_dim 128) with dummy
weights (``load_format="dummy"``, no weights reach the GPU machine), bf16. LOOKAT codebooks are
synthetic (seeded normal centroids in the codebook file format), since there are no real keys to
calibrate on: speed and capacity are measured here, not accuracy; accuracy is measured on the CPU
path. Each config runs in its own process and its row is written as soon as it finishes
(``rows.jsonl``), so a sweep can be split over several device runs; ``summary.json``,
``summary.md`` (and ``summary.png`` when matplotlib is there) are rewritten from all rows of the
same workload and utilization each time, the newest row per config winning.

Measured per config, each ratio against ``vllm-bf16`` (FLASH_ATTN, bf16 KV):
- capacity: tokens vLLM's KV pool holds (``capacity_ratio``);
- decode-heavy throughput: output tokens/s, many requests of a short prompt and a long output,
  more than bf16's pool holds at once (``throughput_tok_s``, ``throughput_ratio``);
- long-context throughput: output tokens/s, fewer requests of a long prompt, also more than bf16's
  pool holds (``long_context_tok_s``, ``long_context_ratio``);
- TPOT: decode time per output token at batch 1 and 32 after a long prompt: a prefill-only run
  (``max_tokens=1``) on other prompts of the same length, then a run of ``tokens + 1`` on fresh
  prompts, then a second prefill-only run; the difference to the faster prefill divided by
  ``tokens`` (``tpot_ms_b1``/``_b32``, ``tpot_ratio_*`` = config / bf16, lower is better). Every timed run has its own random prompts, so vLLM's prefix
  cache never skips a prefill;
- engine start time, the attention implementation, the configured ``cudagraph_mode`` and the
  graphs vLLM actually captured (``graph_capture``: its capture lines from the config's log),
  and the kernels Triton compiled after start-up (``jit_while_serving``: vLLM's JIT monitor
  in the log; each compile is a latency spike inside a timed stage);
- no block leak: once every request has finished, vLLM's pool holds no block
  (``blocks_free_at_end``, from ``LLM.reset_prefix_cache()``, which succeeds only then); the
  sweep exits non-zero if a config leaked.

Workloads (requests x (prompt + output) tokens). The bf16 pool holds about
(u * 150e9 - 19.6e9) / 131e3 tokens at ``gpu_memory_utilization`` u on one H200 (131 KB of KV per
token for this shape; 0.85 -> 824K measured, 0.30 -> ~194K):
- ``quick``: u = 0.30 (bf16 pool ~194K tokens); decode-heavy 256 x (1024 + 512) = 393K tokens;
  long-context 16 x (16384 + 256) = 266K tokens; TPOT B=1 at a 32768-token context (128 tokens),
  B=32 at 4096 (64 tokens, 131K tokens: fits bf16's pool); max_model_len 34816.
- ``full``: u = 0.85; decode-heavy 320 x (2048 + 2048) = 1.31M tokens; long-context
  64 x (16384 + 1024) = 1.11M tokens; TPOT B=1 at 32768 (128 tokens), B=32 at 16384 (64 tokens):
  32 x 32K does not fit bf16's pool on one H200 (1.05M > 824K tokens); max_model_len 34816.
``--gpu-memory-utilization`` overrides the workload's value. ``full`` is one config per device run
with a larger ``--config-timeout`` (its decode-heavy part alone is 655K output tokens).

Configs: ``vllm-*`` are vLLM's own KV caches (bf16, fp8, int4 per token and head on TRITON_ATTN).
``kvc-none`` is the plugin with method none as it runs by default on CUDA: it delegates attention
to vLLM's FLASH_ATTN (``KVCOMPRESS_NONE_CUDA_BACKEND`` removed from its environment).
``kvc-none-dense`` is the same with ``KVCOMPRESS_NONE_CUDA_BACKEND=plugin``: the plugin's own dense
paged layout and Triton decode kernel, the baseline the LOOKAT configs share their glue with.
``lookat-mM-vB``: LOOKAT keys with M subspaces, values in B bits. ``knorm-Nx`` / ``snapkv-Nx``:
whole-row eviction keeping 1/N of each prompt (vLLM's V1 runner, vLLM's async scheduling; ``-sync``:
``--no-async-scheduling``; ``-b2``: ``buffer_blocks`` 2); ``headkv-4x``, ``kvzap-4x``, ``dms-4x``: the
stream methods at about the same ratio, with synthetic artefacts (``synthetic_artefact``; speed only)
and ``KVCOMPRESS_CUDA_STREAMS=experimental``; KVzap and DMS compiled (``kvzap-4x-eager``, ``dms-4x-eager``: eager); their pool holds bf16's
tokens, so ``capacity_tokens`` reads 1.00x and what eviction buys shows in the throughput
columns (a request holds 1/N of its blocks, so N times as many run at once).

Robustness: each config has ``--config-timeout`` seconds (its process group is killed after that;
the row holds the tail of its log and the stages it finished: ``PARTIAL`` lines). A config not named
``vllm-*`` that runs on CUDA graphs and gives no row is run once more with ``cudagraph_mode=PIECEWISE``
(row: ``fallback``, ``fallback_reason``), unless it timed out after its engine started (slow, not
broken; ``graph_fallback_helps``). With
``--deadline-s`` (seconds from the sweep's start) no config starts with less than 150 s left; the
skipped ones are printed and listed in summary.json (``skipped``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "bfloat16", "hidden_act": "silu",
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}

NONE_BACKEND_ENV = "KVCOMPRESS_NONE_CUDA_BACKEND"
STREAMS_ENV = "KVCOMPRESS_CUDA_STREAMS"
KVQUANT_ENV = "KVCOMPRESS_CUDA_KVQUANT"
DUMMY_WEIGHT_STD = 1e-3 / 3 ** 0.5  # vLLM's dummy weights: uniform in +-1e-3

# name -> llm: LLM kwargs; kvcompress: plugin settings or None (vLLM's own caches); codebooks_m: LOOKAT m
# (synthetic codebooks); env: set in the config's process (None = removed from it)
CONFIGS = {
    "vllm-bf16": {"llm": {}, "kvcompress": None, "codebooks_m": None, "env": {}},
    "vllm-fp8": {"llm": {"kv_cache_dtype": "fp8"}, "kvcompress": None, "codebooks_m": None, "env": {}},
    "vllm-int4_per_token_head": {"llm": {"kv_cache_dtype": "int4_per_token_head", "attention_backend": "TRITON_ATTN"},
                                 "kvcompress": None, "codebooks_m": None, "env": {}},
    "kvc-none": {"llm": {}, "kvcompress": {"method": "none"}, "codebooks_m": None, "env": {NONE_BACKEND_ENV: None}},
    "kvc-none-dense": {"llm": {}, "kvcompress": {"method": "none"}, "codebooks_m": None,
                       "env": {NONE_BACKEND_ENV: "plugin"}},
    "lookat-m16-v4": {"llm": {}, "kvcompress": {"method": "lookat", "value_bits": 4}, "codebooks_m": 16, "env": {}},
    "lookat-m32-v16": {"llm": {}, "kvcompress": {"method": "lookat", "value_bits": 16}, "codebooks_m": 32, "env": {}},
    # Whole-row eviction on vLLM's V1 GPU runner (docs/gpu.md); compression ratio
    # r keeps 1 - r of a prompt past min_kv_tokens, so 0.5 -> 2x and 0.75 -> 4x the tokens held.
    "knorm-2x": {"llm": {}, "kvcompress": {"method": "knorm", "compression_ratio": 0.5}, "codebooks_m": None, "env": {}},
    "knorm-4x": {"llm": {}, "kvcompress": {"method": "knorm", "compression_ratio": 0.75}, "codebooks_m": None, "env": {}},
    "snapkv-4x": {"llm": {}, "kvcompress": {"method": "snapkv", "compression_ratio": 0.75}, "codebooks_m": None, "env": {}},
    # knorm-4x scheduled synchronously (--no-async-scheduling): what async scheduling buys.
    "knorm-4x-sync": {"llm": {"async_scheduling": False},
                      "kvcompress": {"method": "knorm", "compression_ratio": 0.75}, "codebooks_m": None, "env": {}},
    # Two blocks of decode tokens between compactions (32 on CUDA): half the compactions for
    # 16 more rows per request.
    "knorm-4x-b2": {"llm": {}, "kvcompress": {"method": "knorm", "compression_ratio": 0.75, "buffer_blocks": 2},
                    "codebooks_m": None, "env": {}},
    # The per-(layer, KV head) stream methods, still behind KVCOMPRESS_CUDA_STREAMS=experimental:
    # HeadKV with async scheduling and FULL decode graphs (headkv-4x-sync: without async), the
    # learned ones synchronous, compiled with PIECEWISE graphs (their scores through the
    # buffered custom op; the -eager rows: --enforce-eager). Their artefacts are synthetic
    # (seeded; no real model to calibrate or train on, see synthetic_artefact): HeadKV's budgets
    # differ per stream as they would; KVzap keeps exactly 1/4 (top-k); DMS (adapters) evicts
    # about 3/4 of what leaves its window.
    "headkv-4x": {"llm": {}, "kvcompress": {"method": "headkv", "compression_ratio": 0.75}, "codebooks_m": None,
                  "artefact": "head_scores", "env": {STREAMS_ENV: "experimental"}},
    "headkv-4x-sync": {"llm": {"async_scheduling": False}, "kvcompress": {"method": "headkv", "compression_ratio": 0.75},
                       "codebooks_m": None, "artefact": "head_scores", "env": {STREAMS_ENV: "experimental"}},
    "kvzap-4x": {"llm": {}, "kvcompress": {"method": "kvzap", "compression_ratio": 0.75},
                 "codebooks_m": None, "artefact": "kvzap_predictor", "env": {STREAMS_ENV: "experimental"}},
    "kvzap-4x-eager": {"llm": {"enforce_eager": True}, "kvcompress": {"method": "kvzap", "compression_ratio": 0.75},
                       "codebooks_m": None, "artefact": "kvzap_predictor", "env": {STREAMS_ENV: "experimental"}},
    "dms-4x": {"llm": {}, "kvcompress": {"method": "dms"}, "codebooks_m": None,
               "artefact": "dms_adapters", "env": {STREAMS_ENV: "experimental"}},
    "dms-4x-eager": {"llm": {"enforce_eager": True}, "kvcompress": {"method": "dms"}, "codebooks_m": None,
                     "artefact": "dms_adapters", "env": {STREAMS_ENV: "experimental"}},
    # kvquant rows (8-bit pre-RoPE keys and values) under SnapKV at 4x, the `balanced` preset's
    # composition at its eviction ratio, behind KVCOMPRESS_CUDA_KVQUANT=experimental; synthetic
    # key ranges for the dummy weights.
    "kvquant8-snapkv-4x": {"llm": {}, "kvcompress": {"method": "kvquant+snapkv", "key_bits": 8, "value_bits": 8,
                                                     "compression_ratio": 0.75},
                           "codebooks_m": None, "artefact": "key_ranges", "env": {KVQUANT_ENV: "experimental"}},
    "lookat-m16-v4+knorm-2x": {"llm": {}, "kvcompress": {"method": "lookat+knorm", "value_bits": 4,
                                                         "compression_ratio": 0.5},
                               "codebooks_m": 16, "env": {}},
}

# decode_heavy / long_context: (requests, prompt tokens, output tokens); tpot: (batch, context tokens, output tokens)
WORKLOADS = {
    "quick": {"gpu_memory_utilization": 0.30, "max_model_len": 34816, "decode_heavy": (256, 1024, 512),
              "long_context": (16, 16384, 256), "tpot": ((1, 32768, 128), (32, 4096, 64))},
    "full": {"gpu_memory_utilization": 0.85, "max_model_len": 34816, "decode_heavy": (320, 2048, 2048),
             "long_context": (64, 16384, 1024), "tpot": ((1, 32768, 128), (32, 16384, 64))},
    # For --profile only: the full workload's engine, stages reduced to a few seconds, so the
    # profiled run (e.g. --profile-shape 320,2048, the decode-heavy batch) starts soon.
    "profile": {"gpu_memory_utilization": 0.85, "max_model_len": 34816, "decode_heavy": (8, 256, 16),
                "long_context": (1, 256, 1), "tpot": ()},
}

BASE = "vllm-bf16"
MIN_LEFT_S = 150  # --deadline-s: no config starts with less than this left
# A config starts once the GPU holds less than this (vLLM sizes its pool from the memory free
# at start-up: an engine a killed run left behind shrank knorm-2x's pool to 0.18x on 2026-12-05).
IDLE_GPU_USED_MIB = 2048
IDLE_GPU_WAIT_S = 90
# Prompt seeds, one per timed run, so that no run's prompts share a prefix-cache block with another's.
SEED_WARMUP, SEED_DECODE_HEAVY, SEED_LONG_CONTEXT, SEED_TPOT_PREFILL, SEED_TPOT_TOTAL = 1, 3, 4, 1000, 2000
SEED_DECODE_HEAVY_PREFILL = 5


def _prompts(count: int, length: int, seed: int):
    import torch
    from vllm.inputs import TokensPrompt

    generator = torch.Generator().manual_seed(seed)
    return [TokensPrompt(prompt_token_ids=torch.randint(100, 120000, (length,), generator=generator).tolist())
            for _ in range(count)]


def _timed(llm, prompts, max_tokens: int) -> tuple[float, int]:
    """Seconds and output tokens of one ``generate`` (it returns once the engine has sampled every token)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0, detokenize=False)
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - started, sum(len(o.outputs[0].token_ids) for o in outputs)


def _tpot(llm, batch: int, context: int, tokens: int) -> tuple[float, dict]:
    """Decode ms per token after ``batch`` prompts of ``context`` tokens: (a run of ``tokens + 1``
    minus a prefill-only run) / ``tokens``. The prefill-only run goes before and after the long
    one and the faster counts: the first prefill of a shape can carry one-off costs (the
    allocator growing for its temporaries), which made kvzap-4x's B=32 TPOT 0.91 ms, 64 decode
    steps in 58 ms (h200-eviction-13). Other prompts for each run (same lengths): the prefix
    cache must not skip a prefill."""
    before, _ = _timed(llm, _prompts(batch, context, SEED_TPOT_PREFILL + batch), 1)
    total_s, out = _timed(llm, _prompts(batch, context, SEED_TPOT_TOTAL + batch), tokens + 1)
    after, _ = _timed(llm, _prompts(batch, context, SEED_TPOT_PREFILL + 1 + batch), 1)
    prefill_s = min(before, after)
    return round(1000 * (total_s - prefill_s) / tokens, 2), {
        "context": context, "tokens": tokens, "prefill_s": round(prefill_s, 3),
        "prefill_runs_s": [round(before, 3), round(after, 3)], "total_s": round(total_s, 3), "out_tokens": out}


def _emit(tag: str, row: dict) -> None:
    print(f"{tag} " + json.dumps(row), flush=True)


# --profile: the decode steps of a batch of PROFILE_BATCH prompts of PROFILE_CONTEXT tokens (the prefill
# steps skipped), kernels by GPU time (torch profiler in the engine's worker); --profile-shape B,CONTEXT
# picks another batch and context, e.g. the decode-heavy one's.
PROFILE_BATCH, PROFILE_CONTEXT, PROFILE_SKIP_STEPS, PROFILE_STEPS = 32, 4096, 40, 24


def engine_kwargs(name: str, workload: dict, utilization: float, cudagraph_mode: str | None = None) -> dict:
    """``LLM(**kwargs)`` of config ``name`` (its model folder, synthetic codebooks and artefacts made here);
    the config's ``env`` is the caller's to set."""
    from vllm_kvcompress.harness.gpu_generate import model_folder

    config = CONFIGS[name]
    folder, codebooks = model_folder(LLAMA_8B, config["codebooks_m"])
    kwargs = dict(config["llm"])
    if config["kvcompress"] is not None:
        settings = dict(config["kvcompress"], **({"codebooks": str(codebooks)} if codebooks else {}))
        if config.get("artefact"):
            settings[config["artefact"]] = str(synthetic_artefact(config["artefact"], folder, LLAMA_8B))
        kwargs.update(attention_backend="kvcompress", additional_config={"kvcompress": settings})
    if cudagraph_mode:
        kwargs["compilation_config"] = {"cudagraph_mode": cudagraph_mode}
    return dict(model=str(folder), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", seed=0,
                max_model_len=workload["max_model_len"], gpu_memory_utilization=utilization, max_num_seqs=512,
                **kwargs)


def run_one(name: str, workload: dict, utilization: float, cudagraph_mode: str | None = None,
            profile_dir: Path | None = None, profile_shape: tuple[int, int] = (PROFILE_BATCH, PROFILE_CONTEXT),
            prefill_split: bool = False) -> dict:
    """One config in this process: start, capacity, decode-heavy throughput, TPOT per workload batch and
    long-context throughput (``profile_dir``: then a profiled decode run, its kernel table
    ``profile-<config>.txt`` there; ``prefill_split``: after the decode-heavy run, its prompts'
    prefill alone, one output token each, ``decode_heavy_prefill_s``). Prints ``PARTIAL {json}``
    after each stage (what a timeout keeps)."""
    from vllm import LLM

    from vllm_kvcompress.harness.gpu_generate import engine_facts

    kwargs = engine_kwargs(name, workload, utilization, cudagraph_mode)
    traces = None
    if profile_dir is not None:
        traces = Path(tempfile.mkdtemp(prefix="kvc-profile-"))
        kwargs["profiler_config"] = {"profiler": "torch", "torch_profiler_dir": str(traces),
                                     "torch_profiler_with_stack": False, "torch_profiler_use_gzip": True}
    started = time.perf_counter()
    llm = LLM(**kwargs)
    row = {"config": name, "start_s": round(time.perf_counter() - started, 1)}
    facts = engine_facts(llm)
    row.update(capacity_tokens=facts["kv_cache_tokens"], cudagraph_mode=facts["cudagraph_mode"],
               attention=",".join(facts["attention_impls"]))
    _emit("PARTIAL", row)
    _timed(llm, _prompts(2, 256, SEED_WARMUP), 8)  # warm-up
    count, prompt, output = workload["decode_heavy"]
    seconds, out = _timed(llm, _prompts(count, prompt, SEED_DECODE_HEAVY), output)
    row.update(throughput_tok_s=round(out / seconds, 1), throughput_s=round(seconds, 1))
    # Decode steps (warm-up included) by the graph mode they ran in: FULL = a replay, NONE = eager
    row["decode_modes"] = engine_facts(llm)["decode_modes"]
    _emit("PARTIAL", row)
    if prefill_split:  # how much of the decode-heavy run its prefill takes (other prompts: no cache hits)
        prefill_s, _ = _timed(llm, _prompts(count, prompt, SEED_DECODE_HEAVY_PREFILL), 1)
        row["decode_heavy_prefill_s"] = round(prefill_s, 1)
        _emit("PARTIAL", row)
    for batch, context, tokens in workload["tpot"]:
        row[f"tpot_ms_b{batch}"], row[f"tpot_detail_b{batch}"] = _tpot(llm, batch, context, tokens)
        _emit("PARTIAL", row)
    if traces is not None:
        row["profile"] = _profile_decode(llm, name, traces, profile_dir, *profile_shape)
        # Where a TPOT stage ran the profiled batch and context, its TPOT is their step time.
        same = tuple(profile_shape) in [(b, c) for b, c, _ in workload["tpot"]]
        step_ms = row.get(f"tpot_ms_b{profile_shape[0]}") if same else None
        for field, range_name in (("compaction", COMPACTION_RANGE), ("predictor", PREDICTOR_RANGE)):
            share = range_time(traces, PROFILE_STEPS, range_name)
            if share is not None:
                gpu_ms = share["gpu_ms_per_step"]
                share["pct_of_step"] = round(100 * gpu_ms / step_ms, 2) if step_ms and gpu_ms is not None else None
                row[field] = share
        _emit("PARTIAL", row)
    count, prompt, output = workload["long_context"]
    seconds, out = _timed(llm, _prompts(count, prompt, SEED_LONG_CONTEXT), output)
    row.update(long_context_tok_s=round(out / seconds, 1), long_context_s=round(seconds, 1))
    # No request left: vLLM resets its prefix cache only when every block but the null one is
    # free, so this is the block-leak check (eviction frees and re-allocates blocks all run long).
    row["blocks_free_at_end"] = bool(llm.reset_prefix_cache())
    # Only now: a CUDA context in this (front-end) process before the engine's profiling would cost pool.
    # The name is a convenience (the sweep asks nvidia-smi first).
    with contextlib.suppress(Exception):
        import torch

        row["device"] = torch.cuda.get_device_name(0)
    return row


DMS_WINDOW, DMS_EVICTED = 256, 0.75  # the synthetic DMS adapters' window and target share evicted


def synthetic_artefact(setting: str, folder: Path, model: dict, seed: int = 0,
                       weight_std: float = DUMMY_WEIGHT_STD) -> Path:
    """A seeded artefact for a dummy model, in the format the offline tools write, for the
    setting ``setting`` (``head_scores``, ``kvzap_predictor``, ``dms_adapters``, ``key_ranges``;
    ``weight_std``: the model's weights, for the key ranges):

    * head scores: cubes of uniforms (a few heads score high), so HeadKV's budgets differ;
    * KVzap: linear predictors with N(0, 1/hidden) weights (top-k keeps a fixed share anyway);
    * DMS: adapters whose logit ``100 (w . rmsnorm(h) + b) - 5`` is above 0 for about
      :data:`DMS_EVICTED` of the tokens: with w ~ N(0, 1/hidden) and unit-RMS states, w . h ~ N(0, 1),
      so b = 0.05 + the normal quantile of that share."""
    import statistics

    import torch
    from safetensors.torch import save_file

    layers, hidden, kv_heads = model["num_hidden_layers"], model["hidden_size"], model["num_key_value_heads"]
    generator = torch.Generator().manual_seed(seed)
    shape_meta = {"num_layers": str(layers), "hidden_size": str(hidden), "num_kv_heads": str(kv_heads)}
    if setting == "head_scores":
        from vllm_kvcompress.methods.headkv import HeadScores

        raw = torch.rand(layers, model["num_attention_heads"], generator=generator) ** 3 + 1e-3
        scores = HeadScores(tuple(map(tuple, (raw / raw.sum()).tolist())), kv_heads)
        path = folder / "head_scores.json"
        path.write_text(json.dumps(scores.to_json(model="synthetic, dummy weights")))
        return path
    weights = {f"layers.{i}.proj.weight": torch.randn(kv_heads, hidden, generator=generator) / hidden ** 0.5
               for i in range(layers)}
    if setting == "kvzap_predictor":
        from vllm_kvcompress.methods.kvzap.predictors import FORMAT

        tensors = {**weights, **{f"layers.{i}.proj.bias": torch.zeros(kv_heads) for i in range(layers)}}
        path = folder / "kvzap-linear.safetensors"
        save_file(tensors, str(path), metadata={"format": FORMAT, "kind": "linear", **shape_meta})
        return path
    if setting == "dms_adapters":
        from vllm_kvcompress.methods.dms.checkpoint import FORMAT

        bias = 0.05 + statistics.NormalDist().inv_cdf(DMS_EVICTED)
        tensors = {**weights, **{f"layers.{i}.proj.bias": torch.full((kv_heads,), bias) for i in range(layers)},
                   **{f"layers.{i}.norm.weight": torch.ones(hidden) for i in range(layers)}}
        path = folder / "dms-adapters.safetensors"
        save_file(tensors, str(path), metadata={"format": FORMAT, "window": str(DMS_WINDOW), **shape_meta})
        return path
    if setting == "key_ranges":
        return _synthetic_key_ranges(folder, model, weight_std)
    raise ValueError(f"no synthetic artefact for setting {setting!r}")


def _synthetic_key_ranges(folder: Path, model: dict, weight_std: float) -> Path:
    """kvquant's per-channel key ranges for a dummy model: +-5 standard deviations of a key
    channel, ``weight_std * sqrt(hidden)`` for unit-RMS states (vLLM's dummy weights are
    uniform in +-1e-3: std 1e-3 / sqrt(3))."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from vllm_kvcompress.methods.artefacts import model_signature
    from vllm_kvcompress.methods.kvquant import RANGES_FORMAT

    reach = 5 * weight_std * model["hidden_size"] ** 0.5
    head_dim = model["hidden_size"] // model["num_attention_heads"]
    one = torch.stack([torch.full((model["num_key_value_heads"], head_dim), -reach),
                       torch.full((model["num_key_value_heads"], head_dim), reach)], 1)
    tensors = {f"layer.{i}": one.clone() for i in range(model["num_hidden_layers"])}
    path = folder / "key-ranges.safetensors"
    save_file(tensors, str(path), metadata={"format": RANGES_FORMAT, "model": "synthetic, dummy weights",
                                            **model_signature(LlamaConfig(**model))})
    return path


def parse_profile_shape(text: str) -> tuple[int, int]:
    try:
        batch, context = (int(part) for part in text.split(","))
    except ValueError:
        raise SystemExit(f"--profile-shape: expected B,CONTEXT (two integers), got {text!r}") from None
    if batch < 1 or context < 1:
        raise SystemExit(f"--profile-shape: batch and context must be >= 1, got {text!r}")
    return batch, context


def _profile_decode(llm, name: str, traces: Path, profile_dir: Path, batch: int = PROFILE_BATCH,
                    context: int = PROFILE_CONTEXT) -> str:
    """Profile PROFILE_STEPS decode steps of a fresh batch; the worker's kernel table (self GPU
    time) is copied to ``profile_dir/profile-<name>.txt``, whose path is returned."""
    # Past the prefill steps (chunks of at most 8,192 tokens here) before profiling.
    skip = max(PROFILE_SKIP_STEPS, math.ceil(batch * context / 8192) + 8)
    llm.start_profile(delay_iterations=skip, max_iterations=PROFILE_STEPS)
    _timed(llm, _prompts(batch, context, SEED_TPOT_TOTAL + 7), skip + PROFILE_STEPS)
    llm.stop_profile()
    tables = sorted(traces.glob("*profiler_out*.txt"))
    target = profile_dir / f"profile-{name}.txt"
    header = (f"{name}: {PROFILE_STEPS} engine steps after {skip}, batch {batch} x "
              f"{context}-token prompts (the prefill steps fall in the skipped ones)\n")
    target.write_text(header + ("".join(t.read_text() for t in tables) if tables else "no table written\n"))
    return str(target)


COMPACTION_RANGE = "kvcompress_compaction"  # vllm_kvcompress.vllm.runner.COMPACTION_RANGE (the worker's range)
PREDICTOR_RANGE = "kvcompress_predictor"  # vllm_kvcompress.methods.base.PREDICTOR_RANGE (the learned hooks')


def range_time(traces: Path, steps: int, name: str = COMPACTION_RANGE) -> dict | None:
    """Host and GPU time per profiled step inside the worker's profiler range ``name`` (the
    runner's compaction, the learned methods' hooks; ``ranges``: how many, e.g. one per layer
    and step for the hooks), from the worker's trace
    (``user_annotation`` on the host, ``gpu_user_annotation`` on the GPU); None when the
    trace has no such range (no compaction, no learned method)."""
    import gzip

    host = gpu = 0.0
    calls = gpu_ranges = 0
    for path in sorted(traces.glob("*.json*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as f:
            events = json.load(f).get("traceEvents", [])
        for event in events:
            if event.get("name") != name:
                continue
            if event.get("cat") == "user_annotation":
                host += event.get("dur", 0.0)
                calls += 1
            elif event.get("cat") == "gpu_user_annotation":
                gpu += event.get("dur", 0.0)
                gpu_ranges += 1
    if not calls:
        return None
    return {"ranges": calls, "host_ms_per_step": round(host / 1000 / steps, 3),
            "gpu_ms_per_step": round(gpu / 1000 / steps, 3) if gpu_ranges else None}


# ---------------------------------------------------------------------------------------------- logs

_CAPTURE = re.compile(r"(Capturing[^:|\r\n]*?CUDA graphs?(?: \([^)]*\))?)[^\r\n]*?(\d+)/(\d+)")
_CAPTURE_BARE = re.compile(r"(Capturing[^:|\r\n]*?CUDA graphs?(?: \([^)]*\))?)")


def graph_capture_lines(log: str, limit: int = 4, width: int = 160) -> list[str]:
    """vLLM's CUDA-graph lines in a config's log, short and distinct: downgrade warnings
    ("CUDAGraphMode.X is not supported with ..."), each capture progress bar's last state
    ("Capturing CUDA graphs (FULL): 35/35") and the last "Graph capturing finished ..."."""
    warnings, captures, finished = [], {}, None
    for segment in re.split(r"[\r\n]+", log):
        if "CUDAGraphMode." in segment and "not supported" in segment:
            text = segment[segment.index("CUDAGraphMode."):].strip()[:width]
            if text not in warnings:
                warnings.append(text)
        elif "Graph capturing finished" in segment:
            finished = segment[segment.index("Graph capturing finished"):].strip()[:width]
        elif "Capturing" in segment and "CUDA graph" in segment:
            match = _CAPTURE.search(segment)
            if match:
                captures[match.group(1)] = f"{match.group(1)}: {match.group(2)}/{match.group(3)}"
            else:
                bare = _CAPTURE_BARE.search(segment)
                if bare:
                    captures.setdefault(bare.group(1), bare.group(1))
    lines = warnings[:1] + [c[:width] for c in captures.values()] + ([finished] if finished else []) + warnings[1:]
    return lines[:limit]


_JIT = re.compile(r"Triton kernel JIT compilation during inference: (\w+)")


def jit_while_serving(log: str) -> list[str]:
    """Kernels that vLLM's JIT monitor saw Triton compile after start-up (each a latency spike
    inside a timed stage), in order, once each."""
    return list(dict.fromkeys(_JIT.findall(log)))


def captured_modes(lines: list[str]) -> str:
    """'FULL+PIECEWISE' from capture lines that reached a nonzero count; '' when none did."""
    modes = set()
    for line in lines:
        match = re.match(r"Capturing[^(]*\(([^)]*)\): (\d+)/\d+", line)
        if match and int(match.group(2)) > 0:
            modes.update(m for m in ("FULL", "PIECEWISE") if re.search(rf"\b{m}\b", match.group(1)))
    return "+".join(sorted(modes))


# ------------------------------------------------------------------------------------------ summary

def _ratio(value, base) -> float | None:
    if not isinstance(value, (int, float)) or not isinstance(base, (int, float)) or base <= 0 or value <= 0:
        return None
    return round(value / base, 2)


RATIOS = {"capacity_ratio": "capacity_tokens", "throughput_ratio": "throughput_tok_s",
          "long_context_ratio": "long_context_tok_s", "tpot_ratio_b1": "tpot_ms_b1", "tpot_ratio_b32": "tpot_ms_b32"}


def workload_text(workload: dict, utilization: float) -> str:
    (dn, dp, do), (ln, lp, lo) = workload["decode_heavy"], workload["long_context"]
    tpot = ", ".join(f"B={b} at {c} ({t} tokens)" for b, c, t in workload["tpot"])
    return (f"decode-heavy {dn} x ({dp} + {do}), long-context {ln} x ({lp} + {lo}), TPOT {tpot}; "
            f"gpu_memory_utilization {utilization:g}, max_model_len {workload['max_model_len']}")


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "**no: leak**"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    return str(value).replace("|", "/").replace("\n", " ")


def error_line(row: dict, width: int = 120) -> str:
    """A table cell for an error row: timed out or not, and the log's last line naming an error."""
    error = row.get("error", "")
    busy = re.match(r"another process held [\d,]+ MiB of the GPU[^;]*", error)
    if busy:
        error = error[busy.end():].lstrip("; ")
        if not error:
            return busy.group(0)
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    named = [line for line in lines if re.search(r"Error|Exception|error:|Killed|Traceback", line)]
    text = (named or lines or ["?"])[-1][-width:]
    prefix = busy.group(0) + "; " if busy else ""
    if not row.get("timed_out"):
        return prefix + text
    # A timeout's log tail names no cause worth a cell (the last warning before the kill): the
    # stages it did not reach say more.
    head = re.match(r"timed out after \d+ s", error)
    stages = {"throughput_tok_s": "decode-heavy", "tpot_ms_b1": "TPOT B=1", "tpot_ms_b32": "TPOT B=32",
              "long_context_tok_s": "long-context"}
    missing = [stage for field, stage in stages.items() if field not in row]
    return prefix + (head.group(0) if head else "timed out") + ("; not reached: " + ", ".join(missing) if missing else "")


def summarise(rows: list[dict], meta: dict) -> tuple[dict, str]:
    """summary.json's object and summary.md's text. Rows of another workload or utilization than
    ``meta``'s are left out; of several rows of one config the newest wins. Ratios against the
    newest vllm-bf16 row, stage by stage: a bf16 row that ran out of time after some stages still
    gives those stages' ratios (its error shows in its row); ``tpot_ratio_*`` = config / bf16
    (lower is better)."""
    workload, utilization = meta["workload"], meta["gpu_memory_utilization"]
    latest: dict[str, dict] = {}
    left_out = 0
    for r in rows:
        if r.get("workload", workload) != workload or r.get("gpu_memory_utilization", utilization) != utilization:
            left_out += 1
            continue
        latest[r["config"]] = dict(r)  # the newest row, in the place of the config's first
    rows = list(latest.values())
    base = latest.get(BASE)
    for r in rows:
        for ratio, field in RATIOS.items():
            value = _ratio(r.get(field), base.get(field)) if base is not None else None
            if value is not None:
                r[ratio] = value
            else:
                r.pop(ratio, None)
        r.setdefault("graph_modes", captured_modes(r.get("graph_capture", [])))
        for field in ("compaction", "predictor"):
            if (r.get(field) or {}).get("pct_of_step") is not None:
                r[f"{field}_pct"] = r[field]["pct_of_step"]
    summary = {**meta, "rows": rows}
    cols = [("config", "config"), ("capacity_tokens", "capacity tokens"), ("capacity_ratio", "x bf16"),
            ("throughput_tok_s", "decode-heavy tok/s"), ("throughput_ratio", "x bf16"),
            ("long_context_tok_s", "long-context tok/s"), ("long_context_ratio", "x bf16"),
            ("tpot_ms_b1", "TPOT B=1 ms"), ("tpot_ratio_b1", "/ bf16"), ("tpot_ms_b32", "TPOT B=32 ms"),
            ("tpot_ratio_b32", "/ bf16"), ("start_s", "start s"), ("attention", "attention"),
            ("cudagraph_mode", "cudagraph_mode (configured)"), ("graph_modes", "graphs captured"),
            ("jit_while_serving", "compiled while serving"), ("blocks_free_at_end", "all blocks free at end"),
            ("compaction_pct", "compaction, % of a B=32 step (GPU)"),
            ("predictor_pct", "predictor, % of a B=32 step (GPU)"),
            ("fallback", "fallback"), ("error", "error")]
    lines = [f"# kvcompress in vLLM on {meta['device']}, {meta['date']}", "",
             f"Model: {meta['model']}. Workload {workload}: {workload_text(WORKLOADS[workload], utilization)}.",
             f"vLLM {meta.get('vllm', '?')}, commit {meta.get('commit') or '?'}. `{meta['command']}`", "",
             ("Ratios against vllm-bf16: capacity and tok/s higher is better; TPOT ratio = config / bf16, lower is "
              "better. 'graphs captured' = modes of vLLM's capture progress bars in the config's log."), "",
             "| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [_cell(r.get(c)) for c, _ in cols[:-1]] + [_cell(error_line(r)) if "error" in r else ""]
        lines.append("| " + " | ".join(cells) + " |")
    graphs = [f"- {r['config']}: " + "; ".join(r["graph_capture"]) for r in rows if r.get("graph_capture")]
    if graphs:
        lines += ["", "CUDA-graph lines per config (from its log):", *graphs]
    if meta.get("skipped"):
        lines += ["", f"Skipped (deadline): {', '.join(meta['skipped'])}."]
    if left_out:
        lines += ["", f"{left_out} row(s) of rows.jsonl of another workload or utilization left out."]
    return summary, "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- plot

PLOT_BARS = (("capacity", "capacity_ratio"), ("decode-heavy tok/s", "throughput_ratio"),
             ("long-context tok/s", "long_context_ratio"), ("TPOT speed B=1", "tpot_ms_b1"),
             ("TPOT speed B=32", "tpot_ms_b32"))


def plot_summary(summary: dict, path: Path) -> Path:
    """Grouped bars per config, every bar a ratio to vllm-bf16 where higher is better (TPOT as
    bf16 TPOT / config TPOT); rows with an error are left out unless they kept partial results
    (a timed-out config: its finished stages are drawn, the label says so)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary["rows"] if "error" not in r or r.get("partial")]
    base = next((r for r in rows if r["config"] == BASE), None)

    def value(row: dict, field: str) -> float:
        if field.startswith("tpot_ms"):
            speed = _ratio(base.get(field), row.get(field)) if base is not None else None
            return speed if speed is not None else math.nan
        v = row.get(field)
        return float(v) if isinstance(v, (int, float)) else math.nan

    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(rows) + 2), 4.2))
    width = 0.8 / len(PLOT_BARS)
    for i, (label, field) in enumerate(PLOT_BARS):
        xs = [j + (i - (len(PLOT_BARS) - 1) / 2) * width for j in range(len(rows))]
        ys = [value(r, field) for r in rows]
        bars = ax.bar(xs, ys, width, label=label)
        for bar, y in zip(bars, ys):
            if not math.isnan(y):
                ax.annotate(f"{y:.2f}", (bar.get_x() + bar.get_width() / 2, y), textcoords="offset points",
                            xytext=(0, 2), ha="center", fontsize=6)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
    labels = [r["config"] + (f"\n({r['fallback']} fallback)" if r.get("fallback") else "")
              + ("\n(partial: timed out)" if r.get("partial") else "") for r in rows]
    ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("x vllm-bf16 (higher is better)")
    utilization = summary.get("gpu_memory_utilization")
    ax.set_title(f"kvcompress in vLLM on {summary.get('device', '?')}: workload {summary.get('workload', '?')}"
                 + (f", gpu_memory_utilization {utilization:g}" if isinstance(utilization, (int, float)) else "")
                 + f"\n{summary.get('model', '')}, {summary.get('date', '')}", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.3), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------- the sweep

def _device_name() -> str:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], check=False,
                              capture_output=True, text=True, timeout=30)
        names = [n.strip() for n in done.stdout.splitlines() if n.strip()]
        return names[0] if names else "unknown GPU"
    except (OSError, subprocess.SubprocessError):
        return "unknown GPU"


def _gpu_used_mib() -> int | None:
    """Memory in use on GPU 0 (every process's), from nvidia-smi; None where it cannot say."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                              check=False, capture_output=True, text=True, timeout=30)
        return int(done.stdout.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def wait_for_idle_gpu(limit_s: float = IDLE_GPU_WAIT_S, poll_s: float = 2.0, used_mib=_gpu_used_mib) -> int | None:
    """Waits until the GPU holds less than IDLE_GPU_USED_MIB (or ``limit_s`` passed); the MiB
    still in use then (None: unknown)."""
    deadline = time.monotonic() + limit_s
    while True:
        used = used_mib()
        if used is None or used < IDLE_GPU_USED_MIB or time.monotonic() >= deadline:
            return used
        time.sleep(poll_s)


def _versions() -> dict:
    facts = {}
    try:
        from importlib.metadata import version

        facts["vllm"] = version("vllm")
    except Exception:  # noqa: BLE001 - vLLM from a bundle on PYTHONPATH may carry no metadata
        facts["vllm"] = None
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True,
                              timeout=10, cwd=Path(__file__).resolve().parent)
        facts["commit"] = done.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        facts["commit"] = None
    return facts


_RUNNING: list[subprocess.Popen] = []  # the config process now running (killed with its group if the sweep is)


def _kill_group(proc: subprocess.Popen) -> None:
    """The config's process and the engine processes it started: its own process group (its id = the pid)."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            proc.poll()  # reap it: a zombie still counts as a member of the group
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)


def _on_signal(signum, _frame) -> None:
    for proc in _RUNNING:
        _kill_group(proc)
    raise SystemExit(128 + signum)


def apply_config_env(name: str, env) -> None:
    """Config ``name``'s environment into ``env`` (a dict, or ``os.environ``): set, or removed where None."""
    for key, value in CONFIGS[name]["env"].items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value


def graph_fallback_helps(name: str, partial: dict | None, timed_out: bool, forced_mode: str | None,
                         log: str = "") -> bool:
    """Whether a config that gave no row is worth a PIECEWISE retry: only one of the plugin's,
    on CUDA graphs (not eager, no mode forced), that failed at start-up (capture) or crashed
    while serving. One that timed out after its engine started is slow, not broken: a retry
    would spend another timeout on the same outcome (kvzap-4x on 2026-12-04 ran its device call
    past its limit so). One that ran out of GPU memory would run out again (dms-4x, 2026-12-05)."""
    if name.startswith("vllm-") or forced_mode is not None or CONFIGS[name]["llm"].get("enforce_eager"):
        return False
    if "CUDA out of memory" in log:
        return False
    started = partial is not None and "start_s" in partial
    return not (timed_out and started)


def run_config(name: str, args, utilization: float, timeout_s: float, log: Path,
               cudagraph_mode: str | None) -> tuple[dict | None, dict | None, str, bool]:
    """One ``--one`` process: (row or None, last partial row or None, its stderr, timed out)."""
    command = [sys.executable, "-m", "benchmarks.gpu_engine", "--one", name, "--out", str(args.out),
               "--workload", args.workload, "--gpu-memory-utilization", str(utilization)]
    if cudagraph_mode:
        command += ["--cudagraph-mode", cudagraph_mode]
    if args.profile:
        command += ["--profile", "--profile-shape", args.profile_shape]
    if args.prefill_split:
        command += ["--prefill-split"]
    env = os.environ.copy()
    apply_config_env(name, env)
    timed_out = False
    with tempfile.TemporaryFile("w+") as stdout, log.open("w") as stderr:
        proc = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True, env=env, start_new_session=True)
        _RUNNING.append(proc)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(proc)  # a timed-out config, or engine processes it left behind
            proc.wait()
            _RUNNING.remove(proc)
        stdout.seek(0)
        out = stdout.read()
    # vLLM logs (the engine's tracebacks included) go to stdout: keep them in the log too.
    with log.open("a") as f:
        f.write("\n----- stdout -----\n" + out)
    text = log.read_text(errors="replace")
    row = partial = None
    for line in out.splitlines():
        if line.startswith("ROW "):
            row = json.loads(line[4:])
        elif line.startswith("PARTIAL "):
            partial = json.loads(line[8:])
    return row, partial, text, timed_out


def _error_row(name: str, partial: dict | None, stderr: str, timed_out: bool, timeout_s: float) -> dict:
    row = dict(partial or {}, config=name)
    reason = f"timed out after {timeout_s:.0f} s; " if timed_out else ""
    row["error"] = reason + (stderr[-3000:] if stderr else "no output")
    if timed_out:
        row["timed_out"] = True
    if partial:
        row["partial"] = True
    return row


def sweep(args, names: list[str]) -> None:
    started = time.monotonic()
    out = Path(args.out)
    workload = WORKLOADS[args.workload]
    utilization = args.gpu_memory_utilization or workload["gpu_memory_utilization"]
    meta = {"device": _device_name(), "date": time.strftime("%Y-%m-%d"), "workload": args.workload,
            "gpu_memory_utilization": utilization, "workload_sizes": workload,
            "model": "Llama-3-8B shape, dummy weights, bf16", **_versions(),
            "command": "python -m benchmarks.gpu_engine " + " ".join(args.argv), "skipped": []}
    rows_file = out / "rows.jsonl"

    def left_s() -> float:
        return math.inf if args.deadline_s is None else args.deadline_s - (time.monotonic() - started)

    for index, name in enumerate(names):
        if left_s() < MIN_LEFT_S:
            meta["skipped"] = names[index:]
            print(f"[gpu_engine] deadline: {left_s():.0f} s left, skipped {', '.join(meta['skipped'])}",
                  file=sys.stderr, flush=True)
            break
        timeout_s = min(args.config_timeout, left_s() - 20)  # 20 s: kill it and write its row
        print(f"[gpu_engine] {name} (timeout {timeout_s:.0f} s) ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        used_at_start = wait_for_idle_gpu()
        row, partial, stderr, timed_out = run_config(name, args, utilization, timeout_s, out / f"{name}.log",
                                                     args.cudagraph_mode)
        if row is None and graph_fallback_helps(name, partial, timed_out, args.cudagraph_mode, stderr):
            reason = ("timed out; " if timed_out else "") + stderr[-600:]
            if left_s() < MIN_LEFT_S:
                row = _error_row(name, partial, stderr, timed_out, timeout_s)
                row["fallback_skipped"] = "PIECEWISE retry not started: deadline"
            else:
                retry_timeout_s = min(args.config_timeout, left_s() - 20)
                print(f"[gpu_engine] {name} gave no row; once more with cudagraph_mode=PIECEWISE "
                      f"(timeout {retry_timeout_s:.0f} s) ...", file=sys.stderr, flush=True)
                row, partial, stderr, timed_out = run_config(name, args, utilization, retry_timeout_s,
                                                             out / f"{name}.piecewise.log", "PIECEWISE")
                if row is None:
                    row = _error_row(name, partial, stderr, timed_out, retry_timeout_s)
                row.update(fallback="PIECEWISE", fallback_reason=reason)
        elif row is None:
            row = _error_row(name, partial, stderr, timed_out, timeout_s)
        if used_at_start is not None and used_at_start >= IDLE_GPU_USED_MIB:
            busy = (f"another process held {used_at_start:,} MiB of the GPU at this config's start: its pool is "
                    "smaller than the other rows' (not comparable)")
            row["error"] = busy + ("; " + row["error"] if row.get("error") else "")
        row["gpu_used_mib_at_start"] = used_at_start
        row["graph_capture"] = graph_capture_lines(stderr)
        row["graph_modes"] = captured_modes(row["graph_capture"])
        row["jit_while_serving"] = jit_while_serving(stderr)
        row.update(workload=args.workload, gpu_memory_utilization=utilization, wall_s=round(time.monotonic() - t0, 1))
        env = {k: v for k, v in CONFIGS[name]["env"].items() if v is not None}
        if env:
            row["env"] = env
        if args.cudagraph_mode:
            row["cudagraph_mode_forced"] = args.cudagraph_mode
        with rows_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        write_summary(out, meta)
    if meta["skipped"] or not names:
        write_summary(out, meta)
    leaked = [r["config"] for r in summarise(_rows(out), meta)[0]["rows"] if r.get("blocks_free_at_end") is False]
    if leaked:
        raise SystemExit(f"[gpu_engine] blocks still held after every request finished (a leak): {', '.join(leaked)}")


def _rows(out: Path) -> list[dict]:
    rows_file = out / "rows.jsonl"
    return [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()] \
        if rows_file.exists() else []


def write_summary(out: Path, meta: dict) -> None:
    rows = _rows(out)
    if meta["device"] == "unknown GPU":
        meta["device"] = next((r["device"] for r in rows if r.get("device")), meta["device"])
    summary, table = summarise(rows, meta)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(table)
    print(table, file=sys.stderr, flush=True)
    try:
        plot_summary(summary, out / "summary.png")
    except Exception as error:  # noqa: BLE001 - the plot is optional on the GPU machine
        print(f"[gpu_engine] no summary.png: {error!r}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="configs: " + ", ".join(CONFIGS) + "\nworkloads:\n" + "\n".join(
                                         f"  {n}: {workload_text(w, w['gpu_memory_utilization'])}"
                                         for n, w in WORKLOADS.items()))
    parser.add_argument("--out", help="results folder (rows.jsonl, summary.json/.md/.png, one log per config)")
    parser.add_argument("--plot", metavar="DIR", help="only draw DIR/summary.png from DIR/summary.json (no GPU)")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="quick")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="overrides the workload's value (quick 0.30, full 0.85)")
    parser.add_argument("--config-timeout", type=float, default=330.0,
                        help="seconds per config process (default 330); a hung config gets an error row")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help=f"seconds from the sweep's start; no config starts with less than {MIN_LEFT_S} s left")
    parser.add_argument("--cudagraph-mode", default=None,
                        help="compilation_config cudagraph_mode for every config (default: vLLM's; then a failed "
                             "non-vllm config is retried once with PIECEWISE)")
    parser.add_argument("--profile", action="store_true",
                        help=f"after the TPOT stages, profile {PROFILE_STEPS} decode steps at B={PROFILE_BATCH}, "
                             f"{PROFILE_CONTEXT}-token prompts: kernels by GPU time in OUT/profile-CONFIG.txt")
    parser.add_argument("--profile-shape", default=f"{PROFILE_BATCH},{PROFILE_CONTEXT}", metavar="B,CONTEXT",
                        help="--profile's batch and prompt length (default %(default)s; e.g. 256,1024: the quick "
                             "decode-heavy batch)")
    parser.add_argument("--prefill-split", action="store_true",
                        help="after the decode-heavy run, time its prompts' prefill alone (decode_heavy_prefill_s)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.plot:
        folder = Path(args.plot)
        print(plot_summary(json.loads((folder / "summary.json").read_text()), folder / "summary.png"))
        return
    if not args.out:
        parser.error("--out is required (or --plot DIR)")
    parse_profile_shape(args.profile_shape)  # a bad value stops here, not in every config's process
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.one:
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc(function): a local tool
        workload = WORKLOADS[args.workload]
        utilization = args.gpu_memory_utilization or workload["gpu_memory_utilization"]
        row = run_one(args.one, workload, utilization, args.cudagraph_mode, out if args.profile else None,
                      parse_profile_shape(args.profile_shape), args.prefill_split)
        _emit("ROW", row)
        return
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"--configs: unknown {', '.join(map(repr, unknown))}; allowed: {', '.join(CONFIGS)}")
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _on_signal)
    sweep(args, names)


if __name__ == "__main__":
    main()
