"""KVzap threshold mode on the per-stream layout, without vLLM: the plan/run glue
(``stream_attention.build`` + ``StreamRunner``) driven step by step over a small pool must
give the attention of a masked reference of the rule (window, permanent per-head
eviction after the step's attention), keep the reference's survivors, and ask for the
pages they need."""

from types import SimpleNamespace

import pytest
import torch

from vllm_kvcompress import step_plan, stream_attention
from vllm_kvcompress.config import KVCompressConfig
from vllm_kvcompress.eviction.policy import EvictionPolicy
from vllm_kvcompress.eviction.streams import PoolGeometry, cdiv
from vllm_kvcompress.eviction.threshold import ThresholdSchedule, prompt_survivors, ring_order, visible

LAYERS, HEADS, Q_HEADS, DIM, BLOCK, PAGE, RING, BLOCKS = 2, 2, 4, 8, 32, 8, 16, 12


def _settings(threshold=0.0):
    return KVCompressConfig.from_dict({"method": "kvzap", "kvzap_predictor": "unused", "kvzap_threshold": threshold,
                                       "kvzap_window": RING, "page_tokens": PAGE})


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


def _reference(q, k, v, scores, threshold, prompt, pos, scale):
    """Attention of the query at ``pos`` over positions ``0..pos`` under the rule."""
    outs = []
    for layer in range(LAYERS):
        mask = visible(scores[layer].T, threshold, RING, prompt, pos)  # [H, pos + 1]
        kk, vv = k[layer, : pos + 1].transpose(0, 1), v[layer, : pos + 1].transpose(0, 1)  # [H, n, D]
        qq = q[layer, pos].view(HEADS, Q_HEADS // HEADS, DIM)
        logits = (qq @ kk.transpose(1, 2)) * scale
        logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
        outs.append((torch.softmax(logits, -1) @ vv).reshape(Q_HEADS, DIM))
    return torch.stack(outs)


@pytest.mark.parametrize("threshold", [-0.3, 0.4])
def test_threshold_mode_matches_the_masked_reference(threshold):
    torch.manual_seed(0)
    prompt, steps = 40, 30
    total = prompt + steps
    q = torch.randn(LAYERS, total, Q_HEADS, DIM)
    k = torch.randn(LAYERS, total, HEADS, DIM)
    v = torch.randn(LAYERS, total, HEADS, DIM)
    scores = torch.randn(LAYERS, total, HEADS)
    scale = DIM ** -0.5
    buffer = torch.zeros(LAYERS, BLOCKS, HEADS, BLOCK, 2 * DIM)
    geometry = PoolGeometry(LAYERS, BLOCKS, HEADS, BLOCK, PAGE)
    settings = _settings(threshold)
    schedule = EvictionPolicy(settings, BLOCK, (LAYERS, Q_HEADS, HEADS)).schedule_for(prompt, None)
    runners = [stream_attention.StreamRunner(settings, layer, LAYERS) for layer in range(LAYERS)]
    step_plan.score_store = torch.zeros(LAYERS * BLOCKS * HEADS * BLOCK)
    step_plan.rows, step_plan.req_ids = [schedule], ["r"]
    try:
        computed = 0
        while computed < total:
            new = prompt if computed == 0 else 1
            span = slice(computed, computed + new)
            m = SimpleNamespace(query_start_loc_cpu=torch.tensor([0, new]), seq_lens=torch.tensor([computed + new]),
                                block_table_tensor=torch.arange(BLOCKS)[None], num_actual_tokens=new)
            meta = stream_attention.build(m, 1, geometry)
            out = torch.zeros(LAYERS, new, Q_HEADS, DIM)
            for layer in range(LAYERS):
                step_plan.kvzap_scores[layer] = scores[layer, span]
                runners[layer].forward(q[layer, span], k[layer, span], v[layer, span], buffer[layer], meta, out[layer],
                                       scale)
            for i in range(new):
                want = _reference(q, k, v, scores, threshold, prompt, computed + i, scale)
                torch.testing.assert_close(out[:, i], want, atol=1e-5, rtol=1e-5)
            computed += new
            kept = step_plan.kept["r"]
            leaving = scores[:, : computed - RING]  # [L, n, H]: decided for good
            want_kept = (leaving >= threshold).sum(1)
            assert torch.equal(kept, want_kept)
            assert schedule.pages_next == schedule.pages_for(want_kept.flatten().tolist())
        assert 0 < int(kept.sum()) < LAYERS * HEADS * (total - RING)  # some evicted, some kept
    finally:
        step_plan.rows, step_plan.req_ids = None, []
        step_plan.score_store = None
        step_plan.kept.clear()
        step_plan.stream_tables.clear()
        step_plan.kvzap_scores.clear()
