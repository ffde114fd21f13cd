"""Short soak of `vllm serve` (the long form: `python -m benchmarks.soak`, see README):
mixed streaming traffic with disconnects, give-ups, hostile per-request settings and
requests opting out of eviction, on a pool small enough to queue and preempt. bf16
(vLLM's own attention) and knorm eviction get the same job list."""

import pytest

pytestmark = pytest.mark.engine

SECONDS = 20


def test_short_soak_leaks_nothing_and_shows_the_plugin_metrics(tmp_path, capsys):
    from benchmarks.soak import main

    main(["--config", "bf16", "--config", "knorm-r0.5", "--duration", str(SECONDS), "--out", str(tmp_path)])
    import json

    results = json.loads((tmp_path / "results.json").read_text())["results"]
    bf16, knorm = results["bf16"], results["knorm-r0.5"]
    for r in (bf16, knorm):
        assert r["problems"] == []  # no failed request, control unchanged, usage back to 0, something served
        assert r["kv_cache_usage_after"] == 0.0
        assert r["by_kind"]["hostile"] >= 1 and r["hostile_400"] == r["by_kind"]["hostile"]
    # The plugin's counters on /metrics: sampled while the load ran, and final totals.
    assert knorm["peak"]["kvcompress:compression_ratio"] > 1.5
    assert knorm["plugin_metrics"]["kvcompress:tokens_evicted_total"] > 0
    assert knorm["plugin_metrics"]["kvcompress:blocks_reclaimed_total"] > 0
    assert "kvcompress:compression_ratio" not in bf16["peak"]  # not selected: the plugin's logger stays out
    with capsys.disabled():
        print("\n" + (tmp_path / "report.md").read_text())
