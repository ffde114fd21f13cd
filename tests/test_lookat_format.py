"""LOOKAT's cache format: which centroids every path scores, and one copy per process."""

from types import SimpleNamespace

import torch
from safetensors.torch import save_file

from vllm_kvcompress.methods.artefacts import model_signature
from vllm_kvcompress.methods.lookat import codebooks as codebook_files
from vllm_kvcompress.methods.lookat.format import LookatFormat

CONFIG = SimpleNamespace(architectures=["LlamaForCausalLM"], num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=3, hidden_size=64, head_dim=16, rope_theta=10000.0)


def _file(tmp_path, m=4, k=8):
    generator = torch.Generator().manual_seed(0)
    tensors = {f"layer.{i}": torch.randn(2, m, k, 16 // m, generator=generator) * 3 for i in range(3)}
    metadata = {"format": codebook_files.FORMAT, "m": str(m), **model_signature(CONFIG)}
    path = tmp_path / "codebooks.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return str(path), tensors


def _format(path, heads=None):
    settings = SimpleNamespace(codebooks=path, value_bits=8, current_tokens="coded")
    return LookatFormat.from_settings(settings, CONFIG, 16, torch.bfloat16, heads)


def test_centroids_hold_the_bf16_values_the_triton_kernel_scores(tmp_path):
    path, tensors = _file(tmp_path)
    fmt = _format(path)
    fmt.to(torch.device("cpu"))
    for layer, (codebooks, kernel_copy) in enumerate(zip(fmt.codebooks, fmt.codebooks_bf16)):
        raw = tensors[f"layer.{layer}"]
        assert codebooks.dtype == torch.float32 and kernel_copy.dtype == torch.bfloat16
        assert torch.equal(codebooks, raw.bfloat16().float()) and not torch.equal(codebooks, raw)
        assert torch.equal(kernel_copy.float(), codebooks)


def test_every_layer_shares_one_copy_per_file_heads_and_device(tmp_path):
    path, tensors = _file(tmp_path)
    first, second = _format(path), _format(path)
    first.to(torch.device("cpu")), second.to(torch.device("cpu"))
    assert all(a is b for a, b in zip(first.codebooks, second.codebooks))
    assert all(a is b for a, b in zip(first.codebooks_bf16, second.codebooks_bf16))
    rank = _format(path, heads=[1])  # tensor parallelism: this rank's KV heads only
    rank.to(torch.device("cpu"))
    assert rank.codebooks[0].shape[0] == 1 and torch.equal(rank.codebooks[0][0], first.codebooks[0][1])
