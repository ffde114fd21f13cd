"""Compositions inside vLLM on the real test model: a compact row format under whole-row
eviction. The pool holds as many rows as the format's bytes say, compaction hands blocks
back to it as for dense rows, and kvquant rows keep their logical RoPE positions after
compaction moved them (methods/composition.py)."""

import pytest

from vllm_kvcompress.harness.generate import run_in_subprocess
from vllm_kvcompress.harness.step_trace import run_traced
from vllm_kvcompress.kernels import kvquant_ref
from vllm_kvcompress.offline.key_ranges import ensure_key_ranges

pytestmark = pytest.mark.engine

BLOCK = 128  # vLLM's CPU block size
LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64  # SmolLM2-135M
ROW = kvquant_ref.layout(HEAD_DIM, 8, 8, None, positions=True).row_bytes  # 64 + 4 + 64 + 2
PAGE = LAYERS * KV_HEADS * BLOCK * ROW


def _llm(model_dir, blocks, **extra):
    return dict(model=model_dir, dtype="bfloat16", max_model_len=min(2048, blocks * BLOCK), enforce_eager=True,
                kv_cache_memory_bytes=(blocks + 1) * PAGE, **extra)  # + vLLM's null block


def _kvc(method, **settings):
    return {"attention_backend": "kvcompress", "additional_config": {"kvcompress": {
        "method": method, "key_ranges": str(ensure_key_ranges("smollm2-135m")), **settings}}}


@pytest.fixture(scope="module")
def documents(smollm2_dir):
    from transformers import AutoTokenizer

    from vllm_kvcompress.offline.prompts import long_document_ids

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    return lambda n, count: [long_document_ids(tokenizer, n, offset=300 * i) for i in range(count)]


def test_kvquant_rows_under_knorm_free_blocks_as_dense_rows_do(smollm2_dir, documents):
    prompts = [p[:640] for p in documents(700, 4)]  # 5 full blocks each
    traced = run_traced(_llm(smollm2_dir, 15, **_kvc("kvquant+knorm", max_kv_tokens=256)), prompts, max_tokens=40)
    # vLLM's own block accounting over the format's page: 15 blocks of 134-byte rows
    assert traced["num_blocks"] == 15
    held = [step["blocks"].get("0") for step in traced["steps"]]
    first = next(i for i, step in enumerate(traced["steps"]) if step["computed"].get("0") == 640)
    # 5 blocks while the prompt is computed, ceil((256 + 1) / 128) = 3 once compacted
    assert held[first] == 5 and held[first + 1] == 3
    assert all(h <= 3 for h in held[first + 1:] if h is not None)
    assert traced["steps"][-1]["free_blocks"] == 15
    dense_page = LAYERS * KV_HEADS * BLOCK * 4 * HEAD_DIM
    print(f"kvquant+knorm: rows of {ROW} bytes ({dense_page / PAGE:.2f}x bf16's tokens per byte), request 0 "
          f"{held[first]} -> {held[first + 1]} blocks after compaction to 256 tokens: "
          f"{dense_page / PAGE * 640 / 256:.1f}x in all for this prompt")


@pytest.mark.parametrize("eviction", ["knorm", "snapkv"])
def test_compacted_kvquant_rows_keep_their_positions(smollm2_dir, documents, eviction):
    """The same eviction over dense bf16 rows and over kvquant int8 rows, the kvquant run forced
    along the dense run's greedy tokens: the kept sets differ only by key rounding, so each
    token's log-probability stays close (measured 2026-12-05: mean changes of 0.12 nats with
    knorm, 0.07 with snapkv). A row turned by its physical index instead of its logical position
    after compaction scores every kept key at a wrong angle (the bound of 0.5 is set between,
    not measured against such a bug). Greedy agreement alone is too brittle a measure here: int8 rows
    change a 0.25-nat margin at the fourth token of this prompt, and float rounding (the compiled
    CPU ops against the eager reference) moves that margin."""
    prompt = [documents(1500, 1)[0]]
    settings = {"compression_ratio": 0.5}
    dense = run_in_subprocess(_llm(smollm2_dir, 40, attention_backend="kvcompress",
                                   additional_config={"kvcompress": {"method": eviction, **settings}}),
                              prompt, max_tokens=24)
    tokens = dense["outputs"][0]["token_ids"]
    composed = run_in_subprocess(_llm(smollm2_dir, 40, **_kvc(f"kvquant+{eviction}", **settings)), prompt,
                                 forced=[tokens])
    assert composed["outputs"][0]["token_ids"] == tokens
    changes = [abs(a - b) for a, b in zip(dense["outputs"][0]["token_logprobs"],
                                          composed["outputs"][0]["token_logprobs"], strict=True)]
    mean = sum(changes) / len(changes)
    print(f"{eviction} at half the prompt, kvquant int8 rows forced along bf16 rows' {len(tokens)} greedy tokens: "
          f"mean |change| of their log-probabilities {mean:.3f} nats, largest {max(changes):.3f}")
    assert composed["attention_impls"] == ["KVCompressImpl"]
    assert mean < 0.5


def test_a_preset_starts_as_its_expansion(smollm2_dir):
    """``{"preset": "balanced"}`` alone: start-up finds the shipped key ranges of the model and
    every process runs the expansion (kvquant int8 rows under snapkv): the pool's tokens are
    the 134-byte rows' (with the position an evicting row carries)."""
    prompt = [[1, 2, 3, 4]]
    llm = dict(model=smollm2_dir, dtype="bfloat16", max_model_len=2048, enforce_eager=True,
               kv_cache_memory_bytes=96 << 20, attention_backend="kvcompress",
               additional_config={"kvcompress": {"preset": "balanced"}})
    out = run_in_subprocess(llm, prompt, max_tokens=4)
    assert out["kv_cache_tokens"] == (96 << 20) // PAGE * BLOCK
    assert out["attention_impls"] == ["KVCompressImpl"] and len(out["outputs"][0]["token_ids"]) == 4
