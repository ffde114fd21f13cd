"""HeadKV inside vLLM on the real test model: per-(layer, KV head) budgets cost the sum
of their pages in vLLM's pool, uniform scores reduce to SnapKV, and chunked prefill and
preemption + recompute keep the decisions. fp32 (kept sets are discontinuous in the
scores: bf16 noise between batch layouts could flip a near-tie)."""

from pathlib import Path

import pytest

from vllm_kvcompress.config import KVCompressConfig
from vllm_kvcompress.vllm.policy import EvictionPolicy
from vllm_kvcompress.eviction.streams import cdiv
from vllm_kvcompress.harness.generate import run_in_subprocess
from vllm_kvcompress.harness.step_trace import run_traced

pytestmark = pytest.mark.engine

BLOCK = 128
PAGE = 30 * 3 * BLOCK * 256 * 2  # SmolLM2-135M: bytes of one block over all layers, fp32 K+V
SCORES = str(Path(__file__).parents[1] / "vllm_kvcompress" / "artefacts" / "head_scores" / "smollm2-135m.json")


def _llm(model_dir, blocks=64, **extra):
    return dict(model=model_dir, dtype="float32", max_model_len=min(2048, blocks * BLOCK), enforce_eager=True,
                kv_cache_memory_bytes=(blocks + 1) * PAGE, attention_backend="kvcompress", **extra)


def _method(**settings):
    return {"additional_config": {"kvcompress": settings}}


@pytest.fixture(scope="module")
def documents(smollm2_dir):
    from transformers import AutoTokenizer

    from vllm_kvcompress.offline.prompts import long_document_ids

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    return lambda n, count: [long_document_ids(tokenizer, n, offset=300 * i) for i in range(count)]


def _logprob_gap(a, b) -> float:
    return max(abs(x - y) for oa, ob in zip(a["outputs"], b["outputs"])
               for x, y in zip(oa["token_logprobs"], ob["token_logprobs"], strict=True))


def _schedule(settings: dict, prompt_len: int):
    return EvictionPolicy(KVCompressConfig.from_dict(settings), BLOCK, (30, 9, 3)).schedule_for(prompt_len, None)


def _check_blocks_follow_pages(trace, req: str, schedule) -> int:
    """Every step: native blocks until the prompt is compressed, then cdiv(pages, pages per block)."""
    checked = 0
    for step in trace["steps"]:
        if req not in step["blocks"]:
            continue
        computed = step["computed"][req]
        want = cdiv(computed, BLOCK) if computed <= schedule.compress_at else \
            cdiv(schedule.pages(computed), schedule.pages_per_block)
        assert step["blocks"][req] == want, (computed, step["blocks"][req], want)
        checked += computed > schedule.compress_at
    return checked


def test_uniform_headkv_is_snapkv_and_holds_its_pages(smollm2_dir, documents):
    """Equal head scores: every stream keeps 128 rows, chosen as SnapKV chooses them; the
    run compresses a prompt prefilled in 256-token chunks (the window's queries all fall in
    the last chunk) and must score the tokens as the single-block-table SnapKV engine."""
    prompts = documents(700, 2)
    snap = run_in_subprocess(_llm(smollm2_dir, **_method(method="snapkv", max_kv_tokens=128)), prompts, max_tokens=40)
    forced = [o["token_ids"] for o in snap["outputs"]]
    settings = dict(method="headkv", head_scores="uniform", max_kv_tokens=128)
    head = run_traced(_llm(smollm2_dir, max_num_batched_tokens=256, **_method(**settings)), prompts, forced=forced)
    gap = _logprob_gap(snap, head)
    schedule = _schedule(settings, len(prompts[0]))
    assert schedule.budgets == (128,) * 90
    checked = _check_blocks_follow_pages(head, "0", schedule)
    print(f"uniform HeadKV vs SnapKV (fp32, 2 x {len(prompts[0])} tokens, 256-token chunks): largest logprob gap "
          f"{gap:.2e}; blocks {cdiv(len(prompts[0]), BLOCK)} -> {cdiv(schedule.pages(len(prompts[0]) + 1), 720)}")
    assert checked >= len(forced[0]) - 2 and gap < 1e-3


def test_headkv_memory_is_the_sum_of_head_budgets_and_survives_preemption(smollm2_dir, documents):
    """Shipped R2 scores: streams keep 16..N rows (whole 16-row pages). At every step the
    request holds cdiv(sum_s ceil(len_s / 16), 720) blocks. A 9-block pool and 256-token
    steps preempt it after its compression; the recompute (prompt, compression, then the
    output as a chunk on the packed layout) must score as the unconstrained run."""
    prompts = [documents(500, 1)[0], documents(600, 4)[3]]
    settings = dict(method="headkv", head_scores=SCORES, max_kv_tokens=128)
    opt_out = [{"kvcompress": {"compression_ratio": 0}}, None]
    plain = run_traced(_llm(smollm2_dir, **_method(**settings)), prompts, max_tokens=340, extra_args=opt_out)
    schedule = _schedule(settings, len(prompts[1]))
    pages = sum(cdiv(b, 16) for b in schedule.kept())  # streams never keep more than the prompt
    assert len(set(schedule.budgets)) > 3 and sum(b // 16 for b in schedule.budgets) == 90 * 128 // 16
    assert pages == schedule.pages(len(prompts[1])) <= 720
    assert _check_blocks_follow_pages(plain, "1", schedule) >= 300
    forced = [o["token_ids"] for o in plain["outputs"]]
    small = run_traced(_llm(smollm2_dir, blocks=9, max_num_batched_tokens=256, **_method(**settings)), prompts,
                       extra_args=opt_out, forced=forced)
    gap = _logprob_gap(plain, small)
    print(f"HeadKV budgets {min(schedule.budgets)}..{max(schedule.budgets)} rows per stream, {pages} pages = "
          f"{cdiv(pages, 720)} block(s) after compression (native: {cdiv(len(prompts[1]), BLOCK)}); 9-block pool: "
          f"preemptions {small['preemptions']}, largest logprob gap {gap:.2e}")
    assert small["preemptions"]["1"] > 0 and sum(plain["preemptions"].values()) == 0
    assert gap < 1e-3
