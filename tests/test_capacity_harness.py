import argparse
import json

import pytest

from benchmarks.capacity import main, parse_config
from vllm_kvcompress.harness.capacity import peak_overlap


def test_peak_overlap():
    assert peak_overlap([]) == 0
    assert peak_overlap([(0, 10), (1, 2), (3, 4)]) == 2
    assert peak_overlap([(0, 1), (1, 2), (2, 3)]) == 1  # back to back: never two at once
    assert peak_overlap([(0, 5)] * 4 + [(6, 7)]) == 4


def test_config_is_one_line():
    assert parse_config('kvc={"attention_backend": "kvcompress"}') == ("kvc", {"attention_backend": "kvcompress"})
    for bad in ("noequals", "x={not json", "x=[1]", "={}"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_config(bad)


@pytest.mark.engine
def test_quick_capacity_run(smollm2_dir, tmp_path):
    report = main(["--quick", "--out", str(tmp_path),
                   "--config", "bf16={}",
                   "--config", 'kvcompress-none={"attention_backend": "kvcompress"}'])
    bf16, kvc = report["results"]["bf16"], report["results"]["kvcompress-none"]
    # SmolLM2-135M: 30 layers x 3 KV heads x (64 + 64) bf16 values = 23,040 bytes per token.
    assert bf16["bytes_per_token"] == kvc["bytes_per_token"] == 23040
    assert kvc["kv_capacity_tokens"] == bf16["kv_capacity_tokens"] > 0 and kvc["capacity_ratio"] == 1.0
    for r in (bf16, kvc):
        c = r["concurrency"]
        fit = c["trials"][str(c["predicted_fit"])]
        assert fit["preemptions"] == 0 and fit["peak_running"] == c["predicted_fit"]
        assert c["max_running_without_preemption"] == c["predicted_fit"]
        assert r["throughput"]["output_tokens"] == 2 * 16 and r["throughput"]["output_tokens_per_s"] > 0
    assert kvc["throughput_ratio"] > 0
    written = json.loads((tmp_path / "capacity.json").read_text())
    assert set(written["results"]) == {"bf16", "kvcompress-none"}
    assert "| kvcompress-none |" in (tmp_path / "capacity.md").read_text()
