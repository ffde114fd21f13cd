"""Accuracy-task construction and scoring (no engine)."""

import math

import pytest

from vllm_kvcompress.harness.scoring import cell_summary, score
from vllm_kvcompress.offline.corpus import essay_sentences, split_sentences, take_tokens


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_split_sentences():
    assert split_sentences("It works. Really? Yes! e.g. this stays. \"Quoted.\" Next") == [
        "It works.", "Really?", "Yes! e.g. this stays.", "\"Quoted.\"", "Next"]
    assert len(essay_sentences()) > 10_000


def test_take_tokens_stays_within_budget(tokenizer):
    taken = take_tokens(tokenizer, ["One two.", "Three four five."], 50)
    assert 40 <= sum(len(tokenizer(" " + s, add_special_tokens=False)["input_ids"]) for s in taken) <= 50
    assert taken[:3] == ["One two.", "Three four five.", "One two."]  # wraps around


@pytest.mark.parametrize("builder", ["passkey", "niah"])
def test_needle_samples_fit_and_place_the_needle(tokenizer, builder):
    from vllm_kvcompress.harness import tasks

    make = {"passkey": tasks.passkey_samples, "niah": tasks.niah_samples}[builder]
    samples = make(tokenizer, {1024: [10, 90], 2048: [50]})
    assert [(s.length, s.depth) for s in samples] == [(1024, 10), (1024, 90), (2048, 50)]
    for s in samples:
        total = len(s.prompt_ids) + s.max_tokens
        assert s.length - 120 <= total <= s.length, total
        text = tokenizer.decode(s.prompt_ids)
        answer = s.answers[0]
        assert text.count(answer) >= 1
        position = text.index(answer) / len(text)
        assert abs(position - s.depth / 100) < 0.12, (s.depth, position)
        # The prompt ends with the answer prefix, so the answer itself is not repeated there.
        assert not text.rstrip().endswith(answer)
    assert samples[0].answers != samples[1].answers  # a different key per sample


def test_perplexity_samples_split_real_text(tokenizer):
    from vllm_kvcompress.harness.tasks import perplexity_samples

    (sample,) = perplexity_samples(tokenizer, {300: 1}, continuation=20)
    assert len(sample.prompt_ids) == 300 and len(sample.forced_ids) == 20 and sample.metric == "perplexity"
    joined = tokenizer.decode(sample.prompt_ids + sample.forced_ids)
    assert tokenizer.decode(sample.forced_ids).strip() in joined


def test_ruler_generators_run_with_the_regex_splitter(tokenizer, smollm2_dir):
    from vllm_kvcompress.harness.ruler import ANSWER_MARKER, ruler_samples

    samples = ruler_samples(tokenizer, smollm2_dir, {"vt": 1, "niah_multikey_1": 1}, 1024)
    assert [s.task for s in samples] == ["ruler/vt", "ruler/niah_multikey_1"]
    for s in samples:
        text = tokenizer.decode(s.prompt_ids)
        assert ANSWER_MARKER not in text
        assert 500 < len(s.prompt_ids) + s.max_tokens <= 1024 + 64  # chat template adds a few tokens
        assert s.answers and all(a in text for a in s.answers)  # the needles are in the context
    assert tokenizer.decode(samples[0].prompt_ids).rstrip().endswith("they are:")


def test_scores_use_ruler_metrics():
    all_match = {"metric": "all", "answers": ["12", "34"]}
    assert score(all_match, {"text": "12 and 34"}) == 1.0
    assert score(all_match, {"text": "only 12"}) == 0.5
    part = {"metric": "part", "answers": ["Paris", "paris, France"]}
    assert score(part, {"text": "It is PARIS."}) == 1.0
    assert score(part, {"text": "Lyon"}) == 0.0
    ppl = {"metric": "perplexity", "answers": []}
    nll = score(ppl, {"forced_logprobs": [math.log(0.5), math.log(0.25)]})
    assert nll == pytest.approx(1.5 * math.log(2))
    summary = cell_summary([ppl, ppl], [nll, nll])
    assert summary["perplexity"] == pytest.approx(2 ** 1.5) and summary["n"] == 2
