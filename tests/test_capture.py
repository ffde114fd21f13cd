"""Q/K/V capture from the real model, and the fidelity metrics over it."""

import pytest
import torch

from vllm_kvcompress.offline.capture import capture_qkv, compare, fp8_roundtrip


@pytest.fixture(scope="module")
def captured(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    word = tokenizer(" apple", add_special_tokens=False)["input_ids"][0]
    text = tokenizer("The quick brown fox jumps over the lazy dog. " * 8, add_special_tokens=False)["input_ids"]
    # Token `word` at positions 0 and 1: same layer-0 key input, different positions.
    return capture_qkv(smollm2_dir, [word, word] + text, layers=[0, 29], dtype=torch.float32)


def test_shapes_are_cache_shaped(captured):
    assert list(captured) == [0, 29]
    layer = captured[0]
    tokens = layer["k"].shape[1]
    assert layer["q"].shape == (9, tokens, 64) and layer["k"].shape == layer["v"].shape == (3, tokens, 64)
    assert layer["scale"] == pytest.approx(64 ** -0.5)


def test_keys_are_post_rope(captured):
    k, v = captured[0]["k"], captured[0]["v"]
    # Same token, positions 0 and 1: values (no RoPE) are equal, keys are rotated copies.
    torch.testing.assert_close(v[:, 0], v[:, 1])
    assert not torch.allclose(k[:, 0], k[:, 1], atol=1e-3)
    torch.testing.assert_close(k[:, 0].norm(dim=-1), k[:, 1].norm(dim=-1), rtol=1e-4, atol=1e-4)


def test_fidelity_identity_and_perturbation(captured):
    layer = captured[29]
    same = compare(layer, layer["k"], layer["v"], last=16, top_k=8)
    assert same["output_cosine"]["min"] == pytest.approx(1.0, abs=1e-9)
    assert same["attention_kl"]["max"] == pytest.approx(0.0, abs=1e-12)
    assert same["logit_spearman"]["min"] == pytest.approx(1.0) and same["top8_overlap"]["min"] == 1.0
    fp8 = compare(layer, fp8_roundtrip(layer["k"]), fp8_roundtrip(layer["v"]), last=16, top_k=8)
    assert 0.95 < fp8["output_cosine"]["mean"] < 1.0 and fp8["attention_kl"]["mean"] > 1e-6
    noise = compare(layer, torch.randn_like(layer["k"]), layer["v"], last=16, top_k=8)
    assert noise["logit_spearman"]["mean"] < 0.5 < fp8["logit_spearman"]["mean"]
