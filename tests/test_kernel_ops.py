"""kernels.ops, the engine's one door to the attention ops: on CPU every op is exactly its
PyTorch reference; the choice of implementation per call; and, forced to Triton (on CPU
under Triton's interpreter, see ``triton_env``), the Triton twins through ops match the
reference on tiny shapes."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from triton_env import DEV, import_kernels, interpreter  # noqa: F401  (fixture)
from vllm_kvcompress.kernels import compaction_ref, lookat_ref, ops, paged_dense_ref, stream_attention_ref

# Bind the Triton twins (and triton_common) to the interpreter on CPU before ops imports them lazily.
import_kernels("dense_triton", "lookat_triton", "lookat_write_triton", "compaction_triton", "stream_attention_triton")

D, BS = 32, 16


def _table(lens, num_blocks, g):
    """Shuffled physical blocks, one row per request; spare columns point at valid blocks."""
    need = [-(-n // BS) for n in lens]
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.zeros(len(lens), max(need) + 1, dtype=torch.long)
    used = 0
    for r, n in enumerate(need):
        table[r, :n] = perm[used:used + n]
        used += n
    return table


def _dense_case(lens=(37, 5, 20), hkv=2, group=3, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // BS) for n in lens) + 2
    cache = torch.randn(num_blocks, hkv, BS, 2 * D, generator=g).to(dtype)
    query = torch.randn(len(lens), hkv * group, D, generator=g).to(dtype)
    return g, cache, _table(lens, num_blocks, g), torch.tensor(lens), query


def _lookat_case(bits=8, lens=(37, 5, 20), hkv=2, group=3, m=4, seed=0, permuted=False):
    g = torch.Generator().manual_seed(seed)
    layout = ops.LookatLayout(head_dim=D, m=m, value_bits=bits)
    num_blocks = sum(-(-n // BS) for n in lens) + 2
    codebooks = torch.randn(hkv, m, 256, D // m, generator=g)
    dims = torch.randperm(D, generator=g).view(m, -1) if permuted else None
    rows = lookat_ref.encode_rows(torch.randn(num_blocks * BS, hkv, D, generator=g),
                                  torch.randn(num_blocks * BS, hkv, D, generator=g), codebooks, dims, layout)
    cache = rows.view(num_blocks, BS, hkv, -1).transpose(1, 2).contiguous()  # every slot a valid row
    query = torch.randn(len(lens), hkv * group, D, generator=g)
    return g, layout, codebooks, dims, cache, _table(lens, num_blocks, g), torch.tensor(lens), query


def _stream_case(head_dim=D, group=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    page, num_pages, heads = 16, 30, 2
    pool = torch.randn(num_pages * page, 2 * head_dim, generator=g).to(torch.bfloat16)
    lengths = torch.tensor([[37, 5], [20, 16]])  # different lengths per head
    pages = torch.stack([torch.randperm(num_pages, generator=g)[:3] for _ in range(4)]).view(2, heads, 3)
    query = torch.randn(2, heads * group, head_dim, generator=g).to(torch.bfloat16)
    return g, pool, pages, lengths, page, query


def _same(a, b):
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


# ----------------------------------------------------------------- (a) CPU: exactly the reference


def test_dense_ops_are_the_reference_on_cpu():
    g, cache, table, lens, query = _dense_case()
    assert ops.current_kind() == "auto"
    visible = torch.rand(3, 2, 40, generator=g) > 0.3
    visible[..., 0] = True
    for vis in (None, visible):
        assert _same(ops.dense_decode(query, cache, table, lens, 0.2, vis),
                     paged_dense_ref.decode_attention(query, cache, table, lens, 0.2, vis))
    q = torch.randn(7, 6, D, generator=g).bfloat16()
    for vis in (None, visible[0, :, :37]):
        assert _same(ops.dense_prefill(q, cache, table[0], 37, 0.2, vis),
                     paged_dense_ref.prefill_attention(q, cache, table[0], 37, 0.2, vis))
    assert _same(ops.dense_gather(cache, table[0], 37), paged_dense_ref.gather_kv(cache, table[0], 37))
    key, value = torch.randn(2, 5, 2, D, generator=g).unbind(0)
    slots = torch.tensor([3, -1, 40, 17, 0])
    out, ref = cache.clone(), cache.clone()
    ops.dense_write(out, key, value, slots)
    paged_dense_ref.write_kv(ref, key, value, slots)
    assert torch.equal(out, ref) and not torch.equal(out, cache)


@pytest.mark.parametrize("bits,permuted", [(16, False), (4, True)])
def test_lookat_ops_are_the_reference_on_cpu(bits, permuted):
    g, layout, codebooks, dims, cache, table, lens, query = _lookat_case(bits, permuted=permuted)
    current = tuple(torch.randn(2, 3, 2, D, generator=g).unbind(0))
    for cur in (None, current):
        assert _same(ops.lookat_decode(query, cache, table, lens, codebooks, dims, layout, 0.2, cur),
                     lookat_ref.decode_attention(query, cache, table, lens, codebooks, dims, layout, 0.2, cur))
    q = torch.randn(7, 6, D, generator=g)
    current = tuple(torch.randn(2, 7, 2, D, generator=g).unbind(0))
    for cur in (None, current):
        assert _same(ops.lookat_prefill(q, cache, table[0], 37, codebooks, dims, layout, 0.2, cur),
                     lookat_ref.prefill_attention(q, cache, table[0], 37, codebooks, dims, layout, 0.2, cur))
    codes, _ = lookat_ref.split_rows(lookat_ref.gather_rows(cache, table[0][None], 37)[0], layout)
    keys = ops.lookat_keys(cache, table[0], 37, codebooks, dims, layout)
    assert keys.shape == (2, 37, D) and _same(keys, lookat_ref.rebuilt_keys(codes, codebooks, dims))
    key, value = torch.randn(2, 5, 2, D, generator=g).unbind(0)
    rows = ops.lookat_encode_rows(key, value, codebooks, dims, layout)
    assert _same(rows, lookat_ref.encode_rows(key, value, codebooks, dims, layout))
    slots = torch.tensor([3, -1, 40, 17, 0])
    out, ref = cache.clone(), cache.clone()
    ops.lookat_write_rows(out, rows, slots)
    lookat_ref.write_rows(ref, rows, slots)
    assert torch.equal(out, ref) and not torch.equal(out, cache)
    out = cache.clone()
    ops.lookat_write(out, key, value, slots, codebooks, dims, layout)
    assert torch.equal(out, ref)


def test_masked_prefills_go_in_query_tiles_that_bound_the_mask(monkeypatch):
    """A DMS prefill of an 8K-token chunk over 16K rows asked torch for a 16 GiB float mask on
    the H200 (h200-eviction-12): masked prefills now attend in tiles of query rows whose
    per-head mask stays under MASK_TILE_BYTES, with the one-pass result."""
    g, pool, pages, lengths, page, _ = _stream_case()
    g2, cache, table, _, _ = _dense_case()
    q_stream = torch.randn(9, 6, D, generator=g)
    visible = torch.rand(2, 9, 37, generator=g) > 0.3
    visible[..., 0] = True
    q_dense = torch.randn(9, 6, D, generator=g2)
    seen = visible[:, 0]
    calls = [
        lambda: stream_attention_ref.prefill_attention(q_stream, pool.float(), pages[0], lengths[0], page, 0.2, visible),
        lambda: stream_attention_ref.prefill_attention(q_stream, pool.float(), pages[0], lengths[0], page, 0.2),
        lambda: paged_dense_ref.prefill_attention(q_dense, cache.float(), table[0], 37, 0.2, seen),
    ]
    whole = [call() for call in calls]
    masks, attend = [], paged_dense_ref.attend
    monkeypatch.setattr(paged_dense_ref, "attend", lambda q, k, v, mask, *a, **kw: (masks.append(mask.shape), attend(q, k, v, mask, *a, **kw))[1])
    monkeypatch.setattr(paged_dense_ref, "MASK_TILE_BYTES", 6 * 37 * 4 * 2)  # two query rows per tile
    for call, expected in zip(calls, whole):
        masks.clear()
        tiled = call()
        assert len(masks) == 5 and all(shape[-2] <= 2 for shape in masks), masks
        torch.testing.assert_close(tiled, expected, rtol=1e-5, atol=1e-6)


def test_compact_is_the_reference_on_cpu():
    g, cache, table, _, _ = _dense_case()
    keep = torch.stack([torch.sort(torch.randperm(37, generator=g)[:12]).values for _ in range(2)])
    out, ref = cache.clone(), cache.clone()
    ops.compact(out, table[0], keep)
    compaction_ref.compact(ref, table[0], keep)
    assert torch.equal(out, ref) and not torch.equal(out, cache)


def test_stream_ops_are_the_reference_on_cpu():
    g, pool, pages, lengths, page, query = _stream_case()
    assert _same(ops.stream_decode(query, pool, pages, lengths, page, 0.2),
                 stream_attention_ref.decode_attention(query, pool, pages, lengths, page, 0.2))
    q = torch.randn(5, 6, D, generator=g).bfloat16()
    visible = torch.rand(2, 5, 37, generator=g) > 0.3
    visible[..., 0] = True
    for vis in (None, visible):
        assert _same(ops.stream_prefill(q, pool, pages[0], lengths[0], page, 0.2, vis),
                     stream_attention_ref.prefill_attention(q, pool, pages[0], lengths[0], page, 0.2, vis))
    assert _same(ops.page_rows(pages, page), stream_attention_ref.page_rows(pages, page))
    rows = ops.page_rows(pages[0], page)[:, 30:33].T  # [T=3, H=2]
    key, value = torch.randn(2, 3, 2, D, generator=g).unbind(0)
    out, ref = pool.clone(), pool.clone()
    ops.stream_write_rows(out, rows, key, value)
    stream_attention_ref.write_rows(ref, rows, key, value)
    assert torch.equal(out, ref) and not torch.equal(out, pool)
    source, dest = torch.tensor([5, 6, 7, 8]), torch.tensor([4, 5, 6, 7])  # overlapping
    ops.stream_move_rows(out, source, dest)
    stream_attention_ref.move_rows(ref, source, dest)
    assert torch.equal(out, ref)


# ----------------------------------------------------------------- (b) which implementation


CUDA = SimpleNamespace(is_cuda=True)  # stands in for a CUDA tensor
CPU = SimpleNamespace(is_cuda=False)


@pytest.fixture
def triton_installed(monkeypatch):
    monkeypatch.setattr(ops, "_triton_importable", lambda: True)


def test_auto_picks_the_reference_for_cpu_tensors():
    _, cache, table, lens, query = _dense_case()
    for op in ops.OPS:
        assert ops.implementation(op, query, cache, table, lens) == "reference"


def test_auto_picks_triton_for_cuda_tensors_where_a_twin_fits(triton_installed):
    assert ops.TRITON_OPS.keys() == {"dense_decode", "lookat_decode", "lookat_write", "compact", "compact_batch",
                                     "compact_layers", "dense_key_norms", "stream_decode", "kvquant_decode", "linear_scores",
                                     "stream_prefill"}
    for op in ops.TRITON_OPS:
        assert ops.implementation(op, CUDA, CUDA, None) == "triton"
        assert ops.implementation(op, CUDA, CPU) == "reference"  # not all on CUDA
        assert ops.implementation(op, CUDA, fits=False) == "reference"  # outside the kernel's limits
        with ops.use("reference"):
            assert ops.implementation(op, CUDA) == "reference"
    for op in ops.OPS - ops.TRITON_OPS.keys():  # no twin
        assert ops.implementation(op, CUDA) == "reference"
    # arguments the twin cannot honour
    assert ops.implementation("dense_decode", CUDA, visible=None) == "triton"
    assert ops.implementation("dense_decode", CUDA, visible=CUDA) == "reference"
    assert ops.implementation("lookat_decode", CUDA, current=(CUDA, CUDA)) == "reference"
    assert ops.implementation("stream_prefill", CUDA, visible=CUDA) == "reference"  # a mask tensor
    assert ops.implementation("stream_prefill", CUDA, decoder=len) == "reference"  # encoded rows


def test_auto_without_triton_is_the_reference(monkeypatch):
    monkeypatch.setattr(ops, "_triton_importable", lambda: False)
    assert ops.implementation("dense_decode", CUDA) == "reference"


def test_forcing(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with ops.use("triton"):
        assert ops.current_kind() == "triton"
        assert ops.implementation("compact", CPU) == "triton"
        assert ops.implementation("dense_decode", CPU, visible=CPU) == "reference"
        assert ops.implementation("dense_prefill", CPU) == "reference"
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            ops.implementation("compact", CPU)
    assert ops.current_kind() == "auto"
    with pytest.raises(ValueError, match="kind"):
        with ops.use("cuda"):
            pass
    with pytest.raises(ValueError, match="unknown op"):
        ops.implementation("dense_decoder", CPU)


def test_shape_limits_send_calls_to_the_reference(triton_installed):
    _, cache, _, _, query = _dense_case()
    assert ops._dense_rows_fit(query, cache)
    assert not ops._dense_rows_fit(query, cache.float())  # the kernel is for 16-bit rows
    assert not ops._dense_rows_fit(query, cache.transpose(1, 2))  # addressed as contiguous
    assert not ops._dense_rows_fit(query[..., :24], cache[..., :48].contiguous())  # head_dim not a power of two
    _, layout, codebooks, _, lcache, _, _, lquery = _lookat_case()
    assert ops._lookat_fits(lquery, lcache, codebooks, layout)
    assert not ops._lookat_fits(lquery, lcache[..., :-2].contiguous(), codebooks, layout)
    key = lquery[:, :2]
    assert ops._lookat_write_fits(key, key, lcache, codebooks, layout)
    assert not ops._lookat_write_fits(key, key, lcache, codebooks[:, :, :100], layout)  # K not a power of two
    assert not ops._lookat_write_fits(key[..., ::2], key[..., ::2], lcache, codebooks, layout)


def test_ops_imports_neither_triton_nor_vllm():
    code = ("import sys, vllm_kvcompress.kernels.ops\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('triton', 'vllm')\n"
            "       or m.startswith('vllm_kvcompress.') and not m.startswith('vllm_kvcompress.kernels')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------- (c) Triton twins through ops


def _rel(out, ref):
    out, ref = out.float().cpu(), ref.float().cpu()
    assert out.shape == ref.shape and torch.isfinite(out).all()
    return float((out - ref).norm() / ref.norm())


def _to(*xs):
    return [x.to(DEV) if isinstance(x, torch.Tensor) else x for x in xs]


@pytest.fixture
def twins(monkeypatch):
    """Names of the Triton modules ops ran."""
    used, load = [], ops._twin
    monkeypatch.setattr(ops, "_twin", lambda name: used.append(name) or load(name))
    return used


def test_dense_decode_through_triton(interpreter, twins):
    _, cache, table, lens, query = _dense_case()
    ref = paged_dense_ref.decode_attention(query, cache, table, lens, D ** -0.5)
    args = _to(query, cache, table, lens)
    with ops.use("triton"):
        assert ops.implementation("dense_decode", *args, fits=ops._dense_rows_fit(args[0], args[1])) == "triton"
        out = ops.dense_decode(*args, D ** -0.5)
    assert twins == ["dense_triton"] and out.dtype == ref.dtype and _rel(out, ref) < 1e-2


@pytest.mark.parametrize("bits,permuted", [(8, True), (4, False)])
def test_lookat_decode_through_triton(interpreter, twins, bits, permuted):
    _, layout, codebooks, dims, cache, table, lens, query = _lookat_case(bits, permuted=permuted)
    ref = lookat_ref.decode_attention(query, cache, table, lens, codebooks, dims, layout, 0.2)
    query, cache, table, lens, codebooks, dims = _to(query, cache, table, lens, codebooks, dims)
    with ops.use("triton"):
        assert ops.implementation("lookat_decode", query, cache,
                                  fits=ops._lookat_fits(query, cache, codebooks, layout)) == "triton"
        out = ops.lookat_decode(query, cache, table, lens, codebooks, dims, layout, 0.2)
    assert twins == ["lookat_triton"] and out.dtype == ref.dtype
    assert _rel(out, ref) < 1e-2  # bf16 centroids vs the fp32 reference


@pytest.mark.parametrize("bits,permuted", [(8, True), (4, False), (16, False)])
def test_lookat_write_through_triton(interpreter, twins, bits, permuted):
    g, layout, codebooks, dims, cache, _, _, _ = _lookat_case(bits, permuted=permuted)
    key, value = torch.randn(2, 5, 2, D, generator=g).unbind(0)
    # vLLM hands values in the model dtype, the 16-bit format's (Triton's interpreter casts
    # fp32 -> bf16 by truncation, the GPU to nearest even)
    value = value.to(torch.bfloat16) if bits == 16 else value
    slots = torch.tensor([3, -1, 40, 17, 0])
    ref = cache.clone()
    lookat_ref.encode_write(ref, key, value, slots, codebooks, dims, layout)
    out, key, value, slots, codebooks, dims = _to(cache.clone(), key, value, slots, codebooks, dims)
    with ops.use("triton"):
        ops.lookat_write(out, key, value, slots, codebooks, dims, layout)
    assert twins == ["lookat_write_triton"] and torch.equal(out.cpu(), ref) and not torch.equal(ref, cache)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.uint8])
def test_compact_through_triton(interpreter, twins, dtype):
    g, cache, table, _, _ = _dense_case(dtype=torch.float32)
    cache = (cache * 40).to(dtype)
    keep = torch.stack([torch.sort(torch.randperm(37, generator=g)[:12]).values for _ in range(2)])
    keep[1] = torch.cat([torch.arange(3), torch.arange(28, 37)])  # heads keep different rows
    expect = cache.clone()
    compaction_ref.compact(expect, table[0], keep)
    out = cache.to(DEV)
    with ops.use("triton"):
        ops.compact(out, table[0].to(DEV), keep.to(DEV))
        ops.compact(out, table[0].to(DEV), keep[:, :0].to(DEV))  # nothing kept: nothing moves
    assert twins == ["compaction_triton"] and torch.equal(out.cpu(), expect)


def test_compact_batch_through_triton(interpreter, twins):
    """The batched compaction of a step, as the evictor calls it: int64 indices with
    padding past each request's count, which must not move anything."""
    from vllm_kvcompress.eviction.selection import BatchTargets, keep_indices_batch

    g, cache, table, lens, _ = _dense_case()
    scores = torch.randn(len(lens), cache.shape[1], int(lens.max()), generator=g)
    targets = BatchTargets.of(lens.tolist(), [12] * len(lens), scores.device)
    keep, keep_lens = keep_indices_batch(scores, targets), targets.keep_lens
    expect = cache.clone()
    compaction_ref.compact_batch(expect, table, keep, keep_lens)
    out = cache.clone().to(DEV)
    with ops.use("triton"):
        ops.compact_batch(out, table.to(DEV), keep.to(DEV), keep_lens.to(DEV))
    assert twins == ["compaction_triton"] and torch.equal(out.cpu(), expect) and not torch.equal(expect, cache)


def _layer_caches(num_layers=3, **case):
    """Separately allocated layer caches (as vLLM allocates them), each with its own rows."""
    g, cache, table, lens, _ = _dense_case(**case)
    caches = [torch.randn(cache.shape, generator=g).to(cache.dtype) for _ in range(num_layers)]
    return g, caches, table, lens


@pytest.mark.parametrize("two_phase", [False, True])
def test_compact_layers_matches_the_reference(interpreter, two_phase):
    """Every layer in one launch, each layer keeping its own rows (its own scores), both
    launch plans; the padding past each request's count moves nothing."""
    from vllm_kvcompress.eviction.selection import BatchTargets, keep_indices_batch
    from vllm_kvcompress.kernels import compaction_triton

    g, caches, table, lens = _layer_caches()
    scores = torch.randn(len(caches), len(lens), caches[0].shape[1], int(lens.max()), generator=g)
    targets = BatchTargets.of(lens.tolist(), [12, 3, 12], scores.device)
    keep = keep_indices_batch(scores, targets)
    expect = [c.clone() for c in caches]
    compaction_ref.compact_layers(expect, table, keep, targets.keep_lens)
    out = [c.clone().to(DEV) for c in caches]
    compaction_triton.compact_layers(out, table.to(DEV), keep.to(DEV), targets.keep_lens.to(DEV), two_phase=two_phase)
    assert all(torch.equal(o.cpu(), e) for o, e in zip(out, expect))
    assert not any(torch.equal(e, c) for e, c in zip(expect, caches))


def test_compact_layers_through_ops_and_one_layer_is_compact_batch(interpreter, twins):
    from vllm_kvcompress.eviction.selection import BatchTargets, keep_indices_batch

    g, caches, table, lens = _layer_caches(num_layers=2)
    scores = torch.randn(2, len(lens), caches[0].shape[1], int(lens.max()), generator=g)
    targets = BatchTargets.of(lens.tolist(), [9] * len(lens), scores.device)
    keep = keep_indices_batch(scores, targets)
    expect = [c.clone() for c in caches]
    for cache, layer_keep in zip(expect, keep):
        compaction_ref.compact_batch(cache, table, layer_keep, targets.keep_lens)
    out = [c.clone().to(DEV) for c in caches]
    with ops.use("triton"):
        ops.compact_layers(out, table.to(DEV), keep.to(DEV), targets.keep_lens.to(DEV))
    assert twins == ["compaction_triton"] and all(torch.equal(o.cpu(), e) for o, e in zip(out, expect))
    with pytest.raises(ValueError, match="2 layers, 1 caches"):
        from vllm_kvcompress.kernels import compaction_triton
        compaction_triton.compact_layers(out[:1], table.to(DEV), keep.to(DEV), targets.keep_lens.to(DEV))


def test_one_launch_needs_layers_of_one_shape():
    _, caches, _, _ = _layer_caches(num_layers=2)
    assert compaction_ref.same_layers(caches)
    assert not compaction_ref.same_layers([caches[0], caches[1][:, :1].contiguous()])  # other shape
    assert not compaction_ref.same_layers([caches[0], caches[1].float()])  # other dtype
    assert not compaction_ref.same_layers([caches[0], caches[1].transpose(1, 2)])  # not contiguous


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_key_norms_match_the_reference(interpreter, twins, dtype):
    """knorm's scores of every layer in one launch: the keys' L2 norms (fp32) of each
    request's rows, read through its shuffled block list, past the first block too."""
    g, caches, table, lens = _layer_caches(dtype=dtype)
    longest = int(lens.max())
    expect = compaction_ref.key_norms(caches, table, longest)
    direct = torch.stack([torch.linalg.vector_norm(paged_dense_ref.gather_rows(c, table, longest)[..., :D].float(),
                                                   dim=-1) for c in caches])
    with ops.use("triton"):
        got = ops.dense_key_norms([c.to(DEV) for c in caches], table.to(DEV), longest)
    assert twins == ["compaction_triton"] and got.shape == (len(caches), len(lens), caches[0].shape[1], longest)
    assert torch.equal(expect, direct) and torch.allclose(got.cpu(), expect, rtol=1e-5, atol=1e-5)


def test_stream_decode_through_triton(interpreter, twins):
    _, pool, pages, lengths, page, query = _stream_case()
    ref = stream_attention_ref.decode_attention(query, pool, pages, lengths, page, 0.2)
    with ops.use("triton"):
        out = ops.stream_decode(*_to(query, pool, pages, lengths), page, 0.2)
    assert twins == ["stream_attention_triton"] and _rel(out, ref) < 5e-3


def test_triton_forced_but_not_honoured_runs_the_reference(interpreter, twins):
    g, cache, table, lens, query = _dense_case()
    visible = torch.rand(3, 2, 40, generator=g) > 0.3
    visible[..., 0] = True
    with ops.use("triton"):
        out = ops.dense_decode(query, cache, table, lens, 0.2, visible)
    assert not twins and _same(out, paged_dense_ref.decode_attention(query, cache, table, lens, 0.2, visible))


def test_a_dms_prompt_mask_is_made_a_query_tile_at_a_time(monkeypatch):
    """DMS's prompt mask (``stream_attention_ref.delayed_visible``) is a function of a query
    span: the kernel makes each tile's part (a whole 8K x 32K mask asked for 32 GiB on the
    H200), and the attention equals the one with the whole mask, built from the rule itself;
    so does the seam given the rule (``ops.DelayedRule``, the pool rows' scores)."""
    delayed_visible = stream_attention_ref.delayed_visible
    g, pool, pages, lengths, page, _ = _stream_case()
    q_len, window = 9, 4
    q = torch.randn(q_len, 6, D, generator=g)
    scores = torch.randn(2, int(lengths[0].max()), generator=g)
    q_pos = lengths[0][:, None] - q_len + torch.arange(q_len)  # [H, q]
    rows = torch.arange(scores.shape[-1])
    whole = ((q_pos[:, :, None] - rows) <= window) | (scores >= 0)[:, None, :]  # the rule, every query at once
    tiles = delayed_visible(scores, lengths[0], q_len, window)
    assert torch.equal(torch.cat([tiles(0, 4), tiles(4, 9)], dim=1), whole)
    expected = stream_attention_ref.prefill_attention(q, pool.float(), pages[0], lengths[0], page, 0.2, whole)
    made = []
    monkeypatch.setattr(paged_dense_ref, "MASK_TILE_BYTES", 6 * scores.shape[-1] * 4 * 2)  # two query rows per tile
    tiled = stream_attention_ref.prefill_attention(q, pool.float(), pages[0], lengths[0], page, 0.2,
                                                   lambda start, end: made.append(end - start) or tiles(start, end))
    assert made == [2, 2, 2, 2, 1]
    torch.testing.assert_close(tiled, expected, rtol=1e-5, atol=1e-6)
    row_scores = torch.zeros(pool.shape[0])
    row_scores[stream_attention_ref.page_rows(pages[0], page)[:, : scores.shape[-1]]] = scores
    by_rule = ops.stream_prefill(q, pool.float(), pages[0], lengths[0], page, 0.2, rule=ops.DelayedRule(row_scores, window, 0.0))
    torch.testing.assert_close(by_rule, expected, rtol=1e-5, atol=1e-6)
