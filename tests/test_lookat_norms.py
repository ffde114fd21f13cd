"""Knorm over LOOKAT rows scores keys by their norms read from the codes and each
centroid's norm (``LookatFormat.key_norms``), never rebuilding the keys: the same norms as
the rebuilt keys (``keys_batch``), in the layers asked for."""

import torch

from vllm_kvcompress.kernels import ops
from vllm_kvcompress.methods.knorm import KnormScorer
from vllm_kvcompress.methods.lookat.format import LookatFormat

BS, D, HEADS, M, K, LAYERS = 16, 32, 2, 8, 16, 3


def _format_and_caches(seed=0):
    gen = torch.Generator().manual_seed(seed)
    codebooks = [torch.randn(HEADS, M, K, D // M, generator=gen) * (1 + layer) for layer in range(LAYERS)]
    dims = torch.randperm(D, generator=gen).view(M, D // M)  # subspaces over permuted channels
    fmt = LookatFormat(codebooks, dims, ops.LookatLayout(head_dim=D, m=M, value_bits=8), exact_current=False)
    caches = []
    for _ in range(LAYERS):
        cache = torch.zeros(9, HEADS, BS, fmt.layout.row_bytes, dtype=torch.uint8)
        cache[..., :M] = torch.randint(0, K, (9, HEADS, BS, M), generator=gen, dtype=torch.uint8)
        cache[..., M:] = torch.randint(0, 256, (9, HEADS, BS, fmt.layout.row_bytes - M), generator=gen,
                                       dtype=torch.uint8)
        caches.append(cache)
    return fmt, caches


def test_norms_from_the_codes_are_the_rebuilt_keys_norms():
    fmt, caches = _format_and_caches()
    table = torch.tensor([[3, 1, 7], [2, 8, 0]])
    length = 40
    layers = [2, 0]  # a group of layers, not in order: each layer's own centroids
    got = fmt.key_norms([caches[i] for i in layers], table, length, layers)
    assert got.shape == (2, 2, HEADS, length)
    for row, layer in enumerate(layers):
        keys = fmt.keys_batch(layer, caches[layer], table, length)  # [R, H, L, D]
        torch.testing.assert_close(got[row], torch.linalg.vector_norm(keys.float(), dim=-1), rtol=1e-5, atol=1e-5)
    other = fmt.key_norms([caches[0]], table, length, [1])  # layer 0's codes with layer 1's centroids
    assert not torch.allclose(other[0], got[1])


def test_knorm_takes_the_norms_from_the_codes(monkeypatch):
    fmt, caches = _format_and_caches(1)
    table = torch.tensor([[4, 5]])
    monkeypatch.setattr(fmt, "keys_batch", lambda *a, **k: (_ for _ in ()).throw(AssertionError("keys rebuilt")))
    scores = KnormScorer().score_layers([(i, c, fmt) for i, c in enumerate(caches)], table, 20, [20])
    assert scores.shape == (LAYERS, 1, HEADS, 20)
