"""The fused LOOKAT cache write (Triton) vs ``lookat_ref.encode_write`` (small shapes; on CPU
under Triton's interpreter, see ``triton_env``)."""

import pytest
import torch

from triton_env import DEV, import_kernels, interpreter  # noqa: F401  (autouse below)

lookat_ref, lookat_write_triton = import_kernels("lookat_ref", "lookat_write_triton")


@pytest.fixture(autouse=True)
def _interpreter(interpreter):
    yield


def _case(bits, D=32, m=8, hkv=2, tokens=21, K=64, bs=16, seed=0, dims=False):
    g = torch.Generator().manual_seed(seed)
    layout = lookat_ref.LookatLayout(head_dim=D, m=m, value_bits=bits)
    codebooks = torch.randn(hkv, m, K, D // m, generator=g)
    # keys near centroids (as real keys are) plus noise, so codes are not all ties
    keys = torch.randn(tokens, hkv, D, generator=g)
    values = (torch.randn(tokens, hkv, D, generator=g) * 2 + 0.5).to(torch.bfloat16)
    num_blocks = 6
    # Slot 0 is in vLLM's null block, never a token's (the reference aims padding rows there).
    slots = torch.randperm(num_blocks * bs - 1, generator=g)[:tokens] + 1
    slots[3] = -1  # vLLM's padding slot: stores nothing
    order = torch.randperm(D, generator=g).view(m, D // m) if dims else None
    cache = torch.randint(0, 256, (num_blocks, hkv, bs, layout.row_bytes), generator=g, dtype=torch.uint8)
    return layout, codebooks, keys, values, slots, order, cache


@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("dims", [False, True])
@pytest.mark.parametrize("distances", ["fma", "mma"])
def test_write_matches_reference(bits, dims, distances):
    layout, codebooks, keys, values, slots, order, cache = _case(bits, dims=dims)
    keys = keys.to(torch.bfloat16)  # as vLLM hands them; centroids hold bf16 values (LookatFormat)
    codebooks = codebooks.to(torch.bfloat16).float()
    ref = cache.clone()
    lookat_ref.encode_write(ref, keys, values, slots, codebooks, order, layout)
    out = cache.clone().to(DEV)
    # keys as vLLM hands them: a strided view into the fused qkv projection
    qkv = torch.cat([torch.zeros(keys.shape[0], 1, keys.shape[2]), keys], 1).to(DEV)
    lookat_write_triton.lookat_write(out, qkv[:, 1:], values.to(DEV), slots.to(DEV), codebooks.to(DEV),
                                     None if order is None else order.to(DEV), layout, distances=distances)
    out = out.cpu()
    assert torch.equal(out, ref), f"{int((out != ref).sum())} bytes differ"


def test_prefill_sized_writes_match_reference():
    """A prefill chunk's worth of tokens (many programs per head and subspace)."""
    tokens = 1101
    layout, codebooks, keys, values, slots, order, cache = _case(4, tokens=tokens, seed=5)
    keys, codebooks = keys.to(torch.bfloat16), codebooks.to(torch.bfloat16).float()  # exact in tf32 ("mma")
    cache = torch.zeros(tokens // 16 + 8, 2, 16, layout.row_bytes, dtype=torch.uint8)
    slots = torch.randperm(cache.shape[0] * 16 - 1, generator=torch.Generator().manual_seed(6))[:tokens] + 1
    ref = cache.clone()
    lookat_ref.encode_write(ref, keys, values, slots, codebooks, None, layout)
    for distances, block_t in (("fma", 16), ("mma", 64)):
        out = cache.clone().to(DEV)
        lookat_write_triton.lookat_write(out, keys.to(DEV), values.to(DEV), slots.to(DEV), codebooks.to(DEV), None,
                                         layout, distances=distances, block_t=block_t)
        assert torch.equal(out.cpu(), ref), distances


def test_padding_slots_store_nothing():
    layout, codebooks, keys, values, slots, order, cache = _case(4)
    slots[:] = -1
    out = cache.clone().to(DEV)
    lookat_write_triton.lookat_write(out, keys.to(DEV), values.to(DEV), slots.to(DEV), codebooks.to(DEV), None,
                                     layout)
    assert torch.equal(out.cpu(), cache)


def test_codes_are_nearest_centroids():
    """Codes from the kernel are the nearest centroids (up to an exact tie in fp32)."""
    layout, codebooks, keys, values, slots, order, cache = _case(16, D=64, m=16, K=256, tokens=40, seed=3)
    slots = torch.arange(40)
    out = cache.clone().to(DEV)
    lookat_write_triton.lookat_write(out, keys.to(DEV), values.to(DEV), slots.to(DEV), codebooks.to(DEV), None,
                                     layout)
    codes = out.cpu().transpose(1, 2).flatten(0, 1)[:40, :, :layout.m].long()  # [T, Hkv, m]
    sub = keys.unflatten(-1, (layout.m, -1))  # [T, Hkv, m, s]
    dist = ((sub.unsqueeze(3) - codebooks.unsqueeze(0)) ** 2).sum(-1)  # [T, Hkv, m, K]
    chosen = dist.gather(-1, codes.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(chosen, dist.amin(-1), atol=1e-4)
