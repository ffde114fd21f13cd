"""LOOKAT inside vLLM on the real test model: the pool holds as many more tokens as the
byte arithmetic says, and a cached prefix gives the same output as an uncached one."""

import pytest

from vllm_kvcompress.offline.calibrate import ensure_codebooks
from vllm_kvcompress.kernels.lookat_ref import LookatLayout
from vllm_kvcompress.harness.generate import run_in_subprocess

pytestmark = pytest.mark.engine

POOL = 96 << 20
BLOCK = 128  # vLLM's CPU block size
LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64  # SmolLM2-135M


def _llm(model_dir, dtype="bfloat16", **extra):
    return dict(model=model_dir, dtype=dtype, max_model_len=2048, enforce_eager=True,
                kv_cache_memory_bytes=POOL, **extra)


def _lookat(codebooks, **settings):
    return {"attention_backend": "kvcompress",
            "additional_config": {"kvcompress": {"method": "lookat", "codebooks": str(codebooks), **settings}}}


def _expected_tokens(row_bytes: int) -> int:
    page = LAYERS * KV_HEADS * BLOCK * row_bytes  # one block, every layer
    return POOL // page * BLOCK


def test_pool_holds_more_tokens_as_the_bytes_say(smollm2_dir):
    # Capacity depends only on m and value_bits, not on codebook quality: small, fast k-means.
    codebooks = ensure_codebooks("smollm2-135m", 8, k=16, tokens=512, iters=3)
    prompt = [[1, 2, 3, 4]]
    dense = run_in_subprocess(_llm(smollm2_dir), prompt, max_tokens=4)
    lookat = run_in_subprocess(_llm(smollm2_dir, **_lookat(codebooks, value_bits=4)), prompt, max_tokens=4)
    layout = LookatLayout(head_dim=HEAD_DIM, m=8, value_bits=4)
    assert dense["kv_cache_tokens"] == _expected_tokens(layout.dense_row_bytes)
    assert lookat["kv_cache_tokens"] == _expected_tokens(layout.row_bytes)
    ratio = lookat["kv_cache_tokens"] / dense["kv_cache_tokens"]
    print(f"KV cache tokens at {POOL >> 20} MiB: bf16 {dense['kv_cache_tokens']}, "
          f"LOOKAT m=8 int4 values {lookat['kv_cache_tokens']} ({ratio:.2f}x; rows {layout.row_bytes} vs "
          f"{layout.dense_row_bytes} bytes)")
    assert ratio >= 5
    assert lookat["attention_impls"] == ["KVCompressImpl"]


@pytest.mark.parametrize("value_bits", [4])
def test_cached_prefix_gives_the_uncached_output(smollm2_dir, value_bits):
    from transformers import AutoTokenizer

    from vllm_kvcompress.offline.prompts import long_document_ids

    # Equality needs deterministic encoding, not good codebooks: a small, fast calibration.
    codebooks = ensure_codebooks("smollm2-135m", 16, tokens=1024, iters=5)
    ids = long_document_ids(AutoTokenizer.from_pretrained(smollm2_dir), 700)
    # fp32: in bf16 the 701-token and the 61-token prefill round differently (vLLM's own
    # attention: logprob gap 0.06 over 24 tokens, measured), and a key on a centroid
    # boundary then takes another code, so bf16 tokens differ for reasons not the cache's.
    llm = _llm(smollm2_dir, dtype="float32", enable_prefix_caching=True, **_lookat(codebooks, value_bits=value_bits))
    # Round 1 computes the prompt; round 2 finds its full blocks in the prefix cache.
    first, second = run_in_subprocess(llm, [ids], max_tokens=24, repeat=2)["outputs"]
    gap = max(abs(a - b) for a, b in zip(first["token_logprobs"], second["token_logprobs"], strict=True))
    print(f"prefix cache: {second['num_cached_tokens']} of {len(ids)} prompt tokens reused; "
          f"largest logprob gap {gap:.1e}; output {first['text']!r}")
    assert first["num_cached_tokens"] == 0 and second["num_cached_tokens"] >= 5 * BLOCK
    assert second["token_ids"] == first["token_ids"]
    assert gap < 1e-4
