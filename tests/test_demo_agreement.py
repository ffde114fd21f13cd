"""The demo-agreement report's arithmetic and its config names (no engine)."""

from benchmarks.demo_agreement import agreement


def _out(tokens, tops, text="t"):
    return {"token_ids": tokens, "top_logprobs": tops, "text": text}


def test_agreement_counts_identical_near_tie_and_changed_prompts():
    reference = [_out([1, 2], [[[1, -0.1]], [[2, -0.2]]]),
                 _out([1, 2], [[[1, -0.1]], [[2, -1.0], [3, -1.1]]]),
                 _out([1, 2], [[[1, -0.1], [4, -5.0]], [[2, -0.2]]])]
    candidate = [_out([1, 2], [[[1, -0.1]], [[2, -0.2]]]),
                 _out([1, 3], [[[1, -0.1]], [[3, -1.0], [2, -1.1]]]),  # each prefers its own token by 0.1
                 _out([4, 2], [[[4, -0.1], [1, -6.0]], [[2, -0.2]]])]  # 4 was 4.9 nats down in the reference
    result = agreement(reference, candidate)
    assert (result["identical"], result["near_ties"], result["changed"]) == (1, 1, 1)
    assert result["tokens_before_difference"] == 2 + 1 + 0 and result["tokens"] == 6
    assert [p["first_difference"] for p in result["prompts"]] == [None, 1, 0]


def test_kvquant_config_names_resolve_to_the_shipped_ranges():
    from benchmarks.configs import resolve

    llm = resolve("kvquant-k4-v8", "smollm2-135m")
    settings = llm["additional_config"]["kvcompress"]
    assert (settings["method"], settings["key_bits"], settings["value_bits"]) == ("kvquant", 4, 8)
    assert settings["key_ranges"].endswith("artefacts/key_ranges/smollm2-135m.safetensors")
    assert resolve("kvquant-k2-v8", "smollm2-135m") is None
