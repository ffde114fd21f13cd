"""DMS retrofit on a tiny random Llama (transformers): the teacher pass is the plain
model, the adapters start at "keep everything", and the compression loss drives the
achieved compression up while the KL to the teacher stays measured."""

import pytest
import torch


@pytest.fixture()
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def test_teacher_pass_is_the_plain_model_and_adapters_start_at_keep(tiny_llama):
    from vllm_kvcompress.offline.dms_train import DMSRetrofit

    ids = torch.randint(0, 64, (1, 40))
    with torch.no_grad():
        plain = tiny_llama(ids).logits
    retrofit = DMSRetrofit(tiny_llama, window=4)
    with torch.no_grad():
        assert torch.allclose(tiny_llama(ids).logits, plain, atol=1e-6)  # adapters off
        total, kl, per_head, ratio = retrofit.losses(ids, step=0, steps_per_ratio=100, max_ratio=8)
    # z = -5: a token is marked only when the logistic noise exceeds 5 (p = 0.7%)
    assert per_head.shape == (2, 2) and float(per_head.mean()) < 0.03
    assert ratio == 1.0 and float(kl) < 1e-3


def test_compression_loss_raises_the_achieved_ratio(tiny_llama):
    from vllm_kvcompress.offline.dms_train import DMSRetrofit

    retrofit = DMSRetrofit(tiny_llama, window=4)
    optimizer = torch.optim.AdamW(retrofit.adapters.parameters(), lr=1e-2)
    ids = torch.randint(0, 64, (1, 48))
    achieved = []
    for step in range(40):
        total, kl, per_head, _ = retrofit.losses(ids, step, steps_per_ratio=5, max_ratio=4)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        achieved.append(float(per_head.mean()))
    assert achieved[0] < 0.05 and max(achieved[-5:]) > 0.3  # marked fraction follows the target
    assert float(kl) > 0  # evictions change the student's distribution
