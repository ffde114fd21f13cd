"""Paged caches of kvquant rows for the decode tests (Triton and CPU twins vs the reference)."""

import torch

from vllm_kvcompress.kernels import kvquant_ref
from vllm_kvcompress.kernels.rope_ref import rotate

THETA = 1e6


def paged_case(key_bits, value_bits, positions, lens, hkv=2, group=3, D=32, bs=16, seed=0, farthest=5000):
    """Every slot of a shuffled paged cache holds a valid row (keys of a calibrated range, at
    scattered logical positions when the rows carry them, as after eviction). Returns
    ``layout, cache, table (int32, unused entries poisoned), kv_lens, ranges, query``."""
    g = torch.Generator().manual_seed(seed)
    layout = kvquant_ref.layout(D, key_bits, value_bits, torch.bfloat16, positions=positions)
    num_blocks = sum(-(-n // bs) for n in lens) + 3
    rows = num_blocks * bs
    offsets = torch.randn(hkv, D, generator=g) * 3  # a k_proj bias: position-free, large
    pre = torch.randn(rows, hkv, D, generator=g) + offsets
    where = torch.randint(0, farthest, (rows,), generator=g) if positions else torch.arange(rows) % bs
    keys = rotate(pre.transpose(0, 1), where, THETA).transpose(0, 1)  # post-RoPE, as the model writes them
    ranges = torch.stack([pre.amin(0) - 0.5, pre.amax(0) + 0.5], 1)  # [Hkv, 2, D]
    values = torch.randn(rows, hkv, D, generator=g) * 2 + 0.5
    encoded = kvquant_ref.encode_rows(keys, values, where, ranges, key_bits, THETA, layout)
    cache = encoded.view(num_blocks, bs, hkv, -1).transpose(1, 2).contiguous()
    need = [-(-n // bs) for n in lens]
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.full((len(lens), max(need) + 1), 10**6, dtype=torch.int32)
    used = 0
    for r, n in enumerate(need):
        table[r, :n] = perm[used:used + n].int()
        used += n
    query = (torch.randn(len(lens), hkv * group, D, generator=g) * 2).bfloat16()
    return layout, cache, table, torch.tensor(lens, dtype=torch.int32), ranges, query
