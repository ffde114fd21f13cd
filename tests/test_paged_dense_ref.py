"""The PyTorch paged ops against plain dense attention computed in fp64."""

import math

import pytest
import torch

from vllm_kvcompress.kernels import paged_dense_ref as dense

BLOCK = 16
HEAD_DIM = 32


def naive_attention(q, k, v, scale, q_offset):
    """q [Tq, Hq, D], k/v [Tk, Hkv, D]; query i sits at position q_offset + i."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1).double()
    v = v.repeat_interleave(group, dim=1).double()
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    pos_q = torch.arange(q.shape[0]).unsqueeze(1) + q_offset
    scores = scores.masked_fill(torch.arange(k.shape[0]).unsqueeze(0) > pos_q, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def make_request(gen, num_blocks_total, length, kv_heads):
    """Random K/V for one request, stored in randomly chosen (scrambled) cache blocks."""
    n_blocks = math.ceil(length / BLOCK)
    blocks = torch.randperm(num_blocks_total, generator=gen)[:n_blocks]
    k = torch.randn(length, kv_heads, HEAD_DIM, generator=gen)
    v = torch.randn(length, kv_heads, HEAD_DIM, generator=gen)
    pos = torch.arange(length)
    slots = blocks[pos // BLOCK] * BLOCK + pos % BLOCK
    return blocks, k, v, slots


@pytest.mark.parametrize("kv_heads,q_heads", [(1, 1), (2, 6), (3, 9)])
def test_write_then_gather_roundtrip(kv_heads, q_heads):
    gen = torch.Generator().manual_seed(0)
    cache = torch.zeros(32, kv_heads, BLOCK, 2 * HEAD_DIM)
    blocks, k, v, slots = make_request(gen, 31, 77, kv_heads)
    blocks, slots = blocks + 1, slots + BLOCK  # block 0 is vLLM's null block: never a request's
    slots_with_padding = torch.cat([slots, torch.tensor([-1, -1])])
    dense.write_kv(cache, torch.cat([k, k[:2]]), torch.cat([v, v[:2]]), slots_with_padding)
    k2, v2 = dense.gather_kv(cache, blocks, 77)
    assert torch.equal(k2.transpose(0, 1), k) and torch.equal(v2.transpose(0, 1), v)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("kv_heads,q_heads", [(1, 4), (3, 9)])
def test_prefill_and_chunked_prefill_match_dense(dtype, tol, kv_heads, q_heads):
    gen = torch.Generator().manual_seed(1)
    length = 70
    cache = torch.zeros(40, kv_heads, BLOCK, 2 * HEAD_DIM, dtype=dtype)
    blocks, k, v, slots = make_request(gen, 40, length, kv_heads)
    dense.write_kv(cache, k, v, slots)
    q = torch.randn(length, q_heads, HEAD_DIM, generator=gen)
    scale = HEAD_DIM**-0.5
    kq, vq = k.to(dtype).float(), v.to(dtype).float()
    expected = naive_attention(q.to(dtype).float(), kq, vq, scale, 0)
    full = dense.prefill_attention(q.to(dtype), cache, blocks, length, scale)
    torch.testing.assert_close(full.double(), expected, atol=tol, rtol=tol)
    # A later chunk: the last 23 queries over all 70 cached tokens (bottom-right causal).
    chunk = dense.prefill_attention(q[-23:].to(dtype), cache, blocks, length, scale)
    torch.testing.assert_close(chunk.double(), expected[-23:], atol=tol, rtol=tol)
    # A middle chunk sees only what is cached so far.
    mid = dense.prefill_attention(q[30:50].to(dtype), cache, blocks, 50, scale)
    torch.testing.assert_close(mid.double(), expected[30:50], atol=tol, rtol=tol)


def test_batched_decode_matches_per_request():
    gen = torch.Generator().manual_seed(2)
    kv_heads, q_heads, total = 2, 6, 64
    cache = torch.zeros(total, kv_heads, BLOCK, 2 * HEAD_DIM)
    lengths = [1, 17, 48, 33]
    perm = torch.randperm(total, generator=gen)
    table = torch.zeros(len(lengths), 4, dtype=torch.long)
    refs, queries = [], []
    for r, length in enumerate(lengths):
        n = math.ceil(length / BLOCK)
        blocks = perm[4 * r : 4 * r + n]
        table[r, :n] = blocks
        k = torch.randn(length, kv_heads, HEAD_DIM, generator=gen)
        v = torch.randn(length, kv_heads, HEAD_DIM, generator=gen)
        pos = torch.arange(length)
        dense.write_kv(cache, k, v, blocks[pos // BLOCK] * BLOCK + pos % BLOCK)
        q = torch.randn(1, q_heads, HEAD_DIM, generator=gen)
        queries.append(q)
        refs.append(naive_attention(q, k, v, 0.2, length - 1)[0])
    out = dense.decode_attention(torch.cat(queries), cache, table, torch.tensor(lengths), 0.2)
    torch.testing.assert_close(out.double(), torch.stack(refs), atol=1e-5, rtol=1e-5)


def test_padding_slots_write_nothing_and_need_no_host_read_back():
    """Slots -1 (vLLM pads a captured batch with them) store nothing: not at the slot they
    are aimed at (0, in the null block), nor anywhere else; the write is sync-free (no
    boolean filtering), so it can sit inside a CUDA graph."""
    gen = torch.Generator().manual_seed(3)
    cache = torch.randn(8, 2, BLOCK, 2 * HEAD_DIM, generator=gen)
    before = cache.clone()
    key, value = torch.randn(3, 2, HEAD_DIM, generator=gen), torch.randn(3, 2, HEAD_DIM, generator=gen)
    dense.write_kv(cache, key, value, torch.tensor([-1, 5 * BLOCK + 3, -1]))
    assert torch.equal(cache[5, :, 3], torch.cat([key[1], value[1]], -1))
    cache[5, :, 3] = before[5, :, 3]
    assert torch.equal(cache, before)
