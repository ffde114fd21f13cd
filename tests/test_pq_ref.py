"""Product quantization and ADC scoring: reference ops and k-means codebooks."""

import pytest
import torch

from vllm_kvcompress.kernels.pq_ref import adc_logits, adc_tables, decode, encode
from vllm_kvcompress.offline.pq import fit_codebooks, kmeans


def _codebooks(hkv=2, m=4, k=16, sub=8, seed=0):
    return torch.randn(hkv, m, k, sub, generator=torch.Generator().manual_seed(seed))


def test_centroids_encode_to_themselves():
    cb = _codebooks()
    codes = torch.randint(16, (10, 2, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    keys = decode(codes, cb)
    assert keys.shape == (10, 2, 32)
    assert torch.equal(encode(keys, cb), codes)


def test_encode_picks_the_nearest_centroid():
    cb = _codebooks()
    keys = torch.randn(50, 2, 32, generator=torch.Generator().manual_seed(2))
    codes = encode(keys, cb)
    sub = keys.unflatten(-1, (4, 8))  # [T, H, m, s]
    brute = ((sub.unsqueeze(-2) - cb.unsqueeze(0)) ** 2).sum(-1).argmin(-1)
    assert torch.equal(codes.long(), brute)


def test_adc_logits_equal_dot_products_with_rebuilt_keys():
    cb = _codebooks()
    codes = torch.randint(16, (37, 2, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    queries = torch.randn(6, 32, generator=torch.Generator().manual_seed(4))  # GQA group 3
    logits = adc_logits(adc_tables(queries, cb), codes, scale=0.125)
    keys = decode(codes, cb).repeat_interleave(3, dim=1)  # [T, Hq, D]
    expected = torch.einsum("hd,thd->ht", queries, keys) * 0.125
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_kmeans_is_deterministic_and_finds_clusters():
    gen = torch.Generator().manual_seed(5)
    truth = torch.randn(1, 4, 2, generator=gen) * 10
    x = (truth.repeat_interleave(50, dim=1) + 0.01 * torch.randn(1, 200, 2, generator=gen))
    a, b = kmeans(x, 4, seed=7), kmeans(x, 4, seed=7)
    assert torch.equal(a, b)
    # Every true centre is matched by a fitted centroid.
    assert (torch.cdist(truth[0], a[0]).min(-1).values < 0.05).all()


def test_lloyd_iterations_reduce_distortion():
    keys = torch.randn(2, 2000, 32, generator=torch.Generator().manual_seed(6)) * torch.linspace(0.2, 3, 32)
    seeded_only = fit_codebooks(keys, m=4, k=16, iters=0)
    fitted = fit_codebooks(keys, m=4, k=16, iters=10)
    assert fitted.shape == (2, 4, 16, 8)

    def err(cb):
        k = keys.transpose(0, 1)  # [N, H, D]
        return float(((decode(encode(k, cb), cb) - k) ** 2).mean())

    # 4 bits per 8-dim Gaussian subspace: optimal distortion is about half the variance.
    assert err(fitted) < 0.9 * err(seeded_only)
    assert err(fitted) < 0.6 * float(keys.pow(2).mean())


def test_bad_subspace_count_is_refused():
    with pytest.raises(ValueError, match="not divisible"):
        fit_codebooks(torch.randn(1, 300, 30), m=4, k=8)
