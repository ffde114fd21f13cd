"""The fidelity sweep's model-free parts: key formats, cached metrics (= capture.compare),
summaries and report files."""

import json

import pytest
import torch

from benchmarks.fidelity_sweep import (Reference, int_channel_keys, int_keys, key_formats, pq_keys, query_positions, summarize,
                                       write_markdown, write_plot)
from vllm_kvcompress.offline.capture import compare
from vllm_kvcompress.kernels.lookat_ref import permute, rebuilt_keys
from vllm_kvcompress.kernels.pq_ref import encode
from vllm_kvcompress.offline.pq import subspace_dims


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_formats_and_bytes():
    formats = {f.name: f for f in key_formats(64)}
    assert [f for f in formats if f.startswith("pq-m")] == [
        f"pq-m{m}-{g}" for m in (2, 4, 8, 16, 32) for g in ("contiguous", "rope_pairs")]
    assert formats["pq-m16-rope_pairs"].bytes_per_token == 16
    assert formats["int8"].bytes_per_token == 68 and formats["int4"].bytes_per_token == 36
    assert formats["int2"].bytes_per_token == 20 and formats["fp8-e4m3"].bytes_per_token == 64
    assert formats["int4-ch32"].bytes_per_token == 40 and formats["int2-ch32"].bytes_per_token == 24
    assert "pq-m64-contiguous" in {f.name for f in key_formats(128)}
    assert "pq-m64-rope_pairs" not in {f.name for f in key_formats(64, ms=[64])}  # 1-dim subspaces
    bytes_ = [f.bytes_per_token for f in key_formats(128)]
    assert bytes_ == sorted(bytes_)


def test_int_keys_are_per_token_asymmetric():
    keys = torch.randn(2, 50, 64, generator=_gen(0)).bfloat16() * 3 + 1
    x = keys.float()
    step = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True))
    for bits in (8, 4, 2):
        rebuilt = int_keys(keys, bits)
        # Rounding error at most half a step of that token's own range (fp16 params).
        assert ((rebuilt - x).abs() <= 0.5 * step / (2 ** bits - 1) * 1.01 + 1e-3).all()
        assert max(len(row.unique()) for row in rebuilt.flatten(0, 1)) <= 2 ** bits
    constant = torch.full((1, 3, 8), 0.5)
    assert torch.equal(int_keys(constant, 4), constant)


def test_int_channel_keys_group_tokens_per_dim():
    gen = _gen(8)
    offsets = torch.tensor([150.0, -80.0] + [0.0] * 14)  # constant outlier dims
    keys = (offsets + 0.3 * torch.randn(2, 70, 16, generator=gen)).bfloat16()
    x = keys.float()
    rebuilt = int_channel_keys(keys, 4, group=32)
    assert rebuilt.shape == x.shape
    for start, stop in ((0, 32), (32, 64), (64, 70)):  # two full groups, one partial
        part = x[:, start:stop]
        step = (part.amax(1, keepdim=True) - part.amin(1, keepdim=True)) / 15
        assert ((rebuilt[:, start:stop] - part).abs() <= 0.5 * step * 1.01 + 1e-2).all()
    # Per-token ranges span the outliers: far coarser on the ordinary dims.
    assert (int_keys(keys, 4) - x)[..., 2:].abs().mean() > 10 * (rebuilt - x)[..., 2:].abs().mean()


@pytest.mark.parametrize("grouping", ["contiguous", "rope_pairs"])
def test_pq_keys_match_the_reference_decode(grouping):
    keys = torch.randn(2, 300, 32, generator=_gen(1)).bfloat16()
    codebooks = torch.randn(2, 8, 16, 4, generator=_gen(2))
    dims = subspace_dims(32, 8, grouping)
    codes = encode(permute(keys.transpose(0, 1).float(), dims), codebooks)  # [T, Hkv, m]
    expected = rebuilt_keys(codes.transpose(0, 1), codebooks, dims)
    torch.testing.assert_close(pq_keys(keys, codebooks, dims), expected, rtol=0, atol=0)


@pytest.mark.parametrize("coarse", [False, True])
def test_cached_reference_equals_capture_compare(coarse):
    heads, kv, tokens, d, last = 6, 2, 200, 16, 24
    q = torch.randn(heads, tokens, d, generator=_gen(3)).bfloat16()
    k = torch.randn(kv, tokens, d, generator=_gen(4)).bfloat16()
    v = torch.randn(kv, tokens, d, generator=_gen(5)).bfloat16()
    k_new = k.float() + 0.3 * torch.randn(kv, tokens, d, generator=_gen(6))
    if coarse:  # many tied logits (few distinct keys), as PQ with small m gives
        k_new = torch.round(k_new)
    layer = {"q": q, "k": k, "v": v, "scale": 0.25}
    expected = compare(layer, k_new, v, last=last, top_k=8)
    got = Reference(q[:, -last:], k, v, 0.25, top_k=8).compare(k_new)
    assert got.keys() == {"output_cosine", "attention_kl", "logit_spearman", "topk_overlap"}
    for metric, values in got.items():
        reference = expected["top8_overlap" if metric == "topk_overlap" else metric]
        for stat, value in values.items():
            assert value == pytest.approx(reference[stat], rel=1e-9, abs=1e-12), (metric, stat)


def test_query_positions_and_summary():
    positions, where = query_positions([8, 20], last=4)
    assert positions.tolist() == [4, 5, 6, 7, 16, 17, 18, 19]
    assert positions[where[20]].tolist() == [16, 17, 18, 19] and positions[where[8]].tolist() == [4, 5, 6, 7]
    rows = [{"output_cosine": {"mean": c}, "attention_kl": {"mean": kl}, "logit_spearman": {"mean": 0.9},
             "topk_overlap": {"mean": 0.5}} for c, kl in ((0.99, 0.01), (0.95, 0.03), (0.98, 0.02))]
    s = summarize(rows)
    assert s["mean"]["output_cosine"] == pytest.approx((0.99 + 0.95 + 0.98) / 3)
    assert s["worst_layer"]["output_cosine"] == 0.95 and s["worst_layer_index"]["output_cosine"] == 1
    assert s["worst_layer"]["attention_kl"] == 0.03


def test_report_files(tmp_path):
    formats = key_formats(64, ms=[8], int_bits=(4,))
    metrics = {"output_cosine": 0.97, "attention_kl": 0.01, "logit_spearman": 0.9, "topk_overlap": 0.8}
    result = {
        "model": "toy", "head_dim": 64, "num_layers": 2, "num_kv_heads": 2, "lengths": [512, 2048], "last_queries": 64,
        "top_k": 32, "evaluation_text": "essays", "calibration": {"tokens": 4096, "text": "docstrings"},
        "formats": [{"name": f.name, "kind": f.kind, "grouping": f.grouping, "bytes_per_token": f.bytes_per_token}
                    for f in formats],
        "results": {f.name: {n: {"mean": metrics, "worst_layer": metrics} for n in ("512", "2048")} for f in formats},
        "command": "python -m benchmarks.fidelity_sweep ...", "timing": {"total_s": 1},
    }
    json.dumps(result)
    write_markdown(result, tmp_path / "results.md")
    text = (tmp_path / "results.md").read_text()
    assert "| pq-m8-rope_pairs | 8 | 16.0x | 0.9700 (0.9700) | 0.9700 (0.9700) |" in text
    assert "| int4 | 36 | 3.6x |" in text
    write_plot(result, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_prerope_static_keys_are_position_free_and_exact_on_the_calibration_grid():
    """Pre-RoPE static per-channel integers: the error does not grow with position (RoPE is
    undone before and redone after), 8 bits beat 4, and the range comes from calibration."""
    from benchmarks.fidelity_sweep import prerope_static_keys
    from vllm_kvcompress.offline.rope import rotate

    g = torch.Generator().manual_seed(0)
    offsets = torch.linspace(-20, 20, 16)  # channel offsets, as k_proj biases
    post = rotate(torch.randn(2, 4096, 16, generator=g) + offsets, torch.arange(4096), 10000.0)
    calibration = rotate(torch.randn(2, 16384, 16, generator=g) * 1.1 + offsets, torch.arange(16384), 10000.0)
    errors = {}
    for bits in (4, 8):
        rebuilt = prerope_static_keys(post, calibration, bits, 10000.0)
        error = (rebuilt - post).norm(dim=-1) / post.norm(dim=-1)
        errors[bits] = error
        # tokens far past the calibration window are no worse than those inside it
        assert error[:, 3000:].mean() < 1.5 * error[:, :512].mean()
    assert errors[8].mean() < errors[4].mean() / 8
    assert errors[4].mean() < 0.03  # static ranges on the post-RoPE keys: 0.065 here
