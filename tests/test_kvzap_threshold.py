"""KVzap threshold mode on the per-stream layout, without vLLM: the plan/run glue
(``stream_attention.build`` + ``StreamRunner``) driven step by step over a small pool must
give the attention of a masked reference of the rule (window, permanent per-head
eviction after the step's attention), keep the reference's survivors, and ask for the
pages they need."""


import pytest
import torch
from masked_reference import drive, masked_attention

from vllm_kvcompress.config import KVCompressConfig
from vllm_kvcompress.vllm.state import WorkerState
from vllm_kvcompress.vllm.policy import EvictionPolicy
from vllm_kvcompress.eviction.streams import cdiv
from vllm_kvcompress.eviction.threshold import ThresholdSchedule, prompt_survivors, ring_order, visible

LAYERS, HEADS, Q_HEADS, DIM, BLOCK, PAGE, RING, BLOCKS = 2, 2, 4, 8, 32, 8, 16, 12


def _settings(threshold=0.0, **budget):
    mode = budget or {"kvzap_threshold": threshold}
    return KVCompressConfig.from_dict({"method": "kvzap", "kvzap_predictor": "unused", "kvzap_window": RING,
                                       "page_tokens": PAGE, **mode})


def test_schedule_counts_pages_of_ring_survivors_and_spare():
    schedule = EvictionPolicy(_settings(-4.0), BLOCK, (LAYERS, Q_HEADS, HEADS)).schedule_for(40, None)
    assert isinstance(schedule, ThresholdSchedule) and schedule.compress_at == 40
    assert schedule.pages_for([0, 7, 8, 100]) == 3 + 3 + 4 + 15  # cdiv(16 + k + 1, 8)
    assert schedule.next_point(10) == 40 and schedule.next_point(40) == 41 and schedule.next_point(57) == 58
    assert schedule.rows_held(30) == 30  # native until the prompt is packed
    schedule.pages_next = 17
    assert schedule.rows_held(41) == cdiv(17, schedule.pages_per_block) * BLOCK
    short = EvictionPolicy(_settings(), BLOCK, (LAYERS, Q_HEADS, HEADS)).schedule_for(5, None)
    assert short.compress_at == RING  # nothing can leave the window before it is full


def test_prompt_survivors_and_ring_order():
    scores = torch.tensor([[0.5, -1.0, 2.0, -3.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0, 5.0, 5.0]])
    survivors = prompt_survivors(scores, 0.0, 2)
    assert survivors[0].tolist() == [0, 2] and survivors[1].tolist() == []
    assert ring_order(7, 4).tolist() == [4, 5, 6, 3]  # ring row j holds the position p with p % 4 == j


def _drive(settings, schedule, q, k, v, scores, prompt, check, state=None):
    """Prefill ``prompt`` tokens in one step, then decode one token per step."""
    steps = [prompt] + [1] * (q.shape[1] - prompt)
    drive(settings, schedule, q, k, v, scores, steps, check, BLOCKS, BLOCK, PAGE, state)


def test_topk_mode_keeps_each_streams_best_predicted_tokens():
    torch.manual_seed(1)
    prompt, budget, total = 40, 12, 46
    q, k, v = torch.randn(LAYERS, total, Q_HEADS, DIM), torch.randn(LAYERS, total, HEADS, DIM), \
        torch.randn(LAYERS, total, HEADS, DIM)
    scores = torch.randn(LAYERS, total, HEADS)
    settings = _settings(max_kv_tokens=budget)
    schedule = EvictionPolicy(settings, BLOCK, (LAYERS, Q_HEADS, HEADS)).schedule_for(prompt, None)
    assert schedule.budgets == (budget,) * (LAYERS * HEADS)
    top = scores[:, :prompt].topk(budget, dim=1).indices  # [L, budget, H]
    kept = torch.zeros(LAYERS, HEADS, total, dtype=torch.bool)
    for layer in range(LAYERS):
        for head in range(HEADS):
            kept[layer, head, top[layer, :, head]] = True
    kept[:, :, prompt:] = True  # decode tokens are appended

    def check(out, first, computed):
        for i in range(computed - first):
            pos = first + i
            mask = torch.ones(LAYERS, HEADS, pos + 1, dtype=torch.bool) if pos < prompt else kept[:, :, : pos + 1]
            torch.testing.assert_close(out[:, i], masked_attention(q, k, v, pos, mask), atol=1e-5, rtol=1e-5)

    _drive(settings, schedule, q, k, v, scores, prompt, check)


@pytest.mark.parametrize("threshold", [-0.3, 0.4])
def test_threshold_mode_matches_the_masked_reference(threshold):
    torch.manual_seed(0)
    prompt, total = 40, 70
    q, k, v = torch.randn(LAYERS, total, Q_HEADS, DIM), torch.randn(LAYERS, total, HEADS, DIM), \
        torch.randn(LAYERS, total, HEADS, DIM)
    scores = torch.randn(LAYERS, total, HEADS)
    settings = _settings(threshold)
    schedule = EvictionPolicy(settings, BLOCK, (LAYERS, Q_HEADS, HEADS)).schedule_for(prompt, None)
    state = WorkerState()

    def check(out, first, computed):
        for i in range(computed - first):
            pos = first + i
            mask = torch.stack([visible(scores[layer].T, threshold, RING, prompt, pos) for layer in range(LAYERS)])
            torch.testing.assert_close(out[:, i], masked_attention(q, k, v, pos, mask), atol=1e-5, rtol=1e-5)
        kept = state.requests["r"].kept
        want_kept = (scores[:, : computed - RING] >= threshold).sum(1)  # left the window: decided for good
        assert torch.equal(kept, want_kept)
        assert schedule.pages_next == schedule.pages_for(want_kept.flatten().tolist())
        check.last = int(kept.sum())

    _drive(settings, schedule, q, k, v, scores, prompt, check, state)
    assert 0 < check.last < LAYERS * HEADS * (total - RING)  # some evicted, some kept


def test_packing_step_has_room_for_the_spare_row():
    """Regression (found by the DMS soak, an engine crash): a prompt shorter than the window
    packs ``ring + 1`` rows per stream at ``compress_at = ring``; with ring = block size the
    native prompt held one block per stream's worth, the packed layout needs a second."""
    from vllm_kvcompress.eviction.threshold import ThresholdSchedule

    schedule = ThresholdSchedule(compress_at=128, ring=128, streams=90, page=32, block_size=128, threshold=0.0)
    assert schedule.rows_during(127, 128) == 256  # the packing step: room for 128 + 1 rows per stream
    assert schedule.rows_during(100, 120) == 120  # before it: native
    worst = schedule.pages_for([128 - 128] * 90)  # nothing before the window to evict: ring + spare
    assert worst <= schedule.rows_during(127, 128) // 128 * schedule.pages_per_block
    longer = ThresholdSchedule(compress_at=300, ring=128, streams=90, page=32, block_size=128, threshold=0.0)
    assert longer.rows_during(200, 300) == 384  # 300 + 1 rows fit the native 3 blocks
    assert longer.pages_for([300 - 128] * 90) <= 3 * longer.pages_per_block


def test_packing_reports_at_once_and_ring_decodes_wait_for_the_step_end(monkeypatch):
    """Survivors reach the host two ways: the packing step counts them on the host and reports
    at once; a ring decode leaves them on the pool's device until ``settle_reports`` reads every
    request's back together. So what waits is always on one device (a step can pack one
    request while another decodes), and a report is never read before the step ends."""
    from vllm_kvcompress.vllm.state import StepPlan

    torch.manual_seed(0)
    prompt, total = 40, 46
    q, k, v = torch.randn(LAYERS, total, Q_HEADS, DIM), torch.randn(LAYERS, total, HEADS, DIM), \
        torch.randn(LAYERS, total, HEADS, DIM)
    settings = _settings(0.0)
    schedule = EvictionPolicy(settings, BLOCK, (LAYERS, Q_HEADS, HEADS)).schedule_for(prompt, None)
    seen, settle = [], StepPlan.settle_reports

    def recording(step):
        seen.append((dict(step.pages_reports), list(step.kept_pending)))
        return settle(step)

    monkeypatch.setattr(StepPlan, "settle_reports", recording)
    _drive(settings, schedule, q, k, v, torch.randn(LAYERS, total, HEADS), prompt, lambda *args: None)
    packing, *decodes = seen
    assert list(packing[0]) == ["r"] and packing[1] == []  # reported at once, nothing waiting
    assert decodes and all(reports == {} and pending == ["r"] for reports, pending in decodes)
