"""Fast k-means for PQ codebooks: exact assignments, deterministic fits, early stopping,
and subspace groupings (contiguous, RoPE pairs)."""

import pytest
import torch

from vllm_kvcompress.kernels.lookat_ref import permute
from vllm_kvcompress.kernels.pq_ref import decode, encode
from vllm_kvcompress.offline.pq import assign, fit_codebooks, kmeans, subspace_dims


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("batch,n,k,s", [(3, 1000, 256, 2), (2, 300, 16, 8), (5, 700, 64, 4), (1, 50, 7, 3)])
def test_assign_is_the_nearest_centroid(batch, n, k, s):
    x = torch.randn(batch, n, s, generator=_gen(0))
    centers = torch.randn(batch, k, s, generator=_gen(1))
    brute = ((x.unsqueeze(2) - centers.unsqueeze(1)) ** 2).sum(-1).argmin(-1)
    assert torch.equal(assign(x, centers), brute)


def test_assign_breaks_ties_to_the_first_centroid():
    centers = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])
    x = torch.tensor([[[0.9, 0.1], [0.1, 0.9], [0.5, 0.5]]])
    assert assign(x, centers).tolist() == [[0, 1, 0]]


def test_same_seed_bit_identical_other_seed_differs():
    keys = torch.randn(2, 600, 32, generator=_gen(2))
    a = fit_codebooks(keys, m=8, k=32, seed=3)
    assert torch.equal(a, fit_codebooks(keys, m=8, k=32, seed=3))
    assert not torch.equal(a, fit_codebooks(keys, m=8, k=32, seed=4))


def test_lloyd_stops_at_a_fixed_point():
    gen = _gen(5)
    truth = torch.randn(1, 4, 2, generator=gen) * 10
    x = truth.repeat_interleave(50, dim=1) + 0.01 * torch.randn(1, 200, 2, generator=gen)
    stats = {}
    centers = kmeans(x, 4, iters=50, tol=0.0, stats=stats)
    assert stats["iterations"] < 50
    # Stopping at the fixed point returns what the full run returns.
    assert torch.equal(centers, kmeans(x, 4, iters=stats["iterations"] + 5, tol=0.0))


def test_tolerance_stops_early_at_nearly_the_same_error():
    keys = torch.randn(2, 3000, 16, generator=_gen(6)) * torch.linspace(0.2, 3, 16)
    full, early = {}, {}
    x = keys.unflatten(-1, (8, 2)).permute(0, 2, 1, 3).flatten(0, 1)
    kmeans(x, 64, iters=40, tol=0.0, stats=full)
    kmeans(x, 64, iters=40, tol=1e-2, stats=early)
    assert early["iterations"] < full["iterations"]

    def err(cb):
        k = keys.transpose(0, 1)
        return float(((decode(encode(k, cb), cb) - k) ** 2).mean())

    tight = err(fit_codebooks(keys, m=8, k=64, iters=40, tol=0.0))
    assert err(fit_codebooks(keys, m=8, k=64, iters=40, tol=1e-2)) < 1.05 * tight


def test_subspace_dims():
    assert subspace_dims(8, 2).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert subspace_dims(8, 2, "rope_pairs").tolist() == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert subspace_dims(8, 4, "rope_pairs").tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    for m in (2, 4, 8, 16, 32, 64):
        dims = subspace_dims(128, m, "rope_pairs")
        assert dims.shape == (m, 128 // m) and sorted(dims.flatten().tolist()) == list(range(128))
        # Every RoPE pair (i, i + 64) lies inside one subspace.
        owner = torch.empty(128, dtype=torch.long)
        owner[dims.flatten()] = torch.arange(m).repeat_interleave(128 // m)
        assert torch.equal(owner[:64], owner[64:])
    with pytest.raises(ValueError, match="even subspace size"):
        subspace_dims(64, 64, "rope_pairs")
    with pytest.raises(ValueError, match="unknown grouping"):
        subspace_dims(64, 8, "zigzag")
    with pytest.raises(ValueError, match="not divisible"):
        subspace_dims(64, 6)


def test_dims_fit_the_permuted_keys():
    keys = torch.randn(2, 500, 16, generator=_gen(7))
    dims = subspace_dims(16, 4, "rope_pairs")
    cb = fit_codebooks(keys, m=4, k=16, dims=dims, seed=1)
    assert torch.equal(cb, fit_codebooks(permute(keys, dims), m=4, k=16, seed=1))
    assert torch.equal(fit_codebooks(keys, m=4, k=16, dims=subspace_dims(16, 4), seed=1),
                       fit_codebooks(keys, m=4, k=16, seed=1))
    with pytest.raises(ValueError, match="dims must be"):
        fit_codebooks(keys, m=4, k=16, dims=subspace_dims(16, 2))
