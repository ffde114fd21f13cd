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


def test_stream_warm_up_runs_each_launch_plan_and_leaves_the_pool_alone(monkeypatch):
    # What the engine's warm-up compiles (docs/design/eviction-on-cuda.md §7): each split count
    # up to the longest context (powers of two) for each table width Triton specialises on.
    seen, dense_decode = set(), stream_attention_triton.dense_decode

    def recording(query, cache, table, lengths, scale, **kwargs):
        seen.add((table.shape[1], table.dtype, kwargs["num_splits"]))
        return dense_decode(query, cache, table, lengths, scale, **kwargs)

    monkeypatch.setattr(stream_attention_triton, "dense_decode", recording)
    page, heads, head_dim = 16, 2, 64
    pool = torch.randn(8 * page, 2 * head_dim).to(torch.bfloat16).to(DEV)
    before = pool.clone()
    query = torch.zeros(1, 2 * heads, head_dim, dtype=torch.bfloat16, device=DEV)
    stream_attention_triton.warm_up(query, pool, heads, page, max_len=1024)  # 1024 / 256 tokens a split: 4
    # int32 pages: the CUDA graph buffers' (StreamDecodeBuffers), a multiple of 16 wide.
    plans = [(1, torch.long), (2, torch.long), (16, torch.long), (16, torch.int32)]
    assert seen == {(width, dtype, splits) for width, dtype in plans for splits in (1, 2, 4)}
    assert torch.equal(pool, before)


@pytest.mark.skipif(DEV == "cuda", reason="the CPU pool's case")
def test_stream_warm_up_is_skipped_where_the_reference_serves():
    from vllm_kvcompress.kernels import ops

    pool = torch.zeros(8 * 16, 128, dtype=torch.bfloat16)  # a CPU pool: the engine runs the PyTorch reference
    assert ops.warm_up_stream_decode(pool, 16, 4, 2, 64, torch.bfloat16, max_len=1024) is False
