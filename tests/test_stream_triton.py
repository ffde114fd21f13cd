"""Triton stream decode (HeadKV: every KV head its own page list and length) vs the
PyTorch reference (small shapes; on CPU under Triton's interpreter)."""

import pytest
import torch

from triton_env import DEV, import_kernels, interpreter  # noqa: F401

stream_attention_ref, stream_attention_triton = import_kernels("stream_attention_ref", "stream_attention_triton")


@pytest.fixture(autouse=True)
def _interpreter(interpreter):
    yield


@pytest.mark.parametrize("head_dim,group", [(64, 3), (128, 6)])
def test_stream_decode_matches_reference(head_dim, group):
    g = torch.Generator().manual_seed(head_dim)
    page, num_pages, heads = 16, 40, 2
    pool = torch.randn(num_pages * page, 2 * head_dim, generator=g).to(torch.bfloat16)
    lengths = torch.tensor([[37, 5], [70, 16], [1, 90]])  # very different lengths per head
    pages = torch.stack([torch.randperm(num_pages, generator=g)[:6] for _ in range(6)]).view(3, heads, 6)
    query = torch.randn(3, heads * group, head_dim, generator=g)
    ref = stream_attention_ref.decode_attention(query.to(torch.bfloat16), pool, pages, lengths, page, 0.125)
    out = stream_attention_triton.stream_decode(query.to(DEV), pool.to(DEV), pages.to(DEV).int(), lengths.to(DEV),
                                                page, 0.125).cpu()
    assert torch.isfinite(out).all()
    assert float((out - ref).norm() / ref.norm()) < 5e-3
