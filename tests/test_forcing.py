"""Teacher forcing through the sampler reports the model's own logprobs.

Reference: vLLM's prompt_logprobs over context + continuation in one prefill. In fp32
both must agree to numerical noise; a bug (off-by-one step, processed instead of raw
logprobs, a forced token that is not emitted) moves them by whole nats.
"""

import math

import pytest

from vllm_kvcompress.harness.subprocess_run import run_module

pytestmark = pytest.mark.engine


def test_forced_logprobs_equal_prompt_logprobs(smollm2_dir):
    from transformers import AutoTokenizer

    from vllm_kvcompress.harness.tasks import perplexity_samples

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    sample = perplexity_samples(tokenizer, {300: 1}, continuation=24)[0]
    spec = {
        "llm": dict(model=smollm2_dir, dtype="float32", max_model_len=1024, enforce_eager=True,
                    kv_cache_memory_bytes=64 << 20, enable_prefix_caching=False),
        "context": sample.prompt_ids, "forced": sample.forced_ids,
    }
    out = run_module("tests.forcing_tool", spec, timeout=600)
    forced, reference = out["forced_logprobs"], out["prompt_logprobs"]
    assert len(forced) == len(reference) == 24
    assert out["emitted"] == sample.forced_ids
    worst = max(abs(a - b) for a, b in zip(forced, reference))
    print(f"forced vs prompt logprobs: max |diff| {worst:.2e}; ppl {math.exp(-sum(forced) / 24):.3f}")
    assert worst < 1e-3
    # Greedy would not reproduce the reference text on its own: forcing did something.
    assert out["greedy"] != sample.forced_ids
