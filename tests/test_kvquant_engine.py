"""kvquant inside vLLM on the real test model: the pool holds as many more tokens as the
row bytes say, and positions survive chunked prefill and a cached prefix (keys are stored
turned back to position 0 and turned forward by their row index when read)."""

import pytest

from vllm_kvcompress.eviction.streams import cdiv
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


STREAM_METHODS = {
    "dms": {"dms_adapters": "vllm_kvcompress/artefacts/dms/smollm2-135m/dms-cr8.safetensors"},
    "headkv": {"head_scores": "vllm_kvcompress/artefacts/head_scores/smollm2-135m.json", "compression_ratio": 0.75},
}


@pytest.mark.parametrize("method", sorted(STREAM_METHODS))
def test_kvquant_rows_under_stream_eviction_multiply_the_savings(smollm2_dir, method):
    """``kvquant+dms`` / ``kvquant+headkv``: the per-(layer, KV head) streams hold int8 kvquant
    rows (their logical positions inside), so vLLM's pool holds as many more tokens as the row
    bytes say, and eviction frees blocks of them as it does dense rows. The plain method's
    tokens forced through the composition: the same pages each step (HeadKV's budgets are
    fixed; DMS's decisions read the residual stream, which int8 rows nudge by a near tie at
    most) and log-probabilities within int8's error."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from vllm_kvcompress.harness.step_trace import run_traced
    from vllm_kvcompress.offline.prompts import long_document_ids

    root = Path(__file__).parents[1]
    settings = {k: str(root / v) if isinstance(v, str) else v for k, v in STREAM_METHODS[method].items()}
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = [long_document_ids(tokenizer, 400, offset=900 * i) for i in range(2)]
    pool = 33 * LAYERS * KV_HEADS * BLOCK * 2 * HEAD_DIM * 4  # 33 blocks of fp32 rows

    def llm(name):
        return dict(model=smollm2_dir, dtype="float32", max_model_len=2048, enforce_eager=True, kv_cache_memory_bytes=pool,
                    attention_backend="kvcompress", max_num_batched_tokens=256,
                    additional_config={"kvcompress": {"method": name, **settings, **(
                        {"key_ranges": str(ensure_key_ranges("smollm2-135m"))} if name.startswith("kvquant") else {})}})

    plain = run_traced(llm(method), prompts, max_tokens=40)
    composed = run_traced(llm(f"kvquant+{method}"), prompts, forced=[o["token_ids"] for o in plain["outputs"]])
    row = kvquant_ref.layout(HEAD_DIM, 8, 8, None, positions=True).row_bytes
    # (num_blocks: the scheduler's, vLLM's null block not counted)
    assert composed["num_blocks"] + 1 == pool // (LAYERS * KV_HEADS * BLOCK * row) and plain["num_blocks"] + 1 == 33

    def held(trace):  # what the scheduler holds each step; the pages the worker reported (ring layouts)
        return ([s["blocks"].get(r) for s in trace["steps"] for r in ("0", "1")],
                [s["pages_next"].get(r) for s in trace["steps"] for r in ("0", "1")])

    (plain_blocks, plain_pages), (blocks, pages) = held(plain), held(composed)
    differences = [abs(a - b) for a, b in zip(plain_pages, pages, strict=True) if a is not None] or [0]
    gaps = sorted(abs(a - b) for i in range(2) for a, b in zip(plain["outputs"][i]["token_logprobs"],
                                                                composed["outputs"][i]["token_logprobs"]))
    first = [b for b in blocks[::2] if b]
    print(f"kvquant+{method} vs {method} (forced tokens, fp32 model, int8 rows of {row} bytes vs {2 * HEAD_DIM * 4}): "
          f"pool {composed['num_blocks']} vs {plain['num_blocks']} blocks; blocks held differ at "
          f"{sum(a != b for a, b in zip(plain_blocks, blocks))}/{len(blocks)} request-steps, reported pages at "
          f"{sum(d > 0 for d in differences)} (at most {max(differences)}); logprob gap median "
          f"{gaps[len(gaps) // 2]:.4f}, max {gaps[-1]:.3f}; request 0 holds {max(first)} -> {first[-1]} blocks")
    assert gaps[len(gaps) // 2] < 0.02 and gaps[-1] < 1.5
    assert max(differences) <= 4 and (method == "dms" or blocks == plain_blocks)
    assert first[-1] < cdiv(len(prompts[0]) + 40, BLOCK)  # eviction freed blocks of kvquant rows
