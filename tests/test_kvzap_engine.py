"""KVzap inside vLLM on the real test model (shipped SmolLM2 predictors, fp32):

* the predictor sees the same attention inputs as in transformers: the survivors the
  worker reports at every step are those of the predictor run offline on the HF model's
  hidden states, and the blocks the scheduler holds follow them;
* with a threshold nothing falls under, the ring + survivors layout attends like the
  full cache (method none);
* top-k mode holds exactly the pages of its per-stream budgets."""

from pathlib import Path

import pytest
import torch

from vllm_kvcompress.eviction.streams import cdiv
from vllm_kvcompress.tools.step_trace import run_traced

pytestmark = pytest.mark.engine

BLOCK, RING, PAGE_ROWS, PAGES_PER_BLOCK = 128, 128, 16, 30 * 3 * 128 // 16
POOL_BLOCK = 30 * 3 * BLOCK * 256 * 2  # SmolLM2-135M: bytes of one block over all layers, fp32 K+V
PREDICTORS = Path(__file__).parents[1] / "vllm_kvcompress" / "artefacts" / "kvzap" / "smollm2-135m"


def _llm(model_dir, method="kvzap", blocks=32, **settings):
    return dict(model=model_dir, dtype="float32", max_model_len=2048, enforce_eager=True,
                kv_cache_memory_bytes=(blocks + 1) * POOL_BLOCK, attention_backend="kvcompress",
                additional_config={"kvcompress": {"method": method, **settings}})


@pytest.fixture(scope="module")
def prompt(smollm2_dir):
    from transformers import AutoTokenizer

    from vllm_kvcompress.prompts import long_document_ids

    return long_document_ids(AutoTokenizer.from_pretrained(smollm2_dir), 600)


def _gap(a, b) -> float:
    return max(abs(x - y) for x, y in zip(a["outputs"][0]["token_logprobs"], b["outputs"][0]["token_logprobs"],
                                          strict=True))


def test_kvzap_survivors_match_transformers_and_blocks_follow_them(smollm2_dir, prompt):
    threshold = -4.0
    predictor = str(PREDICTORS / "kvzap-linear.safetensors")
    trace = run_traced(_llm(smollm2_dir, kvzap_predictor=predictor, kvzap_threshold=threshold), [prompt],
                       max_tokens=48)
    ids = prompt + trace["outputs"][0]["token_ids"]

    from vllm_kvcompress.eviction.kvzap import load_any_predictors
    from vllm_kvcompress.kvzap_hooks import offline_scores
    from vllm_kvcompress.models import load_eager

    _, model = load_eager(smollm2_dir)
    scores = offline_scores(model, load_any_predictors(predictor, 30, 576, 3), ids)  # [L, T, H]
    passing = (scores >= threshold).cumsum(dim=1)  # survivors among the first n tokens, per stream
    steps = [s for s in trace["steps"] if "0" in s["pages_next"]]
    mismatched = 0
    for step in steps:
        computed = step["computed"]["0"]
        kept = passing[:, computed - RING - 1].flatten()  # tokens before the window: decided
        want = sum(cdiv(RING + int(k) + 1, PAGE_ROWS) for k in kept)
        mismatched += want != step["pages_next"]["0"]
        assert abs(want - step["pages_next"]["0"]) <= 1, (computed, want, step["pages_next"]["0"])
    held = [(s["blocks"]["0"], prev["pages_next"]["0"]) for prev, s in zip(steps, steps[1:])]
    assert all(blocks == cdiv(pages, PAGES_PER_BLOCK) for blocks, pages in held), held
    native, packed = cdiv(len(prompt), BLOCK), held[0][0]
    kept_fraction = float((scores[:, : len(prompt) - RING] >= threshold).float().mean())
    print(f"KVzap-Linear tau={threshold}: {kept_fraction:.2f} of the prompt's tokens before the window kept "
          f"(transformers' hidden states); reported pages = offline pages at {len(steps) - mismatched}/{len(steps)} "
          f"steps; blocks {native} -> {packed}")
    assert mismatched <= 2 and packed < native and len(steps) >= 47


def test_kvzap_keeping_everything_is_full_attention_and_topk_holds_its_budget(smollm2_dir, prompt):
    none = run_traced(_llm(smollm2_dir, method="none"), [prompt], max_tokens=40)
    forced = [none["outputs"][0]["token_ids"]]
    predictor = str(PREDICTORS / "kvzap-mlp.safetensors")
    keep_all = run_traced(_llm(smollm2_dir, kvzap_predictor=predictor, kvzap_threshold=-1e4), [prompt], forced=forced)
    topk = run_traced(_llm(smollm2_dir, kvzap_predictor=predictor, max_kv_tokens=150), [prompt], max_tokens=40)
    gap = _gap(none, keep_all)
    pages = [s["pages_next"]["0"] for s in keep_all["steps"] if "0" in s["pages_next"]]
    # every token survives: each stream holds ring + (computed - ring) + spare rows
    assert pages[0] == 90 * cdiv(len(prompt) + 1, PAGE_ROWS)
    topk_blocks = {s["computed"]["0"]: s["blocks"]["0"] for s in topk["steps"] if "0" in s["blocks"]}
    for computed, blocks in topk_blocks.items():
        want = cdiv(computed, BLOCK) if computed <= len(prompt) else \
            cdiv(90 * cdiv(150 + computed - len(prompt), PAGE_ROWS), PAGES_PER_BLOCK)
        assert blocks == want, (computed, blocks, want)
    print(f"KVzap keep-all (tau=-1e4) vs method none (fp32, {len(prompt)}-token prompt, 40 tokens): largest logprob "
          f"gap {gap:.2e}; top-k 150 per stream: blocks {cdiv(len(prompt), BLOCK)} -> {topk_blocks[max(topk_blocks)]}")
    assert gap < 1e-3 and not torch.isnan(torch.tensor(gap))
