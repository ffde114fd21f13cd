"""Tensor parallelism without an engine: each rank keeps its own KV heads' slice of every
per-head artefact, and all ranks (and the scheduler) agree on each request's blocks."""

import pytest
import torch

from vllm_kvcompress.config import KVCompressConfig
from vllm_kvcompress.vllm.policy import EvictionPolicy
from vllm_kvcompress.vllm.parallel import kv_heads_of_rank

SHAPE = (4, 8, 4)  # layers, query heads, KV heads
BLOCK = 128


@pytest.mark.parametrize("kv_heads,tp,want", [(4, 1, [[0, 1, 2, 3]]), (4, 2, [[0, 1], [2, 3]]),
                                              (2, 4, [[0], [0], [1], [1]]), (3, 3, [[0], [1], [2]])])
def test_each_rank_holds_vllms_share_of_the_kv_heads(kv_heads, tp, want):
    # vLLM's QKVParallelLinear: contiguous slices, or rank // (tp / kv) when heads are replicated.
    assert [kv_heads_of_rank(kv_heads, tp, rank) for rank in range(tp)] == want


@pytest.mark.parametrize("kv_heads,tp", [(3, 2), (2, 3)])
def test_uneven_head_splits_are_refused(kv_heads, tp):
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        kv_heads_of_rank(kv_heads, tp, 0)


def _headkv(**settings):
    scores = {"method": "headkv", "head_scores": "uniform", "max_kv_tokens": 200, "window_tokens": 16,
              "page_tokens": 16, **settings}
    return KVCompressConfig.from_dict(scores)


def test_rank_budgets_partition_the_models_streams():
    config = _headkv()
    whole = EvictionPolicy(config, BLOCK, SHAPE)
    ranks = [EvictionPolicy(config, BLOCK, SHAPE, tp_rank=r, tp_size=2) for r in range(2)]
    budgets = whole.schedule_for(1000, None).budgets  # one rank: the whole model's streams
    schedules = [policy.schedule_for(1000, None) for policy in ranks]
    for layer in range(SHAPE[0]):  # rank 0 has KV heads 0-1, rank 1 heads 2-3, of every layer
        assert schedules[0].budgets[2 * layer:2 * layer + 2] == budgets[4 * layer:4 * layer + 2]
        assert schedules[1].budgets[2 * layer:2 * layer + 2] == budgets[4 * layer + 2:4 * layer + 4]
    assert ranks[0].streams.count == ranks[1].streams.count == SHAPE[0] * 2


def test_every_rank_holds_the_blocks_of_the_neediest_rank(tmp_path):
    import json

    # Rank 1's heads score far higher: HeadKV gives them most of the budget.
    scores = [[0.01] * 4 + [1.0] * 4 for _ in range(SHAPE[0])]
    path = tmp_path / "scores.json"
    path.write_text(json.dumps({"format": "kvcompress-head-scores/1", "num_layers": SHAPE[0],
                                "num_attention_heads": SHAPE[1], "num_kv_heads": SHAPE[2], "scores": scores}))
    config = _headkv(head_scores=str(path), max_kv_tokens=400)
    ranks = [EvictionPolicy(config, BLOCK, SHAPE, tp_rank=r, tp_size=2).schedule_for(2000, None) for r in range(2)]
    own = [s.pages(2000, s.budgets) for s in ranks]
    assert own[1] > own[0]  # the ranks really differ
    held = {s.rows_held(logical) for s in ranks for logical in (2000, 2100)}
    need = max(-(-pages // ranks[0].pages_per_block) for pages in own) * BLOCK
    assert ranks[0].rows_held(2000) == ranks[1].rows_held(2000) == need
    assert len(held) <= 2  # both ranks agree at every length
    # The price of skew: one rank holds the request in 4 blocks; at TP=2 every rank holds 6
    # (half-size) blocks, because the shared list follows rank 1: 1.5x a balanced split.
    alone = EvictionPolicy(config, BLOCK, SHAPE).schedule_for(2000, None)
    assert alone.rows_held(2000) == 4 * BLOCK and need == 6 * BLOCK


def test_kvzap_hook_scores_only_this_ranks_heads():
    from vllm_kvcompress.methods.kvzap import hooks as kvzap_hooks
    from vllm_kvcompress.methods.kvzap.predictors import LinearPredictor

    torch.manual_seed(0)
    predictor = LinearPredictor(16, 4)

    class Attention(torch.nn.Module):
        def forward(self, hidden_states):
            return hidden_states

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = Attention()

    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([Layer()])
    hidden = torch.randn(5, 16)
    token_scores = {}
    handles = kvzap_hooks.install(model, [predictor], lambda layer, s, _: token_scores.__setitem__(layer, s),
                                  heads=[2, 3])
    try:
        model.layers[0].self_attn(hidden_states=hidden)
        with torch.no_grad():
            torch.testing.assert_close(token_scores[0], predictor(hidden)[:, [2, 3]])
    finally:
        for handle in handles:
            handle.remove()
    # The engine's hooks (the custom op into a persistent buffer): the same heads, the step's rows first.
    seconds = []
    handles, buffers, _ = kvzap_hooks.install_buffered(model, [predictor], 8, lambda layer, s, t: seconds.append(t),
                                                    heads=[2, 3])
    try:
        model.layers[0].self_attn(hidden_states=hidden)
        with torch.no_grad():
            torch.testing.assert_close(buffers[0][:5], predictor(hidden)[:, [2, 3]])
        assert buffers[0].shape == (8, 2) and len(seconds) == 1
    finally:
        for handle in handles:
            handle.remove()


def test_dms_per_layer_decision_reaches_every_rank():
    """``dms_alpha_per: layer``: KV head 0 decides for all heads, also on a rank without it;
    the eager hooks and the engine's (the custom op into a persistent buffer) alike."""
    from vllm_kvcompress.methods.dms import hooks
    from vllm_kvcompress.methods.dms.decisions import DMSAdapter
    from vllm_kvcompress.methods.dms.checkpoint import DMSDecisions

    torch.manual_seed(0)
    adapter = DMSAdapter(16, 4)
    torch.nn.init.normal_(adapter.proj.weight)
    x = torch.randn(3, 16)
    per_head = DMSDecisions([adapter], 64, per_layer=False, source="t", heads=[2, 3])
    per_layer = DMSDecisions([adapter], 64, per_layer=True, source="t", heads=[2, 3])
    assert hooks.head_index(DMSDecisions([adapter], 64, per_layer=False, source="t", heads=[0, 1, 2, 3])) is None
    with torch.no_grad():
        whole = hooks.keep_scores(DMSDecisions([adapter], 64, per_layer=False, source="t"), 0, x)
        expected = {id(per_head): whole[:, [2, 3]], id(per_layer): whole[:, [0, 0]]}
        for decisions in (per_head, per_layer):
            torch.testing.assert_close(hooks.keep_scores(decisions, 0, x, hooks.head_index(decisions)),
                                       expected[id(decisions)])

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = torch.nn.Identity()

        def forward(self, positions, hidden_states, residual):
            return hidden_states

    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([Layer()])
    residual = torch.randn(3, 16)
    for decisions in (per_head, per_layer):
        recorded, seconds = {}, []
        handles = hooks.install(model, decisions, lambda layer, s, _: recorded.__setitem__(layer, s))
        handles += hooks.install_buffered(model, decisions, 8, lambda layer, s, t: seconds.append(t))[0]
        buffers = model.layers[0].kvc_scores
        try:
            model.layers[0](None, x - residual, residual)  # the stream: hidden_states + residual
            torch.testing.assert_close(recorded[0], expected[id(decisions)])
            torch.testing.assert_close(buffers[:3], expected[id(decisions)])
            assert buffers.shape == (8, 2) and len(seconds) == 1
        finally:
            for handle in handles:
                handle.remove()
