"""Method kvquant: pre-RoPE static per-channel integer keys (kernels/kvquant_ref.py) and its
settings and start-up checks (methods/kvquant.py)."""

import pytest
import torch

from vllm_kvcompress.config import KVCompressConfig, KVCompressConfigError
from vllm_kvcompress.kernels import kvquant_ref, lookat_ref, paged_dense_ref
from vllm_kvcompress.kernels.rope_ref import rotate

THETA = 10000.0


def _keys(g, heads=2, tokens=300, dim=16, start=0):
    offsets = torch.linspace(-6, 6, dim)
    return rotate(torch.randn(heads, tokens, dim, generator=g) + offsets, torch.arange(start, start + tokens), THETA)


def _ranges(g, heads=2, dim=16):
    pre = rotate(_keys(g, heads, 4000, dim) * 1.05, -torch.arange(4000), THETA)
    return torch.stack([pre.amin(1), pre.amax(1)], 1)


@pytest.mark.parametrize("bits,tolerance", [(8, 0.003), (4, 0.05)])
def test_keys_round_trip_at_any_position(bits, tolerance):
    g = torch.Generator().manual_seed(0)
    ranges = _ranges(g)
    for start in (0, 50_000):  # far past anything calibrated: the error does not grow
        keys = _keys(g, start=start)  # [Hkv, T, D]
        positions = torch.arange(start, start + keys.shape[1])
        codes = kvquant_ref.quantize_keys(keys.transpose(0, 1), positions, ranges, bits, THETA)
        assert codes.dtype == torch.uint8 and codes.shape == (keys.shape[1], 2, 16 * bits // 8)
        back = kvquant_ref.dequantize_keys(codes.transpose(0, 1), positions, ranges, bits, THETA)
        error = ((back - keys).norm(dim=-1) / keys.norm(dim=-1)).mean()
        assert error < tolerance


def test_row_layout_bytes():
    assert kvquant_ref.layout(64, 8, 8, torch.bfloat16).row_bytes == 64 + 64 + 2
    assert kvquant_ref.layout(64, 4, 4, torch.bfloat16).row_bytes == 32 + 32 + 4
    assert kvquant_ref.layout(128, 4, 16, torch.bfloat16).row_bytes == 64 + 256
    with pytest.raises(ValueError, match=r"key_bits must be one of \(8, 4\), got 2"):
        kvquant_ref.layout(64, 2, 8, torch.bfloat16)


def _paged(g, lens, bits, value_bits=8, bs=16, heads=2, dim=16):
    rows = kvquant_ref.layout(dim, bits, value_bits, torch.bfloat16)
    ranges = _ranges(g, heads, dim)
    num_blocks = sum(-(-n // bs) for n in lens) + 2
    cache = torch.zeros(num_blocks, heads, bs, rows.row_bytes, dtype=torch.uint8)
    order = torch.randperm(num_blocks - 1, generator=g) + 1
    tables, used, dense = [], 0, []
    for n in lens:
        nb = -(-n // bs)
        blocks = order[used: used + nb]
        used += nb
        tables.append(torch.nn.functional.pad(blocks, (0, 8 - nb)))
        keys, values = _keys(g, heads, n, dim).transpose(0, 1), torch.randn(n, heads, dim, generator=g)
        slots = blocks.repeat_interleave(bs)[:n] * bs + torch.arange(n) % bs
        paged_dense_ref.write_rows(cache, kvquant_ref.encode_rows(keys, values, torch.arange(n), ranges, bits, THETA,
                                                                 rows), slots)
        dense.append((keys, values))
    return cache, torch.stack(tables), ranges, rows, dense


@pytest.mark.parametrize("bits", [8, 4])
def test_decode_and_prefill_attend_the_stored_keys(bits):
    """Decode (a batch) and prefill (one request, causal) equal plain attention over the keys
    and values read back from the rows; decode is the prefill's last query."""
    g = torch.Generator().manual_seed(1)
    lens = [37, 70]
    cache, table, ranges, rows, dense = _paged(g, lens, bits)
    kv_lens = torch.tensor(lens)
    query = torch.randn(2, 6, 16, generator=g)  # 3 query heads per KV head
    out = kvquant_ref.decode_attention(query, cache, table, kv_lens, ranges, bits, THETA, rows, 0.25)
    for b, n in enumerate(lens):
        keys, values = kvquant_ref.read_rows(cache, table[b], n, ranges, bits, THETA, rows)
        expected = torch.softmax(torch.einsum("hgd,hld->hgl", query[b].view(2, 3, 16), keys) * 0.25, -1) @ values
        assert torch.allclose(out[b], expected.reshape(6, 16), atol=1e-5)
        # and the stored keys are the written ones, up to the integer step
        assert ((keys - dense[b][0].transpose(0, 1)).norm() / keys.norm()) < (0.01 if bits == 8 else 0.08)
    prefill_query = torch.randn(5, 6, 16, generator=g)
    prefill_query[-1] = query[1]
    last = kvquant_ref.prefill_attention(prefill_query, cache, table[1], lens[1], ranges, bits, THETA, rows, 0.25)[-1]
    assert torch.allclose(last, out[1], atol=1e-4)


def test_settings_and_refusals(tmp_path):
    config = KVCompressConfig.from_dict({"method": "kvquant", "key_ranges": "r.safetensors"})
    assert (config.settings.key_bits, config.settings.value_bits) == (8, 8)
    with pytest.raises(KVCompressConfigError, match=r"kvcompress\.key_ranges is required for method 'kvquant'"):
        KVCompressConfig.from_dict({"method": "kvquant"})
    with pytest.raises(KVCompressConfigError, match=r"key_bits must be one of 8, 4, got 2"):
        KVCompressConfig.from_dict({"method": "kvquant", "key_ranges": "r", "key_bits": 2})
    with pytest.raises(KVCompressConfigError, match=r"budget|keeps every token"):
        KVCompressConfig.from_dict({"method": "kvquant", "key_ranges": "r", "compression_ratio": 0.5})
    method = config.build()
    assert "has not run on a GPU yet" in method.cuda_refusal()


def test_start_up_checks_the_range_file_and_the_rope(tmp_path):
    from types import SimpleNamespace

    from vllm_kvcompress.methods.kvquant import KVQuant, KVQuantSettings
    from vllm_kvcompress.offline.key_ranges import ensure_key_ranges

    shipped = str(ensure_key_ranges("smollm2-135m"))
    smol = SimpleNamespace(architectures=["LlamaForCausalLM"], num_hidden_layers=30, num_attention_heads=9,
                           num_key_value_heads=3, hidden_size=576, rope_theta=100000.0)
    KVQuant(KVQuantSettings(key_ranges=shipped)).check_model(None, smol, 16, 1)
    other = SimpleNamespace(**{**vars(smol), "num_hidden_layers": 24})
    with pytest.raises(KVCompressConfigError, match="made for another model.*num_layers: file has 30, model has 24"):
        KVQuant(KVQuantSettings(key_ranges=shipped)).check_model(None, other, 16, 1)
    scaled = SimpleNamespace(**{**vars(smol), "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(KVCompressConfigError, match="needs plain RoPE.*llama3"):
        KVQuant(KVQuantSettings(key_ranges=shipped)).check_model(None, scaled, 16, 1)
    with pytest.raises(KVCompressConfigError, match="does not exist"):
        KVQuant(KVQuantSettings(key_ranges=str(tmp_path / "no.safetensors"))).check_model(None, smol, 16, 1)


@pytest.mark.parametrize("bits", [8, 4])
def test_rows_that_carry_positions_survive_compaction(bits):
    """An evicting cache stores each row's logical position: after compaction moves the kept
    rows to the front (physical index != position), decode still turns every key to its own
    position, and equals attention over the kept tokens of the uncompacted cache."""
    from vllm_kvcompress.kernels import compaction_ref

    g = torch.Generator().manual_seed(2)
    heads, dim, bs, n = 2, 16, 16, 70
    rows = kvquant_ref.layout(dim, bits, 8, torch.bfloat16, positions=True)
    assert rows.row_bytes == kvquant_ref.layout(dim, bits, 8, torch.bfloat16).row_bytes + 4
    ranges = _ranges(g, heads, dim)
    keys, values = _keys(g, heads, n, dim).transpose(0, 1), torch.randn(n, heads, dim, generator=g)
    blocks = torch.tensor([3, 1, 4, 6, 2])
    cache = torch.zeros(8, heads, bs, rows.row_bytes, dtype=torch.uint8)
    slots = blocks.repeat_interleave(bs)[:n] * bs + torch.arange(n) % bs
    paged_dense_ref.write_rows(cache, kvquant_ref.encode_rows(keys, values, torch.arange(n), ranges, bits, THETA, rows),
                               slots)
    full_keys, full_values = kvquant_ref.read_rows(cache, blocks, n, ranges, bits, THETA, rows)
    keep = torch.stack([torch.sort(torch.randperm(n, generator=g)[:29]).values for _ in range(heads)])  # per head
    compaction_ref.compact(cache, blocks, keep)
    query = torch.randn(1, 6, dim, generator=g)
    out = kvquant_ref.decode_attention(query, cache, blocks[None], torch.tensor([29]), ranges, bits, THETA, rows, 0.25)
    kept_keys = full_keys.gather(1, keep[..., None].expand(-1, -1, dim))
    kept_values = full_values.gather(1, keep[..., None].expand(-1, -1, dim))
    expected = torch.softmax(torch.einsum("hgd,hld->hgl", query[0].view(heads, 3, dim), kept_keys) * 0.25, -1) @ kept_values
    assert torch.allclose(out[0], expected.reshape(6, dim), atol=1e-5)
    read_keys, _ = kvquant_ref.read_rows(cache, blocks, 29, ranges, bits, THETA, rows)
    assert torch.allclose(read_keys, kept_keys, atol=1e-5)  # what eviction scores: keys at their positions
    # rows without positions would have been turned by their new index instead
    plain = kvquant_ref.layout(dim, bits, 8, torch.bfloat16)
    assert plain.m == rows.m - 4


def test_compositions_take_both_settings_and_refuse_what_cannot_work():
    config = KVCompressConfig.from_dict({"method": "kvquant+snapkv", "key_ranges": "r", "key_bits": 4,
                                         "compression_ratio": 0.5, "window_tokens": 16})
    method = config.build()
    assert method.evicts and method.needs_positions and method.rows.stores_positions
    assert (config.settings.key_bits, config.settings.value_bits, config.settings.window_tokens) == (4, 8, 16)
    assert method.row_bytes(64, torch.bfloat16) == 32 + 4 + 64 + 2
    assert KVCompressConfig.from_dict({"method": "kvquant", "key_ranges": "r"}).build().row_bytes(64, torch.bfloat16) \
        == 32 * 2 + 64 + 2
    lookat = KVCompressConfig.from_dict({"method": "lookat+knorm", "codebooks": "c", "value_bits": 4,
                                         "max_kv_tokens": 256, "sink_tokens": 4}).build()
    assert lookat.protected() == (4, 0) and lookat.schedule(1000, 256, _Streams()).budget == 256
    # The stream methods take kvquant rows (their attention decodes them), on the CPU build only.
    for evict, extra in (("dms", {"dms_adapters": "a"}), ("kvzap", {"kvzap_predictor": "p", "compression_ratio": 0.5}),
                         ("headkv", {"head_scores": "uniform", "compression_ratio": 0.5})):
        streams = KVCompressConfig.from_dict({"method": f"kvquant+{evict}", "key_ranges": "r", **extra}).build()
        assert streams.evicts and streams.needs_positions and streams.rows.stores_positions
        assert streams.row_bytes(64, torch.bfloat16) == 64 + 4 + 64 + 2
        assert f"under '{evict}''s per-(layer, KV head) streams run on the CPU build only" in streams.cuda_refusal()
    refusals = {
        "lookat+dms": "builds no 'lookat' lookup tables; .* or use kvquant\\+dms",
        "lookat+headkv": "builds no 'lookat' lookup tables",
        "knorm+kvquant": "first part must be a row format",
        "lookat+kvquant": "second part must be an eviction method",
        "kvquant+knorm+snapkv": "must be FORMAT\\+EVICTION",
        "zip+knorm": "unknown method 'zip'",
    }
    for name, reason in refusals.items():
        with pytest.raises(KVCompressConfigError, match=reason):
            KVCompressConfig.from_dict({"method": name, "key_ranges": "r", "compression_ratio": 0.5})
    with pytest.raises(KVCompressConfigError, match="eviction_mode must be 'compact' with method 'kvquant\\+knorm'"):
        KVCompressConfig.from_dict({"method": "kvquant+knorm", "key_ranges": "r", "compression_ratio": 0.5,
                                    "eviction_mode": "mask"})
    with pytest.raises(KVCompressConfigError, match="codebooks applies to method 'lookat' only"):
        KVCompressConfig.from_dict({"method": "kvquant+knorm", "key_ranges": "r", "compression_ratio": 0.5,
                                    "codebooks": "c"})
    with pytest.raises(KVCompressConfigError, match="key_ranges is required"):
        KVCompressConfig.from_dict({"method": "kvquant+knorm", "compression_ratio": 0.5})


class _Streams:
    block_size = 16


@pytest.mark.parametrize("bits", [8, 4])
def test_stream_attention_over_kvquant_rows_is_the_whole_row_attention(bits):
    """kvquant under the per-(layer, KV head) stream methods: rows written through the format
    with their logical positions (out of order, as after eviction), gathered by page and decoded
    by the stream attention, give the whole-row kvquant attention over the same rows (decode
    and causal prefill). A decoder that ignored the stored positions (their index instead)
    would turn the keys by the wrong angles."""
    from vllm_kvcompress.kernels import ops
    from vllm_kvcompress.methods.kvquant import KVQuantFormat

    g = torch.Generator().manual_seed(3)
    heads, q_heads, dim, block, length = 2, 4, 16, 16, 37
    layout = kvquant_ref.layout(dim, bits, 8, torch.bfloat16, positions=True)
    fmt = KVQuantFormat([_ranges(g, heads, dim)], bits, THETA, layout)
    positions = torch.sort(torch.randperm(400, generator=g)[:length]).values  # logical, with gaps
    keys = rotate(torch.randn(heads, length, dim, generator=g), positions, THETA).transpose(0, 1)  # [T, H, D]
    values = torch.randn(length, heads, dim, generator=g)
    blocks = torch.tensor([3, 1, 4])
    cache = torch.zeros(6, heads, block, layout.row_bytes, dtype=torch.uint8)
    slots = blocks.repeat_interleave(block)[:length] * block + torch.arange(length) % block
    lookat_ref.write_rows(cache, fmt.encode(0, keys, values, positions), slots)
    pool = cache.view(-1, layout.row_bytes)  # one layer: global page (block * heads + head), one page per block
    pages = (blocks[None, :] * heads + torch.arange(heads)[:, None])[None]  # [1, H, 3]
    lengths = torch.full((1, heads), length)
    query = torch.randn(1, q_heads, dim, generator=g)
    whole = kvquant_ref.decode_attention(query, cache, blocks[None], torch.tensor([length]), fmt.ranges[0], bits,
                                         THETA, layout, 0.25)
    streams = ops.stream_decode(query, pool, pages, lengths, block, 0.25, length, fmt.stream_decoder(0))
    torch.testing.assert_close(streams, whole, atol=1e-5, rtol=1e-5)
    prompt = torch.randn(5, q_heads, dim, generator=g)
    whole = kvquant_ref.prefill_attention(prompt, cache, blocks, length, fmt.ranges[0], bits, THETA, layout, 0.25)
    streams = ops.stream_prefill(prompt, pool, pages[0], lengths[0], block, 0.25, decoder=fmt.stream_decoder(0))
    torch.testing.assert_close(streams, whole, atol=1e-5, rtol=1e-5)
    # The stored positions matter: a decoder that turned each key by its index in the stream instead
    # would attend otherwise (this test would catch it).
    key_bytes = dim * bits // 8

    def by_index(data):
        turned = kvquant_ref.dequantize_keys(data[..., :key_bytes], torch.arange(data.shape[-2]), fmt.ranges[0], bits,
                                             THETA)
        return torch.cat([turned, kvquant_ref.dequantize_values(data[..., layout.m:], layout)], -1)

    wrong = ops.stream_prefill(prompt, pool, pages[0], lengths[0], block, 0.25, decoder=by_index)
    assert (wrong - streams).abs().max() > 0.05
