import pytest

from vllm_kvcompress.config import KVCompressConfig, KVCompressConfigError, reference_table


def test_defaults_are_pass_through():
    config = KVCompressConfig.from_additional_config({})
    assert config.method == "none" and "max_kv_tokens" not in config.as_dict()
    assert KVCompressConfig.from_additional_config({"kvcompress": {"method": "none"}}) == config


def test_unknown_method_names_allowed_values():
    with pytest.raises(KVCompressConfigError, match=r"kvcompress\.method.*'bogus'.*allowed: none"):
        KVCompressConfig.from_dict({"method": "bogus"})


def test_dms_needs_adapters_takes_no_budget_and_checks_its_window():
    with pytest.raises(KVCompressConfigError, match=r"dms_adapters is required for method 'dms'"):
        KVCompressConfig.from_dict({"method": "dms"})
    with pytest.raises(KVCompressConfigError, match=r"method 'dms' takes no budget"):
        KVCompressConfig.from_dict({"method": "dms", "dms_adapters": "a.safetensors", "compression_ratio": 0.5})
    with pytest.raises(KVCompressConfigError, match=r"dms_window must be a positive multiple of .*page_tokens=16, got 100"):
        KVCompressConfig.from_dict({"method": "dms", "dms_adapters": "a.safetensors", "dms_window": 100})
    with pytest.raises(KVCompressConfigError, match=r"dms_adapters applies to method 'dms' only \(method is 'kvzap'\)"):
        KVCompressConfig.from_dict({"method": "kvzap", "kvzap_threshold": -4, "kvzap_predictor": "p",
                                    "dms_adapters": "a.safetensors"})
    with pytest.raises(KVCompressConfigError, match=r"recent_tokens does not apply to 'dms'.*dms_window"):
        KVCompressConfig.from_dict({"method": "dms", "dms_adapters": "a.safetensors", "recent_tokens": 8})
    config = KVCompressConfig.from_dict({"method": "dms", "dms_adapters": "a.safetensors", "dms_window": 256})
    assert config.settings.dms_window == 256 and config.settings.page_tokens == 16


def test_eviction_needs_a_budget_and_checks_its_options():
    with pytest.raises(KVCompressConfigError, match=r"'knorm' needs a budget: set .*compression_ratio"):
        KVCompressConfig.from_dict({"method": "knorm"})
    config = KVCompressConfig.from_dict({"method": "knorm", "compression_ratio": 0.5, "sink_tokens": 4})
    assert config.settings.sink_tokens == 4 and config.settings.buffer_blocks == 1
    with pytest.raises(KVCompressConfigError, match=r"buffer_blocks must be an integer >= 1, got 0"):
        KVCompressConfig.from_dict({"method": "knorm", "max_kv_tokens": 64, "buffer_blocks": 0})
    with pytest.raises(KVCompressConfigError, match=r"recent_tokens applies to eviction methods .* \(method is 'none'\)"):
        KVCompressConfig.from_dict({"recent_tokens": 8})


@pytest.mark.parametrize("value", [-5, 0, 2.5, True, "128"])
def test_bad_budget(value):
    with pytest.raises(KVCompressConfigError, match=r"max_kv_tokens must be an integer >= 1"):
        KVCompressConfig.from_dict({"max_kv_tokens": value})


@pytest.mark.parametrize("value", [-0.1, 1.0, 3, "half"])
def test_bad_ratio(value):
    with pytest.raises(KVCompressConfigError, match=r"compression_ratio must be a number with 0 <= r < 1"):
        KVCompressConfig.from_dict({"compression_ratio": value})


def test_unknown_key_lists_allowed_keys():
    with pytest.raises(KVCompressConfigError, match=r"unknown key\(s\) additional_config\.kvcompress\.budget; allowed keys: method, max_kv_tokens"):
        KVCompressConfig.from_dict({"budget": 3})


def test_budget_with_method_none_is_refused():
    with pytest.raises(KVCompressConfigError, match="keeps every token"):
        KVCompressConfig.from_dict({"method": "none", "max_kv_tokens": 512})


def test_non_object_and_wrong_type():
    with pytest.raises(KVCompressConfigError, match="must be a JSON object"):
        KVCompressConfig.from_dict(["none"])
    with pytest.raises(KVCompressConfigError, match="method must be a string"):
        KVCompressConfig.from_dict({"method": 3})


def test_reference_table_lists_every_key():
    table = reference_table()
    for key in ("method", "max_kv_tokens", "compression_ratio"):
        assert f"`{key}`" in table


def test_lookat_needs_codebooks():
    with pytest.raises(KVCompressConfigError, match=r"kvcompress\.codebooks is required for method 'lookat'.*calibrate"):
        KVCompressConfig.from_dict({"method": "lookat"})


@pytest.mark.parametrize("bits", [2, 3, 32, "8", True])
def test_lookat_value_bits(bits):
    with pytest.raises(KVCompressConfigError, match=r"value_bits must be one of 16, 8, 4"):
        KVCompressConfig.from_dict({"method": "lookat", "codebooks": "x.safetensors", "value_bits": bits})


def test_lookat_current_tokens():
    with pytest.raises(KVCompressConfigError, match=r"current_tokens must be one of coded, exact, got 'fast'"):
        KVCompressConfig.from_dict({"method": "lookat", "codebooks": "x", "current_tokens": "fast"})
    config = KVCompressConfig.from_dict({"method": "lookat", "codebooks": "x", "value_bits": 4, "current_tokens": "exact"})
    assert (config.settings.value_bits, config.settings.current_tokens) == (4, "exact")


def test_lookat_settings_refused_for_other_methods():
    with pytest.raises(KVCompressConfigError, match=r"value_bits applies to method\(s\) lookat, kvquant only"):
        KVCompressConfig.from_dict({"method": "none", "value_bits": 8})
