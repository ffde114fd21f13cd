"""kvquant inside vLLM on the real test model: the pool holds as many more tokens as the
row bytes say, and positions survive chunked prefill and a cached prefix (keys are stored
turned back to position 0 and turned forward by their row index when read)."""

import pytest

from vllm_kvcompress.harness.equivalence import first_divergences
from vllm_kvcompress.harness.generate import run_in_subprocess
from vllm_kvcompress.kernels import kvquant_ref
from vllm_kvcompress.offline.key_ranges import ensure_key_ranges

pytestmark = pytest.mark.engine

POOL = 96 << 20
BLOCK = 128  # vLLM's CPU block size
LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64  # SmolLM2-135M


def _llm(model_dir, **extra):
    return dict(model=model_dir, dtype="bfloat16", max_model_len=2048, enforce_eager=True,
                kv_cache_memory_bytes=POOL, **extra)


def _kvquant(**settings):
    return {"attention_backend": "kvcompress", "additional_config": {"kvcompress": {
        "method": "kvquant", "key_ranges": str(ensure_key_ranges("smollm2-135m")), **settings}}}


def test_pool_holds_more_tokens_as_the_bytes_say(smollm2_dir):
    prompt = [[1, 2, 3, 4]]
    dense = run_in_subprocess(_llm(smollm2_dir), prompt, max_tokens=4)
    packed = run_in_subprocess(_llm(smollm2_dir, **_kvquant(key_bits=4, value_bits=4)), prompt, max_tokens=4)
    row = kvquant_ref.layout(HEAD_DIM, 4, 4, None).row_bytes
    assert packed["kv_cache_tokens"] == POOL // (LAYERS * KV_HEADS * BLOCK * row) * BLOCK
    ratio = packed["kv_cache_tokens"] / dense["kv_cache_tokens"]
    print(f"KV cache tokens at {POOL >> 20} MiB: bf16 {dense['kv_cache_tokens']}, kvquant int4 keys + int4 values "
          f"{packed['kv_cache_tokens']} ({ratio:.2f}x; rows {row} vs {4 * HEAD_DIM} bytes)")
    assert ratio >= 3.5
    assert packed["attention_impls"] == ["KVCompressImpl"]


def test_chunked_and_cached_prefill_give_the_whole_prompt_output(smollm2_dir):
    """A 1,500-token prompt prefilled whole, in 256-token chunks, and a second time over its
    cached prefix: each chunk's keys are turned back by their own positions, so all three
    read the same cache rows and give the same tokens (up to a rounding tie)."""
    from transformers import AutoTokenizer

    from vllm_kvcompress.offline.prompts import long_document_ids

    ids = long_document_ids(AutoTokenizer.from_pretrained(smollm2_dir), 1500)
    whole = run_in_subprocess(_llm(smollm2_dir, **_kvquant(), max_num_batched_tokens=2048), [ids], max_tokens=24)
    chunked = run_in_subprocess(_llm(smollm2_dir, **_kvquant(), max_num_batched_tokens=256,
                                     enable_prefix_caching=True), [ids], max_tokens=24, repeat=2)
    for other in chunked["outputs"]:
        divergences = first_divergences(whole["outputs"], [other])
        assert all(d.is_near_tie for d in divergences), [d.explain() for d in divergences]
    dense = run_in_subprocess(_llm(smollm2_dir, max_num_batched_tokens=2048), [ids], max_tokens=24)
    same = next((i for i, (a, b) in enumerate(zip(dense["outputs"][0]["token_ids"],
                                                  whole["outputs"][0]["token_ids"])) if a != b), 24)
    print(f"int8 keys and values: {same}/24 greedy tokens equal to bf16's before the first difference")
    assert same >= 4  # a wrong position turns the first token into noise
