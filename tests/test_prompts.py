import pytest


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.parametrize("target", [300, 2048, 2100, 2600, 4000])
def test_long_prompts_have_the_asked_length(tokenizer, target):
    from vllm_kvcompress.offline.prompts import long_document_ids

    ids = long_document_ids(tokenizer, target)
    assert target <= len(ids) <= target + 8
    assert tokenizer.decode(ids).rstrip().endswith("assistant")  # generation prompt of the chat template


def test_mixed_prompts_are_deterministic_and_mixed(tokenizer):
    from vllm_kvcompress.offline.prompts import mixed_prompts

    first, second = mixed_prompts(tokenizer), mixed_prompts(tokenizer)
    assert first == second
    lengths = [len(p) for p in first]
    assert len(lengths) == 8 and sum(n >= 2048 for n in lengths) == 2 and min(lengths) < 64
