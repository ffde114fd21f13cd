"""Eviction (method knorm) inside vLLM on the real test model: blocks really go back to
the pool, a compacted cache gives what the masked reference gives, and chunked
prefill, preemption + recompute and prefix caching keep the same decisions."""

import pytest

from vllm_kvcompress.harness.generate import run_in_subprocess
from vllm_kvcompress.harness.step_trace import run_traced

pytestmark = pytest.mark.engine

BLOCK = 128  # vLLM's CPU block size
PAGE = 30 * 3 * BLOCK * 256  # SmolLM2-135M: bytes of one block over all layers (bf16 K+V)


def _llm(model_dir, blocks=64, dtype="bfloat16", **extra):
    # vLLM refuses a pool that cannot hold one max_model_len sequence
    page = PAGE * (2 if dtype == "float32" else 1)
    return dict(model=model_dir, dtype=dtype, max_model_len=min(2048, blocks * BLOCK), enforce_eager=True,
                kv_cache_memory_bytes=(blocks + 1) * page, **extra)


def _knorm(**settings):
    return {"attention_backend": "kvcompress",
            "additional_config": {"kvcompress": {"method": "knorm", **settings}}}


@pytest.fixture(scope="module")
def documents(smollm2_dir):
    from transformers import AutoTokenizer

    from vllm_kvcompress.offline.prompts import long_document_ids

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    return lambda n, count: [long_document_ids(tokenizer, n, offset=300 * i) for i in range(count)]


def _logprob_gap(a, b) -> float:
    """Largest per-token logprob difference between two runs over the same tokens."""
    gaps = [abs(x - y) for oa, ob in zip(a["outputs"], b["outputs"])
            for x, y in zip(oa["token_logprobs"], ob["token_logprobs"], strict=True)]
    return max(gaps)


def test_compaction_frees_blocks_and_avoids_preemption(smollm2_dir, documents):
    prompts = [p[:640] for p in documents(700, 4)]  # 5 full blocks each
    bf16 = run_traced(_llm(smollm2_dir, blocks=15, attention_backend="kvcompress"), prompts, max_tokens=60)
    # Request 3 is aborted 20 steps in, after its compaction: its blocks must come back too.
    knorm = run_traced(_llm(smollm2_dir, blocks=15, **_knorm(max_kv_tokens=256)), prompts, max_tokens=60,
                       abort={"3": 20})
    assert bf16["num_blocks"] == knorm["num_blocks"] == 15
    # Request 0: 5 blocks while its prompt is computed, then ceil((256 + 1) / 128) = 3 at
    # the next step (kept rows + the token being decoded), never more than
    # ceil((budget + buffer) / 128) = 3 afterwards.
    held = [step["blocks"].get("0") for step in knorm["steps"]]
    first = next(i for i, step in enumerate(knorm["steps"]) if step["computed"].get("0") == 640)
    assert held[first] == 5 and held[first + 1] == 3
    assert all(h <= 3 for h in held[first + 1:] if h is not None)
    step, after = knorm["steps"][first], knorm["steps"][first + 1]
    released = sum(step["blocks"][r] - after["blocks"][r] for r in step["blocks"])
    admitted = sum(n for r, n in after["blocks"].items() if r not in step["blocks"])
    assert released == 2 * len(step["blocks"])  # 5 -> 3 blocks for every request compacted in that step
    assert after["free_blocks"] == step["free_blocks"] + released - admitted
    assert after["free_blocks"] + sum(after["blocks"].values()) == 15
    print(f"pool 15 blocks, 4 x 640-token prompts + 60 tokens: bf16 preemptions {sum(bf16['preemptions'].values())}, "
          f"knorm (256 kept) preemptions {sum(knorm['preemptions'].values())}; request 0 blocks {held[first]} -> "
          f"{held[first + 1]}; free blocks {step['free_blocks']} -> {after['free_blocks']}")
    assert sum(bf16["preemptions"].values()) > 0
    assert sum(knorm["preemptions"].values()) == 0
    assert "3" in knorm["steps"][19]["blocks"] and all("3" not in step["blocks"] for step in knorm["steps"][20:])
    assert knorm["outputs"][3] is None and knorm["steps"][-1]["free_blocks"] == 15


# The equivalence tests run the model in fp32: kept sets are discontinuous in the scores,
# and bf16 noise between two batch layouts can flip a near-tie and change the tokens kept.


def test_compacted_cache_matches_the_masked_reference(smollm2_dir, documents):
    """Same kept tokens, rows moved and blocks freed vs rows hidden in place: the
    continuation (RoPE positions logical, slots physical) must score the same. 136
    tokens cross a decode-time compaction (300 kept + 128 buffer); the other runs are
    teacher-forced on the compacted run's tokens. A budget above the sequence length
    (no compression point reached) must score as method none: the physical plumbing
    (slots, lengths, block lists) alone changes nothing."""
    prompts = documents(700, 2)
    settings = dict(max_kv_tokens=300, sink_tokens=4, recent_tokens=32)
    compact = run_in_subprocess(_llm(smollm2_dir, dtype="float32", **_knorm(**settings)), prompts, max_tokens=136)
    forced = [o["token_ids"] for o in compact["outputs"]]
    masked = run_in_subprocess(_llm(smollm2_dir, dtype="float32", **_knorm(eviction_mode="mask", **settings)), prompts,
                               forced=forced)
    # Eviction turns prefix caching off; a cache hit would change the prefill's chunking.
    full = run_in_subprocess(_llm(smollm2_dir, dtype="float32", attention_backend="kvcompress",
                                  enable_prefix_caching=False), prompts, forced=forced)
    unbounded = run_in_subprocess(_llm(smollm2_dir, dtype="float32", **_knorm(max_kv_tokens=2048)), prompts,
                                  forced=forced)
    gap, full_gap, unbounded_gap = _logprob_gap(compact, masked), _logprob_gap(compact, full), _logprob_gap(unbounded, full)
    print(f"2 x 136 tokens (fp32): largest logprob gap compacted vs masked {gap:.2e}, vs the full cache {full_gap:.3f}; "
          f"budget above the length vs method none {unbounded_gap:.2e}")
    assert gap < 1e-3 and full_gap > 0.1
    assert unbounded_gap < 1e-4


def test_chunked_prefill_and_preemption_keep_the_decisions(smollm2_dir, documents):
    """A 9-block pool and 256-token steps: prompts are prefilled in chunks, and request 1
    (600 tokens kept to 200) is preempted after compactions, then recomputed (prompt +
    output in capped chunks). Request 0 (500 tokens) opts out per request and grows until
    the pool is full. The continuation must score as in an unconstrained run."""
    prompts = [documents(500, 1)[0], documents(600, 4)[3]]
    opt_out = [{"kvcompress": {"compression_ratio": 0}}, None]
    settings = _knorm(max_kv_tokens=200)
    plain = run_traced(_llm(smollm2_dir, dtype="float32", **settings), prompts, max_tokens=340, extra_args=opt_out)
    forced = [o["token_ids"] for o in plain["outputs"]]
    small = run_traced(_llm(smollm2_dir, blocks=9, dtype="float32", max_num_batched_tokens=256, **settings), prompts,
                       extra_args=opt_out, forced=forced)
    gap = _logprob_gap(plain, small)
    print(f"chunked prefill (256 tokens/step), 9-block pool: preemptions {small['preemptions']}; "
          f"largest logprob gap {gap:.2e}")
    assert sum(plain["preemptions"].values()) == 0 and small["preemptions"]["1"] > 0
    late = [step["blocks"]["1"] for step in small["steps"] if step["computed"].get("1", 0) > 850 and "1" in step["blocks"]]
    assert late and max(late) <= 3  # past 850 tokens request 1 holds <= 3 blocks
    assert gap < 1e-3


def test_prefix_cache_is_not_poisoned(smollm2_dir, documents):
    prompt = documents(700, 1)
    result = run_in_subprocess(_llm(smollm2_dir, enable_prefix_caching=True, **_knorm(compression_ratio=0.5)),
                               prompt, max_tokens=24, repeat=2)
    first, second = result["outputs"]
    assert first["num_cached_tokens"] == second["num_cached_tokens"] == 0
    assert first["token_ids"] == second["token_ids"]
    assert "prefix caching turned off" in result["log"]
