"""Triton kvquant decode (pre-RoPE integer keys turned to their positions in the kernel) vs
its PyTorch reference, small shapes (on CPU under Triton's interpreter, see ``triton_env``),
and the ops seam that picks between them."""

import pytest
import torch

from kvquant_cases import THETA, paged_case
from triton_env import DEV, import_kernels, interpreter  # noqa: F401  (autouse below)

kvquant_ref, kvquant_triton = import_kernels("kvquant_ref", "kvquant_triton")


@pytest.fixture(autouse=True)
def _interpreter(interpreter):
    yield


def _rel(out, ref):
    out, ref = out.float().cpu(), ref.float().cpu()
    assert torch.isfinite(out).all()
    return float((out - ref).norm() / ref.norm())


# Without stored positions a row's position is its index in the request, as the reference reads it.
# The last case's positions reach the RoPE table's end (all four bytes of a stored position count).
@pytest.mark.parametrize("key_bits,value_bits,positions,splits,farthest", [
    (8, 8, True, None, 5000), (4, 4, True, 2, 5000), (8, 16, False, None, 0), (4, 8, False, 3, 0),
    (8, 4, True, 1, 1 << 17)])
def test_kvquant_decode_matches_reference(key_bits, value_bits, positions, splits, farthest):
    layout, cache, table, kv_lens, ranges, query = paged_case(key_bits, value_bits, positions, [37, 5, 70],
                                                         farthest=farthest)
    scale = 32 ** -0.5
    ref = kvquant_ref.decode_attention(query, cache, table.long().clamp_max(cache.shape[0] - 1), kv_lens, ranges,
                                       key_bits, THETA, layout, scale)
    out = kvquant_triton.kvquant_decode(query.to(DEV), cache.to(DEV), table.to(DEV), kv_lens.to(DEV),
                                        ranges.to(DEV), key_bits, THETA, layout, scale, num_splits=splits,
                                        block_n=16, min_part=16, max_position=farthest if positions else None)
    # bf16 keys on the tensor cores (the reference scores in fp32), as the dense kernel's bf16 cache.
    assert out.shape == ref.shape and _rel(out, ref) < 1e-2


def test_a_row_past_its_position_table_is_refused():
    layout, cache, table, kv_lens, ranges, query = paged_case(8, 8, True, [20])
    from vllm_kvcompress.kernels import rope_ref

    with pytest.raises(ValueError, match=r"131073 positions: tables hold at most 131072"):
        kvquant_triton.kvquant_decode(query.to(DEV), cache.to(DEV), table.to(DEV), kv_lens.to(DEV), ranges.to(DEV),
                                      8, THETA, layout, 0.2, max_position=rope_ref.MAX_TABLE + 1)


def test_the_ops_seam_runs_the_twin_where_it_fits_and_the_reference_elsewhere(monkeypatch):
    from vllm_kvcompress.kernels import ops

    layout, cache, table, kv_lens, ranges, query = paged_case(8, 8, True, [37, 5])
    calls = []
    monkeypatch.setattr(kvquant_triton, "kvquant_decode", lambda *a, **k: calls.append("triton") or "twin")
    monkeypatch.setattr(ops, "_twin", lambda name: kvquant_triton)
    with ops.use("triton"):
        assert ops.kvquant_decode(query, cache, table, kv_lens, ranges, 8, THETA, layout, 0.2) == "twin"
        fp32 = ops.kvquant_decode(query.float(), cache, table.long().clamp_max(cache.shape[0] - 1), kv_lens, ranges,
                                  8, THETA, layout, 0.2)  # fp32 activations: outside the twin's limits
    assert calls == ["triton"] and isinstance(fp32, torch.Tensor)
    with ops.use("reference"):
        assert isinstance(ops.kvquant_decode(query, cache, table.long().clamp_max(cache.shape[0] - 1), kv_lens,
                                             ranges, 8, THETA, layout, 0.2), torch.Tensor)
    assert calls == ["triton"]
