"""Presets: what each stands for, on which models, and what is refused (vllm_kvcompress/presets.py)."""

from types import SimpleNamespace

import pytest
import torch

from vllm_kvcompress import presets
from vllm_kvcompress.config import KVCompressConfig, KVCompressConfigError

SMOLLM2 = SimpleNamespace(architectures=["LlamaForCausalLM"], num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, hidden_size=576, rope_theta=100000.0,
                          name_or_path="/root/.cache/vllm_kvcompress/models/smollm2-135m")
QWEN_05B = SimpleNamespace(architectures=["Qwen2ForCausalLM"], num_hidden_layers=24, num_attention_heads=14,
                           num_key_value_heads=2, hidden_size=896, rope_theta=1000000.0,
                           name_or_path="/data/qwen2.5-coder-0.5b")


@pytest.mark.parametrize("name,at_least", [("safe", 4), ("balanced", 8), ("max", 16)])
def test_each_preset_expands_to_a_composition_of_its_stated_capacity(name, at_least):
    for model, file in ((SMOLLM2, "smollm2-135m"), (QWEN_05B, "qwen2.5-coder-0.5b")):
        settings = presets.expand({"preset": name}, model)
        assert settings["key_ranges"].endswith(f"key_ranges/{file}.safetensors")
        config = KVCompressConfig.from_dict(settings)
        method = config.build()
        method.check_model(None, model, 16, 1)  # the shipped file is this model's
        # SnapKV's window reaches past a chat template's tail ("<|im_end|>", "assistant",
        # "Answer:": 7-8 tokens) into the question it scores the prompt with.
        assert settings["window_tokens"] >= 32
        rows = method.row_bytes(64, torch.bfloat16)
        capacity = 4 * 64 / rows / (1 - settings["compression_ratio"])
        assert capacity >= at_least, (name, rows, capacity)


def test_presets_are_refused_where_they_cannot_hold():
    with pytest.raises(KVCompressConfigError, match="preset must be one of safe, balanced, max, got 'fast'"):
        presets.expand({"preset": "fast"}, SMOLLM2)
    with pytest.raises(KVCompressConfigError, match="cannot be combined with .*compression_ratio"):
        presets.expand({"preset": "safe", "compression_ratio": 0.2}, SMOLLM2)
    other = SimpleNamespace(**{**vars(SMOLLM2), "num_hidden_layers": 12})
    with pytest.raises(KVCompressConfigError, match="none is shipped for it.*offline.key_ranges"):
        presets.expand({"preset": "balanced"}, other)
    sibling = SimpleNamespace(**{**vars(QWEN_05B), "name_or_path": "Qwen/Qwen2.5-0.5B-Instruct"})  # same shape
    with pytest.raises(KVCompressConfigError, match="none is shipped for it"):
        presets.expand({"preset": "safe"}, sibling)
    assert presets.expand({"preset": "balanced", "key_ranges": "mine.safetensors"}, other)["key_ranges"] == \
        "mine.safetensors"
    with pytest.raises(KVCompressConfigError, match="expanded at start-up"):
        KVCompressConfig.from_dict({"preset": "safe"})
    assert presets.expand({"method": "none"}, SMOLLM2) == {"method": "none"}
