"""kvquant rows on a CUDA GPU (marker ``gpu``; skipped without one): the Triton decode against
the PyTorch reference at a served model's shape, and the cache write and decode inside a
captured CUDA graph (no read-back: positions are looked up in a whole RoPE table, clamped).
Run with ``python3 -m pytest -m gpu -rP tests/test_gpu_kvquant.py`` (docs/gpu.md)."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

THETA, BLOCK = 500000.0, 16


@pytest.mark.parametrize("key_bits,value_bits", [(8, 8), (4, 4)])
def test_triton_decode_matches_the_reference_at_llama_shape(key_bits, value_bits):
    from benchmarks.kernels_kvquant import case
    from vllm_kvcompress.kernels import kvquant_ref, kvquant_triton

    c = case(32, 8, 128, 4, 3000, key_bits, value_bits, torch.device("cuda"), seed=3)
    c["lens"] = torch.tensor([3000, 17, 1500, 2999], dtype=torch.int32, device="cuda")
    args = (c["query"], c["packed"], c["table"], c["lens"], c["ranges"], key_bits, THETA, c["layout"], 128 ** -0.5)
    ref = kvquant_ref.decode_attention(*args)
    for splits in (None, 1, 8):
        out = kvquant_triton.kvquant_decode(*args, max_position=c["max_position"], num_splits=splits)
        error = float((out.float() - ref.float()).norm() / ref.float().norm())
        print(f"kvquant {key_bits}/{value_bits} bits, Llama-3-8B shape, splits {splits}: relative error {error:.2e}")
        assert error < 1e-2


def test_write_and_decode_capture_in_a_cuda_graph_and_replay_for_new_rows():
    """What a FULL decode graph needs of the op: no host read-back while capturing, and a replay
    that reads the new step's rows, lengths and positions from the captured buffers."""
    from vllm_kvcompress.kernels import kvquant_ref, ops

    torch.manual_seed(0)
    heads, q_heads, dim, blocks = 2, 8, 64, 64
    layout = kvquant_ref.layout(dim, 8, 8, torch.bfloat16, positions=True)
    ranges = torch.stack([torch.full((heads, dim), -4.0), torch.full((heads, dim), 4.0)], 1).cuda()
    cache = torch.zeros(blocks, heads, BLOCK, layout.row_bytes, dtype=torch.uint8, device="cuda")
    table = torch.randperm(blocks, device="cuda").view(4, 16).int()
    lens = torch.tensor([100, 7, 250, 1], dtype=torch.int32, device="cuda")
    rows = 4 * 16 * BLOCK  # fill every row of the 4 requests, at scattered logical positions
    keys, values = torch.randn(rows, heads, dim, device="cuda"), torch.randn(rows, heads, dim, device="cuda")
    positions = torch.randint(0, 30000, (rows,), device="cuda")
    slots = (table.long().repeat_interleave(BLOCK, 1) * BLOCK + torch.arange(16 * BLOCK, device="cuda") % BLOCK)
    ops.lookat_write_rows(cache, ops.kvquant_encode_rows(keys, values, positions, ranges, 8, THETA, layout),
                          slots.flatten())
    query = torch.randn(4, q_heads, dim, device="cuda", dtype=torch.bfloat16)
    new_key = torch.randn(4, heads, dim, device="cuda")
    new_pos = torch.tensor([5000, 6, -1, 40000], device="cuda")  # -1: a graph's padding row
    new_slot = torch.tensor([3, 70, -1, 900], device="cuda")

    def step():
        encoded = ops.kvquant_encode_rows(new_key, new_key, new_pos, ranges, 8, THETA, layout)
        ops.lookat_write_rows(cache, encoded, new_slot)
        return ops.kvquant_decode(query, cache, table, lens, ranges, 8, THETA, layout, 0.125, max_kv_len=16 * BLOCK)

    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()  # compile and build the RoPE table before capturing
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for _ in range(3):
        new_key.normal_()
        query.normal_()
        lens.copy_(torch.randint(1, 16 * BLOCK, (4,), device="cuda", dtype=torch.int32))
        graph.replay()
        want = ops.kvquant_decode(query, cache, table, lens, ranges, 8, THETA, layout, 0.125, max_kv_len=16 * BLOCK)
        torch.testing.assert_close(out, want)
    with ops.use("reference"):
        ref = ops.kvquant_decode(query, cache, table.long(), lens, ranges, 8, THETA, layout, 0.125)
    assert float((out - ref).norm() / ref.norm()) < 1e-2
