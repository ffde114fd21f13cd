"""The rotations the PQ-rotation benchmark compares are orthogonal (scores unchanged),
and the PCA grouping balances variance across subspaces."""

import torch

from benchmarks.pq_rotation import hadamard_rotation, pca_rotation, rotated


def test_rotations_are_orthogonal_and_keep_dot_products():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 300, 16, generator=g) * torch.linspace(0.1, 5, 16)
    for rotation in (hadamard_rotation(16, 3).expand(2, 16, 16), pca_rotation(keys, 4)):
        eye = torch.einsum("hde,hdf->hef", rotation, rotation)
        assert torch.allclose(eye, torch.eye(16).expand(2, 16, 16), atol=1e-5)
        q = torch.randn(2, 5, 16, generator=g)
        scores = torch.einsum("hqd,htd->hqt", q, keys)
        assert torch.allclose(torch.einsum("hqd,htd->hqt", rotated(q, rotation), rotated(keys, rotation)), scores,
                              atol=1e-3)
        assert torch.allclose(rotated(rotated(keys, rotation), rotation, inverse=True), keys, atol=1e-4)


def test_pca_grouping_spreads_the_large_variance_axes_over_subspaces():
    g = torch.Generator().manual_seed(1)
    scales = torch.tensor([8.0, 7.0, 6.0, 5.0] + [0.1] * 12)
    keys = (torch.randn(1, 4000, 16, generator=g) * scales)
    rotation = pca_rotation(keys, 4)[0]
    variance = rotated(keys, rotation[None])[0].var(0)
    per_subspace = variance.unflatten(0, (4, 4)).max(1).values
    # one of the four large axes in each subspace, not all four in one
    assert (per_subspace > 20).all()
