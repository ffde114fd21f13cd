"""Triton LOOKAT / dense decode kernels vs their PyTorch references (small shapes; on CPU
under Triton's interpreter, see ``triton_env``)."""

import pytest
import torch

from triton_env import DEV, INTERP, import_kernels, interpreter  # noqa: F401  (autouse below)

dense_triton, lookat_ref, lookat_triton, paged_dense_ref, pq_ref = import_kernels(
    "dense_triton", "lookat_ref", "lookat_triton", "paged_dense_ref", "pq_ref")


@pytest.fixture(autouse=True)
def _interpreter(interpreter):
    yield


def _rel(out, ref):
    out, ref = out.float().cpu(), ref.float().cpu()
    assert torch.isfinite(out).all()
    return float((out - ref).norm() / ref.norm())


def _tables(lens, bs, num_blocks, g):
    """Block tables of shuffled (non-contiguous) physical blocks, one row per request."""
    need = [-(-n // bs) for n in lens]
    perm = torch.randperm(num_blocks, generator=g)
    width = max(need) + 1  # a spare column: the kernel must not read past kv_len
    table = torch.full((len(lens), width), 10**6, dtype=torch.int32)  # poison unused entries
    used = 0
    for r, n in enumerate(need):
        table[r, :n] = perm[used:used + n].int()
        used += n
    return table


def _lookat_case(bits, D, m, hkv, group, lens, bs=16, seed=0, K=256):
    g = torch.Generator().manual_seed(seed)
    layout = lookat_ref.LookatLayout(head_dim=D, m=m, value_bits=bits)
    num_blocks = sum(-(-n // bs) for n in lens) + 3
    codebooks = torch.randn(hkv, m, K, D // m, generator=g)
    rows = lookat_ref.encode_rows(torch.randn(num_blocks * bs, hkv, D, generator=g),
                                  torch.randn(num_blocks * bs, hkv, D, generator=g) * 2 + 0.5, codebooks, None, layout)
    cache = rows.view(num_blocks, bs, hkv, -1).transpose(1, 2).contiguous()  # every slot a valid row
    query = torch.randn(len(lens), hkv * group, D, generator=g) * 2
    return layout, codebooks, cache, _tables(lens, bs, num_blocks, g), torch.tensor(lens, dtype=torch.int32), query


@pytest.mark.parametrize("lut_dtype", [torch.float32, torch.float16])
def test_adc_tables(lut_dtype):
    g = torch.Generator().manual_seed(1)
    codebooks = torch.randn(2, 4, 256, 8, generator=g)
    query = torch.randn(3, 6, 32, generator=g)
    out = lookat_triton.adc_tables(query.to(DEV), codebooks.to(DEV), lut_dtype)
    ref = torch.stack([pq_ref.adc_tables(q, codebooks) for q in query])
    tol = 1e-5 if lut_dtype == torch.float32 else 1e-3
    assert out.shape == ref.shape and _rel(out, ref) < tol
    lut = lookat_triton.build_lut(query.to(DEV), codebooks.to(DEV), 2.0, lut_dtype)
    assert lut.shape == (3, 2, 4, 256, 4) and float(lut[..., 3].abs().max()) == 0.0  # group 3 -> 4 lanes, pad 0


# (bits, D, m, Hkv, group, lens, forced splits, lut dtype, score)
LOOKAT_CASES = [
    (16, 32, 4, 2, 3, [37, 5, 70], None, torch.float32, "adc"),
    (16, 32, 8, 2, 3, [37, 5, 70], 3, torch.float16, "adc"),
    (16, 32, 8, 2, 3, [37, 5, 70], 2, None, "rebuilt"),
    (8, 32, 4, 2, 3, [37, 5, 70], 2, torch.float32, "adc"),
    (8, 16, 4, 1, 8, [50, 17], None, torch.float16, "adc"),
    (8, 32, 8, 2, 3, [37, 5, 70], None, None, "rebuilt"),
    (4, 32, 4, 2, 3, [37, 5, 70], 4, torch.float32, "adc"),
    (4, 32, 8, 2, 1, [29, 64], None, torch.float16, "adc"),
    (4, 16, 2, 1, 16, [40], 2, torch.float32, "adc"),
    (4, 32, 4, 1, 8, [50, 17], 3, None, "rebuilt"),
    (16, 32, 4, 2, 3, [37, 5, 70], None, None, "rebuilt"),
    (8, 32, 8, 1, 8, [50, 17], 2, None, "rebuilt"),
    (4, 64, 8, 2, 7, [70, 130], None, None, "rebuilt"),
]


@pytest.mark.parametrize("bits,D,m,hkv,group,lens,splits,lut_dtype,score", LOOKAT_CASES)
def test_lookat_decode_matches_reference(bits, D, m, hkv, group, lens, splits, lut_dtype, score):
    layout, codebooks, cache, table, kv_lens, query = _lookat_case(bits, D, m, hkv, group, lens)
    scale = D ** -0.5
    ref = lookat_ref.decode_attention(query, cache, table.long().clamp_max(cache.shape[0] - 1), kv_lens, codebooks,
                                      None, layout, scale)
    out = lookat_triton.lookat_decode(query.to(DEV), cache.to(DEV), table.to(DEV), kv_lens.to(DEV),
                                      codebooks.to(DEV), layout, scale, num_splits=splits, block_n=16,
                                      lut_dtype=lut_dtype or torch.float32, min_part=16, score=score)
    assert out.shape == ref.shape
    # bf16 p @ v (16-bit values) or bf16 centroids ("rebuilt") vs the fp32 reference
    assert _rel(out, ref) < (1e-2 if bits == 16 or score == "rebuilt" else 3e-3), _rel(out, ref)


@pytest.mark.parametrize("score", ["adc", "rebuilt"])
def test_lookat_decode_permuted_dims_and_bf16_query(score):
    layout, codebooks, cache, table, kv_lens, query = _lookat_case(8, 32, 4, 2, 2, [33, 20], seed=3)
    dims = torch.randperm(32, generator=torch.Generator().manual_seed(4)).view(4, 8)
    query = query.bfloat16()
    ref = lookat_ref.decode_attention(query, cache, table.long().clamp_max(cache.shape[0] - 1), kv_lens, codebooks,
                                      dims, layout, 0.2)
    out = lookat_triton.lookat_decode(query.to(DEV), cache.to(DEV), table.to(DEV), kv_lens.to(DEV),
                                      codebooks.to(DEV), layout, 0.2, dims, block_n=32, max_kv_len=33, score=score)
    assert _rel(out, ref) < (3e-3 if score == "adc" else 1e-2)


@pytest.mark.parametrize("hkv,group,lens,splits", [(2, 3, [37, 5, 70], None), (2, 3, [37, 5, 70], 3),
                                                   (1, 1, [45], 2), (2, 8, [16, 3], None)])
def test_dense_decode_matches_reference(hkv, group, lens, splits):
    g = torch.Generator().manual_seed(5)
    D, bs = 32, 16
    num_blocks = sum(-(-n // bs) for n in lens) + 3
    cache = torch.randn(num_blocks, hkv, bs, 2 * D, generator=g).bfloat16()
    table = _tables(lens, bs, num_blocks, g)
    kv_lens = torch.tensor(lens, dtype=torch.int32)
    query = torch.randn(len(lens), hkv * group, D, generator=g).bfloat16()
    ref = paged_dense_ref.decode_attention(query, cache, table.long().clamp_max(num_blocks - 1), kv_lens, D ** -0.5)
    out = dense_triton.dense_decode(query.to(DEV), cache.to(DEV), table.to(DEV), kv_lens.to(DEV), D ** -0.5,
                                    num_splits=splits, block_n=16, min_part=16)
    assert out.shape == ref.shape and _rel(out, ref) < 1e-2


def test_kernels_bound_to_the_interpreter_without_a_gpu():
    assert lookat_triton.INTERPRET == INTERP


def test_plan_splits_fills_the_gpu_without_splits_shorter_than_min_part():
    for batch, hkv, n in [(1, 2, 32768), (64, 2, 32768), (4, 2, 100), (16, 8, 5000)]:
        splits = lookat_triton.plan_splits(batch, hkv, n, 64, 132)
        assert 1 <= splits <= max(1, n // 256)
        assert batch * hkv * splits >= min(264, batch * hkv * max(1, n // 256))
    # A graph's bound (max_model_len) does not shrink the split count for a batch.
    assert lookat_triton.plan_splits(32, 8, 34816, 128, 132, 8.0) == 8


@pytest.mark.parametrize("num_kv_heads", [4, 8])
@pytest.mark.parametrize("programs_per_sm,block_n", [(8.0, 128), (2.0, 64)])
def test_split_counts_of_eager_batches_are_ones_graph_capture_already_compiled(num_kv_heads, programs_per_sm,
                                                                                 block_n):
    """vLLM captures decode graphs for 51 batch sizes at max_model_len; a later eager (mixed)
    batch plans from its own decode count and host lengths. Split counts are powers of two,
    so every count an eager batch can ask for was met at capture: no Triton compile (the
    combine's block size SP, the SPLIT variant) while serving. The H200 run before this
    compiled _lookat_decode_kernel and _combine_kernel mid-benchmark (vLLM's JIT monitor)."""
    capture_sizes = [1, 2, 4, *range(8, 256, 8), *range(256, 513, 16)]
    for max_model_len in (8192, 34816, 131072):
        captured = {lookat_triton.plan_splits(b, num_kv_heads, max_model_len, block_n, 132, programs_per_sm)
                    for b in capture_sizes}
        eager = {lookat_triton.plan_splits(b, num_kv_heads, length, block_n, 132, programs_per_sm)
                 for b in range(1, 513) for length in (1, 200, 300, 700, 1500, 3000, 5000, 9000, 20000,
                                                       40000, 70000, 131072) if length <= max_model_len}
        assert all(s & (s - 1) == 0 for s in eager)
        assert eager <= captured, (max_model_len, sorted(eager - captured))


@pytest.mark.parametrize("splits", [1, 3])
def test_padding_rows_of_a_graph_batch_give_zeros_and_real_rows_are_unchanged(splits):
    """A captured decode batch is padded with requests of length 0 and is sized by a host
    bound (max_model_len), not by the lengths: padding rows come out 0 (not 0/0) and the
    real rows equal the reference."""
    g = torch.Generator().manual_seed(9)
    D, bs, hkv, group, lens = 32, 16, 2, 3, [37, 0, 70, 0]
    num_blocks = sum(-(-n // bs) for n in lens) + 3
    cache = torch.randn(num_blocks, hkv, bs, 2 * D, generator=g).bfloat16()
    table = _tables(lens, bs, num_blocks, g)
    table[[1, 3]] = 0  # padding rows point at block 0 (vLLM's null block)
    kv_lens = torch.tensor(lens, dtype=torch.int32)
    query = torch.randn(len(lens), hkv * group, D, generator=g).bfloat16()
    out = dense_triton.dense_decode(query.to(DEV), cache.to(DEV), table.to(DEV), kv_lens.to(DEV), D ** -0.5,
                                    num_splits=splits, block_n=16, min_part=16, max_kv_len=128).cpu()
    assert torch.isfinite(out).all() and not out[[1, 3]].any()
    real = [0, 2]
    ref = paged_dense_ref.decode_attention(query[real], cache, table[real].long().clamp_max(num_blocks - 1),
                                           kv_lens[real], D ** -0.5)
    assert _rel(out[real], ref) < 1e-2
