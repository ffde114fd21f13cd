"""Budgets and per-request overrides -> compression schedules (scheduler and worker
call the same function)."""

import pytest

from vllm_kvcompress.config import KVCompressConfig, KVCompressConfigError
from vllm_kvcompress.vllm.policy import EvictionPolicy


def _policy(**settings):
    return EvictionPolicy(KVCompressConfig.from_dict({"method": "knorm", **settings}), block_size=128)


def test_ratio_and_token_budgets():
    s = _policy(compression_ratio=0.75).schedule_for(1000, None)
    assert (s.compress_at, s.budget, s.buffer) == (1000, 250, 128)
    assert _policy(max_kv_tokens=300, buffer_blocks=2).schedule_for(1000, None).budget == 300
    assert _policy(max_kv_tokens=300, buffer_blocks=2).schedule_for(1000, None).buffer == 256
    assert _policy(compression_ratio=0.0).schedule_for(1000, None) is None  # keep everything


def test_protected_tokens_raise_a_tiny_budget():
    assert _policy(compression_ratio=0.99, sink_tokens=4, recent_tokens=16).schedule_for(100, None).budget == 20


def test_per_request_overrides():
    policy = _policy(compression_ratio=0.5)
    assert policy.schedule_for(1000, {"kvcompress": {"max_kv_tokens": 64}}).budget == 64
    assert policy.schedule_for(1000, {"kvcompress": {"compression_ratio": 0.9}}).budget == 100
    assert policy.schedule_for(1000, {"kvcompress": {"compression_ratio": 0}}) is None
    assert policy.schedule_for(1000, {"other_plugin": 1}).budget == 500
    with pytest.raises(KVCompressConfigError, match=r"keys from compression_ratio, max_kv_tokens"):
        policy.schedule_for(1000, {"kvcompress": {"ratio": 0.5}})
    with pytest.raises(KVCompressConfigError, match=r"compression_ratio must be a number with 0 <= r < 1"):
        policy.schedule_for(1000, {"kvcompress": {"compression_ratio": 1.5}})


def test_flat_request_keys_for_the_openai_api():
    """``vllm_xargs`` takes numbers and strings only: ``kvcompress_<key>`` works like the object form."""
    policy = _policy(compression_ratio=0.5)
    assert policy.schedule_for(1000, {"kvcompress_max_kv_tokens": 64}).budget == 64
    assert policy.schedule_for(1000, {"kvcompress_compression_ratio": 0.9}).budget == 100


@pytest.mark.parametrize("extra_args,message", [
    ({"kvcompress_compression_ratio": "abc"}, r"per-request setting kvcompress\.compression_ratio must be a number "
                                              r"with 0 <= r < 1 \(or null\), got 'abc'"),
    ({"kvcompress_compression_ratio": 1.5}, r"compression_ratio must be a number with 0 <= r < 1"),
    ({"kvcompress_max_kv_tokens": -3}, r"per-request setting kvcompress\.max_kv_tokens must be an integer >= 1"),
    ({"kvcompress_max_kv_tokens": 2.5}, r"max_kv_tokens must be an integer >= 1"),
    ({"kvcompress_max_kv_tokens": [1, 2]}, r"max_kv_tokens must be an integer >= 1"),
    ({"kvcompress_budget": 64}, r"unknown setting\(s\) budget; keys from compression_ratio, max_kv_tokens"),
    ({"kvcompress": "0.5"}, r"must be an object with keys from compression_ratio"),
    ({"kvcompress_max_kv_tokens": 64, "kvcompress_compression_ratio": 0.5}, r"set at most one of"),
])
def test_bad_per_request_settings_name_the_setting(extra_args, message):
    with pytest.raises(KVCompressConfigError, match=message):
        _policy(compression_ratio=0.5).schedule_for(1000, extra_args)


def test_min_kv_tokens_keeps_short_prompts_whole_and_lets_the_ratio_bind_past_it():
    policy = _policy(compression_ratio=0.8, min_kv_tokens=512)
    assert policy.budget(100, {}) == 512 and policy.budget(1000, {}) == 512  # nothing of these is evicted
    assert policy.budget(4096, {}) == 819  # the ratio: floor(4096 * 0.2)
    assert policy.budget(4096, {"compression_ratio": 0.9}) == 512  # a request's own ratio, floored too
    with pytest.raises(KVCompressConfigError, match="min_kv_tokens must be an integer >= 0"):
        _policy(compression_ratio=0.8, min_kv_tokens=-1)


def test_a_prompt_within_min_kv_tokens_is_left_whole_and_contradictions_are_refused():
    assert _policy(compression_ratio=0.8, min_kv_tokens=512).schedule_for(512, None) is None
    assert _policy(compression_ratio=0.8, min_kv_tokens=512).schedule_for(513, None).budget == 512
    with pytest.raises(KVCompressConfigError, match="min_kv_tokens=512 is above .*max_kv_tokens=64"):
        _policy(max_kv_tokens=64, min_kv_tokens=512)
