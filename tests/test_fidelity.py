"""Fidelity metrics on synthetic cases with known answers."""

import math

import pytest
import torch

from vllm_kvcompress.offline import fidelity


def test_identical_inputs_are_perfect():
    x = torch.randn(4, 3, 50, generator=torch.Generator().manual_seed(0))
    assert fidelity.output_cosine(x, x)["min"] == pytest.approx(1.0)
    assert fidelity.attention_kl(x, x)["max"] == pytest.approx(0.0, abs=1e-12)
    assert fidelity.spearman(x, x)["min"] == pytest.approx(1.0)
    assert fidelity.topk_overlap(x, x, 5)["min"] == 1.0


def test_cosine_known_values():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 2.0], [2.0, 2.0]])
    result = fidelity.output_cosine(a, b)
    assert result["min"] == pytest.approx(0.0) and result["mean"] == pytest.approx(0.5)
    assert fidelity.output_cosine(a, -a)["mean"] == pytest.approx(-1.0)


def test_kl_known_value_and_mask():
    p = torch.log(torch.tensor([0.5, 0.5]))
    q = torch.log(torch.tensor([0.25, 0.75]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert fidelity.attention_kl(p, q)["mean"] == pytest.approx(expected)
    # A masked third position, wildly different in the two inputs, changes nothing.
    p3, q3 = torch.cat([p, torch.tensor([9.0])]), torch.cat([q, torch.tensor([-9.0])])
    mask = torch.tensor([True, True, False])
    assert fidelity.attention_kl(p3, q3, mask)["mean"] == pytest.approx(expected)
    # Shifting all logits by a constant leaves the distribution unchanged.
    assert fidelity.attention_kl(p, p + 3.0)["mean"] == pytest.approx(0.0, abs=1e-12)


def test_spearman_known_values():
    x = torch.arange(10.0)
    assert fidelity.spearman(x, x**3)["mean"] == pytest.approx(1.0)  # monotone transform
    assert fidelity.spearman(x, x.flip(0))["mean"] == pytest.approx(-1.0)  # reversed order
    # With ties (scipy.stats.spearmanr([1,2,2,3],[1,3,2,4]) = 0.9486832980505138).
    rho = fidelity.spearman(torch.tensor([1.0, 2, 2, 3]), torch.tensor([1.0, 3, 2, 4]))["mean"]
    assert rho == pytest.approx(0.9486832980505138)


def test_topk_overlap_known_values():
    ref = torch.tensor([5.0, 4, 3, 2, 1, 0])
    cand = torch.tensor([5.0, 0, 3, 2, 1, 4])  # top-2: {0, 5} vs reference {0, 1}
    assert fidelity.topk_overlap(ref, cand, 2)["mean"] == 0.5
    assert fidelity.topk_overlap(ref, cand, 6)["mean"] == 1.0
    with pytest.raises(ValueError, match="k must be in 1..6"):
        fidelity.topk_overlap(ref, cand, 7)
