"""The compiled CPU kvquant decode (``kernels/kvquant_cpu.py``) vs its PyTorch reference,
and the ops seam that runs it on CPU tensors."""

import pytest
import torch

from kvquant_cases import THETA, paged_case
from vllm_kvcompress.kernels import kvquant_cpu, kvquant_ref, ops, rope_ref


def _ref(query, cache, table, kv_lens, ranges, key_bits, layout, scale):
    return kvquant_ref.decode_attention(query, cache, table.long().clamp_max(cache.shape[0] - 1), kv_lens, ranges,
                                        key_bits, THETA, layout, scale)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


# Both compute in fp32: agreement to float rounding (one compiled loop vs eager passes).
@pytest.mark.parametrize("key_bits,value_bits,positions,lens", [
    (8, 8, True, [37, 5, 70]), (4, 4, True, [16, 33]), (8, 16, False, [37, 5, 70]), (4, 8, False, [70]),
    (8, 4, True, [2, 90])])
def test_compiled_decode_matches_the_reference(key_bits, value_bits, positions, lens):
    layout, cache, table, kv_lens, ranges, query = paged_case(key_bits, value_bits, positions, lens)
    scale = 32 ** -0.5
    ref = _ref(query, cache, table, kv_lens, ranges, key_bits, layout, scale)
    out = kvquant_cpu.decode_attention(query, cache, table.long().clamp_max(cache.shape[0] - 1), kv_lens, ranges,
                                       key_bits, THETA, layout, scale)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("key_bits,value_bits", [(8, 8), (4, 4)])
def test_after_the_warm_up_no_batch_or_length_compiles_again(key_bits, value_bits):
    layout, cache, table, kv_lens, ranges, query = paged_case(key_bits, value_bits, True, [37, 5, 70], hkv=2, group=7,
                                                             D=64, seed=1)
    table = table.long().clamp_max(cache.shape[0] - 1)
    kvquant_cpu.warm_up(14, cache.shape[2], ranges, key_bits, THETA, layout, 0.125)
    before = _graphs()
    with torch.inference_mode():  # as vLLM steps (the warm-up's too)
        _decode_every_batch(query, cache, table, ranges, key_bits, layout)
    assert _graphs() == before


def _decode_every_batch(query, cache, table, ranges, key_bits, layout):
    for rows in ([0, 1, 2], [2, 0, 1], [1], [0], [0, 2]):
        for lens in ([12, 64, 3], [70, 70, 70], [41, 2, 9], [16, 16, 16]):
            lens = torch.tensor([lens[r] for r in range(len(rows))])
            out = kvquant_cpu.decode_attention(query[rows], cache, table[rows], lens, ranges, key_bits, THETA, layout,
                                               0.125)
            torch.testing.assert_close(out, _ref(query[rows], cache, table[rows], lens, ranges, key_bits, layout,
                                                 0.125), rtol=1e-4, atol=1e-5)


def test_positions_past_the_table_are_computed_directly():
    layout, cache, table, kv_lens, ranges, query = paged_case(8, 8, True, [40], farthest=rope_ref.MAX_TABLE + 5000,
                                                                seed=2)
    table = table.long().clamp_max(cache.shape[0] - 1)
    out = kvquant_cpu.decode_attention(query, cache, table, kv_lens, ranges, 8, THETA, layout, 0.2)
    torch.testing.assert_close(out, _ref(query, cache, table, kv_lens, ranges, 8, layout, 0.2), rtol=1e-4,
                               atol=1e-5)


def test_the_ops_seam_runs_the_compiled_decode_on_cpu_unless_the_reference_is_forced(monkeypatch):
    layout, cache, table, kv_lens, ranges, query = paged_case(8, 8, True, [37, 5])
    table = table.long().clamp_max(cache.shape[0] - 1)
    calls = []
    monkeypatch.setattr(kvquant_cpu, "decode_attention", lambda *a, **k: calls.append("compiled") or "twin")
    assert ops.kvquant_decode(query, cache, table, kv_lens, ranges, 8, THETA, layout, 0.2) == "twin"
    with ops.use("reference"):
        assert isinstance(ops.kvquant_decode(query, cache, table, kv_lens, ranges, 8, THETA, layout, 0.2),
                          torch.Tensor)
    one_row = ops.kvquant_decode(query[:1], cache, table[:1], torch.tensor([1]), ranges, 8, THETA, layout, 0.2)
    assert calls == ["compiled"] and isinstance(one_row, torch.Tensor)  # a single row: the reference


@pytest.mark.parametrize("key_bits,value_bits,positions", [(8, 8, True), (4, 4, True), (8, 16, False), (4, 8, False)])
def test_compiled_cache_write_gives_the_reference_bytes(key_bits, value_bits, positions):
    g = torch.Generator().manual_seed(3)
    layout = kvquant_ref.layout(64, key_bits, value_bits, torch.bfloat16, positions=positions)
    ranges = torch.stack([torch.full((2, 64), -2.5), torch.full((2, 64), 2.5)], 1) + torch.randn(2, 1, 64, generator=g)
    for tokens in (1, 37):
        key = (torch.randn(tokens, 2, 64, generator=g) * 2).bfloat16()  # some beyond the range: clamped
        value = (torch.randn(tokens, 2, 64, generator=g) * 3).bfloat16()
        where = torch.randint(0, 100_000, (tokens,), generator=g)
        ref = kvquant_ref.encode_rows(key, value, where, ranges, key_bits, THETA, layout)
        assert torch.equal(kvquant_cpu.encode_rows(key, value, where, ranges, key_bits, THETA, layout), ref)


def test_the_cache_write_compiles_at_the_warm_up_only():
    layout = kvquant_ref.layout(64, 8, 8, torch.bfloat16, positions=True)
    ranges = torch.stack([-torch.ones(2, 64), torch.ones(2, 64)], 1)
    kvquant_cpu.warm_up(14, 16, ranges, 8, THETA, layout, 0.125)
    before = _graphs()
    with torch.inference_mode():
        for tokens in (1, 2, 5, 300):
            key = torch.randn(tokens, 2, 64).bfloat16()
            kvquant_cpu.encode_rows(key, key, torch.arange(tokens) + 7, ranges, 8, THETA, layout)
    assert _graphs() == before


def test_rows_without_positions_compile_at_the_warm_up_only():
    layout, cache, table, kv_lens, ranges, query = paged_case(8, 8, False, [37, 5, 70], hkv=2, group=7, D=64, seed=4)
    table = table.long().clamp_max(cache.shape[0] - 1)
    kvquant_cpu.warm_up(14, cache.shape[2], ranges, 8, THETA, layout, 0.125)
    before = _graphs()
    with torch.inference_mode():
        _decode_every_batch(query, cache, table, ranges, 8, layout)
        key = torch.randn(3, 2, 64).bfloat16()
        kvquant_cpu.encode_rows(key, key, torch.arange(3), ranges, 8, THETA, layout)
    assert _graphs() == before
