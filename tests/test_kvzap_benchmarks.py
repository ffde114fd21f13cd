"""KVzap benchmark plumbing without an engine: config names, the workers' per-request
kept fractions as the sweep reads them, and the matched-compression table."""

import pytest

from benchmarks.configs import resolve
from benchmarks.measured_sweep import markdown, removed_fraction, rows


def test_kvzap_config_names_resolve_to_shipped_predictors():
    threshold = resolve("kvzap-mlp-t-4.5", "smollm2-135m")
    settings = threshold["additional_config"]["kvcompress"]
    assert settings["kvzap_threshold"] == -4.5 and settings["kvzap_predictor"].endswith(
        "smollm2-135m/kvzap-mlp.safetensors") and threshold["enforce_eager"]
    topk = resolve("kvzap-linear-r0.75", "smollm2-135m")["additional_config"]["kvcompress"]
    assert topk["compression_ratio"] == 0.75 and "kvzap_threshold" not in topk
    assert resolve("headkv-r0.5", "smollm2-135m")["additional_config"]["kvcompress"]["head_scores"].endswith(".json")
    with pytest.raises(FileNotFoundError, match="no shipped KVzap predictors for qwen2.5-coder-1.5b"):
        resolve("kvzap-mlp-t-4", "qwen2.5-coder-1.5b")


def test_removed_fraction_from_the_workers_kept_fractions():
    """The kept fractions come from the workers' records (``harness.generate.kept_records``)."""
    assert removed_fraction({"kept_fractions": [0.4, 0.2]}) == pytest.approx(0.7)
    assert removed_fraction({}) is None


def test_sweep_table_pairs_each_threshold_with_its_matched_runs():
    cell = lambda score: {"score": score}  # noqa: E731
    results = {
        "bf16": {"cells": {"niah@2048": cell(1.0), "perplexity@4096": {"score": 3.0, "perplexity": 20.0}}},
        "kvzap-mlp-t-4": {"cells": {"niah@2048": cell(1.0), "perplexity@4096": {"score": 3.0, "perplexity": 20.5}},
                          "kept_fractions": [0.3, 0.3]},
        "knorm-r0.70": {"cells": {"niah@2048": cell(0.0), "perplexity@4096": {"score": 3.5, "perplexity": 33.0}}},
        "headkv-r0.70": {"error": "boom"},
    }
    report = {"date": "d", "command": "c", "model": "m", "kind": "mlp", "hardware": "h", "vllm": "v",
              "kvzap_configs": {"-4": "kvzap-mlp-t-4"}, "compare": ["knorm", "headkv"],
              "matched": {"kvzap-mlp-t-4": {"knorm": "knorm-r0.70", "headkv": "headkv-r0.70"}},
              "accuracy": {"results": results, "kept_cells": ["niah@2048", "perplexity@4096"], "min_baseline": 0.8}}
    (row,) = rows(report)
    assert row["removed"] == pytest.approx(0.7)
    assert row["methods"]["kvzap"]["accuracy"] == 1.0 and row["methods"]["knorm"]["perplexity"] == 33.0
    assert row["methods"]["headkv"]["error"] == "boom"
    text = markdown(report)
    assert "| -4 | 0.700 | 3.33x | 1.00 / 20.500 | 0.00 / 33.000 | error: boom |" in text


def test_dms_sweep_names_its_checkpoints_and_matches_kvzap_topk():
    settings = resolve("dms-cr8", "smollm2-135m")
    assert settings["enforce_eager"] and settings["additional_config"]["kvcompress"]["dms_adapters"].endswith(
        "smollm2-135m/dms-cr8.safetensors")
    with pytest.raises(FileNotFoundError, match="no shipped DMS adapters for smollm2-135m at CR 3"):
        resolve("dms-cr3", "smollm2-135m")
    results = {"bf16": {"cells": {"niah@2048": {"score": 1.0}}},
               "dms-cr4": {"cells": {"niah@2048": {"score": 1.0}}, "kept_fractions": [0.25]},
               "kvzap-linear-r0.75": {"cells": {"niah@2048": {"score": 0.5}}},
               "dms-cr8": {"cells": {"niah@2048": {"score": 0.0}}, "kept_fractions": [0.2]}}
    report = {"date": "d", "command": "c", "model": "m", "kind": "mlp", "hardware": "h", "vllm": "v",
              "primary": "dms", "primary_configs": {"4": "dms-cr4", "8": "dms-cr8"}, "compare": ["kvzap-linear"],
              "matched": {"dms-cr4": {"kvzap-linear": "kvzap-linear-r0.75"},
                          "dms-cr8": {"kvzap-linear": "kvzap-linear-r0.80"}}, "figure": "sweep.png",
              "accuracy": {"results": results, "kept_cells": ["niah@2048"], "min_baseline": 0.8}}
    row, second = rows(report)
    assert row["methods"]["dms"]["accuracy"] == 1.0 and row["methods"]["kvzap-linear"]["accuracy"] == 0.5
    assert second["methods"]["dms"]["accuracy"] == 0.0 and second["methods"]["kvzap-linear"]["error"] == "not run"
    text = markdown(report)
    assert "| trained CR | removed |" in text and "| 4 | 0.750 | 4.00x | 1.00 / nan | 0.50 / nan |" in text
