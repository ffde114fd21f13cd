"""DMS engine-neutral pieces (groundwork for issue 8): decisions, shift by one, the
delayed-eviction mask, and the training objective's parts."""

import torch

from vllm_kvcompress.methods.dms.decisions import (DMSAdapter, eviction_flags, neuron_logits, visible,
                                                   without_decision_channel)
from vllm_kvcompress.offline.dms_objective import (compression_loss, gumbel_sigmoid, log_keep_bias, shift_to_keys,
                                                   target_ratio)


def test_adapter_starts_at_keep_everything():
    adapter = DMSAdapter(16, 3)
    z = adapter(torch.randn(5, 16))
    assert z.shape == (5, 3) and torch.all(z == -5.0)


def test_single_neuron_reads_and_clears_the_first_query_head_of_each_group():
    query = torch.zeros(2, 6, 4)  # 6 query heads, 2 KV heads: groups {0,1,2}, {3,4,5}
    query[:, 0, -1], query[:, 3, -1], query[:, 1, -1] = 0.1, -0.1, 9.0
    z = neuron_logits(query, 2)
    assert torch.allclose(z, torch.tensor([[5.0, -15.0], [5.0, -15.0]]))
    cleared = without_decision_channel(query, 2)
    assert cleared[:, 0, -1].abs().sum() == 0 and cleared[:, 3, -1].abs().sum() == 0
    assert torch.all(cleared[:, 1, -1] == 9.0)  # other query heads keep the channel


def test_shift_by_one_marks_the_previous_token():
    logits = torch.tensor([[1.0, -1.0, 2.0, 3.0]])
    assert eviction_flags(logits).tolist() == [[False, True, True, False]]


def test_mask_keeps_marked_tokens_for_the_window_then_drops_them():
    marked = torch.tensor([[True, False, True, False, False, False]])
    mask = visible(marked, window=2)[0]
    assert mask[2].tolist() == [True, True, True, False, False, False]  # 2 - 0 <= 2: still visible
    assert mask[3].tolist() == [False, True, True, True, False, False]  # token 0 left the window
    assert mask[5].tolist() == [False, True, False, True, True, True]
    # per-head length at query i = window part + unmarked older tokens
    for i in range(6):
        older = [j for j in range(i + 1) if i - j > 2]
        assert int(mask[i].sum()) == min(i + 1, 3) + sum(not marked[0, j] for j in older)


def test_training_pieces():
    z = torch.tensor([[-10.0, 10.0, 0.0]], requires_grad=True)
    alpha = gumbel_sigmoid(z, generator=torch.Generator().manual_seed(0))
    assert set(alpha.detach().flatten().tolist()) <= {0.0, 1.0} and alpha[0, 0] == 0 and alpha[0, 1] == 1
    alpha.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # straight-through gradient
    assert shift_to_keys(torch.tensor([[1.0, 2.0, 3.0]])).tolist() == [[2.0, 3.0, 0.0]]
    bias = log_keep_bias(torch.tensor([[0.0, -9.0, -9.0, -9.0]]), window=1)[0]  # key 0: alpha = 0.5
    assert bias[1, 0] == 0 and torch.isclose(bias[2, 0], torch.log(torch.tensor(0.5))) and bias[0, 1] == float("-inf")
    assert target_ratio(0) == 1.0 and target_ratio(300) == 4.0 and target_ratio(10_000) == 8.0
    assert compression_loss(torch.full((4,), 0.25), 2.0).item() == 0.25
    assert compression_loss(torch.full((4,), 0.75), 2.0).item() == 0.0
