"""LOOKAT reference: value formats round-trip, row layout, ADC decode == attention over
rebuilt keys, prefill == decode at the last position, exact current tokens."""

import pytest
import torch

from vllm_kvcompress.kernels import lookat_ref as L
from vllm_kvcompress.kernels import pq_ref


def _setup(bits=16, D=16, m=4, Hkv=2, group=3, bs=16, seed=0, dims=None):
    g = torch.Generator().manual_seed(seed)
    layout = L.LookatLayout(head_dim=D, m=m, value_bits=bits)
    codebooks = torch.randn(Hkv, m, 256, D // m, generator=g)
    cache = torch.zeros(12, Hkv, bs, layout.row_bytes, dtype=torch.uint8)
    return g, layout, codebooks, cache


@pytest.mark.parametrize("bits,tol", [(16, 1e-2), (8, 2e-2), (4, 0.15)])
def test_value_roundtrip(bits, tol):
    layout = L.LookatLayout(head_dim=64, m=8, value_bits=bits)
    v = torch.randn(50, 3, 64)
    data = L.quantize_values(v, layout)
    assert data.dtype == torch.uint8 and data.shape == (50, 3, layout.value_bytes + layout.param_bytes)
    back = L.dequantize_values(data, layout)
    rel = (back - v).norm() / v.norm()
    assert rel < tol, rel


def test_row_bytes_arithmetic():
    # head_dim 64, m=8, int4 values: 8 + 32 + 4 = 44 bytes vs 256 dense -> 5.8x.
    layout = L.LookatLayout(head_dim=64, m=8, value_bits=4)
    assert layout.row_bytes == 44 and layout.dense_row_bytes / layout.row_bytes > 5
    with pytest.raises(ValueError, match="value_bits"):
        L.LookatLayout(head_dim=64, m=8, value_bits=3)
    with pytest.raises(ValueError, match="divide"):
        L.LookatLayout(head_dim=64, m=6)


def _fill(cache, layout, codebooks, dims, T, g):
    Hkv, D = cache.shape[1], layout.head_dim
    k, v = torch.randn(T, Hkv, D, generator=g), torch.randn(T, Hkv, D, generator=g)
    blocks = torch.randperm(cache.shape[0], generator=g)
    slots = blocks[torch.arange(T) // cache.shape[2]] * cache.shape[2] + torch.arange(T) % cache.shape[2]
    L.write_rows(cache, L.encode_rows(k, v, codebooks, dims, layout), slots)
    return k, v, blocks


@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("permuted", [False, True])
def test_decode_matches_attention_over_rebuilt_keys(bits, permuted):
    g, layout, codebooks, cache = _setup(bits)
    D = layout.head_dim
    dims = torch.randperm(D, generator=g).view(layout.m, -1) if permuted else None
    lens = torch.tensor([37, 5])
    tables, refs = [], []
    q = torch.randn(2, 6, D, generator=g)
    for r, n in enumerate(lens.tolist()):
        k, v, blocks = _fill(cache, layout, codebooks, dims, n, g)
        tables.append(blocks[:6])
        codes = pq_ref.encode(L.permute(k, dims), codebooks)
        kr = L.rebuilt_keys(codes.transpose(0, 1), codebooks, dims)  # [Hkv, n, D]
        vr = L.dequantize_values(L.quantize_values(v, layout), layout).transpose(0, 1)
        p = torch.softmax((q[r].view(2, 3, D) @ kr.transpose(1, 2)) * 0.25, -1)
        refs.append((p @ vr).reshape(6, D))
    out = L.decode_attention(q, cache, torch.stack(tables), lens, codebooks, dims, layout, 0.25)
    torch.testing.assert_close(out, torch.stack(refs), atol=1e-4, rtol=1e-4)


def test_rebuilt_keys_follow_dims():
    g, layout, codebooks, _ = _setup()
    dims = torch.randperm(16, generator=g).view(4, 4)
    k = torch.randn(9, 2, 16, generator=g)
    codes = pq_ref.encode(L.permute(k, dims), codebooks)
    rebuilt = L.rebuilt_keys(codes.transpose(0, 1), codebooks, dims).transpose(0, 1)
    # the permuted rebuilt key is exactly the concatenated centroids
    assert torch.equal(L.permute(rebuilt, dims), pq_ref.decode(codes, codebooks))


@pytest.mark.parametrize("exact", [False, True])
def test_prefill_last_row_equals_decode(exact):
    g, layout, codebooks, cache = _setup(8)
    k, v, blocks = _fill(cache, layout, codebooks, None, 40, g)
    # exact mode: a prompt's own tokens are all exact, so compare a one-token "prefill"
    n = 1 if exact else 7
    q = torch.randn(n, 6, 16, generator=g)
    cur = (k[-n:], v[-n:]) if exact else None
    pre = L.prefill_attention(q, cache, blocks, 40, codebooks, None, layout, 0.3, current=cur)
    dec_cur = (k[-1:], v[-1:]) if exact else None
    dec = L.decode_attention(q[-1:], cache, blocks[None], torch.tensor([40]), codebooks, None, layout, 0.3,
                             current=dec_cur)
    torch.testing.assert_close(pre[-1:], dec, atol=1e-4, rtol=1e-4)
    assert pre.shape == (n, 6, 16)


def test_exact_current_tokens_change_only_what_they_should():
    g, layout, codebooks, cache = _setup(16)
    k, v, blocks = _fill(cache, layout, codebooks, None, 20, g)
    q = torch.randn(1, 6, 16, generator=g)
    coded = L.decode_attention(q, cache, blocks[None], torch.tensor([20]), codebooks, None, layout, 0.3)
    exact = L.decode_attention(q, cache, blocks[None], torch.tensor([20]), codebooks, None, layout, 0.3,
                               current=(k[-1:], v[-1:]))
    assert not torch.allclose(coded, exact)
    # with the exact key equal to its own rebuilt key and value, both agree
    codes = pq_ref.encode(k[-1:], codebooks)
    same = L.decode_attention(q, cache, blocks[None], torch.tensor([20]), codebooks, None, layout, 0.3,
                              current=(pq_ref.decode(codes, codebooks), v[-1:].bfloat16().float()))
    torch.testing.assert_close(same, coded, atol=1e-4, rtol=1e-4)


def test_whole_prompt_prefill_equals_chunked():
    g, layout, codebooks, cache = _setup(4)
    k, v, blocks = _fill(cache, layout, codebooks, None, 40, g)
    q = torch.randn(40, 6, 16, generator=g)
    whole = L.prefill_attention(q, cache, blocks, 40, codebooks, None, layout, 0.3)  # is_causal path
    tail = L.prefill_attention(q[25:], cache, blocks, 40, codebooks, None, layout, 0.3)  # explicit mask
    torch.testing.assert_close(whole[25:], tail, atol=1e-5, rtol=1e-5)
