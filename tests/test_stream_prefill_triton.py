"""Triton stream prefill (causal, optionally DMS's delayed rule) vs the PyTorch reference
(``stream_attention_ref.prefill_attention`` with ``delayed_visible``), on streams of unequal
length in scattered pages; small shapes, on CPU under Triton's interpreter."""

import pytest
import torch

from triton_env import DEV, import_kernels, interpreter  # noqa: F401

stream_attention_ref, stream_prefill_triton = import_kernels("stream_attention_ref", "stream_prefill_triton")

PAGE, D, KV_HEADS, GROUP = 4, 16, 2, 2


@pytest.fixture(autouse=True)
def _interpreter(interpreter):
    yield


def _case(seed: int, lengths: list[int], q_len: int, dtype=torch.float32):
    """A pool whose streams sit in shuffled pages (rows of other streams between them)."""
    g = torch.Generator().manual_seed(seed)
    per_stream = -(-max(lengths) // PAGE)
    num_pages = KV_HEADS * per_stream + 3
    pool = torch.randn(num_pages * PAGE, 2 * D, generator=g).to(dtype)
    pages = torch.randperm(num_pages, generator=g)[: KV_HEADS * per_stream].view(KV_HEADS, per_stream)
    query = torch.randn(q_len, KV_HEADS * GROUP, D, generator=g).to(dtype)
    row_scores = torch.randn(num_pages * PAGE, generator=g)
    return pool, pages, torch.tensor(lengths), query, row_scores


def _reference(pool, pages, lengths, query, scale, row_scores=None, window=0, threshold=0.0, page=PAGE):
    visible = None
    if row_scores is not None:
        key_rows = stream_attention_ref.page_rows(pages, page)[:, : int(lengths.max())]
        visible = stream_attention_ref.delayed_visible(row_scores[key_rows], lengths, query.shape[0], window, threshold)
    return stream_attention_ref.prefill_attention(query.float(), pool.float(), pages, lengths, page, scale, visible)


@pytest.mark.parametrize("lengths,q_len,rule", [
    ([37, 21], 9, None),  # streams of unequal length (HeadKV after its compression), causal only
    ([37, 21], 9, (5, 0.0)),  # DMS: keys older than 5 visible only where their score passes
    ([70, 70], 70, (8, 0.3)),  # a whole prompt: several query and key tiles, most keys hidden
    ([19, 33], 1, (4, -0.2)),  # one query
])
def test_stream_prefill_matches_the_reference(lengths, q_len, rule):
    pool, pages, lengths, query, row_scores = _case(len(lengths) + q_len, lengths, q_len)
    args = {} if rule is None else {"row_scores": row_scores, "window": rule[0], "threshold": rule[1]}
    want = _reference(pool, pages, lengths, query, 0.25, **args)
    got = stream_prefill_triton.prefill_attention(query.to(DEV), pool.to(DEV), pages.to(DEV), lengths.to(DEV), PAGE,
                                                  0.25, block_m=16, block_n=16,
                                                  **{k: v.to(DEV) if torch.is_tensor(v) else v for k, v in args.items()})
    assert got.shape == query.shape and got.dtype == query.dtype
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


def test_the_rule_changes_the_answer():
    """Hiding the marked keys must matter (a kernel ignoring the rule would pass the test above
    only where nothing is hidden)."""
    pool, pages, lengths, query, row_scores = _case(3, [40, 40], 12)
    causal = stream_prefill_triton.prefill_attention(query.to(DEV), pool.to(DEV), pages.to(DEV), lengths.to(DEV), PAGE,
                                                     0.25, block_m=16, block_n=16)
    ruled = stream_prefill_triton.prefill_attention(query.to(DEV), pool.to(DEV), pages.to(DEV), lengths.to(DEV), PAGE,
                                                    0.25, row_scores.to(DEV), 4, 0.5, block_m=16, block_n=16)
    assert (causal - ruled).abs().max() > 1e-2


def test_the_seam_sends_rules_and_unequal_streams_to_the_twin(monkeypatch):
    """``ops.stream_prefill``: DMS's rule and unequal streams run the twin; equal streams without
    a rule stay on the reference (FlashAttention on CUDA); the twin's answer is the reference's."""
    from vllm_kvcompress.kernels import ops

    calls = []
    twin = stream_prefill_triton.prefill_attention
    monkeypatch.setattr(stream_prefill_triton, "prefill_attention", lambda *a, **k: calls.append(1) or twin(*a, **k))
    pool, pages, lengths, query, row_scores = _case(5, [37, 21], 9)
    with ops.use("triton"):
        ruled = ops.stream_prefill(query, pool, pages, lengths, PAGE, 0.25, rule=ops.DelayedRule(row_scores, 5, 0.0))
        unequal = ops.stream_prefill(query, pool, pages, lengths, PAGE, 0.25, uniform=False)
        assert len(calls) == 2
        equal = torch.tensor([37, 37])
        ops.stream_prefill(query, pool, pages, equal, PAGE, 0.25, uniform=True)
        assert len(calls) == 2
    torch.testing.assert_close(ruled, _reference(pool, pages, lengths, query, 0.25, row_scores, 5), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(unequal, _reference(pool, pages, lengths, query, 0.25), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["dms", "unequal"])
def test_llama_shape_in_bf16_on_the_gpu(kind):
    """The engine's case on the GPU: Llama-3-8B's heads, bf16, 64-row tiles, a 1,000-token chunk."""
    from benchmarks.kernels_stream_prefill import WINDOW, case

    pool, pages, lengths, query, row_scores = case(kind, 1000, 3000, torch.device("cuda"))
    rule = {"row_scores": row_scores, "window": WINDOW} if kind == "dms" else {}
    want = _reference(pool, pages, lengths, query, 128 ** -0.5, **rule, page=16)
    got = stream_prefill_triton.prefill_attention(query, pool, pages, lengths, 16, 128 ** -0.5, **rule)
    assert float((got.float() - want).abs().max() / want.abs().max()) < 2e-2
